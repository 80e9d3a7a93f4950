"""Fused MoE forward: two grouped GEMMs over all experts in one launch each.

    x          [T, H]          tokens
    w_in       [E, F_in, H]    F_in = 2F for SwiGLU (gate rows, then up rows), F otherwise
    w_out      [E, H, F]
    expert_idx int [T, k]      −1 = dropped route
    weights    fp32 [T, k]     gate weight of each route
    → out      [T, H]          Σ_r weights[t, r] · MLP_{expert_idx[t, r]}(x[t])

GPU path (Triton), after vLLM's fused_moe, with no host synchronisation anywhere (a CUDA graph
can capture it). Launch "up" multiplies each route's token row by its expert's w_in with fp32
accumulation and applies the activation (SwiGLU fused: gate and up tiles accumulate side by
side), writing one row per route; launch "down" multiplies those rows by w_out and scales by the
route's gate weight; for k > 1 a last launch sums each token's routes in fp32. How a launch
finds its rows depends on the batch (kernels/moe_config.py picks, per device and shape):
  - large batches: routes are block-aligned by expert (kernels/align.py, three small launches),
    one program per (block of BLOCK_M routes of one expert, BLOCK_N columns);
  - small batches (by route): no alignment at all; program r takes the expert of route r if r is
    that expert's first route, with all of the expert's routes as its rows — each touched
    expert's weights are still read once, and decoding costs 2-3 launches in all.
Reference path (CPU, and the oracle): sort routes, grouped_mlp_reference, weighted index_add.
Training: the Triton forward is wrapped in an autograd Function whose backward differentiates the
reference (correct; a fused backward is future work).
"""

from __future__ import annotations

from functools import cache

import torch

from expertswitch.kernels.align import align_block_size_triton, sort_routes
from expertswitch.kernels.grouped_mlp import ACTIVATIONS, activate, grouped_mlp_reference
from expertswitch.kernels.moe_config import GemmConfig, MoEPlan, device_limits, plan_for
from expertswitch.kernels.select import kernels_for, needs_grad
from expertswitch.utils.imports import is_triton_available

_ACT_CODE = {"swiglu": 0, "gelu": 1, "relu": 2, "silu": 3}


def fused_moe_reference(
    x: torch.Tensor,
    w_in: torch.Tensor,
    w_out: torch.Tensor,
    expert_idx: torch.Tensor,
    weights: torch.Tensor,
    activation: str = "swiglu",
    b_in: torch.Tensor | None = None,
    b_out: torch.Tensor | None = None,
) -> torch.Tensor:
    t, k = expert_idx.shape
    check_expert_ids(expert_idx, w_in.shape[0])
    route_ids, offsets = sort_routes(expert_idx, w_in.shape[0])
    tokens = torch.div(route_ids, k, rounding_mode="floor")
    y = grouped_mlp_reference(
        x.index_select(0, tokens), offsets, w_in, w_out, activation, b_in, b_out
    )
    rows = y.float() * weights.reshape(-1)[route_ids].float().unsqueeze(-1)
    out = torch.zeros(t, w_out.shape[1], dtype=torch.float32, device=x.device)
    return out.index_add_(0, tokens, rows).to(x.dtype)


def check_inputs(x, w_in, w_out, expert_idx, weights, activation) -> None:
    if activation not in ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}: choose one of {ACTIVATIONS}")
    if x.dim() != 2 or w_in.dim() != 3 or w_out.dim() != 3:
        raise ValueError("expected x [T, H], w_in [E, F_in, H], w_out [E, H, F]")
    e, f_in, h = w_in.shape
    f = w_out.shape[2]
    if x.shape[1] != h or w_out.shape[:2] != (e, h):
        raise ValueError(f"shape mismatch: x {tuple(x.shape)}, w_in {tuple(w_in.shape)}, "
                         f"w_out {tuple(w_out.shape)}")  # fmt: skip
    if f_in != (2 * f if activation == "swiglu" else f):
        raise ValueError(f"w_in has {f_in} rows; {activation} with ffn {f} needs "
                         f"{2 * f if activation == 'swiglu' else f}")  # fmt: skip
    if (
        expert_idx.dim() != 2
        or expert_idx.shape[0] != x.shape[0]
        or weights.shape != expert_idx.shape
    ):
        raise ValueError("expert_idx and weights must both be [T, k]")
    if not (x.dtype == w_in.dtype == w_out.dtype):
        raise ValueError(f"dtypes differ: x {x.dtype}, w_in {w_in.dtype}, w_out {w_out.dtype}")


