"""What `expertswitch router train / eval` do, as functions."""

from __future__ import annotations

import hashlib
from pathlib import Path

from expertswitch.router.data import domain_queries, read_jsonl, style_shift_queries
from expertswitch.router.evaluate import classification_report, latency_report
from expertswitch.router.router import BASE, Router, load_router


def _split(texts, labels, share=0.1):
    """Deterministic hold-out of ~share of a user's examples for threshold calibration."""
    fit, cal = ([], []), ([], [])
    for t, lbl in zip(texts, labels):
        h = hashlib.sha256(t.encode()).digest()[0] / 256
        target = cal if h < share else fit
        target[0].append(t)
        target[1].append(lbl)
    return fit, cal


def train_router(out: str | Path, data: str | Path | None = None, backbone: str = "minilm",
                 base_model=None, target_accuracy: float = 0.98, default: str = BASE,
                 per_domain: int = 600, device: str = "cpu") -> Router:  # fmt: skip
    """Fit on `data` (JSONL) or the zoo's domains, calibrate the fallback threshold on held-out
    examples to `target_accuracy`, save to `out`."""
    if data:
        (fit_t, fit_l), (cal_t, cal_l) = _split(*read_jsonl(data))
    else:
        from expertswitch.zoo.corpora import load_corpora

        corpora = load_corpora()
        fit_t, fit_l = domain_queries(corpora, "train", per_domain, seed=0)
        cal_t, cal_l = domain_queries(corpora, "heldout", per_domain // 4, seed=1)
    router = Router.train(fit_t, fit_l, backbone, base_model, device, default)
    if cal_t:
        router.calibrate(cal_t, cal_l, target_accuracy)
    router.info["data"] = str(data) if data else "zoo domains (train split)"
    router.save(out)
    return router


def evaluate_router(path: str | Path, data: str | Path | None = None, base_model=None,
                    device: str = "cpu", per_domain: int = 200) -> dict:  # fmt: skip
    """Reports per evaluation set: the user's JSONL, or the zoo's held-out and style-shifted
    queries; plus latency."""
    router = load_router(path, base_model=base_model, device=device)
    if data:
        sets = {"data": read_jsonl(data)}
    else:
        from expertswitch.zoo.corpora import load_corpora

        corpora = load_corpora()
        sets = {"heldout": domain_queries(corpora, "heldout", per_domain, seed=0),
                "style_shift": style_shift_queries(corpora, per_domain // 2)}  # fmt: skip
    report = {name: classification_report(router, q, lbl) for name, (q, lbl) in sets.items()}
    first = next(iter(sets.values()))[0]
    report["latency"] = latency_report(router, first)
    report["router"] = {"experts": router.experts, "backbone": router.backbone.identity,
                        "threshold": router.threshold, "default": router.default}  # fmt: skip
    return report


def format_report(report: dict) -> str:
    lines = []
    for name, rep in report.items():
        if name in ("latency", "router"):
            continue
        lines.append(f"{name}: accuracy {rep['accuracy']:.4f}  macro-F1 {rep['macro_f1']:.4f}  "
                     f"fallback {rep['fallback_rate']:.3f}  routed accuracy "
                     f"{rep['routed_accuracy']:.4f}  ({rep['examples']} queries)")  # fmt: skip
        cols = list(next(iter(rep["confusion"].values())))
        lines.append("  truth \\ routed  " + " ".join(f"{c:>9}" for c in cols))
        for truth, row in rep["confusion"].items():
            lines.append(f"  {truth:<15} " + " ".join(f"{row[c]:>9}" for c in cols))
    lat = report["latency"]
    lines.append("latency: " + ", ".join(f"{k} {v}" for k, v in lat.items()))
    return "\n".join(lines)
