"""Quality retained by each compression method on the expert family.

For every expert: the base, the full expert, and the expert rebuilt from its delta compressed
with mixed (ME-Switch) / RTN / BitDelta at 1-3 bits (mixed with and without step-size tuning),
scored on the expert's own domain: held-out perplexity, answer-token accuracy and exact match
of its task, archive size. "kept" is the share of the expert's gain over the base that
survives compression, on log-perplexity (nats/token) and on task token accuracy.

    python benchmarks/quality.py                    # tiny family, CPU (a few minutes)
    python benchmarks/quality.py --preset small     # on the GPU
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import run_info, svg_line_plot, write_results  # noqa: E402

from expertswitch.compress import CompressOptions, compress_expert, make_method  # noqa: E402
from expertswitch.compress import reconstruct as rebuild  # noqa: E402
from expertswitch.compress.calibration import CalibOptions  # noqa: E402
from expertswitch.compress.report import archive_report  # noqa: E402
from expertswitch.demo import margin_kept, nll_kept  # noqa: E402
from expertswitch.eval.tasks import evaluate_checkpoint  # noqa: E402
from expertswitch.io.archive import open_archive  # noqa: E402
from expertswitch.utils.imports import resolve_device  # noqa: E402
from expertswitch.zoo.build import build_family  # noqa: E402
from expertswitch.zoo.corpora import load_corpora  # noqa: E402


def variants(bits_list, tune_steps):
    for bits in bits_list:
        yield f"mixed-{bits}", "mixed", make_method("mixed", bits=bits)
        if tune_steps:
            yield (f"mixed-{bits}+tune", "mixed+tune",
                   make_method("mixed", bits=bits, tune_steps=tune_steps))  # fmt: skip
        yield f"rtn-{bits}", "rtn", make_method("rtn", bits=bits)
    yield "bitdelta", "bitdelta", make_method("bitdelta")


KEPT_FLOOR = -0.5


def make_plot(rows: list[dict], preset: str) -> str:
    """Mean share of gain kept vs bits/param, one line per method; values below KEPT_FLOOR
    (a method that destroys the model) are drawn at the floor so the rest stays readable."""
    series: dict[str, list[tuple[float, float]]] = {}
    for method in ("mixed", "mixed+tune", "rtn", "bitdelta"):
        for label in dict.fromkeys(r["variant"] for r in rows if r["method"] == method):
            sel = [r for r in rows if r["variant"] == label]
            x = sum(r["bits_per_param"] for r in sel) / len(sel)
            y = sum(r["kept_nll"] for r in sel) / len(sel)
            series.setdefault(method, []).append((x, max(KEPT_FLOOR, y)))
    return svg_line_plot(series, f"Share of expert gain kept ('{preset}' family)",
                         "bits per parameter (quantized tensors)",
                         f"gain kept (log-ppl), mean of experts; floor {KEPT_FLOOR}")  # fmt: skip


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--bits", type=int, nargs="+", default=[1, 2, 3])
    ap.add_argument("--tune-steps", type=int, default=100)
    ap.add_argument("--items", type=int, default=100)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--replot", type=Path, default=None, help="redraw the SVG of a results JSON")
    args = ap.parse_args(argv)
    if args.replot:
        import json

        data = json.loads(args.replot.read_text())
        args.replot.with_suffix(".svg").write_text(make_plot(data["rows"], data["preset"]))
        return
    device = resolve_device(args.device)
    start = time.perf_counter()
    family = build_family(args.preset, device=device)
    corpora = load_corpora(family.manifest["seed"])
    base = evaluate_checkpoint(family.base, family.domains, corpora, args.items, device)
    opts = CompressOptions(calib=CalibOptions(tokens=8192, seq_len=256), device=device,
                           progress=False, quantize_embeddings=True)  # fmt: skip
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for d, path in family.experts.items():
            full = evaluate_checkpoint(path, [d], corpora, args.items, device)[d]
            b = base[d]
            rows.append({"expert": d, "variant": "full (bf16)", "method": "full",
                         "bits_per_param": 16.0, "ppl": full.ppl, "token_acc": full.token_acc,
                         "exact": full.score, "kept_nll": 1.0, "kept_acc": 1.0,
                         "base_ppl": b.ppl, "base_token_acc": b.token_acc, "base_exact": b.score,
                         "full_ppl": full.ppl, "full_token_acc": full.token_acc})  # fmt: skip
            for label, family_name, method in variants(args.bits, args.tune_steps):
                ar = compress_expert(family.base, path, Path(tmp) / f"{d}-{label}", method, opts)
                rec = rebuild(family.base, ar, Path(tmp) / f"{d}-{label}-rec", device, False)
                s = evaluate_checkpoint(rec, [d], corpora, args.items, device)[d]
                rep = archive_report(open_archive(ar))
                row = {
                    **rows[-1],
                    "variant": label,
                    "method": family_name,
                    "bits_per_param": rep["bits_per_param_quantized"],
                    "archive_bytes": rep["archive_bytes"],
                    "ratio": rep["ratio_to_fp16"],
                    "ppl": s.ppl,
                    "token_acc": s.token_acc,
                    "exact": s.score,
                    "kept_nll": nll_kept(b.ppl, full.ppl, s.ppl),
                    "kept_acc": margin_kept(b.token_acc, full.token_acc, s.token_acc),
                }
                rows.append(row)
                print(f"{d:<6} {label:<16} {row['bits_per_param']:>6.2f} b/p  ppl {s.ppl:8.2f} "
                      f"(base {b.ppl:.2f}, full {full.ppl:.2f})  kept {row['kept_nll']:.2f}",
                      flush=True)  # fmt: skip
    info = run_info(device)
    payload = {**info, "benchmark": "quality", "preset": args.preset, "items": args.items,
               "family": family.manifest, "base": {d: s.to_dict() for d, s in base.items()},
               "rows": rows, "seconds": round(time.perf_counter() - start, 1)}  # fmt: skip
    md = [f"# Quality retained, '{args.preset}' family", "",
          f"{info['device']}, torch {info['torch']}, commit {info['commit']}, {info['date']}. "
          "Each expert on its own domain; kept = share of the expert's gain over the base that "
          "survives (log-perplexity; task answer-token accuracy). Sizes include quantized "
          "embedding/lm_head deltas.", "",
          "| expert | variant | bits/param | ratio | ppl (base → full) | ppl | kept (ppl) "
          "| task acc (base → full) | task acc | kept (acc) | exact |",
          "|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        kept_acc = "-" if r["kept_acc"] is None else f"{r['kept_acc']:.2f}"
        md.append(f"| {r['expert']} | {r['variant']} | {r['bits_per_param']:.2f} | "
                  f"{r.get('ratio', '-')} | {r['base_ppl']:.2f} → {r['full_ppl']:.2f} | "
                  f"{r['ppl']:.2f} | {r['kept_nll']:.2f} | {r['base_token_acc']:.3f} → "
                  f"{r['full_token_acc']:.3f} | {r['token_acc']:.3f} | {kept_acc} | "
                  f"{r['exact']:.2f} |")  # fmt: skip
    svg = make_plot(rows, args.preset)
    tag = f"quality-{args.preset}-{'gpu' if device.startswith('cuda') else 'cpu'}"
    path = write_results(tag, payload, "\n".join(md), args.out)
    path.with_suffix(".svg").write_text(svg)
    print("\n".join(md))
    print(f"wrote {path} and {path.with_suffix('.svg')}")


if __name__ == "__main__":
    main()