def map_experts(expert_idx: torch.Tensor, expert_map: torch.Tensor) -> torch.Tensor:
    """Global expert ids → local ids through expert_map (−1: held elsewhere, or dropped); ids
    outside the map become −1 as well (dropped, as the kernels treat them)."""
    n = expert_map.numel()
    valid = (expert_idx >= 0) & (expert_idx < n)
    local = expert_map.to(device=expert_idx.device, dtype=expert_idx.dtype)
    return torch.where(valid, local[expert_idx.clamp(0, max(n - 1, 0))], -1)


def check_expert_ids(expert_idx: torch.Tensor, num_experts: int) -> None:
    """Host check (one synchronisation) that every id names an expert or is −1 (dropped). The
    Triton path cannot raise without a synchronisation: it treats an id outside [0, E) as a
    dropped route, so no id reads past the weights or writes another token's rows."""
    if expert_idx.numel() and (int(expert_idx.min()) < -1 or int(expert_idx.max()) >= num_experts):
        bad = expert_idx[(expert_idx < -1) | (expert_idx >= num_experts)]
        raise ValueError(f"expert_idx holds {bad.numel()} ids outside [-1, {num_experts}) "
                         f"(e.g. {int(bad[0])}): ids name one of the {num_experts} experts, "
                         "or are −1 for a dropped route")  # fmt: skip


@cache
def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else device.type


def plan(x: torch.Tensor, w_in: torch.Tensor, w_out: torch.Tensor, n_routes: int) -> MoEPlan:
    """The launch plan for this call: the device's tuned table, else the heuristic (sized by
    the device's own SM count and shared memory)."""
    e, _, h = w_in.shape
    dtype_name = str(x.dtype).removeprefix("torch.")
    return plan_for(n_routes, e, h, w_out.shape[2], dtype_name, _device_name(x.device),
                    device_limits(x.device))  # fmt: skip


