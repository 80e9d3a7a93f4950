"""Router accuracy and latency for the three backbones on the zoo's domains.

Train on queries cut from the train split, calibrate the fallback threshold on held-out
queries (seed 1), evaluate on other held-out queries (seed 0) and on the style-shifted set
(HumanEval prompts, an unseen word-problem template, chat-phrased questions).

    python benchmarks/router.py
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import run_info, write_results  # noqa: E402

from expertswitch.router.workflow import evaluate_router, train_router  # noqa: E402
from expertswitch.zoo.build import build_family  # noqa: E402


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--backbones", nargs="+", default=["minilm", "base", "ngram"])
    ap.add_argument("--preset", default="tiny", help="family whose base is the 'base' backbone")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    base_model = build_family(args.preset).base if "base" in args.backbones else None
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for bb in args.backbones:
            t0 = time.perf_counter()
            router = train_router(Path(tmp) / bb, backbone=bb, base_model=base_model)
            train_s = time.perf_counter() - t0
            rep = evaluate_router(Path(tmp) / bb, base_model=base_model)
            results[bb] = {"train_seconds": round(train_s, 1), "threshold": router.threshold,
                           "identity": router.backbone.identity, **rep}  # fmt: skip
            print(bb, {k: v.get("accuracy", v) for k, v in rep.items() if k != "router"},
                  flush=True)  # fmt: skip
    info = run_info("cpu")
    payload = {**info, "benchmark": "router", "preset_for_base": args.preset, "results": results}
    md = ["# Router: which expert should answer?", "",
          f"{info['device']}, torch {info['torch']}, commit {info['commit']}, {info['date']}. "
          "Accuracy counts fallbacks as misses; latency per query at batch 1 (p50/p99) and "
          "queries/s at batch 64.", "",
          "| backbone | held-out acc | held-out macro-F1 | style-shift acc | style-shift macro-F1 "
          "| fallback (held-out) | p50 ms | p99 ms | batched q/s | train s |",
          "|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for bb, r in results.items():
        h, s, lat = r["heldout"], r["style_shift"], r["latency"]
        md.append(f"| {bb} | {h['accuracy']:.4f} | {h['macro_f1']:.4f} | {s['accuracy']:.4f} | "
                  f"{s['macro_f1']:.4f} | {h['fallback_rate']:.3f} | {lat['batch1_p50_ms']} | "
                  f"{lat['batch1_p99_ms']} | {lat['batch64_queries_per_s']} | "
                  f"{r['train_seconds']} |")  # fmt: skip
    path = write_results("router", payload, "\n".join(md), args.out)
    print("\n".join(md))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
