"""Tune the fused MoE kernels' launch plans on this GPU; writes kernels/configs/<device>.json.

For each shape and batch size, with routes from a real gate over random tokens, it times every
candidate configuration of each of the two grouped GEMMs on its own (triton.testing.do_bench:
L2 flushed, median), adds the alignment pass to the aligned plans, and keeps the fastest plan.
Candidates are staged so a whole run fits a 10-minute device call: tile shapes first, then
pipeline depth and K-tile around the best. Time-boxed by --budget-s (untuned sizes keep the
heuristic).

    python benchmarks/tune_moe.py --out DIR            # then commit DIR/<device>.json to
                                                       # src/expertswitch/kernels/configs/
    TRITON_INTERPRET=1 python benchmarks/tune_moe.py --device cpu --small --tokens 1 40 \
        --out /tmp/t                                   # smoke run of the script itself
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from moe import SHAPES, SMALL, build_ours  # noqa: E402

from expertswitch.kernels import moe_config  # noqa: E402
from expertswitch.kernels.align import align_block_size_triton  # noqa: E402
from expertswitch.kernels.fused_moe import (  # noqa: E402
    _ACT_CODE,
    _launch,
    buffers,
    fused_moe_reference,
    fused_moe_triton,
)
from expertswitch.kernels.moe_config import GemmConfig, MoEPlan  # noqa: E402

TOKENS = [1, 16, 256, 4096, 4, 64, 1024, 2, 8, 32, 128, 512, 2048]  # benchmark sizes first
SMEM_BYTES = 200 * 1024  # H100: 228 KB per SM, less what Triton keeps for itself
REG_ELEMS_PER_WARP = 32 * 128  # fp32 accumulator elements one warp holds comfortably


def fits(cfg: GemmConfig, n_acc: int, elt: int) -> bool:
    regs = n_acc * cfg.block_m * cfg.block_n / (cfg.num_warps * REG_ELEMS_PER_WARP)
    return cfg.shared_bytes(n_acc, elt) <= SMEM_BYTES and regs <= 1.0


def tile_candidates(by_route: bool, block_m: int | None, rows_per_expert: float,
                    which: str) -> list:  # fmt: skip
    if by_route:
        splits = (1, 2, 4, 8) if which == "down" else (1,)
        return [GemmConfig(block_m, bn, 128, 4, 4, s) for bn in (16, 32, 64, 128) for s in splits]
    bms = [bm for bm in (16, 32, 64, 128) if bm <= max(16, 2 * rows_per_expert)]
    return [GemmConfig(bm, bn, 64, 8 if bm * bn >= 128 * 128 else 4, 3)
            for bm in bms for bn in (32, 64, 128, 256) if bm * bn <= 128 * 256]  # fmt: skip


def refinements(best: GemmConfig, by_route: bool) -> list:
    """Pipeline depth, K tile and warps around the best tile shape (its split kept)."""
    out = []
    for bk in (64, 128, 256):
        for stages in (3, 4):
            for warps in (4, 8):
                out.append(replace(best, block_k=bk, num_stages=stages, num_warps=warps))
    # weight tiles by TMA (frees the registers of address arithmetic: 255 -> 171 on the
    # Mixtral 4096-token up-projection, kernels/check_sm90), at the best warp count; the L2
    # swizzle (GROUP_M row blocks sweep the columns together) where there are row blocks
    same_warps = [c for c in out if c.num_warps == best.num_warps]
    groups = [] if by_route else [replace(best, group_m=g) for g in (4, 8, 16)]
    return out + [replace(c, tma_w=True) for c in same_warps] + groups


class Problem:
    """One shape at one batch size: inputs, routes and the two launches as callables."""

    def __init__(self, layer, tokens: int, dtype, device):
        ex = layer.experts
        self.x = torch.randn(tokens, ex.w_in.shape[2], dtype=dtype, device=device)
        self.idx, self.w = layer.gate.route(self.x)
        self.idx = self.idx.reshape(-1).contiguous()
        self.k = layer.gate.k
        self.n_routes = self.idx.numel()
        self.e, _, self.h = ex.w_in.shape
        self.f = ex.w_out.shape[2]
        self.w_in, self.w_out = ex.w_in, ex.w_out
        self.inter = torch.empty(self.n_routes, self.f, dtype=dtype, device=device)
        self.wts = self.w.reshape(-1).float().contiguous()
        counts = torch.bincount(self.idx, minlength=self.e)
        self.rows_per_expert = float(counts[counts > 0].float().mean())

    def rows(self, by_route: bool, block_m: int):
        if by_route:
            return (self.idx, self.idx)
        return align_block_size_triton(self.idx, self.e, block_m)[:2]

    def gemm(self, which: str, by_route: bool, cfg: GemmConfig):
        rows = self.rows(by_route, cfg.block_m)
        if which == "up":
            args = (self.x, self.w_in, self.inter, rows, self.idx, self.wts, self.f, self.h,
                    self.n_routes, self.k, _ACT_CODE["swiglu"], False, by_route, cfg)  # fmt: skip
            return lambda: _launch(*args[:-1], cfg=args[-1])
        split = MoEPlan(by_route, replace(cfg, split_k=1), cfg).split_for(self.f)
        _, c, _ = buffers(self.x, self.n_routes, self.k, self.h, self.f, split, dropless=True)
        args = (self.inter, self.w_out, c, rows, self.idx, self.wts, self.h, self.f,
                self.n_routes, 1, -1, True, by_route)  # fmt: skip
        return lambda: _launch(*args, cfg=cfg, split=split)

    def error(self, plan: MoEPlan) -> float:
        """Relative error of the whole call under `plan` against the fp32 reference: a fast
        plan that computes something else must never be chosen."""
        out = self.whole(plan)().float()
        idx = self.idx.view(-1, self.k)
        ref = fused_moe_reference(self.x.float(), self.w_in.float(), self.w_out.float(), idx,
                                  self.w, "swiglu")  # fmt: skip
        return float((out - ref).norm() / ref.norm().clamp_min(1e-12))

    def whole(self, plan: MoEPlan):
        """The full fused_moe call under a plan: alignment, both matmuls, the combine."""
        idx = self.idx.view(-1, self.k)
        return lambda: fused_moe_triton(self.x, self.w_in, self.w_out, idx, self.w, "swiglu",
                                        moe_plan=plan, dropless=True)  # fmt: skip


def bench(fn) -> float:
    if not torch.cuda.is_available():  # the smoke run: Triton's interpreter, wall clock
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3
    from triton.testing import do_bench

    return do_bench(fn, warmup=5, rep=25, return_mode="median")


def best_config(prob: Problem, which: str, by_route: bool, elt: int, deadline: float):
    """(ms, GemmConfig) of the fastest candidate; past the deadline only the first one of the
    tile stage is timed, so every size still gets a plan."""
    n_acc = 2 if which == "up" else 1
    block_m = moe_config.by_route_block(prob.n_routes) if by_route else None
    seen: dict = {}
    best = None
    for stage in ("tiles", "refine"):
        if best is None and stage == "refine":
            break
        cands = (tile_candidates(by_route, block_m, prob.rows_per_expert, which)
                 if stage == "tiles" else refinements(best[1], by_route))  # fmt: skip
        for cfg in cands:
            if cfg in seen or not fits(cfg, n_acc, elt):
                continue
            if best is not None and time.time() > deadline:
                break
            try:
                seen[cfg] = bench(prob.gemm(which, by_route, cfg))
            except Exception as e:  # e.g. out of shared memory: skip the candidate
                print(f"    {which} {cfg}: {type(e).__name__}: {str(e)[:120]}", flush=True)
                continue
            if best is None or seen[cfg] < best[0]:
                best = (seen[cfg], cfg)
    return best


def tune_size(layer, tokens, dtype, device, deadline) -> tuple[MoEPlan, float, dict]:
    """Best up and down configurations per path (by route, aligned), each timed alone; then
    the whole call under each path's plan decides."""
    prob = Problem(layer, tokens, dtype, device)
    elt = torch.finfo(dtype).bits // 8
    options = {}
    paths = [True, False] if prob.n_routes <= moe_config.BY_ROUTE_MAX else [False]
    for by_route in paths:
        up = best_config(prob, "up", by_route, elt, deadline)
        down = best_config(prob, "down", by_route, elt, deadline)
        if up is None or down is None:
            continue
        plan = MoEPlan(by_route, up[1], down[1])
        err = prob.error(plan)
        if not err < 2e-2:  # bf16 with fp32 accumulation: ~4e-3 expected
            print(f"    {plan}: relative error {err:.3g} against the reference, rejected")
            continue
        options["by_route" if by_route else "aligned"] = (plan, bench(prob.whole(plan)))
    if "aligned" in options and device != "cpu":  # CUTLASS grouped GEMMs, by measurement
        gmm = replace(options["aligned"][0], grouped_mm=True)
        try:
            if prob.error(gmm) < 2e-2:
                options["grouped_mm"] = (gmm, bench(prob.whole(gmm)))
        except (RuntimeError, NotImplementedError) as e:  # this GPU / dtype has no kernel
            print(f"    torch._grouped_mm: {type(e).__name__}: {str(e)[:120]}", flush=True)
    name, (plan, ms) = min(options.items(), key=lambda kv: kv[1][1])
    return plan, ms, {k: round(v[1], 4) for k, v in options.items()}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--small", action="store_true", help="small shapes (smoke run)")
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES))
    ap.add_argument("--tokens", type=int, nargs="+", default=TOKENS)
    ap.add_argument("--budget-s", type=float, default=240.0)
    ap.add_argument("--out", type=Path, default=moe_config.CONFIG_DIR)
    args = ap.parse_args(argv)
    device = args.device
    if device == "cuda" and not torch.cuda.is_available():
        sys.exit("tune_moe.py tunes GPU kernels: run it on a CUDA machine (or --device cpu "
                 "--small with TRITON_INTERPRET=1 for a smoke run)")  # fmt: skip
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu-smoke"
    shapes = SMALL if args.small else SHAPES
    deadline = time.time() + args.budget_s
    path = args.out / moe_config.device_file(name).name
    table = json.loads(path.read_text())["shapes"] if path.exists() else {}
    for shape in args.shapes:
        s = shapes[shape]
        key = moe_config.shape_key(s["experts"], s["hidden"], s["ffn"], str(dtype)[6:])
        torch.manual_seed(0)
        layer = build_ours(s, dtype, device)
        entries = {e["max_routes"]: e for e in table.get(key, [])}
        per_shape_deadline = time.time() + (deadline - time.time()) / (
            len(args.shapes) - args.shapes.index(shape)
        )
        for t in args.tokens:
            if time.time() > per_shape_deadline:
                print(f"  {shape}: budget spent before {t} tokens", flush=True)
                break
            try:
                plan, ms, options = tune_size(layer, t, dtype, device, per_shape_deadline)
            except Exception as e:  # one size failing must not cost the others their plans
                print(f"  {shape} T={t}: failed ({type(e).__name__}: {e})", flush=True)
                continue
            entries[t * s["k"]] = plan.to_json(t * s["k"])
            print(f"  {shape} T={t}: {ms:.4f} ms {options} -> {plan}", flush=True)
        table[key] = [entries[r] for r in sorted(entries)]
        args.out.mkdir(parents=True, exist_ok=True)  # written after every shape
        path.write_text(json.dumps({"device": name, "shapes": table}, indent=1) + "\n")
        del layer
        if device == "cuda":
            torch.cuda.empty_cache()
    args.out.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"device": name, "shapes": table}, indent=1) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