if is_triton_available():
    import triton
    import triton.language as tl

    @triton.jit
    def _dot(a, b, IEEE: tl.constexpr):
        if IEEE:  # fp32 operands in full fp32, as torch.matmul does unless tf32 is allowed
            return tl.dot(a, b, input_precision="ieee")
        return tl.dot(a, b)

    @triton.jit
    def _moe_gemm_kernel(
        a_ptr, w_ptr, w_desc, c_ptr, routes_ptr, block_expert_ptr, idx_ptr, weight_ptr,
        bias_ptr, out_ptr, counter_ptr,
        N, K, k_split, n_routes, num_experts, w_rows, num_pid_m, n_counters,
        stride_am, stride_ak, stride_we, stride_wn, stride_wk, stride_cm, stride_cn, stride_cs,
        stride_be, stride_om,
        A_ROW_DIV: tl.constexpr, SWIGLU: tl.constexpr, ACT: tl.constexpr,
        MUL_WEIGHT: tl.constexpr, BY_ROUTE: tl.constexpr, EVEN_K: tl.constexpr,
        IEEE: tl.constexpr, TMA_W: tl.constexpr, HAS_BIAS: tl.constexpr,
        ZERO_COUNTERS: tl.constexpr, REDUCE_SPLITS: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
        GROUP_M: tl.constexpr,
    ):  # fmt: skip
        """Axis 0: the (row block, column block) tiles, GROUP_M row blocks sweeping the columns
        together (L2 reuse of their rows); axis 1: the K splits. k_split: K elements each split
        sums (K itself when not split); split programs write partial sums to c + pid_k ·
        stride_cs. TMA_W: weight tiles come by the tensor-memory accelerator (Hopper) through
        w_desc, a descriptor built on the host that sees w as [E·w_rows, K]; rows past N read
        the next rows (masked at the store), K past the end reads zeros. HAS_BIAS: bias
        [E, N (2N for SwiGLU)] added before the activation (the first matmul) or before the
        gate weight (the second; split 0 only).
        REDUCE_SPLITS (> 0: the number of splits): the last split program of a tile to finish
        (counted by an atomic per tile) adds up all splits' partial sums and writes the tile of
        out — no combine launch; ZERO_COUNTERS: the launch before (the first matmul) zeroes
        those n_counters counters, before any program returns."""
        pid = tl.program_id(0)
        if ZERO_COUNTERS:
            z = tl.arange(0, 128)
            for z0 in range(pid * 128, n_counters, tl.num_programs(0) * 128):
                tl.store(counter_ptr + z0 + z, tl.zeros((128,), tl.int32),
                         mask=z0 + z < n_counters)  # fmt: skip
        num_pid_n = tl.cdiv(N, BLOCK_N)
        if GROUP_M == 1:
            pid_m = pid // num_pid_n
            pid_n = pid % num_pid_n
        else:
            in_group = GROUP_M * num_pid_n
            first_m = (pid // in_group) * GROUP_M
            group_rows = tl.minimum(num_pid_m - first_m, GROUP_M)
            pid_m = first_m + (pid % in_group) % group_rows
            pid_n = (pid % in_group) // group_rows
        pid_k = tl.program_id(1)
        if BY_ROUTE:  # rows: every route of the expert of route pid_m, if pid_m is its first
            i = tl.arange(0, BLOCK_M)
            ids = tl.load(idx_ptr + i, mask=i < n_routes, other=-1)
            expert = tl.load(idx_ptr + pid_m)
            first = tl.min(tl.where(ids == expert, i, BLOCK_M), axis=0)
            if (first != pid_m) | (expert < 0) | (expert >= num_experts):
                return
            valid = ids == expert
            route_rows = tl.where(valid, i, 0).to(tl.int64)
        else:  # rows: the block's slice of the expert-sorted, block-padded routes
            expert = tl.load(block_expert_ptr + pid_m)
            if expert >= num_experts:  # past the last block
                return
            routes = tl.load(routes_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))
            valid = routes < n_routes
            route_rows = tl.where(valid, routes, 0).to(tl.int64)
        # invalid rows read row 0 and are never stored: A loads need no row mask
        rows = route_rows // A_ROW_DIV  # input row: the token for launch 1, the route for 2
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
        n_mask = offs_n < N
        offs_n_in = offs_n % N  # columns past N re-read column n − N; masked at the store
        k_lo = pid_k * k_split
        offs_k = tl.arange(0, BLOCK_K)
        a_ptrs = a_ptr + rows[:, None] * stride_am + (k_lo + offs_k[None, :]) * stride_ak
        w_ptrs = (w_ptr + expert.to(tl.int64) * stride_we + offs_n_in[None, :] * stride_wn
                  + (k_lo + offs_k[:, None]) * stride_wk)  # fmt: skip
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        if TMA_W:
            w_row = (expert * w_rows + pid_n * BLOCK_N).to(tl.int32)
        for k0 in range(k_lo, tl.minimum(k_lo + k_split, K), BLOCK_K):
            if EVEN_K:
                a = tl.load(a_ptrs)
            else:
                k_mask = offs_k < K - k0
                a = tl.load(a_ptrs, mask=k_mask[None, :], other=0.0)
            if TMA_W:
                w = tl.trans(w_desc.load([w_row, k0]))
            elif EVEN_K:
                w = tl.load(w_ptrs)
            else:
                w = tl.load(w_ptrs, mask=k_mask[:, None], other=0.0)
            acc += _dot(a, w, IEEE)
            if SWIGLU:  # up rows sit N rows below the gate rows
                if TMA_W:
                    w_up = tl.trans(w_desc.load([w_row + N, k0]))
                elif EVEN_K:
                    w_up = tl.load(w_ptrs + N * stride_wn)
                else:
                    w_up = tl.load(w_ptrs + N * stride_wn, mask=k_mask[:, None], other=0.0)
                acc_up += _dot(a, w_up, IEEE)
            a_ptrs += BLOCK_K * stride_ak
            w_ptrs += BLOCK_K * stride_wk
        if HAS_BIAS:
            b_ptrs = bias_ptr + expert.to(tl.int64) * stride_be + offs_n_in
            bias = tl.load(b_ptrs).to(tl.float32)
            acc += tl.where(pid_k == 0, bias, 0.0)[None, :]  # split K: one split adds it
            if SWIGLU:
                acc_up += tl.load(b_ptrs + N).to(tl.float32)[None, :]
        if SWIGLU:
            acc = acc * tl.sigmoid(acc) * acc_up
        elif ACT == 1:
            acc = 0.5 * acc * (1.0 + tl.math.erf(acc * 0.7071067811865476))
        elif ACT == 2:
            acc = tl.maximum(acc, 0.0)
        elif ACT == 3:
            acc = acc * tl.sigmoid(acc)
        if MUL_WEIGHT:
            acc = acc * tl.load(weight_ptr + route_rows, mask=valid, other=0.0)[:, None]
        c_ptrs = (c_ptr + pid_k.to(tl.int64) * stride_cs + route_rows[:, None] * stride_cm
                  + offs_n[None, :] * stride_cn)  # fmt: skip
        out_mask = valid[:, None] & n_mask[None, :]
        tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=out_mask)
        if REDUCE_SPLITS > 0:
            tl.debug_barrier()  # every thread's partial stored before the release below
            arrived = tl.atomic_add(counter_ptr + pid, 1, sem="acq_rel", scope="gpu")
            if arrived == REDUCE_SPLITS - 1:  # the last split of this tile: add them all up
                total = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
                tile = route_rows[:, None] * stride_cm + offs_n[None, :] * stride_cn
                for s in tl.static_range(REDUCE_SPLITS):
                    total += tl.load(c_ptr + s * stride_cs + tile, mask=out_mask, other=0.0,
                                     cache_modifier=".cg")  # fmt: skip
                o_ptrs = out_ptr + route_rows[:, None] * stride_om + offs_n[None, :]
                tl.store(o_ptrs, total.to(out_ptr.dtype.element_ty), mask=out_mask)

    @triton.jit
    def _combine_kernel(buf_ptr, idx_ptr, out_ptr, H, R, E, K: tl.constexpr, S: tl.constexpr,
                        BLOCK_H: tl.constexpr):  # fmt: skip
        """out[t] = Σ_s Σ_r buf[s, t·K + r] over the token's kept routes (expert in [0, E)) and
        the K splits, in fp32 (buf: [S, R, H])."""
        t = tl.program_id(0).to(tl.int64)
        offs = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
        mask = offs < H
        acc = tl.zeros((BLOCK_H,), dtype=tl.float32)
        for r in tl.static_range(K):
            e = tl.zeros((BLOCK_H,), tl.int64) + tl.load(idx_ptr + t * K + r)
            kept = (e >= 0) & (e < E)
            for s in tl.static_range(S):
                row = (s * R + t * K + r) * H
                acc += tl.load(buf_ptr + row + offs, mask=mask & kept, other=0.0)
        tl.store(out_ptr + t * H + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)


