"""Structured outputs: what holding answers to JSON costs, in one run.

  masks      BPE tokenizers (ByteLevel, digits split, as the zoo's) trained on the zoo's code
             and prose at --vocabs sizes (a size the corpus cannot fill stops short): building
             the vocabulary's tries once, then the banned-token mask of each state met along a
             JSON answer to a schema (an object with a name, integers, a list and a nested
             object): the first time a state is met (the trie walk) and again (memoised),
             against brute force (reading every token's text alone, the obvious way).
  engine     the `tiny` family's base, --requests requests (greedy and sampled halves) for
             --max-tokens tokens: free text, any JSON object, and the schema; tokens/s and how
             many answers closed as JSON that parses (a closed answer leaves the batch, so the
             constrained runs finish with smaller batches: tokens/s understates them).
The peer that matters (vLLM with xgrammar or outlines) cannot run here; the comparison in the
same run is the engine without a constraint and brute-force masking.

    python benchmarks/structured_outputs.py                 # CPU
    python benchmarks/structured_outputs.py --device cuda   # GPU
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import run_info, write_results  # noqa: E402

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 24},
        "year": {"type": "integer"},
        "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 4},
        "owner": {
            "type": "object",
            "properties": {"id": {"type": "integer"}, "admin": {"type": "boolean"}},
            "required": ["id"],
        },  # fmt: skip
    },
    "required": ["name", "year"],
}
ANSWER = ('{"name": "parser for the zoo", "year": 2026, "tags": ["json", "bpe", "trie"], '
          '"owner": {"id": 42, "admin": false}}')  # fmt: skip


def masks(vocabs: list[int]) -> list[dict]:
    from expertswitch.engine import StructuredOutputsParams
    from expertswitch.engine.guided import Grammar, TokenIndex
    from expertswitch.zoo.corpora import load_corpora
    from expertswitch.zoo.tokenizer import train_tokenizer

    corpora = load_corpora(0, scale=0.25)
    texts = [d for name in ("code", "prose") for d in corpora[name].train]
    rows = []
    for size in vocabs:
        tok = train_tokenizer(texts, size)
        t0 = time.perf_counter()
        index = TokenIndex(tok, len(tok))
        build = time.perf_counter() - t0
        spec = StructuredOutputsParams(json=SCHEMA)
        grammar = Grammar.schema(spec.json)  # a fresh memo
        states, state = [], grammar.initial()
        for ch in ANSWER:
            states.append(state)
            state = grammar.step(state, ch)
        distinct = list(dict.fromkeys(states))
        first, again, brute, allowed = [], [], [], []
        for s in distinct:
            t0 = time.perf_counter()
            banned = grammar.banned(index, s)
            first.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            grammar.banned(index, s)
            again.append(time.perf_counter() - t0)
            allowed.append(int((~banned).sum()))
        for s in distinct[:: max(1, len(distinct) // 12)]:  # brute force is slow: a sample
            t0 = time.perf_counter()
            ref = sorted(i for i, t in index.text.items() if grammar.read(s, t) is not None)
            brute.append(time.perf_counter() - t0)
            assert ref == grammar.allowed(index, s)
        rows.append({"vocab": len(tok), "tokens_indexed": len(index.text),
                     "build_s": build, "states": len(states), "distinct_states": len(distinct),
                     "first_ms_mean": 1e3 * statistics.mean(first),
                     "first_ms_max": 1e3 * max(first),
                     "again_us_mean": 1e6 * statistics.mean(again),
                     "brute_ms_mean": 1e3 * statistics.mean(brute),
                     "allowed_mean": statistics.mean(allowed)})  # fmt: skip
        print(f"vocab {len(tok):>6}: index {build:.2f} s; first {rows[-1]['first_ms_mean']:.2f} "
              f"ms (max {rows[-1]['first_ms_max']:.1f}), again {rows[-1]['again_us_mean']:.1f} "
              f"µs, brute force {rows[-1]['brute_ms_mean']:.1f} ms", flush=True)  # fmt: skip
    return rows


def engine(device: str, n: int, max_tokens: int) -> list[dict]:
    from expertswitch.engine import Engine, SamplingParams, StructuredOutputsParams
    from expertswitch.zoo.build import build_family
    from expertswitch.zoo.corpora import load_corpora

    family = build_family("tiny", log=lambda *_: None)
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    eng = Engine(family.base, {}, device=device, dtype=dtype)
    corpora = load_corpora(0, scale=0.05)
    prompts = [d[:200] for d in corpora["prose"].train[:n]]
    modes = {"free": None, "json_object": StructuredOutputsParams(json_object=True),
             "schema": StructuredOutputsParams(json=SCHEMA)}  # fmt: skip
    rows = []
    for name, so in modes.items():
        params = [SamplingParams(temperature=0.0 if i % 2 == 0 else 0.8, seed=i,
                                 max_tokens=max_tokens, structured_outputs=so)
                  for i in range(n)]  # fmt: skip
        eng.generate(prompts[:2], None, params[:2])  # warm (and the vocabulary's trie)
        t0 = time.perf_counter()
        outs = eng.generate(prompts, None, params)
        wall = time.perf_counter() - t0
        tokens = sum(len(o.token_ids) for o in outs)
        parsed = 0
        for o in outs:
            try:
                json.loads(o.text)
                parsed += o.finish_reason == "stop"
            except ValueError:
                pass
        rows.append({"mode": name, "requests": n, "tokens": tokens, "wall_s": wall,
                     "tokens_per_s": tokens / wall, "closed_json": parsed})  # fmt: skip
        print(f"{name:>12}: {tokens} tokens in {wall:.2f} s = {tokens / wall:.0f} tok/s; "
              f"{parsed}/{n} answers closed as JSON", flush=True)  # fmt: skip
    free = rows[0]["tokens_per_s"]
    for r in rows:
        r["vs_free"] = r["tokens_per_s"] / free
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--vocabs", default="2048,8192,32000")
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--out", type=Path, default=None, help="results folder (default: results/)")
    args = ap.parse_args()
    mask_rows = masks([int(v) for v in args.vocabs.split(",")])
    engine_rows = engine(args.device, args.requests, args.max_tokens)
    md = ["# Structured outputs", "", "Allowed tokens per state along a JSON answer "
          f"({len(ANSWER)} characters) to a schema:", "",
          "| vocab | indexed | trie build s | distinct states | first ms (mean / max) | "
          "memoised µs | brute force ms | allowed tokens (mean) |",
          "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in mask_rows:
        md.append(f"| {r['vocab']} | {r['tokens_indexed']} | {r['build_s']:.2f} | "
                  f"{r['distinct_states']} | {r['first_ms_mean']:.2f} / {r['first_ms_max']:.1f} "
                  f"| {r['again_us_mean']:.1f} | {r['brute_ms_mean']:.1f} | "
                  f"{r['allowed_mean']:.0f} |")  # fmt: skip
    md += ["", f"Engine, tiny family base, {args.requests} requests × {args.max_tokens} tokens "
           "(half greedy, half sampled):", "",
           "| mode | tokens | wall s | tokens/s | vs free | closed as JSON |",
           "|---|---|---|---|---|---|"]  # fmt: skip
    for r in engine_rows:
        md.append(f"| {r['mode']} | {r['tokens']} | {r['wall_s']:.2f} | {r['tokens_per_s']:.0f} | "
                  f"{r['vs_free']:.2f}× | {r['closed_json']}/{r['requests']} |")  # fmt: skip
    text = "\n".join(md)
    print(text)
    stem = "structured_outputs" + ("_gpu" if args.device.startswith("cuda") else "")
    write_results(stem, {**run_info(args.device), "masks": mask_rows, "engine": engine_rows},
                  text, args.out)  # fmt: skip


if __name__ == "__main__":
    main()
