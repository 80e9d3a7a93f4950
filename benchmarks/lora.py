"""PEFT LoRA adapters served as experts: throughput beside PEFT itself, and the LoRA term's cost.

CPU part (`--part cpu`, the default without a GPU): the `tiny` family's base (with its
tokenizer) and --adapters PEFT LoRA adapters (rank --rank on every projection, random A and B,
written by PEFT's save_pretrained). A stream of --requests requests spread evenly over the
adapters and the base (greedy, EOS ignored), each wanting --max-tokens tokens ("fixed") or a
length drawn from U[16, 2·max_tokens] ("mixed lengths"):
  ours            one Engine: the adapters unmerged over the shared base, continuous batching
                  (the whole stream in one running batch, two matmuls per layer for all its
                  adapters)
  PEFT mixed      PEFT's own mixed-adapter batch (`generate(adapter_names=[...])`): the whole
                  stream in one left-padded batch, run as long as its longest request
  PEFT per adapter  one adapter at a time (`set_adapter`, then its requests in one batch), the
                  way one serves several adapters without mixed batches
  ours, base only the same stream with every request on the base: what the LoRA terms cost us
Goal: ours ≥ PEFT mixed (both batch every adapter together; ours also batches continuously).

GPU part (`--part gpu`): Mistral-7B-shaped random bf16 base, synthetic rank-16 adapters on every
projection, a decode step at batch 32 with 512 cached tokens over 0 (base only), 1, 4, 8 and 16
adapters, eager and replayed from a CUDA graph, as a ratio to the base-only step (goal ≤ 1.15,
the LoRA terms' share), beside one forward per adapter's rows.

    python benchmarks/lora.py                          # CPU part
    python benchmarks/lora.py --part gpu               # on the GPU
    python benchmarks/lora.py --part gpu --small --device cpu   # smoke run of the GPU part
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
from engine import (  # noqa: E402
    MISTRAL,
    SMALL,
    TABLE,
    decode_fixture,
    length_scenarios,
    linear_shapes,
    random_base,
    request_stream,
    time_step,
)

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


# --- CPU: ours vs PEFT -----------------------------------------------------------------------


def make_adapters(base: Path, work: Path, n: int, rank: int) -> dict[str, Path]:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    out = {}
    for i in range(n):
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
        torch.manual_seed(100 + i)
        cfg = LoraConfig(r=rank, lora_alpha=rank, target_modules=TARGETS,
                         init_lora_weights=False)  # fmt: skip
        model = get_peft_model(model, cfg)
        with torch.no_grad():  # a fine-tune's size of change, not init's (B·A ~ the weights)
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.mul_(0.05)
        out[f"lora{i}"] = work / f"lora{i}"
        model.save_pretrained(out[f"lora{i}"])
    return out


def stream_of(family, adapters: list[str], n: int) -> list[tuple[str | None, str]]:
    """Prompts of the family's domains, round robin over the adapters and the base."""
    prompts = [p for _, p in request_stream(family, n)]
    targets = [*adapters, None]
    return [(targets[i % len(targets)], p) for i, p in enumerate(prompts)]


def run_ours(base, adapters, stream, lengths) -> dict:
    from expertswitch.engine import Engine, SamplingParams

    eng = Engine(base, adapters, max_num_seqs=len(stream))
    params = [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True) for n in lengths]
    eng.generate([p for _, p in stream[:4]], [e for e, _ in stream[:4]], params[:4])  # warm-up
    eng.reset_prefix_cache()
    t0 = time.perf_counter()
    outs = eng.generate([p for _, p in stream], [e for e, _ in stream], params)
    seconds = time.perf_counter() - t0
    tokens = sum(len(o.token_ids) for o in outs)
    return {"seconds": seconds, "tokens": tokens, "tok_s": tokens / seconds,
            "ids": [o.token_ids for o in outs]}  # fmt: skip


def _padded(tok, prompts: list[str]):
    enc = [tok(p)["input_ids"] for p in prompts]
    width = max(map(len, enc))
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    ids = torch.tensor([[pad] * (width - len(e)) + e for e in enc])
    mask = torch.tensor([[0] * (width - len(e)) + [1] * len(e) for e in enc])
    return ids, mask, pad


def _generate(model, tok, prompts, lengths, **kw) -> tuple[float, list[list[int]]]:
    ids, mask, pad = _padded(tok, prompts)
    n = max(lengths)
    with torch.inference_mode():
        t0 = time.perf_counter()
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n,
                             min_new_tokens=n, do_sample=False, pad_token_id=pad, **kw)  # fmt: skip
        seconds = time.perf_counter() - t0
    w = ids.shape[1]
    return seconds, [out[j, w : w + lengths[j]].tolist() for j in range(len(prompts))]