def gemm_launch(a, w, c, rows, idx, weight, n, k_dim, n_routes, row_div, act, mul_weight,
                by_route, cfg: GemmConfig, split: int = 1, bias: torch.Tensor | None = None,
                counters: torch.Tensor | None = None, zero_counters: bool = False,
                out: torch.Tensor | None = None) -> tuple[tuple, dict, dict]:  # fmt: skip
    """(grid, runtime args, constexprs) of one _moe_gemm_kernel launch; kernels/aot.py
    compiles the very same specialisation for an H100 on a CPU-only machine. split > 1: c is
    [split, rows, n] and each split sums K/split of K. bias: [E, w rows], or None.
    counters (int32): zeroed by this launch (zero_counters), or — with out — one per tile of
    this launch, whose last split writes the summed tile to out [rows, n]."""
    routes, block_expert = rows
    n_m = n_routes if by_route else block_expert.numel()
    grid = (n_m * -(-n // cfg.block_n), split)
    if split > 1 and k_dim % (split * cfg.block_k):
        raise ValueError(f"K={k_dim} does not split into {split} parts of whole {cfg.block_k} "
                         "tiles")  # fmt: skip
    reduce = out is not None
    if reduce and (split < 2 or counters is None or counters.numel() < grid[0]):
        raise ValueError("an in-kernel split reduction needs split > 1 and a counter per tile")
    c2 = c[0] if split > 1 else c
    tma = cfg.tma_w and tma_ok(w)
    args = dict(
        a_ptr=a, w_ptr=w, w_desc=weight_descriptor(w, k_dim, cfg) if tma else w, c_ptr=c,
        routes_ptr=routes, block_expert_ptr=block_expert, idx_ptr=idx, weight_ptr=weight,
        bias_ptr=weight if bias is None else bias, out_ptr=out if reduce else c,
        counter_ptr=routes if counters is None else counters, N=n, K=k_dim,
        k_split=k_dim // split, n_routes=n_routes, num_experts=w.shape[0], w_rows=w.shape[1],
        num_pid_m=n_m, n_counters=0 if counters is None else counters.numel(),
        stride_am=a.stride(0), stride_ak=a.stride(1), stride_we=w.stride(0),
        stride_wn=w.stride(1), stride_wk=w.stride(2), stride_cm=c2.stride(0),
        stride_cn=c2.stride(1), stride_cs=c.stride(0) if split > 1 else 0,
        stride_be=0 if bias is None else bias.stride(0), stride_om=out.stride(0) if reduce else 0,
    )  # fmt: skip
    consts = dict(
        A_ROW_DIV=row_div, SWIGLU=act == _ACT_CODE["swiglu"], ACT=act, MUL_WEIGHT=mul_weight,
        BY_ROUTE=by_route, EVEN_K=k_dim % cfg.block_k == 0,
        IEEE=a.dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32,
        TMA_W=tma, HAS_BIAS=bias is not None, ZERO_COUNTERS=zero_counters and not reduce,
        REDUCE_SPLITS=split if reduce else 0,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
        GROUP_M=1 if by_route else cfg.group_m,
    )  # fmt: skip
    return grid, args, consts


def weight_descriptor(w: torch.Tensor, k_dim: int, cfg: GemmConfig):
    """The TMA descriptor of w [E, rows, K] seen as one [E·rows, K] matrix, in [BLOCK_N,
    BLOCK_K] tiles, built on the host: it travels as a kernel parameter (no per-program
    descriptor set-up in global scratch) and describes w's own memory, on w's own device."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    e, rows, _ = w.shape
    return TensorDescriptor(w, shape=[e * rows, k_dim], strides=[w.stride(1), 1],
                            block_shape=[cfg.block_n, cfg.block_k])  # fmt: skip


def tma_ok(w: torch.Tensor) -> bool:
    """The kernel's descriptor sees w [E, rows, K] as one [E·rows, K] matrix: experts packed
    back to back (a view such as big[:, :2F] is not), a contiguous last dimension, and the
    16-byte aligned base and row stride TMA needs."""
    elt = w.element_size()
    return (
        w.stride(2) == 1
        and (w.shape[0] == 1 or w.stride(0) == w.shape[1] * w.stride(1))
        and (w.stride(1) * elt) % 16 == 0
        and (w.device.type == "meta" or w.data_ptr() % 16 == 0)
    )


def _launch(*launch_args, cfg: GemmConfig, split: int = 1, bias=None, counters=None,
            zero_counters: bool = False, out=None) -> None:  # fmt: skip
    grid, args, consts = gemm_launch(*launch_args, cfg, split, bias, counters, zero_counters,
                                     out)  # fmt: skip
    _moe_gemm_kernel[grid](**args, **consts, num_warps=cfg.num_warps,
                           num_stages=cfg.num_stages)  # fmt: skip


def buffers(x, n_routes: int, k: int, h: int, f: int, split: int, dropless: bool):
    """(out [T, H], buf, inter [R, F]) of one call: buf is what the down matmul writes — the
    output itself when k = 1 and K is not split, else fp32 rows [R, H] or partial sums
    [split, R, H] that the combine launch adds up."""
    t = n_routes // k
    out = (torch.empty if dropless else torch.zeros)(t, h, dtype=x.dtype, device=x.device)
    if k == 1 and split == 1:
        buf = out
    else:
        shape = (split, n_routes, h) if split > 1 else (n_routes, h)
        buf = torch.empty(shape, dtype=torch.float32, device=x.device)
    return out, buf, torch.empty(n_routes, f, dtype=x.dtype, device=x.device)


def fused_moe_triton(
    x: torch.Tensor,
    w_in: torch.Tensor,
    w_out: torch.Tensor,
    expert_idx: torch.Tensor,
    weights: torch.Tensor,
    activation: str = "swiglu",
    moe_plan: MoEPlan | None = None,
    dropless: bool = False,
    b_in: torch.Tensor | None = None,
    b_out: torch.Tensor | None = None,
) -> torch.Tensor:
    """The Triton path; checks shapes, strides and dtypes first. No host synchronisation, so a
    CUDA graph can capture it (biases included). dropless=True promises no −1 in expert_idx
    (skips zero-filling the output when k = 1)."""
    if not is_triton_available():
        raise ImportError("Triton is not installed: pip install 'expertswitch[gpu]'")
    check_inputs(x, w_in, w_out, expert_idx, weights, activation)
    if x.stride(1) != 1 or w_in.stride(2) != 1 or w_out.stride(2) != 1:
        raise ValueError("x, w_in and w_out must be contiguous along their last dimension")
    check_biases(w_in, w_out, b_in, b_out)
    b_in = None if b_in is None else b_in.contiguous()
    b_out = None if b_out is None else b_out.contiguous()
    if x.is_cuda:  # launch on the tensors' GPU, whichever is current
        with torch.cuda.device(x.device):
            return _fused_moe_launches(x, w_in, w_out, expert_idx, weights, activation,
                                       moe_plan, dropless, b_in, b_out)  # fmt: skip
    return _fused_moe_launches(x, w_in, w_out, expert_idx, weights, activation, moe_plan,
                               dropless, b_in, b_out)  # fmt: skip


def check_biases(w_in, w_out, b_in, b_out) -> None:
    for name, b, w in (("b_in", b_in, w_in), ("b_out", b_out, w_out)):
        if b is not None and (b.shape != w.shape[:2] or b.dtype != w.dtype):
            raise ValueError(f"{name} must be [{w.shape[0]}, {w.shape[1]}] in {w.dtype}, got "
                             f"{list(b.shape)} in {b.dtype}")  # fmt: skip


def _fused_moe_launches(x, w_in, w_out, expert_idx, weights, activation, moe_plan, dropless,
                        b_in, b_out) -> torch.Tensor:  # fmt: skip
    t, k = expert_idx.shape
    e, _, h = w_in.shape
    f = w_out.shape[2]
    n_routes = t * k
    p = moe_plan or plan(x, w_in, w_out, n_routes)
    if p.by_route and n_routes > p.up.block_m:
        raise ValueError(f"a by-route plan with block_m={p.up.block_m} holds at most that many "
                         f"routes, got {n_routes}")  # fmt: skip
    if n_routes == 0:
        return x.new_zeros(t, h)
    if p.grouped_mm:
        return grouped_mm_moe(x, w_in, w_out, expert_idx, weights, activation, b_in, b_out)
    idx = expert_idx.reshape(-1).contiguous()
    w = weights.reshape(-1).to(torch.float32).contiguous()
    split = p.split_for(f)
    out, buf, inter = buffers(x, n_routes, k, h, f, split, dropless)
    act = _ACT_CODE[activation]
    rows_up = (idx, idx) if p.by_route else align_block_size_triton(idx, e, p.up.block_m)[:2]
    rows_down = rows_up
    if not p.by_route and p.down.block_m != p.up.block_m:
        rows_down = align_block_size_triton(idx, e, p.down.block_m)[:2]
    # top-1 with split K: the down matmul's last split per tile adds the splits up (no
    # combine launch); its tile counters are zeroed by the up launch, which runs first
    reduce = k == 1 and split > 1
    counters = None
    if reduce:
        n_m = n_routes if p.by_route else rows_down[1].numel()
        counters = torch.empty(n_m * -(-h // p.down.block_n), dtype=torch.int32,
                               device=x.device)  # fmt: skip
    _launch(x, w_in, inter, rows_up, idx, w, f, h, n_routes, k, act, False, p.by_route, cfg=p.up,
            bias=b_in, counters=counters, zero_counters=reduce)  # fmt: skip
    _launch(inter, w_out, buf, rows_down, idx, w, h, f, n_routes, 1, -1, True, p.by_route,
            cfg=p.down, split=split, bias=b_out, counters=counters,
            out=out if reduce else None)  # fmt: skip
    if buf is not out and not reduce:
        block_h = min(1024, triton.next_power_of_2(h))
        _combine_kernel[(t, triton.cdiv(h, block_h))](buf, idx, out, h, n_routes, e, K=k,
                                                      S=split, BLOCK_H=block_h)  # fmt: skip
    return out


def grouped_mm_moe(x, w_in, w_out, expert_idx, weights, activation="swiglu", b_in=None,
                   b_out=None) -> torch.Tensor:  # fmt: skip
    """The large-batch path on torch._grouped_mm: routes sorted by expert on the device (ids
    outside [0, E) last, as dropped), x permuted once, two grouped GEMMs, the activation
    between, then each token's routes summed in fp32. No host synchronisation."""
    t, k = expert_idx.shape
    e = w_in.shape[0]
    flat = expert_idx.reshape(-1)
    valid = (flat >= 0) & (flat < e)
    key = torch.where(valid, flat, e)
    order = torch.argsort(key, stable=True)
    counts = torch.zeros(e + 1, dtype=torch.int32, device=x.device)
    counts.scatter_add_(0, key, torch.ones_like(key, dtype=torch.int32))
    offs = torch.cumsum(counts[:e], 0, dtype=torch.int32)
    tokens = torch.div(order, k, rounding_mode="floor")
    expert = key[order].clamp(max=e - 1)
    h = torch._grouped_mm(x.index_select(0, tokens), w_in.transpose(1, 2), offs=offs)
    if b_in is not None:
        h = h + b_in.index_select(0, expert)
    y = torch._grouped_mm(activate(h, activation), w_out.transpose(1, 2), offs=offs)
    if b_out is not None:
        y = y + b_out.index_select(0, expert)
    kept = valid[order]
    rows = torch.where(kept[:, None], y.float() * weights.reshape(-1)[order].float()[:, None], 0.0)
    out = torch.zeros(t, w_out.shape[1], dtype=torch.float32, device=x.device)
    return out.index_add_(0, tokens, rows).to(x.dtype)


class _FusedMoE(torch.autograd.Function):
    """The Triton forward; the backward differentiates the reference (a fused backward is
    future work)."""

    @staticmethod
    def forward(ctx, x, w_in, w_out, weights, b_in, b_out, expert_idx, activation, dropless):
        ctx.save_for_backward(x, w_in, w_out, weights, b_in, b_out, expert_idx)
        ctx.activation = activation
        return fused_moe_triton(x, w_in, w_out, expert_idx, weights, activation,
                                dropless=dropless, b_in=b_in, b_out=b_out)  # fmt: skip

    @staticmethod
    def backward(ctx, grad_out):
        *inputs, expert_idx = ctx.saved_tensors
        leaves = [None if t is None else t.detach().requires_grad_(need)
                  for t, need in zip(inputs, ctx.needs_input_grad[:6])]  # fmt: skip
        x, w_in, w_out, weights, b_in, b_out = leaves
        e = w_in.shape[0]  # ids outside [0, E) were dropped routes in the forward: here too
        ids = torch.where((expert_idx >= 0) & (expert_idx < e), expert_idx, -1)
        with torch.enable_grad():
            out = fused_moe_reference(x, w_in, w_out, ids, weights, ctx.activation, b_in, b_out)
            if not out.requires_grad:  # no route kept (or no token): nothing flows back
                return (None,) * 9
            wanted = [t for t in leaves if t is not None and t.requires_grad]
            grads = iter(torch.autograd.grad(out, wanted, grad_out, allow_unused=True))
        return (*[next(grads) if t is not None and t.requires_grad else None for t in leaves],
                None, None, None)  # fmt: skip


def fused_moe(
    x: torch.Tensor,
    w_in: torch.Tensor,
    w_out: torch.Tensor,
    expert_idx: torch.Tensor,
    weights: torch.Tensor,
    activation: str = "swiglu",
    b_in: torch.Tensor | None = None,
    b_out: torch.Tensor | None = None,
    use_triton: bool | None = None,
    dropless: bool = False,
    expert_map: torch.Tensor | None = None,
) -> torch.Tensor:
    """The fused kernel on CUDA tensors when Triton is present, else the reference.
    `use_triton=True` forces the kernel (e.g. under TRITON_INTERPRET=1 on CPU), as does
    kernels.select.force_kernels(). dropless=True: the caller promises every route has an
    expert (no −1). expert_map int [E_global]: expert_idx holds global ids and w_in/w_out
    only this rank's experts; map[g] is g's local index, −1 where another rank holds it (its
    routes add nothing here) — no re-indexing by the caller, no host synchronisation."""
    if use_triton is None:
        use_triton = kernels_for(x)
    if expert_map is not None:
        if expert_map.dim() != 1 or expert_map.dtype.is_floating_point or expert_map.dtype in (
            torch.bool, torch.uint8):  # fmt: skip
            raise ValueError(f"expert_map must be a 1-D integer tensor (global id → local id or "
                             f"−1), got {expert_map.dtype} {tuple(expert_map.shape)}")  # fmt: skip
        if not use_triton:  # the reference path checks (the kernels drop bad ids, no sync)
            check_expert_ids(expert_idx, expert_map.numel())
            bad = (expert_map < -1) | (expert_map >= w_in.shape[0])
            if bool(bad.any()):
                n = w_in.shape[0]
                raise ValueError(f"expert_map sends global ids to local experts outside "
                                 f"[-1, {n}): this rank holds {n} experts")  # fmt: skip
        expert_idx = map_experts(expert_idx, expert_map)
        dropless = False
    if not use_triton:
        check_inputs(x, w_in, w_out, expert_idx, weights, activation)
        check_biases(w_in, w_out, b_in, b_out)
        return fused_moe_reference(x, w_in, w_out, expert_idx, weights, activation, b_in, b_out)
    # the kernels read rows with a unit last stride (a strided view is copied, as torch would)
    x, w_in, w_out = (t if t.stride(-1) == 1 else t.contiguous() for t in (x, w_in, w_out))
    if needs_grad(x, w_in, w_out, weights, b_in, b_out):
        return _FusedMoE.apply(x, w_in, w_out, weights, b_in, b_out, expert_idx, activation,
                               dropless)  # fmt: skip
    return fused_moe_triton(x, w_in, w_out, expert_idx, weights, activation, dropless=dropless,
                            b_in=b_in, b_out=b_out)  # fmt: skip
