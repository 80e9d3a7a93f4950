"""Compile every Triton kernel variant the library launches for an H100, on this machine.

    python -m expertswitch.kernels.check_sm90          # table; exit 1 on an error or a spill

The GEMM variants are the launch plans (tuned table or heuristic) for the benchmark shapes at
1, 16, 256 and 4096 tokens, built by the launchers' own argument code (fused_moe.gemm_launch),
so what compiles here is what a launch on the GPU compiles. Needs Triton (not a GPU), and must
run without TRITON_INTERPRET (tests start it in a subprocess).
"""

from __future__ import annotations

import os
import sys
from dataclasses import replace

import torch

SHAPES = {"mixtral": (4096, 14336, 8, 2), "ds128": (1024, 4096, 128, 1)}  # H, F, E, k
TOKENS = (1, 16, 256, 4096)
SMEM_LIMIT = 227 * 1024  # the most shared memory one H100 block may use


def _meta(*shape, dtype=torch.bfloat16):
    return torch.empty(*shape, dtype=dtype, device="meta")


def gemm_variants(dtype=torch.bfloat16, device_name: str = "NVIDIA H100 80GB HBM3"):
    from expertswitch.kernels.align import max_blocks
    from expertswitch.kernels.fused_moe import _ACT_CODE, buffers, gemm_launch
    from expertswitch.kernels.moe_config import plan_for

    seen = set()
    for shape, (h, f, e, k) in SHAPES.items():
        w_in, w_out = _meta(e, 2 * f, h, dtype=dtype), _meta(e, h, f, dtype=dtype)
        for t in TOKENS:
            r = t * k
            plan = plan_for(r, e, h, f, str(dtype)[6:], device_name)
            x = _meta(t, h, dtype=dtype)
            split = plan.split_for(f)
            _, buf, inter = buffers(x, r, k, h, f, split, dropless=True)  # the launch's own
            idx, wts = _meta(r, dtype=torch.int64), _meta(r, dtype=torch.float32)
            gemms = [("up", plan.up), ("down", plan.down)]
            if t in (1, 4096):  # the TMA weight path the tuner may pick, at both ends
                gemms += [(w, replace(c, tma_w=True)) for w, c in gemms]
            for which, cfg in gemms + ([("up bias", plan.up), ("down bias", plan.down)]
                                       if t in (1, 256) else []):  # fmt: skip
                bias = None
                if which.endswith("bias"):
                    bias = _meta(*(w_in if which == "up bias" else w_out).shape[:2], dtype=dtype)
                nb = max_blocks(r, e, cfg.block_m)
                rows = (_meta(nb * cfg.block_m, dtype=torch.int32), _meta(nb, dtype=torch.int32))
                if plan.by_route:
                    rows = (idx, idx)
                reduce = k == 1 and split > 1  # fused_moe's in-kernel split reduction
                counters = _meta(4096, dtype=torch.int32) if reduce else None
                if which.startswith("up"):
                    launch = (x, w_in, inter, rows, idx, wts, f, h, r, k, _ACT_CODE["swiglu"],
                              False, plan.by_route, cfg, 1, bias, counters, reduce)  # fmt: skip
                else:
                    launch = (inter, w_out, buf, rows, idx, wts, h, f, r, 1, -1, True,
                              plan.by_route, cfg, split, bias, counters, False,
                              x if reduce else None)  # fmt: skip
                _, args, consts = gemm_launch(*launch)
                key = (tuple(sorted(consts.items())), cfg.num_warps, cfg.num_stages,
                       buf.dtype if which.startswith("down") else None)  # fmt: skip
                if key in seen:
                    continue
                seen.add(key)
                path = ("by-route" if plan.by_route else "aligned") + (" tma" if cfg.tma_w else "")
                label = (
                    f"gemm {shape} T={t} {which} {path}"
                    + (f" split {split}" if which.startswith("down") and split > 1 else "")
                    + (" reduce" if which.startswith("down") and reduce else "")
                )
                yield label, args, consts, cfg.num_warps, cfg.num_stages


DELTA_SHAPES = ((4096, 4096), (14336, 4096), (4096, 14336))  # (N, K): Mistral q/o, up, down
DELTA_BATCHES = {"decode": (32, 16), "prefill": (2048, 4)}  # rows T over n_slots experts


