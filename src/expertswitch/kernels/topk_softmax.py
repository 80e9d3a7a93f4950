"""Fused gating: softmax over experts, top-k, optional renormalisation, in one launch.

    logits   [T, E]  any float dtype (computed in fp32)
    → idx    int64 [T, k]  chosen experts, best first (ties: lowest expert id)
      weight fp32  [T, k]  their probabilities (renormalised to sum 1 when asked)
      probs  fp32  [T, E]  the full softmax (for the aux loss), when asked

At decode batch sizes the unfused chain (softmax, topk, sum, divide, casts) is a handful of
launches whose fixed cost is larger than the gating arithmetic; one program per BLOCK_T tokens
does it all in registers.
"""

from __future__ import annotations

import torch

from expertswitch.utils.imports import is_triton_available


def topk_softmax_reference(
    logits: torch.Tensor, k: int, renormalize: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    probs = logits.float().softmax(dim=-1)
    weight, idx = probs.topk(k, dim=-1)
    if renormalize:
        weight = weight / weight.sum(dim=-1, keepdim=True)
    return idx, weight, probs


if is_triton_available():
    import triton
    import triton.language as tl

    @triton.jit
    def _topk_softmax_kernel(
        logits_ptr, idx_ptr, weight_ptr, probs_ptr, T, E, stride_t,
        K: tl.constexpr, K_PAD: tl.constexpr, RENORM: tl.constexpr, WRITE_PROBS: tl.constexpr,
        BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr,
    ):  # fmt: skip
        rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
        cols = tl.arange(0, BLOCK_E)
        row_ok = rows < T
        mask = row_ok[:, None] & (cols[None, :] < E)
        x = tl.load(logits_ptr + rows[:, None] * stride_t + cols[None, :], mask=mask,
                    other=float("-inf")).to(tl.float32)  # fmt: skip
        x = tl.where(mask, x, float("-inf"))
        x = tl.where(row_ok[:, None], x, 0.0)  # rows past T: finite, never stored
        m = tl.max(x, axis=1)
        p = tl.exp(x - m[:, None])
        p = tl.where(mask, p, 0.0)
        p = p / tl.maximum(tl.sum(p, axis=1), 1e-30)[:, None]  # rows past T sum to 0
        if WRITE_PROBS:
            tl.store(probs_ptr + rows[:, None] * E + cols[None, :], p, mask=mask)
        kcols = tl.arange(0, K_PAD)
        vals = tl.zeros((BLOCK_T, K_PAD), dtype=tl.float32)
        idxs = tl.zeros((BLOCK_T, K_PAD), dtype=tl.int32)
        work = tl.where(mask, p, -1.0)
        for j in tl.static_range(K):
            best = tl.max(work, axis=1)
            best_i = tl.min(tl.where(work == best[:, None], cols[None, :], BLOCK_E), axis=1)
            vals = tl.where(kcols[None, :] == j, best[:, None], vals)
            idxs = tl.where(kcols[None, :] == j, best_i[:, None], idxs)
            work = tl.where(cols[None, :] == best_i[:, None], -1.0, work)
        if RENORM:
            vals = vals / tl.maximum(tl.sum(vals, axis=1), 1e-30)[:, None]
        out_mask = row_ok[:, None] & (kcols[None, :] < K)
        tl.store(weight_ptr + rows[:, None] * K + kcols[None, :], vals, mask=out_mask)
        tl.store(idx_ptr + rows[:, None] * K + kcols[None, :], idxs.to(tl.int64), mask=out_mask)


def topk_softmax_triton(
    logits: torch.Tensor, k: int, renormalize: bool, write_probs: bool = True
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    if not is_triton_available():
        raise ImportError("Triton is not installed: pip install 'expertswitch[gpu]'")
    if logits.dim() != 2 or logits.stride(1) != 1:
        raise ValueError("logits must be a [T, E] tensor contiguous along E")
    t, e = logits.shape
    if not 1 <= k <= e:
        raise ValueError(f"k={k} must be between 1 and E={e}")
    idx = torch.empty(t, k, dtype=torch.int64, device=logits.device)
    weight = torch.empty(t, k, dtype=torch.float32, device=logits.device)
    probs = torch.empty(t, e, dtype=torch.float32, device=logits.device) if write_probs else weight
    block_e = triton.next_power_of_2(e)
    block_t = max(1, min(64, 4096 // block_e))
    if t:
        _topk_softmax_kernel[(triton.cdiv(t, block_t),)](
            logits, idx, weight, probs, t, e, logits.stride(0),
            K=k, K_PAD=triton.next_power_of_2(k), RENORM=renormalize, WRITE_PROBS=write_probs,
            BLOCK_T=block_t, BLOCK_E=block_e,
        )  # fmt: skip
    return idx, weight, probs if write_probs else None


def topk_softmax(
    logits: torch.Tensor, k: int, renormalize: bool, use_triton: bool | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(idx, weight, probs); the Triton kernel on CUDA tensors, the reference elsewhere."""
    if use_triton is None:
        use_triton = logits.is_cuda and is_triton_available()
    if use_triton:
        return topk_softmax_triton(logits, k, renormalize)
    return topk_softmax_reference(logits, k, renormalize)
