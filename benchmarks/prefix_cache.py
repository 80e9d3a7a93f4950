"""Prefix caching: the same streams served with the prefix cache on and off, in one run.

The `tiny` family (base + code/math/prose experts, 2-bit mixed deltas, as the demo compresses
them), one Engine per setting, greedy decoding:
  shared prompt  --requests requests round-robin over the 3 experts and the base, each a
                 --prefix-tokens-token instruction block (the same text for all; real text
                 from the Python standard library's docs) followed by its own held-out task
                 prompt: a system prompt or few-shot header, the case vLLM's automatic prefix
                 caching is for. One batch, all at once; then the same stream again (warm).
  multi-turn     --conversations conversations, one per expert and the base in turn, each
                 --turns turns: a turn's prompt is the previous prompt, its answer and a new
                 question, so all but the new question was computed by the turn before.
Reported per setting: wall seconds, mean time to first token, prompt tokens computed (the rest
came from the cache) and whether every answer equals the cache-off answer. The only peer that
matters here is the same engine without the cache: vLLM's own prefix cache is the design this
follows (hash chain of full blocks, per model), not something we can run beside it here.

    python benchmarks/prefix_cache.py                 # CPU
    python benchmarks/prefix_cache.py --device cuda   # GPU (bf16)
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

DOMAINS = ("code", "math", "prose")


def archives(work: Path):
    from expertswitch.compress import CompressOptions, compress_expert, make_method
    from expertswitch.compress.calibration import CalibOptions
    from expertswitch.zoo.build import build_family

    family = build_family("tiny", log=lambda *_: None)
    opts = CompressOptions(calib=CalibOptions(tokens=2048, seq_len=128), progress=False,
                           quantize_embeddings=True)  # fmt: skip
    return family, {d: compress_expert(family.base, family.experts[d], work / f"{d}.delta",
                                       make_method("mixed", bits=2), opts)
                    for d in DOMAINS}  # fmt: skip


def instruction_block(tok, n_tokens: int) -> list[int]:
    """n_tokens of real prose: the start of the `json` module's documentation."""
    import json

    text = " ".join((json.__doc__ or "").split())
    ids = tok.encode(text)
    while len(ids) < n_tokens:
        ids += ids
    return ids[:n_tokens]


def serve(eng, prompts: list[list[int]], experts: list, max_tokens: int) -> dict:
    """All requests at once, stepped to the end: wall time, mean time to first token, each
    answer's tokens."""
    from expertswitch.engine import SamplingParams

    sp = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    computed0 = eng.blocks.queries - eng.blocks.hits
    t0 = time.perf_counter()
    rids = [eng.add_request(p, e, sp) for p, e in zip(prompts, experts)]
    first: dict[str, float] = {}
    tokens: dict[str, list[int]] = {}
    while eng.has_unfinished():
        for out in eng.step():
            if out.new_token_ids and out.request_id not in first:
                first[out.request_id] = time.perf_counter() - t0
            tokens[out.request_id] = out.token_ids
    seconds = time.perf_counter() - t0
    computed = eng.blocks.queries - eng.blocks.hits - computed0
    if not eng.blocks.prefix_caching:
        computed = sum(map(len, prompts))
    return {"seconds": seconds, "ttft_mean_s": sum(first.values()) / len(first),
            "prompt_tokens": sum(map(len, prompts)), "prompt_tokens_computed": computed,
            "answers": [tokens[r] for r in rids]}  # fmt: skip