def delta_variants(dtype=torch.bfloat16):
    """The multi-expert packed-delta kernel (kernels/delta_gemm.py) as an engine launches it:
    2-bit asymmetric with salient channels, groups of 128, at decode and prefill, plus 1-, 3-
    and 4-bit decode; built by the launcher's own argument code (delta_launch)."""
    from expertswitch.kernels.align import max_blocks
    from expertswitch.kernels.delta_gemm import (
        DeltaTable,
        RowGroups,
        delta_config,
        delta_launch,
        pick_block_m,
    )

    i32 = torch.int32
    cases = [(2, False, batch) for batch in DELTA_BATCHES] + [(b, b == 1, "decode")
                                                              for b in (1, 3, 4)]  # fmt: skip
    for bits, symmetric, batch in cases:
        t, n_slots = DELTA_BATCHES[batch]
        for n, k in DELTA_SHAPES if bits == 2 else DELTA_SHAPES[:1]:
            bm = pick_block_m(t, n_slots)
            nb = max_blocks(t, n_slots, bm)  # what the GPU alignment allocates
            table = DeltaTable(
                _meta(n_slots, 6, dtype=torch.int64), _meta(n_slots, dtype=i32),
                _meta(n_slots, dtype=torch.float32), n, k, bits, 128, symmetric,
                max_salient=k // 100,
            )  # fmt: skip
            groups = RowGroups(_meta(nb * bm, dtype=i32), _meta(nb, dtype=i32), bm, t, n_slots)
            cfg = delta_config(n, k, 128, bm, nb)
            x, out = _meta(t, k, dtype=dtype), _meta(t, n, dtype=dtype)
            _, args, consts = delta_launch(x, table, groups, out, cfg)
            sym = "sym" if symmetric else "asym"
            label = f"delta {bits}b {sym} N={n} K={k} {batch} T={t}/{n_slots}"
            yield label, args, consts, cfg.num_warps, cfg.num_stages


def paged_variants(dtype=torch.bfloat16):
    """The paged decode kernel (kernels/paged_attention.py) at a Mistral-like shape (H=32,
    kv=8, block 16, int64 tables for 2048 keys as AttentionBatch holds them): 32 sequences (no
    split by the heuristic), with Mistral's 4096 window, and one sequence (split), plus the
    split combine; D=64 besides D=128; Gemma 2's soft-capped scores at D=256 (its 4096 window,
    H=16, kv=8, as Gemma-2-9B); Phi-3-mini's D=96 (padded to 128 inside). Built by the
    launchers' own code."""
    from expertswitch.kernels.paged_attention import (
        _combine_splits_kernel,
        _paged_decode_kernel,
        combine_launch,
        decode_config,
        decode_launch,
    )

    kvh, bs, m = 8, 16, 2048 // 16
    shapes = [(128, 32, None, None), (128, 32, 4096, None), (128, 1, None, None),
              (64, 32, None, None), (256, 32, 4096, 50.0), (96, 32, None, None),
              (96, 1, None, None)]  # fmt: skip
    for d, batch, window, softcap in shapes:
        h = 16 if softcap else 32
        cfg = decode_config(batch, kvh, m, bs, window)
        q, cache = _meta(batch, h, d, dtype=dtype), _meta(4096, bs, kvh, d, dtype=dtype)
        table, lens = _meta(batch, m, dtype=torch.int64), _meta(batch, dtype=torch.int64)
        parts = (_meta(batch, h, cfg.splits, d, dtype=torch.float32),
                 _meta(batch, h, cfg.splits, dtype=torch.float32),
                 _meta(batch, h, cfg.splits, dtype=torch.float32))  # fmt: skip
        _, args, consts = decode_launch(q, cache, cache, table, lens, q, parts, d**-0.5, window,
                                        cfg, softcap)  # fmt: skip
        split = f" split {cfg.splits}" if cfg.splits > 1 else ""
        win = f" window {window}" if window else ""
        win += f" softcap {softcap:g}" if softcap else ""
        label = f"paged decode D={d} B={batch} tile {cfg.tile}{win}{split}"
        yield label, _paged_decode_kernel, args, consts, cfg.num_warps, cfg.num_stages
        if cfg.splits > 1:
            _, args, consts = combine_launch(parts, q, cfg.splits)
            label = f"paged combine D={d} split {cfg.splits}"
            yield label, _combine_splits_kernel, args, consts, 4, 1