def peft_model(base, adapters: dict[str, Path]):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    names = list(adapters)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    model = PeftModel.from_pretrained(model, adapters[names[0]], adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(adapters[name], adapter_name=name)
    tok = AutoTokenizer.from_pretrained(base)
    tok.padding_side = "left"
    return model.eval(), tok


def run_peft_mixed(model, tok, stream, lengths) -> dict:
    names = [e or "__base__" for e, _ in stream]  # PEFT's name for the base alone
    prompts = [p for _, p in stream]
    _generate(model, tok, prompts[:4], [2] * 4, adapter_names=names[:4])  # warm-up
    seconds, ids = _generate(model, tok, prompts, lengths, adapter_names=names)
    tokens = sum(map(len, ids))
    return {"seconds": seconds, "tokens": tokens, "tok_s": tokens / seconds, "ids": ids}


def run_peft_per_adapter(model, tok, stream, lengths) -> dict:
    seconds, tokens, ids = 0.0, 0, {}
    for target in sorted({e for e, _ in stream}, key=str):
        idx = [i for i, (e, _) in enumerate(stream) if e == target]
        prompts, want = [stream[i][1] for i in idx], [lengths[i] for i in idx]
        if target is None:
            with model.disable_adapter():
                s, outs = _generate(model, tok, prompts, want)
        else:
            model.set_adapter(target)
            s, outs = _generate(model, tok, prompts, want)
        seconds += s
        for i, o in zip(idx, outs):
            tokens += len(o)
            ids[i] = o
    return {"seconds": seconds, "tokens": tokens, "tok_s": tokens / seconds,
            "ids": [ids[i] for i in range(len(stream))]}  # fmt: skip


def cpu_part(args) -> tuple[dict, str]:
    from expertswitch.zoo.build import build_family

    scenarios = length_scenarios(args)
    family = build_family("tiny", log=lambda *_: None)
    results, md = {}, list(TABLE)
    with tempfile.TemporaryDirectory() as tmp:
        adapters = make_adapters(family.base, Path(tmp), args.adapters, args.rank)
        stream = stream_of(family, list(adapters), args.requests)
        model, tok = peft_model(family.base, adapters)
        for label, lengths in scenarios.items():
            ours = run_ours(family.base, adapters, stream, lengths)
            base_only = run_ours(family.base, adapters, [(None, p) for _, p in stream], lengths)
            mixed = run_peft_mixed(model, tok, stream, lengths)
            per = run_peft_per_adapter(model, tok, stream, lengths)
            same = sum(a == b for a, b in zip(ours.pop("ids"), mixed.pop("ids")))
            per.pop("ids")
            base_only.pop("ids")
            res = {"lengths": lengths, "ours": ours, "ours_base_only": base_only,
                   "peft_mixed": mixed, "peft_per_adapter": per,
                   "ratio_vs_peft_mixed": ours["tok_s"] / mixed["tok_s"],
                   "ratio_vs_peft_per_adapter": ours["tok_s"] / per["tok_s"],
                   "lora_cost": base_only["tok_s"] / ours["tok_s"],
                   "identical_tokens": same}  # fmt: skip
            results[label] = res
            rows = [("ours: Engine, adapters unmerged, one running batch", ours),
                    ("PEFT, mixed-adapter batch (adapter_names)", mixed),
                    ("PEFT, one adapter at a time", per),
                    ("ours, every request on the base (no LoRA terms)", base_only)]  # fmt: skip
            for name, r in rows:
                md.append(f"| {label} | {name} | {r['tokens']} | {r['seconds']:.2f} | "
                          f"{r['tok_s']:.0f} | {ours['tok_s'] / r['tok_s']:.2f} |")  # fmt: skip
    md.append("")
    for label, r in results.items():
        md.append(f"{label}: ours / PEFT mixed batch {r['ratio_vs_peft_mixed']:.2f}×, / PEFT "
                  f"one adapter at a time {r['ratio_vs_peft_per_adapter']:.2f}×; the LoRA terms "
                  f"cost {r['lora_cost']:.2f}× the base-only stream's time; greedy tokens "
                  f"identical to PEFT's in {r['identical_tokens']} of {args.requests} "
                  "requests.")  # fmt: skip
    md.append(
        f"({args.adapters} adapters of rank {args.rank} on every projection, fp32; "
        "tokens differ where fp32 rounding in another order changes a near-tie.)"
    )
    return {"adapters": args.adapters, "rank": args.rank, "scenarios": results}, "\n".join(md)


# --- GPU: the LoRA terms' share of a decode step ----------------------------------------------


def synthetic_adapter(name: str, cfg: dict, rank: int, seed: int, device, dtype):
    from expertswitch.io.lora import LoraPair
    from expertswitch.models.expert_weights import ExpertWeights

    g = torch.Generator(device=device).manual_seed(seed)
    w = ExpertWeights(name, None)
    for n, (rows, cols) in linear_shapes(cfg).items():
        a = torch.randn(rank, cols, generator=g, device=device, dtype=dtype) * cols**-0.5
        b = torch.randn(rows, rank, generator=g, device=device, dtype=dtype) * 1e-3
        w.lora[n] = LoraPair(a, b)
    return w


def gpu_part(args) -> tuple[dict, str]:
    from expertswitch.models.decoder import Decoder

    device = args.device
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    cfg = SMALL if args.small else MISTRAL
    torch.manual_seed(0)
    model = Decoder.from_tensors(cfg, random_base(cfg, device, dtype), device, dtype)
    n_max = max(args.counts)
    adapters = [synthetic_adapter(f"l{i}", cfg, args.rank, i, device, dtype)
                for i in range(n_max)]  # fmt: skip
    batch, ctx, rows = 32, args.ctx, []
    cuda = device.startswith("cuda")
    for n in [0, *args.counts]:
        active = adapters[:n]
        runner, reqs, table = decode_fixture(model, active, batch, ctx, device)

        def step(subset=None, runner=runner, reqs=reqs, table=table):
            for r in reqs:
                r.num_new = 1
            runner.run(reqs if subset is None else subset, table)
            for r in reqs:
                r.num_cached = ctx

        for _ in range(3):  # (the first steps of a process pay one-time set-up)
            step()
        row = {"adapters": n, "eager_ms": time_step(step, device)}
        row["graphed_ms"] = float("nan")
        if cuda:
            from expertswitch.engine.graphs import STEADY_STEPS

            g_runner, g_reqs, _ = decode_fixture(model, active, batch, ctx, device, graphs=True)

            def g_step(g_runner=g_runner, g_reqs=g_reqs, table=table):
                for r in g_reqs:
                    r.num_new = 1
                g_runner.run(g_reqs, table)
                for r in g_reqs:
                    r.num_cached = ctx

            for _ in range(STEADY_STEPS + 2):
                g_step()
            row["graphed_ms"] = time_step(g_step, device) if g_runner.graphs.captures \
                else float("nan")  # fmt: skip
        groups = [[r for r in reqs if r.expert == a.name] for a in active] or [reqs]
        row["per_adapter_ms"] = time_step(lambda g=groups: [step(s) for s in g], device, iters=3)
        row["bytes"] = sum(a.nbytes() for a in active)
        rows.append(row)
    base = rows[0]
    for r in rows:
        r["ratio"] = r["eager_ms"] / base["eager_ms"]
        r["graphed_ratio"] = r["graphed_ms"] / base["graphed_ms"]
    md = ["| adapters | eager ms | / base only | CUDA graph ms | / base only | one forward per "
          "adapter ms | adapter MB |", "|---|---|---|---|---|---|---|"]  # fmt: skip
    md += [f"| {r['adapters']} | {r['eager_ms']:.2f} | {r['ratio']:.2f} | {r['graphed_ms']:.2f} "
           f"| {r['graphed_ratio']:.2f} | {r['per_adapter_ms']:.2f} | {r['bytes'] / 1e6:.0f} |"
           for r in rows]  # fmt: skip
    md.append(
        f"\nbatch {batch}, {ctx} cached tokens per sequence, rank {args.rank} on every "
        "projection; goal: the graphed step with 16 adapters ≤ 1.15× base only."
    )
    result = {"shape": "small" if args.small else "mistral-7b", "batch": batch, "ctx": ctx,
              "rank": args.rank, "decode": rows}  # fmt: skip
    return result, "\n".join(md)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--part", choices=["cpu", "gpu"], default=None)
    p.add_argument("--device", default=None)
    p.add_argument("--requests", type=int, default=32)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--adapters", type=int, default=3)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--counts", type=int, nargs="+", default=[1, 4, 8, 16])
    p.add_argument("--ctx", type=int, default=512)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--small", action="store_true", help="GPU part on small shapes (smoke run)")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    part = args.part or ("gpu" if torch.cuda.is_available() else "cpu")
    args.device = args.device or ("cuda" if part == "gpu" else "cpu")
    result, md = cpu_part(args) if part == "cpu" else gpu_part(args)
    info = run_info(args.device)
    stem = f"lora-{part}" + ("-small" if part == "gpu" and args.small else "")
    head = f"# LoRA adapters ({part}) — {info['device']}, {info['date']}, {info['commit']}\n\n"
    path = write_results(stem, {**info, **result}, head + md, args.out)
    print(head + md)
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