def shared_prompt(eng, family, args) -> dict:
    from expertswitch.eval.tasks import task_items
    from expertswitch.zoo.corpora import load_corpora

    corpora = load_corpora(family.manifest["seed"])
    items = {d: task_items(d, corpora, args.requests) for d in DOMAINS}
    head = instruction_block(eng.tokenizer, args.prefix_tokens)
    targets = [*DOMAINS, None]
    experts = [targets[i % 4] for i in range(args.requests)]
    prompts = [head + eng.tokenizer.encode(items[e or DOMAINS[i % 3]][i // 4].prompt)
               for i, e in enumerate(experts)]  # fmt: skip
    cold = serve(eng, prompts, experts, args.max_tokens)
    warm = serve(eng, prompts, experts, args.max_tokens)
    return {"cold": cold, "warm": warm}


def multi_turn(eng, family, args) -> dict:
    from expertswitch.eval.tasks import task_items
    from expertswitch.zoo.corpora import load_corpora

    corpora = load_corpora(family.manifest["seed"])
    targets = [*DOMAINS, None]
    experts = [targets[i % 4] for i in range(args.conversations)]
    questions = {d: task_items(d, corpora, args.conversations * args.turns) for d in DOMAINS}
    convs = [[] for _ in experts]
    totals = {"seconds": 0.0, "ttft_mean_s": 0.0, "prompt_tokens": 0,
              "prompt_tokens_computed": 0, "answers": []}  # fmt: skip
    for turn in range(args.turns):
        prompts = []
        for c, e in enumerate(experts):
            q = questions[e or DOMAINS[c % 3]][turn * args.conversations + c].prompt
            convs[c] = convs[c] + eng.tokenizer.encode("\n" + q)
            prompts.append(convs[c])
        r = serve(eng, prompts, experts, args.max_tokens)
        for c, answer in enumerate(r["answers"]):
            convs[c] = convs[c] + answer
        for k in ("seconds", "prompt_tokens", "prompt_tokens_computed"):
            totals[k] += r[k]
        totals["ttft_mean_s"] += r["ttft_mean_s"] / args.turns
        totals["answers"] += r["answers"]
    return totals


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--requests", type=int, default=32)
    p.add_argument("--prefix-tokens", type=int, default=512)
    p.add_argument("--conversations", type=int, default=8)
    p.add_argument("--turns", type=int, default=4)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    from expertswitch.engine import Engine

    dtype = torch.float32 if args.device == "cpu" else torch.bfloat16
    rows: dict[str, dict] = {}  # stream → {"off": result, "on": result}
    with tempfile.TemporaryDirectory() as tmp:
        family, deltas = archives(Path(tmp))
        for key in ("off", "on"):
            for scenario in (shared_prompt, multi_turn):
                eng = Engine(family.base, deltas, device=args.device, dtype=dtype,
                             max_num_seqs=args.requests,
                             enable_prefix_caching=key == "on")  # fmt: skip
                eng.generate([list(range(5, 40))] * 4, [*DOMAINS, None])  # warm-up
                eng.reset_prefix_cache()
                got = scenario(eng, family, args)
                eng.close()
                if scenario is shared_prompt:
                    rows.setdefault("shared prompt, first pass", {})[key] = got["cold"]
                    rows.setdefault("shared prompt, again", {})[key] = got["warm"]
                else:
                    rows.setdefault("multi-turn", {})[key] = got
    md = ["| stream | prefix cache | seconds | mean TTFT (s) | prompt tokens computed "
          "| answers equal to off's | speed-up |", "|---|---|---|---|---|---|---|"]  # fmt: skip
    for name, by in rows.items():
        off_answers = by["off"].pop("answers")
        on_answers = by["on"].pop("answers")
        same = sum(a == b for a, b in zip(on_answers, off_answers))
        by["on"]["identical_answers"] = f"{same} of {len(off_answers)}"
        for key in ("off", "on"):
            r = by[key]
            md.append(f"| {name} | {key} | {r['seconds']:.2f} | {r['ttft_mean_s']:.3f} | "
                      f"{r['prompt_tokens_computed']} of {r['prompt_tokens']} | "
                      f"{r.get('identical_answers', '-')} | "
                      f"{by['off']['seconds'] / r['seconds']:.2f}× |")  # fmt: skip
    info = run_info(args.device)
    title = f"# Prefix caching — {info['device']}, {info['date']}, {info['commit']}\n"
    write_results(f"prefix-cache-{'cpu' if args.device == 'cpu' else 'gpu'}",
                  {**info, "args": {k: v for k, v in vars(args).items() if k != "out"},
                   "streams": rows},
                  title + "\n" + "\n".join(md), args.out)  # fmt: skip
    print(title + "\n" + "\n".join(md))


if __name__ == "__main__":
    main()
