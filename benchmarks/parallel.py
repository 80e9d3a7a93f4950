"""Expert parallelism: all-to-all bytes per token, measured against the analytic count, and the
scaling model of docs/parallel.md (expected step time vs number of GPUs for DeepSpeed-MoE
1.3B+MoE-128, with and without the hierarchical all-to-all).

    python benchmarks/parallel.py                  # gloo on this machine: 2 and 4 ranks
    python benchmarks/parallel.py --nproc 2        # fewer ranks
    python benchmarks/parallel.py --measure-layers cuda   # on the GPU: measured compute per
                                                   # layer replaces the FLOP-rate assumption

Each rank runs a dropless MoE layer (stacked SwiGLU experts, ep = world) on its own tokens and
counts what it hands to all-to-all (parallel/dispatch.TRAFFIC): every byte, and the bytes bound
for other ranks. The analytic count for the routes it actually had:

    bytes = R_out·(H·elt + 8) + R_in·H·elt + 8·(ep − 1)
    R_out: this rank's routes to experts on other ranks (a row and an int64 expert id each);
    R_in: other ranks' routes to this rank's experts (their rows go back); the route counts.
    Averaged over ranks, with a uniform router: k·(2·H·elt + 8)·(ep − 1)/ep per token.

Serving (every rank holds the same batch: the engine's lockstep under expert or tensor
parallelism): the layer's infer() with every rank sending its whole batch, against
infer(replicated=True), where each rank routes its 1/ep share and the outputs are all-gathered
(DeepSpeed-MoE's parallelism-coordinated all-to-all): all-to-all bytes summed over the ranks,
all-gather bytes, and ms per layer.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import run_info, write_results  # noqa: E402

H, F, E, T = 256, 512, 16, 512
ELT = 4  # fp32 on the CPU


def worker(out_path: str) -> None:
    import torch.distributed as dist

    from expertswitch.moe import MoE
    from expertswitch.parallel.dispatch import TRAFFIC, reset_traffic

    dist.init_process_group("gloo")
    world, rank = dist.get_world_size(), dist.get_rank()
    rows = []
    configs = [(1, 0), (2, 0)] + ([(2, world // 2)] if world >= 4 else [])
    for k, ppn in configs:  # ppn > 0: the hierarchical all-to-all, "nodes" of ppn ranks
        torch.manual_seed(0)
        layer = MoE.stacked(
            H,
            F,
            E,
            k=k,
            ep_size=world,
            drop_tokens=False,
            hierarchical_all_to_all=ppn > 0,
            ranks_per_node=ppn or None,
        )
        layer.eval()
        x = torch.randn(T, H, generator=torch.Generator().manual_seed(rank))
        with torch.no_grad():
            layer(x)  # warm-up
            reset_traffic()
            dist.barrier()
            t0 = time.perf_counter()
            reps = 5
            for _ in range(reps):
                layer(x)
            dist.barrier()
            ms = (time.perf_counter() - t0) / reps * 1e3
            idx, _ = layer.gate.route(x)
        owner = torch.div(idx, E // world, rounding_mode="floor")
        remote = float((owner != rank).float().mean())
        per_call = {key: TRAFFIC[key] / reps for key in ("bytes", "remote_bytes", "messages")}
        # rows out: this rank's remote routes (row + id); rows back: other ranks' routes to
        # this rank's experts (row); the counts: one int64 per other rank
        sent = torch.bincount(owner.reshape(-1), minlength=world)
        table = [torch.zeros_like(sent) for _ in range(world)]
        dist.all_gather(table, sent)
        received = sum(int(table[r][rank]) for r in range(world) if r != rank)
        analytic = ((T * k * remote) * (H * ELT + 8) + received * H * ELT
                    + 8 * (world - 1)) / T  # fmt: skip
        if ppn:  # rows cross up to two links; the count is the flat one's plus the relay hop
            analytic = float("nan")
        uniform = k * (2 * H * ELT + 8) * (world - 1) / world
        rows.append({"k": k, "ep": world, "rank": rank, "ms_per_layer": ms,
                     "all_to_all": f"hierarchical, {ppn} ranks/node" if ppn else "flat",
                     "messages_per_layer": per_call["messages"],
                     "remote_share": remote, "bytes_per_token": per_call["bytes"] / T,
                     "remote_bytes_per_token": per_call["remote_bytes"] / T,
                     "analytic_remote_bytes_per_token": analytic,
                     "uniform_router_bytes_per_token": uniform})  # fmt: skip
    rows += _serving(world, rank)
    gathered = [None] * world
    dist.all_gather_object(gathered, rows)
    if rank == 0:
        Path(out_path).write_text(json.dumps([r for g in gathered for r in g]))
    dist.destroy_process_group()


def _serving(world: int, rank: int) -> list[dict]:
    """One layer on a batch every rank holds: whole batch from every rank vs. share routing."""
    import torch.distributed as dist

    from expertswitch.moe import MoE
    from expertswitch.parallel.dispatch import TRAFFIC, reset_traffic

    out = []
    for k in (1, 2):
        torch.manual_seed(0)
        layer = MoE.stacked(H, F, E, k=k, ep_size=world, drop_tokens=False).eval()
        x = torch.randn(T, H, generator=torch.Generator().manual_seed(99))  # the same batch
        for replicated in (False, True):
            with torch.no_grad():
                layer.infer(x, replicated)  # warm-up
                reset_traffic()
                dist.barrier()
                t0 = time.perf_counter()
                reps = 5
                for _ in range(reps):
                    layer.infer(x, replicated)
                dist.barrier()
                ms = (time.perf_counter() - t0) / reps * 1e3
            gather = T * H * ELT * (world - 1) / world if replicated else 0.0  # sent per rank
            out.append({"serving": True, "k": k, "ep": world, "rank": rank,
                        "routing": "share + all-gather" if replicated else "whole batch",
                        "a2a_bytes": TRAFFIC["bytes"] / reps, "gather_bytes": gather,
                        "ms_per_layer": ms})  # fmt: skip
    return out


# ---- the scaling model ----------------------------------------------------------------------

MODEL = {  # DeepSpeed-MoE 1.3B+MoE-128 (REFERENCES.md): GPT-3 1.3B shape, MoE every other layer
    "name": "1.3B+MoE-128",
    "layers": 24,
    "moe_layers": 12,
    "hidden": 2048,
    "ffn": 8192,
    "experts": 128,
    "k": 1,
    "seq": 2048,
    "tokens_per_gpu": 8 * 2048,  # micro-batch of 8 sequences per GPU (weak scaling)
    "elt": 2,  # bf16
}
ASSUME = {
    "bf16_flops": 754e12,  # CEILINGS.md, H100 8192³ matmul (H200: 770-800)
    "mfu": 0.45,  # share of it a training step's matmuls reach
    "nvlink_bytes_s": 300e9,  # all-to-all algorithm bandwidth inside an 8-GPU NVLink node
    "ib_bytes_s": 45e9,  # per GPU across nodes: one 400 Gb/s NIC per GPU, ~90% achieved
    "alpha_intra_s": 3e-6,  # per message
    "alpha_inter_s": 12e-6,
    "gpus_per_node": 8,
}


def measure_layers(device: str, small: bool) -> dict:
    """Seconds of one training step's layers on this device (fwd + bwd, bf16 on a GPU): a
    dense transformer layer (attention + MLP) and a MoE layer's local work at ep = 8 (16 of
    the 128 experts, every token of the GPU's micro-batch routed to them, top-1) — what
    replaces the FLOP-rate assumption in the scaling model."""
    from expertswitch.moe import MoE

    m = dict(MODEL)
    if small:  # a smoke run of the script on a CPU
        m.update(hidden=128, ffn=512, seq=128, tokens_per_gpu=256, experts=16)
    h, f, seq = m["hidden"], m["ffn"], m["seq"]
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    tokens = m["tokens_per_gpu"]
    attn = torch.nn.MultiheadAttention(h, max(1, h // 128), batch_first=True, device=device,
                                       dtype=dtype)  # fmt: skip
    mlp = torch.nn.Sequential(torch.nn.Linear(h, f), torch.nn.GELU(), torch.nn.Linear(f, h))
    mlp = mlp.to(device, dtype)
    moe = MoE.stacked(h, f, max(1, m["experts"] // 8), k=1, drop_tokens=False, dtype=dtype,
                      device=device)  # fmt: skip
    x = torch.randn(tokens // seq, seq, h, device=device, dtype=dtype, requires_grad=True)
    mask = torch.nn.Transformer.generate_square_subsequent_mask(seq, device=device, dtype=dtype)

    def dense():
        y = attn(x, x, x, attn_mask=mask, need_weights=False)[0]
        (mlp(y).float().square().mean()).backward()

    def expert():
        y, aux, _ = moe(x.reshape(-1, h))
        (y.float().square().mean() + aux).backward()

    out = {}
    for name, fn in (("dense_layer_s", dense), ("moe_local_s", expert)):
        fn()  # warm-up (and Triton compiles)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        reps = 3 if small else 10
        for _ in range(reps):
            fn()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        out[name] = (time.perf_counter() - t0) / reps
    out["step_compute_s"] = (m["layers"] * out["dense_layer_s"]
                             + m["moe_layers"] * out["moe_local_s"])  # fmt: skip
    out["shape"] = {k: m[k] for k in ("hidden", "ffn", "seq", "tokens_per_gpu", "experts")}
    return out


def step_model(gpus: int, hierarchical: bool, m=MODEL, a=ASSUME, compute_s=None) -> dict:
    """Seconds per training step on `gpus` GPUs (ep = min(gpus, experts), data parallel
    beyond): compute + MoE all-to-all (4 exchanges per MoE layer: 2 forward, 2 backward), no
    overlap between them (a bound a pipelined implementation improves on). compute_s: the
    measured per-step compute (measure_layers), else the FLOP-rate assumption."""
    h, tok = m["hidden"], m["tokens_per_gpu"]
    flops_per_token = 6 * m["layers"] * (12 * h * h + 2 * m["seq"] * h)  # fwd + bwd
    compute = compute_s or flops_per_token * tok / (a["bf16_flops"] * a["mfu"])
    ep = min(gpus, m["experts"])
    per_exchange = tok * m["k"] * h * m["elt"]  # bytes one GPU sends in one exchange
    node = min(a["gpus_per_node"], ep)
    nodes = max(1, ep // node)
    intra_share = (node - 1) / ep  # of a GPU's routes: other GPUs of its node
    inter_share = (ep - node) / ep  # other nodes
    exchanges = 4 * m["moe_layers"]
    if not hierarchical:
        t = (per_exchange * intra_share / a["nvlink_bytes_s"]
             + per_exchange * inter_share / a["ib_bytes_s"]
             + (node - 1) * a["alpha_intra_s"] + (ep - node) * a["alpha_inter_s"])  # fmt: skip
    else:  # gather by destination node inside the node, then one message per other node
        t = (per_exchange * (node - 1) / node / a["nvlink_bytes_s"]
             + per_exchange * inter_share / a["ib_bytes_s"]
             + (node - 1) * a["alpha_intra_s"] + (nodes - 1) * a["alpha_inter_s"])  # fmt: skip
    a2a = exchanges * t
    return {"gpus": gpus, "ep": ep, "compute_s": compute, "all_to_all_s": a2a,
            "step_s": compute + a2a, "a2a_share": a2a / (compute + a2a),
            "tokens_per_s": tok * gpus / (compute + a2a)}  # fmt: skip


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--nproc", type=int, nargs="+", default=[2, 4])
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--measure-layers", metavar="DEVICE",
                    help="time one dense and one MoE layer (fwd+bwd) of the model on DEVICE "
                         "(cuda on the GPU) and use them in the scaling model")  # fmt: skip
    ap.add_argument("--small", action="store_true", help="with --measure-layers on a CPU")
    args = ap.parse_args(argv)
    if args.worker:
        return worker(args.worker)
    layers = measure_layers(args.measure_layers, args.small) if args.measure_layers else None
    if layers:
        print(json.dumps(layers))
    measured = []
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("TRITON_INTERPRET", None)
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.nproc:
            out = Path(tmp) / f"{n}.json"
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                   f"--nproc-per-node={n}", __file__, "--worker", str(out)]  # fmt: skip
            run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
            if run.returncode or not out.exists():
                sys.exit(f"{n} ranks failed:\n{run.stderr[-3000:]}")
            measured += json.loads(out.read_text())
    serving = [r for r in measured if r.get("serving")]
    measured = [r for r in measured if not r.get("serving")]
    lines = ["## All-to-all bytes per token (forward), measured vs analytic", "",
             "| all-to-all | ep | k | rank | remote share | bytes/token handed to all-to-all | "
             "to other ranks | analytic (its routes) | analytic (uniform router) | messages to "
             "other ranks / layer | ms/layer (gloo, CPU) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in measured:
        lines.append(f"| {r['all_to_all']} | {r['ep']} | {r['k']} | {r['rank']} | "
                     f"{r['remote_share']:.3f} | "
                     f"{r['bytes_per_token']:.1f} | {r['remote_bytes_per_token']:.1f} | "
                     f"{r['analytic_remote_bytes_per_token']:.1f} | "
                     f"{r['uniform_router_bytes_per_token']:.1f} | "
                     f"{r['messages_per_layer']:.0f} | {r['ms_per_layer']:.2f} |")  # fmt: skip
    worst = max(abs(r["remote_bytes_per_token"] / r["analytic_remote_bytes_per_token"] - 1)
                for r in measured if r["all_to_all"] == "flat")  # fmt: skip
    lines += [
        "",
        f"Largest deviation of the measured remote bytes from the analytic count: {worst:.2e}.",
        "",
        f"## Serving: one MoE layer on a batch of {T} tokens every rank holds",
        "",
        "| ep | k | routing | all-to-all bytes (all ranks) | all-gather "
        "bytes (all ranks) | ms/layer (slowest rank, gloo, CPU) |",
        "|---|---|---|---|---|---|",
    ]
    summary = []
    for ep in sorted({r["ep"] for r in serving}):
        for k in (1, 2):
            for routing in ("whole batch", "share + all-gather"):
                rs = [r for r in serving if (r["ep"], r["k"], r["routing"]) == (ep, k, routing)]
                row = {"ep": ep, "k": k, "routing": routing,
                       "a2a_bytes": sum(r["a2a_bytes"] for r in rs),
                       "gather_bytes": sum(r["gather_bytes"] for r in rs),
                       "ms_per_layer": max(r["ms_per_layer"] for r in rs)}  # fmt: skip
                summary.append(row)
                lines.append(
                    f"| {ep} | {k} | {routing} | {row['a2a_bytes']:.3g} | "
                    f"{row['gather_bytes']:.3g} | {row['ms_per_layer']:.2f} |"
                )
    lines += ["", f"## Scaling model: {MODEL['name']}, weak scaling, "
              f"{MODEL['tokens_per_gpu']} tokens per GPU per step", "",
              "| GPUs | ep | compute s | all-to-all s (flat) | step s (flat) | a2a share | "
              "all-to-all s (hierarchical) | step s (hier.) | a2a share | tokens/s (hier.) |",
              "|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    model = []
    compute_s = layers["step_compute_s"] if layers and not args.small else None
    for g in (1, 8, 16, 32, 64, 128, 256):
        flat, hier = (
            step_model(g, False, compute_s=compute_s),
            step_model(g, True, compute_s=compute_s),
        )
        model.append({"flat": flat, "hierarchical": hier})
        lines.append(f"| {g} | {flat['ep']} | {flat['compute_s']:.3f} | "
                     f"{flat['all_to_all_s']:.3f} | {flat['step_s']:.3f} | "
                     f"{flat['a2a_share']:.0%} | {hier['all_to_all_s']:.3f} | "
                     f"{hier['step_s']:.3f} | {hier['a2a_share']:.0%} | "
                     f"{hier['tokens_per_s']:.3g} |")  # fmt: skip
    lines += ["", "Assumptions: " + ", ".join(f"{k}={v:g}" for k, v in ASSUME.items())]
    if compute_s:
        lines += [f"Compute per step measured on {args.measure_layers}: {compute_s:.3f} s "
                  f"(dense layer {layers['dense_layer_s'] * 1e3:.1f} ms, MoE layer's local "
                  f"work {layers['moe_local_s'] * 1e3:.1f} ms; replaces the FLOP-rate "
                  "assumption)."]  # fmt: skip
    md = "\n".join(lines)
    print(md)
    payload = {**run_info("cpu"), "shape": {"H": H, "F": F, "E": E, "T": T},
               "measured": measured, "model": MODEL, "assumptions": ASSUME,
               "scaling": model, "max_byte_count_deviation": worst, "serving": summary,
               "layers_measured": layers}  # fmt: skip
    on_gpu = bool(args.measure_layers) and args.measure_layers.startswith("cuda")
    print("wrote", write_results("parallel-gpu" if on_gpu else "parallel-cpu", payload, md,
                                 args.out))  # fmt: skip


if __name__ == "__main__":
    main()
