"""The step's sampler: batched (engine/sampler.py) against the per-row loop it replaced.

  per row   one request at a time: temperature, min_p, top-k, top-p on its row, then
            torch.multinomial with its generator (a host synchronisation per request on a GPU)
  batched   all rows at once: one softmax, top-k by a threshold, top-p over the 1024 most
            likely tokens (a full sort only for rows whose prefix runs past them), one
            cumulative sum and one uniform number per request

Logits [B, 32000] fp32: "flat" (randn: top-p's prefix runs past 1024 candidates, the batched
path's worst case) and "peaked" (randn · 4, nearer an LM's). "penalties": repetition 1.1,
presence 0.5, frequency 0.3 and a logit_bias on requests with 256-token prompts and 64 tokens
generated (per row: adjust_logits one request at a time, as before; batched: adjust_rows).
Milliseconds per step, median of --iters runs.

    python benchmarks/sampler.py                 # CPU
    python benchmarks/sampler.py --device cuda   # GPU
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import run_info, write_results  # noqa: E402

from expertswitch.engine.request import Request  # noqa: E402
from expertswitch.engine.sampler import adjust_logits, sample  # noqa: E402
from expertswitch.engine.sampling import SamplingParams  # noqa: E402


def per_row(logits: torch.Tensor, reqs: list[Request]) -> list[int]:
    """The engine's sampler before it was batched (greedy rows by one argmax)."""
    out = logits.argmax(dim=-1).tolist()
    nan = torch.isnan(logits).any(dim=-1).tolist()  # its NaN check
    for i, r in enumerate(reqs):
        sp = r.sampling
        if nan[i]:
            continue
        row = logits[i]
        if sp.adjusts_logits:
            row = row.clone()
            adjust_logits(row, r, frozenset())
            if sp.greedy:
                out[i] = int(row.argmax())
        if sp.greedy:
            continue
        row = row / sp.temperature
        if sp.min_p > 0:
            probs = torch.softmax(row, dim=-1)
            row = row.masked_fill(probs < sp.min_p * probs.max(), float("-inf"))
        if 0 < sp.top_k < row.numel():
            row = row.masked_fill(row < torch.topk(row, sp.top_k).values[-1], float("-inf"))
        probs = torch.softmax(row, dim=-1)
        if sp.top_p < 1.0:
            sorted_p, order = torch.sort(probs, descending=True)
            sorted_p[torch.cumsum(sorted_p, 0) - sorted_p >= sp.top_p] = 0.0
            probs = torch.zeros_like(probs).scatter_(0, order, sorted_p)
        out[i] = int(torch.multinomial(probs.cpu(), 1, generator=r.generator))
    return out


def timed(fn, logits, reqs, device: str, iters: int) -> float:
    fn(logits, reqs)
    times = []
    for _ in range(iters):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn(logits, reqs)  # both end in host values: the tokens
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--batches", type=int, nargs="+", default=[8, 32, 64])
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    cases = {
        "T=0.8, top_p=0.95": {"temperature": 0.8, "top_p": 0.95},
        "T=0.7, top_k=50": {"temperature": 0.7, "top_k": 50},
        "T=1": {"temperature": 1.0},
        "greedy": {"temperature": 0.0},
        "penalties": {
            "temperature": 0.8,
            "repetition_penalty": 1.1,
            "presence_penalty": 0.5,
            "frequency_penalty": 0.3,
            "logit_bias": {7: 2.0, 11: -100.0},
        },
    }
    g = torch.Generator().manual_seed(0)
    rows, md = [], ["| batch | logits | sampling | per row (ms) | batched (ms) | speed-up |",
                    "|---|---|---|---|---|---|"]  # fmt: skip
    for b in args.batches:
        base = torch.randn(b, args.vocab, generator=g)
        for shape, logits in (("flat", base), ("peaked", base * 4)):
            logits = logits.to(args.device)
            for name, sp in cases.items():
                if shape == "flat" and name != "T=0.8, top_p=0.95":
                    continue  # only top-p's cost depends on the shape
                gens = [torch.Generator().manual_seed(i) for i in range(b)]
                reqs = [Request("r", [1], None, SamplingParams(**sp), generator=g) for g in gens]
                if name == "penalties":
                    for r in reqs:
                        ids = torch.randint(args.vocab, (320,), generator=g).tolist()
                        r.prompt_token_ids, r.output_token_ids = ids[:256], ids[256:]
                old = timed(per_row, logits, reqs, args.device, args.iters)
                new = timed(sample, logits, reqs, args.device, args.iters)
                rows.append({"batch": b, "logits": shape, "sampling": name, "per_row_ms": old,
                             "batched_ms": new, "speedup": old / new})  # fmt: skip
                md.append(f"| {b} | {shape} | {name} | {old:.2f} | {new:.2f} | "
                          f"{old / new:.2f}× |")  # fmt: skip
    info = run_info(args.device)
    title = f"# Sampler — {info['device']}, {info['date']}, {info['commit']}\n"
    stem = f"sampler-{'cpu' if args.device == 'cpu' else 'gpu'}"
    write_results(stem, {**info, "vocab": args.vocab, "rows": rows}, title + "\n" + "\n".join(md),
                  args.out)  # fmt: skip
    print(title + "\n" + "\n".join(md))


if __name__ == "__main__":
    main()
