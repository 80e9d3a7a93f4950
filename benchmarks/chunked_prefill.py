"""Chunked prefill: what long prompts arriving mid-generation cost the requests already
answering, with chunked prefill off and on (two step budgets), in one run.

The `tiny` family (base + code/math/prose experts as 2-bit mixed deltas, prefix_cache.py's
set-up). --requests short requests over the 3 experts and the base decode --max-tokens tokens
each; after --after steps, --long prompts of --long-tokens tokens (real prose) arrive. Reported:
the short requests' inter-token gaps (p50, p99, max: a stall shows as a long gap), the long
prompts' time to first token, and the wall time of the whole stream. The prefix cache is off,
so every long prompt is computed in full.

    python benchmarks/chunked_prefill.py                 # CPU
    python benchmarks/chunked_prefill.py --device cuda   # GPU (bf16)
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import run_info, write_results  # noqa: E402
from prefix_cache import DOMAINS, archives, instruction_block  # noqa: E402


def run(eng, args, shorts: list[list[int]], longs: list[list[int]]) -> dict:
    from expertswitch.engine import SamplingParams

    models = [*DOMAINS, None]
    sp = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=True)
    t0 = time.perf_counter()
    short_ids = [eng.add_request(p, models[i % 4], sp) for i, p in enumerate(shorts)]
    last: dict[str, float] = {}
    gaps: list[float] = []
    first: dict[str, float] = {}
    long_ids: list[str] = []
    step = 0
    while eng.has_unfinished():
        if step == args.after:
            arrived = time.perf_counter()
            long_ids = [eng.add_request(p, models[i % 4], sp) for i, p in enumerate(longs)]
        outs = eng.step()
        now = time.perf_counter()
        for o in outs:
            if o.request_id in short_ids and o.new_token_ids:
                if o.request_id in last:
                    gaps.append(now - last[o.request_id])
                last[o.request_id] = now
            elif o.request_id in long_ids and o.new_token_ids and o.request_id not in first:
                first[o.request_id] = now - arrived
        step += 1
    gaps.sort()

    def pct(q: float) -> float:
        return gaps[min(len(gaps) - 1, int(q * len(gaps)))] * 1e3

    return {"seconds": time.perf_counter() - t0, "itl_p50_ms": pct(0.5),
            "itl_p99_ms": pct(0.99), "itl_max_ms": gaps[-1] * 1e3,
            "long_ttft_s": sum(first.values()) / len(first)}  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--requests", type=int, default=16)
    p.add_argument("--max-tokens", type=int, default=48)
    p.add_argument("--after", type=int, default=8)
    p.add_argument("--long", type=int, default=2)
    p.add_argument("--long-tokens", type=int, default=1500)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    from expertswitch.engine import Engine
    from expertswitch.eval.tasks import task_items
    from expertswitch.zoo.corpora import load_corpora

    dtype = torch.float32 if args.device == "cpu" else torch.bfloat16
    settings = {"off (whole prompts, all-prefill steps)": {"enable_chunked_prefill": False},
                "on, budget 4096": {"max_num_batched_tokens": 4096},
                "on, budget 512": {"max_num_batched_tokens": 512}}  # fmt: skip
    rows: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        family, deltas = archives(Path(tmp))
        corpora = load_corpora(family.manifest["seed"])
        items = {d: task_items(d, corpora, args.requests) for d in DOMAINS}
        for name, opts in settings.items():
            eng = Engine(family.base, deltas, device=args.device, dtype=dtype,
                         enable_prefix_caching=False, **opts)  # fmt: skip
            tok = eng.tokenizer
            shorts = [tok.encode(items[DOMAINS[i % 3]][i].prompt) for i in range(args.requests)]
            head = instruction_block(tok, args.long_tokens + args.long)
            longs = [head[i : i + args.long_tokens] for i in range(args.long)]  # all different
            eng.generate([list(range(5, 40))] * 4, [*DOMAINS, None])  # warm-up
            rows[name] = run(eng, args, shorts, longs)
            eng.close()
    md = ["| chunked prefill | short requests' inter-token gap p50 / p99 / max (ms) "
          "| long prompts' TTFT (s) | stream (s) |", "|---|---|---|---|"]  # fmt: skip
    for name, r in rows.items():
        itl = f"{r['itl_p50_ms']:.1f} / {r['itl_p99_ms']:.1f} / {r['itl_max_ms']:.1f}"
        md.append(f"| {name} | {itl} | {r['long_ttft_s']:.2f} | {r['seconds']:.2f} |")
    info = run_info(args.device)
    title = f"# Chunked prefill — {info['device']}, {info['date']}, {info['commit']}\n"
    write_results(f"chunked-prefill-{'cpu' if args.device == 'cpu' else 'gpu'}",
                  {**info, "args": {k: v for k, v in vars(args).items() if k != "out"},
                   "settings": rows}, title + "\n" + "\n".join(md), args.out)  # fmt: skip
    print(title + "\n" + "\n".join(md))


if __name__ == "__main__":
    main()