def other_variants():
    from expertswitch.kernels import align, fused_moe, topk_softmax

    i32, i64, f32 = torch.int32, torch.int64, torch.float32
    yield ("align counts", align._chunk_counts_kernel,
           {"idx_ptr": _meta(8192, dtype=i64), "counts_ptr": _meta(64, 128, dtype=i32),
            "R": 8192, "E": 128}, {"BLOCK_R": 128, "E_PAD": 128})  # fmt: skip
    yield ("align layout", align._block_layout_kernel,
           {"counts_ptr": _meta(64, 128, dtype=i32), "base_ptr": _meta(64, 128, dtype=i32),
            "exp_counts_ptr": _meta(128, dtype=i64), "routes_ptr": _meta(4096, dtype=i32),
            "block_expert_ptr": _meta(256, dtype=i32), "n_chunks": 64, "n_blocks": 256,
            "R": 8192, "E": 128},
           {"BM": 16, "E_PAD": 128, "C_BLOCK": 64, "B_BLOCK": 64})  # fmt: skip
    yield ("align scatter", align._scatter_routes_kernel,
           {"idx_ptr": _meta(8192, dtype=i64), "base_ptr": _meta(64, 128, dtype=i32),
            "routes_ptr": _meta(4096, dtype=i32), "R": 8192, "E": 128},
           {"BLOCK_R": 128, "E_PAD": 128})  # fmt: skip
    yield ("combine k=2 split 2", fused_moe._combine_kernel,
           {"buf_ptr": _meta(2, 8192, 4096, dtype=f32), "idx_ptr": _meta(8192, dtype=i64),
            "out_ptr": _meta(4096, 4096), "H": 4096, "R": 8192, "E": 8},
           {"K": 2, "S": 2, "BLOCK_H": 1024})  # fmt: skip
    for e, k, t, splits in ((8, 2, 256, 1), (128, 1, 256, 1), (128, 1, 1, 8)):
        h = 4096 if e == 8 else 1024
        yield (f"router E={e} k={k} T={t}" + (f" split {splits}" if splits > 1 else ""),
               topk_softmax._router_topk_kernel,
               {"x_ptr": _meta(t, h), "wg_ptr": _meta(e, h),
                "idx_ptr": _meta(t, k, dtype=i64), "weight_ptr": _meta(t, k, dtype=f32),
                "probs_ptr": _meta(t, k, dtype=f32), "part_ptr": _meta(8 * 16 * e, dtype=f32),
                "counter_ptr": _meta(256, dtype=i32), "T": t, "E": e, "H": h,
                "h_chunk": h // splits, "stride_xt": h, "stride_we": h},
               {"K": k, "K_PAD": topk_softmax._k_pad(k), "RENORM": k > 1, "WRITE_PROBS": False,
                "ROUND": True, "F32": False, "SPLITS": splits, "SECOND_BY_LOGIT": k == 2,
                "BLOCK_T": 16,
                "BLOCK_E": max(16, e), "BLOCK_H": 64})  # fmt: skip
    yield ("topk softmax E=8", topk_softmax._topk_softmax_kernel,
           {"logits_ptr": _meta(256, 8, dtype=f32), "idx_ptr": _meta(256, 2, dtype=i64),
            "weight_ptr": _meta(256, 2, dtype=f32), "probs_ptr": _meta(256, 8, dtype=f32),
            "T": 256, "E": 8, "stride_t": 8},
           {"K": 2, "K_PAD": 2, "RENORM": True, "WRITE_PROBS": True, "SECOND_BY_LOGIT": True,
            "BLOCK_T": 64,
            "BLOCK_E": 8})  # fmt: skip


def main() -> int:
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("unset TRITON_INTERPRET: the interpreter cannot compile for a GPU", file=sys.stderr)
        return 2
    from expertswitch.kernels.aot import compile_for_gpu
    from expertswitch.kernels.delta_gemm import _delta_kernel
    from expertswitch.kernels.fused_moe import _moe_gemm_kernel

    jobs = [(label, _moe_gemm_kernel, args, consts, w, s)
            for label, args, consts, w, s in gemm_variants()]  # fmt: skip
    jobs += [(label, _delta_kernel, args, consts, w, s)
             for label, args, consts, w, s in delta_variants()]  # fmt: skip
    jobs += [(label, fn, args, consts, 4, 1) for label, fn, args, consts in other_variants()]
    jobs += list(paged_variants())
    bad = 0
    print(f"{'variant':<48} {'smem KB':>8} {'regs':>5} {'spill':>5}  features")
    for label, fn, args, consts, warps, stages in jobs:
        try:
            ck = compile_for_gpu(fn, args, consts, num_warps=warps, num_stages=stages)
        except Exception as e:  # report every failure, then exit non-zero
            bad += 1
            print(f"{label:<48} FAILED: {type(e).__name__}: {str(e).splitlines()[0][:200]}")
            continue
        f = ck.features()
        # a GEMM whose main loop is not pipelined in 16-byte copies cannot stream weights at
        # full bandwidth (e.g. loads left scalar when strides lose their divisibility)
        unpipelined = label.startswith("gemm") and not 0 < f["cp_async"] == f["cp_async_16B"]
        problem = (ck.spill_bytes or 0) > 0 or ck.shared_bytes > SMEM_LIMIT or unpipelined
        bad += problem
        feats = " ".join(f"{k}={v}" for k, v in f.items() if v)
        spill = ck.spill_bytes if ck.spill_bytes is not None else "?"
        flag = "  <-- spills, too much shared memory or no 16-byte pipelining" if problem else ""
        print(f"{label:<48} {ck.shared_bytes / 1024:>8.1f} {ck.registers or '?':>5} "
              f"{spill:>5}  {feats}{flag}", flush=True)  # fmt: skip
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
