"""Fused MoE forward: two grouped GEMMs over all experts in one launch each.

    x          [T, H]          tokens
    w_in       [E, F_in, H]    F_in = 2F for SwiGLU (gate rows, then up rows), F otherwise
    w_out      [E, H, F]
    expert_idx int [T, k]      −1 = dropped route
    weights    fp32 [T, k]     gate weight of each route
    → out      [T, H]          Σ_r weights[t, r] · MLP_{expert_idx[t, r]}(x[t])

GPU path (Triton), after vLLM's fused_moe: routes are block-aligned by expert
(kernels/align.py); launch 1 gathers each block's token rows, multiplies by that block's
expert's w_in with fp32 accumulation and applies the activation (SwiGLU fused: gate and up tiles
accumulate side by side), writing one row per route; launch 2 multiplies those rows by w_out,
scales by the route's gate weight and writes per-route outputs, summed over k in fp32.
Reference path (CPU, and the oracle): sort routes, grouped_mlp_reference, weighted index_add.
Training: the Triton forward is wrapped in an autograd Function whose backward differentiates the
reference (correct; a fused backward is future work).
"""

from __future__ import annotations

import torch

from expertswitch.kernels.align import align_block_size, sort_routes
from expertswitch.kernels.grouped_mlp import ACTIVATIONS, grouped_mlp_reference
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


def pick_blocks(n_routes: int) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K) by routes in flight. Small batches want short M blocks so
    padding rows stay few (vLLM on H100 Mixtral uses 16 for ≤ 32 rows up to 128 for ≥ 1024);
    to be tuned on the GPU per shape."""
    if n_routes <= 32:
        return 16, 64, 64
    if n_routes <= 1024:
        return 64, 64, 64
    return 128, 128, 64


if is_triton_available():
    import triton
    import triton.language as tl

    @triton.jit
    def _moe_gemm_kernel(
        a_ptr, w_ptr, c_ptr, routes_ptr, block_expert_ptr, weight_ptr,
        N, K, n_routes,
        stride_am, stride_ak, stride_we, stride_wn, stride_wk, stride_cm, stride_cn,
        A_ROW_DIV: tl.constexpr, SWIGLU: tl.constexpr, ACT: tl.constexpr,
        MUL_WEIGHT: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ):  # fmt: skip
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        routes = tl.load(routes_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))  # [BM]
        valid = routes < n_routes
        route_rows = tl.where(valid, routes, 0).to(tl.int64)  # output / weight row
        rows = route_rows // A_ROW_DIV  # input row: the token for launch 1, the route for 2
        expert = tl.load(block_expert_ptr + pid_m).to(tl.int64)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_k = tl.arange(0, BLOCK_K)
        n_mask = offs_n < N
        a_ptrs = a_ptr + rows[:, None] * stride_am + offs_k[None, :] * stride_ak
        w_ptrs = (
            w_ptr + expert * stride_we + offs_n[None, :] * stride_wn + offs_k[:, None] * stride_wk
        )
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            k_mask = offs_k < K - k0
            a = tl.load(a_ptrs, mask=valid[:, None] & k_mask[None, :], other=0.0)
            w = tl.load(w_ptrs, mask=k_mask[:, None] & n_mask[None, :], other=0.0)
            acc += tl.dot(a, w)
            if SWIGLU:  # up rows sit N rows below the gate rows
                w_up = tl.load(
                    w_ptrs + N * stride_wn, mask=k_mask[:, None] & n_mask[None, :], other=0.0
                )
                acc_up += tl.dot(a, w_up)
            a_ptrs += BLOCK_K * stride_ak
            w_ptrs += BLOCK_K * stride_wk
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
        c_ptrs = c_ptr + route_rows[:, None] * stride_cm + offs_n[None, :] * stride_cn
        tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=valid[:, None] & n_mask[None, :])


def _launch(a, w, c, routes, block_expert, weight, n, k_dim, n_routes, row_div, swiglu, act,
            mul_weight, blocks):  # fmt: skip
    bm, bn, bk = blocks
    grid = (block_expert.numel(), triton.cdiv(n, bn))
    _moe_gemm_kernel[grid](
        a, w, c, routes, block_expert, weight,
        n, k_dim, n_routes,
        a.stride(0), a.stride(1), w.stride(0), w.stride(1), w.stride(2), c.stride(0), c.stride(1),
        A_ROW_DIV=row_div, SWIGLU=swiglu, ACT=act, MUL_WEIGHT=mul_weight,
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk,
    )  # fmt: skip


def fused_moe_triton(
    x: torch.Tensor,
    w_in: torch.Tensor,
    w_out: torch.Tensor,
    expert_idx: torch.Tensor,
    weights: torch.Tensor,
    activation: str = "swiglu",
    blocks: tuple[int, int, int] | None = None,
) -> torch.Tensor:
    """Two Triton launches; checks shapes, strides and dtypes first (biases: use the reference)."""
    if not is_triton_available():
        raise ImportError("Triton is not installed: pip install 'expertswitch[gpu]'")
    check_inputs(x, w_in, w_out, expert_idx, weights, activation)
    if x.stride(1) != 1 or w_in.stride(2) != 1 or w_out.stride(2) != 1:
        raise ValueError("x, w_in and w_out must be contiguous along their last dimension")
    t, k = expert_idx.shape
    e, _, h = w_in.shape
    f = w_out.shape[2]
    n_routes = t * k
    blocks = blocks or pick_blocks(n_routes)
    routes, block_expert = align_block_size(expert_idx, e, blocks[0])
    out_routes = torch.zeros(n_routes, h, dtype=torch.float32, device=x.device)
    if routes.numel():
        inter = torch.empty(n_routes, f, dtype=x.dtype, device=x.device)
        w = weights.reshape(-1).float().contiguous()
        swiglu = activation == "swiglu"
        _launch(x, w_in, inter, routes, block_expert, w, f, h, n_routes, k, swiglu,
                _ACT_CODE[activation], False, blocks)  # fmt: skip
        _launch(inter, w_out, out_routes, routes, block_expert, w, h, f, n_routes, 1, False, -1,
                True, blocks)  # fmt: skip
    return out_routes.view(t, k, h).sum(dim=1).to(x.dtype)


class _FusedMoE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w_in, w_out, weights, expert_idx, activation):
        ctx.save_for_backward(x, w_in, w_out, weights, expert_idx)
        ctx.activation = activation
        return fused_moe_triton(x, w_in, w_out, expert_idx, weights, activation)

    @staticmethod
    def backward(ctx, grad_out):
        x, w_in, w_out, weights, expert_idx = ctx.saved_tensors
        leaves = [t.detach().requires_grad_(need) for t, need in
                  zip((x, w_in, w_out, weights), ctx.needs_input_grad[:4])]  # fmt: skip
        with torch.enable_grad():
            out = fused_moe_reference(*leaves[:3], expert_idx, leaves[3], ctx.activation)
            wanted = [t for t in leaves if t.requires_grad]
            grads = iter(torch.autograd.grad(out, wanted, grad_out, allow_unused=True))
        return (*[next(grads) if t.requires_grad else None for t in leaves], None, None)


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
) -> torch.Tensor:
    """The fused kernel on CUDA tensors when Triton is present (and no biases), else the
    reference. `use_triton=True` forces the kernel (e.g. under TRITON_INTERPRET=1 on CPU)."""
    if use_triton is None:
        use_triton = x.is_cuda and is_triton_available() and b_in is None and b_out is None
    if not use_triton:
        check_inputs(x, w_in, w_out, expert_idx, weights, activation)
        return fused_moe_reference(x, w_in, w_out, expert_idx, weights, activation, b_in, b_out)
    return _FusedMoE.apply(x, w_in, w_out, weights, expert_idx, activation)
