"""Fused gating: softmax over experts, top-k, optional renormalisation, in one launch —
from logits (`topk_softmax`), or with the router matmul fused in front (`router_topk`).

    logits   [T, E]  any float dtype (computed in fp32)
    → idx    int64 [T, k]  chosen experts, best first (ties: lowest expert id)
      weight fp32  [T, k]  their probabilities (renormalised to sum 1 when asked)
      probs  fp32  [T, E]  the full softmax (for the aux loss), when asked

A row whose softmax is not a number (a NaN logit, or a largest logit of ±inf: the model has
diverged) has all-NaN probabilities and still gets k distinct experts in [0, E): NaN ranks
below every probability, so such a row takes experts 0..k−1 with NaN weights. Its own output
is NaN, for the caller to see; no id ever points past the last expert (a grouped GEMM would
read past the weights, and write other tokens' rows).

At decode batch sizes the unfused chain (softmax, topk, sum, divide, casts) is a handful of
launches whose fixed cost is larger than the gating arithmetic; one program per BLOCK_T tokens
does it all in registers.
"""

from __future__ import annotations

import torch

from expertswitch.kernels.select import kernels_for, needs_grad
from expertswitch.utils.imports import is_triton_available


def softmax_or_nan(logits: torch.Tensor) -> torch.Tensor:
    """Softmax over the last dim; a row holding a NaN, or whose largest logit is ±inf, is all
    NaN (torch would give [nan, 0, 0] for [inf, 1, 2]: half a number)."""
    probs = logits.softmax(dim=-1)
    top = logits.amax(dim=-1, keepdim=True)
    bad = logits.isnan().any(dim=-1, keepdim=True) | top.isinf()
    return torch.where(bad, float("nan"), probs)


def topk_softmax_reference(
    logits: torch.Tensor, k: int, renormalize: bool, second_by_logit: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """second_by_logit (k = 2, DeepSpeed's top-2): the second expert is the largest remaining
    logit, not the largest remaining probability (they differ where two probabilities round
    to one fp32 value)."""
    logits = logits.float()
    probs = softmax_or_nan(logits)
    rank_key = torch.where(probs.isnan(), -1.0, probs)  # NaN below every probability
    idx = rank_key.sort(dim=-1, descending=True, stable=True).indices[:, :k]  # ties: lowest id
    if second_by_logit and k >= 2:
        taken = torch.zeros_like(probs, dtype=torch.bool).scatter_(1, idx[:, :1], True)
        rest = logits.masked_fill(taken, float("-inf"))
        top = ~taken & (rest == rest.amax(dim=-1, keepdim=True))  # ties: lowest id
        by_logit = top.float().argmax(dim=-1)
        nan_row = probs.isnan().any(dim=-1)
        idx = idx.clone()
        idx[:, 1] = torch.where(nan_row, idx[:, 1], by_logit)
    weight = probs.gather(1, idx)
    if renormalize:
        weight = weight / weight.sum(dim=-1, keepdim=True)
    return idx, weight, probs


if is_triton_available():
    import triton
    import triton.language as tl

    @triton.jit
    def _softmax_topk_store(
        x, rows, row_ok, cols, E, idx_ptr, weight_ptr, probs_ptr,
        K: tl.constexpr, K_PAD: tl.constexpr, RENORM: tl.constexpr, WRITE_PROBS: tl.constexpr,
        SECOND_BY_LOGIT: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr,
    ):  # fmt: skip
        """x: fp32 logits [BLOCK_T, BLOCK_E] → stores idx, weight (and probs) of valid rows.
        SECOND_BY_LOGIT: the second choice is the largest remaining logit (DeepSpeed's top-2),
        which differs from the largest probability where two round to the same fp32 value."""
        mask = row_ok[:, None] & (cols[None, :] < E)
        x = tl.where(mask, x, float("-inf"))
        x = tl.where(row_ok[:, None], x, 0.0)  # rows past T: finite, never stored
        # a NaN logit or a largest logit of ±inf: no softmax, the whole row is NaN (decided
        # with integer flags: reductions over NaN differ between the GPU and the interpreter)
        has_nan = tl.max(tl.where(mask & (x != x), 1, 0), axis=1) > 0
        m = tl.max(tl.where(x == x, x, float("-inf")), axis=1)
        bad = has_nan | (m == float("inf")) | (m == float("-inf"))
        m = tl.where(bad, 0.0, m)
        p = tl.exp(tl.where(bad[:, None], 0.0, x) - m[:, None])
        p = tl.where(mask, p, 0.0)
        p = p / tl.maximum(tl.sum(p, axis=1), 1e-30)[:, None]  # rows past T sum to 0
        p = tl.where(bad[:, None], float("nan"), p)
        if WRITE_PROBS:
            tl.store(probs_ptr + rows[:, None] * E + cols[None, :], p, mask=mask)
        kcols = tl.arange(0, K_PAD)
        vals = tl.zeros((BLOCK_T, K_PAD), dtype=tl.float32)
        idxs = tl.zeros((BLOCK_T, K_PAD), dtype=tl.int32)
        # ranking keys: probabilities ≥ 0, NaN −1 (below them), taken −2, past E −3: a pick is
        # always a real expert not yet taken, even in a NaN row
        work = tl.where(p == p, p, -1.0)
        work = tl.where(mask, work, -3.0)
        for j in tl.static_range(K):
            best = tl.max(work, axis=1)
            pick = work == best[:, None]
            if SECOND_BY_LOGIT and j == 1:  # among the open experts, the largest logit
                open_ = work > -1.5
                lx = tl.where(open_, x, float("-inf"))
                by_logit = open_ & (lx == tl.max(lx, axis=1)[:, None])
                pick = tl.where(bad[:, None], pick, by_logit)  # NaN rows: 0..k−1 as before
            best_i = tl.min(tl.where(pick, cols[None, :], BLOCK_E), axis=1)
            best = tl.sum(tl.where(cols[None, :] == best_i[:, None], p, 0.0), axis=1)
            vals = tl.where(kcols[None, :] == j, best[:, None], vals)
            idxs = tl.where(kcols[None, :] == j, best_i[:, None], idxs)
            work = tl.where(cols[None, :] == best_i[:, None], -2.0, work)
        if RENORM:
            vals = vals / tl.maximum(tl.sum(vals, axis=1), 1e-30)[:, None]
        out_mask = row_ok[:, None] & (kcols[None, :] < K)
        tl.store(weight_ptr + rows[:, None] * K + kcols[None, :], vals, mask=out_mask)
        tl.store(idx_ptr + rows[:, None] * K + kcols[None, :], idxs.to(tl.int64), mask=out_mask)

    @triton.jit
    def _topk_softmax_kernel(
        logits_ptr, idx_ptr, weight_ptr, probs_ptr, T, E, stride_t,
        K: tl.constexpr, K_PAD: tl.constexpr, RENORM: tl.constexpr, WRITE_PROBS: tl.constexpr,
        SECOND_BY_LOGIT: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr,
    ):  # fmt: skip
        rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
        cols = tl.arange(0, BLOCK_E)
        row_ok = rows < T
        mask = row_ok[:, None] & (cols[None, :] < E)
        x = tl.load(logits_ptr + rows[:, None] * stride_t + cols[None, :], mask=mask,
                    other=float("-inf")).to(tl.float32)  # fmt: skip
        _softmax_topk_store(x, rows, row_ok, cols, E, idx_ptr, weight_ptr, probs_ptr, K, K_PAD,
                            RENORM, WRITE_PROBS, SECOND_BY_LOGIT, BLOCK_T, BLOCK_E)  # fmt: skip

    @triton.jit
    def _router_topk_kernel(
        x_ptr, wg_ptr, idx_ptr, weight_ptr, probs_ptr, part_ptr, counter_ptr,
        T, E, H, h_chunk, stride_xt, stride_we,
        K: tl.constexpr, K_PAD: tl.constexpr, RENORM: tl.constexpr, WRITE_PROBS: tl.constexpr,
        ROUND: tl.constexpr, F32: tl.constexpr, SPLITS: tl.constexpr,
        SECOND_BY_LOGIT: tl.constexpr,
        BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_H: tl.constexpr,
    ):  # fmt: skip
        """The router matmul (fp32 accumulation) fused in front of softmax + top-k. SPLITS > 1
        (decode sizes, where one program would stream the whole gate weight): program (i, s)
        sums H elements [s·h_chunk, (s+1)·h_chunk) into a partial tile; the last of a row
        block's SPLITS programs to finish (an atomic counter, reset by it) adds the partials
        up and finishes the gating."""
        pid_t = tl.program_id(0)
        pid_s = tl.program_id(1)
        rows = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
        cols = tl.arange(0, BLOCK_E)
        row_ok = rows < T
        rows_in = tl.where(row_ok, rows, 0).to(tl.int64)  # padding rows/experts read row 0
        cols_in = tl.where(cols < E, cols, 0).to(tl.int64)
        acc = tl.zeros((BLOCK_T, BLOCK_E), dtype=tl.float32)
        h_lo = pid_s * h_chunk
        h_hi = tl.minimum(h_lo + h_chunk, H)
        for h0 in range(h_lo, h_hi, BLOCK_H):
            offs_h = h0 + tl.arange(0, BLOCK_H)
            h_ok = offs_h < h_hi
            a = tl.load(x_ptr + rows_in[:, None] * stride_xt + offs_h[None, :],
                        mask=h_ok[None, :], other=0.0)  # fmt: skip
            w = tl.load(wg_ptr + cols_in[None, :] * stride_we + offs_h[:, None],
                        mask=h_ok[:, None], other=0.0)  # fmt: skip
            if F32:  # fp32 (or mixed) operands: full fp32 products, as F.linear in fp32
                acc += tl.dot(a.to(tl.float32), w.to(tl.float32), input_precision="ieee")
            else:
                acc += tl.dot(a, w)
        if SPLITS > 1:
            tile = tl.arange(0, BLOCK_T)[:, None] * BLOCK_E + cols[None, :]
            n_tb = tl.num_programs(0)
            tl.store(part_ptr + (pid_s * n_tb + pid_t) * (BLOCK_T * BLOCK_E) + tile, acc)
            tl.debug_barrier()  # every thread's partial stored before the release below
            arrived = tl.atomic_add(counter_ptr + pid_t, 1, sem="acq_rel", scope="gpu")
            if arrived == SPLITS - 1:
                total = tl.zeros((BLOCK_T, BLOCK_E), dtype=tl.float32)
                for s in tl.static_range(SPLITS):
                    total += tl.load(part_ptr + (s * n_tb + pid_t) * (BLOCK_T * BLOCK_E) + tile,
                                     cache_modifier=".cg")  # fmt: skip
                tl.store(counter_ptr + pid_t, 0)  # zero again for the next launch
                _router_finish(total, x_ptr, rows, row_ok, cols, E, idx_ptr, weight_ptr,
                               probs_ptr, K, K_PAD, RENORM, WRITE_PROBS, ROUND,
                               SECOND_BY_LOGIT, BLOCK_T, BLOCK_E)  # fmt: skip
        else:
            _router_finish(acc, x_ptr, rows, row_ok, cols, E, idx_ptr, weight_ptr, probs_ptr, K,
                           K_PAD, RENORM, WRITE_PROBS, ROUND, SECOND_BY_LOGIT, BLOCK_T,
                           BLOCK_E)  # fmt: skip

    @triton.jit
    def _router_finish(
        acc, x_ptr, rows, row_ok, cols, E, idx_ptr, weight_ptr, probs_ptr,
        K: tl.constexpr, K_PAD: tl.constexpr, RENORM: tl.constexpr, WRITE_PROBS: tl.constexpr,
        ROUND: tl.constexpr, SECOND_BY_LOGIT: tl.constexpr, BLOCK_T: tl.constexpr,
        BLOCK_E: tl.constexpr,
    ):  # fmt: skip
        if ROUND:  # logits rounded to the model dtype first, as a bf16 nn.Linear gate does
            acc = acc.to(x_ptr.dtype.element_ty).to(tl.float32)
        _softmax_topk_store(acc, rows, row_ok, cols, E, idx_ptr, weight_ptr, probs_ptr, K, K_PAD,
                            RENORM, WRITE_PROBS, SECOND_BY_LOGIT, BLOCK_T, BLOCK_E)  # fmt: skip


def _k_pad(k: int) -> int:
    return max(2, 1 << (k - 1).bit_length())  # a power of two; 2 at least (no 1-wide aranges)


def _outputs(t: int, e: int, k: int, write_probs: bool, device):
    idx = torch.empty(t, k, dtype=torch.int64, device=device)
    weight = torch.empty(t, k, dtype=torch.float32, device=device)
    probs = torch.empty(t, e, dtype=torch.float32, device=device) if write_probs else weight
    return idx, weight, probs


def router_topk_reference(
    x: torch.Tensor,
    wg: torch.Tensor,
    k: int,
    renormalize: bool,
    round_logits: bool = False,
    second_by_logit: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    logits = torch.nn.functional.linear(x.float(), wg.float())
    if round_logits:
        logits = logits.to(x.dtype)
    return topk_softmax_reference(logits, k, renormalize, second_by_logit)


ROUTER_SPLIT_BYTES = 32 * 1024  # gate weight bytes one program streams at decode sizes
_COUNTERS: dict = {}  # (device, stream) → [int32 counter buffers], kept zero by the kernel


def router_counters(device: torch.device, n: int) -> torch.Tensor | None:
    """n zeroed int32 counters for the split router, one buffer per (device, stream) so
    concurrent streams never share one; the kernel leaves them zero. None while a CUDA graph
    is being captured and no buffer exists yet (one allocated in the capture would belong to
    the graph's memory pool): that call runs unsplit. Buffers are never freed, as a captured
    graph may hold their address."""
    if device.type == "cuda":
        stream = torch.cuda.current_stream(device).cuda_stream
        capturing = torch.cuda.is_current_stream_capturing()
    else:
        stream, capturing = 0, False
    bufs = _COUNTERS.setdefault((str(device), stream), [])
    if bufs and bufs[-1].numel() >= n:
        return bufs[-1]
    if capturing:
        return None
    bufs.append(torch.zeros(max(n, 256), dtype=torch.int32, device=device))
    return bufs[-1]


def router_splits(t: int, e: int, h: int, elt: int, block_h: int) -> int:
    """Programs per row block: one while there are many row blocks; at decode sizes enough
    that each streams about ROUTER_SPLIT_BYTES of the gate weight (at most 8)."""
    if -(-t // 16) >= 8:
        return 1
    return max(1, min(8, e * h * elt // ROUTER_SPLIT_BYTES, h // block_h))


def router_topk_triton(
    x: torch.Tensor,
    wg: torch.Tensor,
    k: int,
    renormalize: bool,
    round_logits: bool = False,
    write_probs: bool = False,
    splits: int | None = None,
    second_by_logit: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Gate matmul + softmax + top-k in one launch: x [T, H], wg [E, H] → (idx, weight, probs).
    Logits accumulate in fp32 from the operands' exact products (= F.linear(x.float(),
    wg.float()) up to summation order); round_logits rounds them to x's dtype first. splits:
    programs per 16-row block along H (None: router_splits)."""
    if not is_triton_available():
        raise ImportError("Triton is not installed: pip install 'expertswitch[gpu]'")
    if x.dim() != 2 or wg.dim() != 2 or x.shape[1] != wg.shape[1]:
        raise ValueError(f"expected x [T, H] and wg [E, H], got {tuple(x.shape)} and "
                         f"{tuple(wg.shape)}")  # fmt: skip
    if x.stride(1) != 1 or wg.stride(1) != 1:
        raise ValueError("x and wg must be contiguous along H")
    (t, h), e = x.shape, wg.shape[0]
    if not 1 <= k <= e:
        raise ValueError(f"k={k} must be between 1 and E={e}")
    idx, weight, probs = _outputs(t, e, k, write_probs, x.device)
    block_e = max(16, triton.next_power_of_2(e))
    block_h = 64 if block_e <= 128 else 32
    if splits is None:
        splits = router_splits(t, e, h, wg.element_size(), block_h)
    if not 1 <= splits <= 8:
        raise ValueError(f"splits={splits}: between 1 and 8")
    n_tb = triton.cdiv(t, 16)
    counters = router_counters(x.device, n_tb) if splits > 1 and t else None
    if counters is None:
        splits = 1
    h_chunk = triton.cdiv(triton.cdiv(h, splits), block_h) * block_h
    part = (torch.empty(splits * n_tb * 16 * block_e, dtype=torch.float32, device=x.device)
            if splits > 1 else weight)  # fmt: skip
    if t:
        _router_topk_kernel[(n_tb, splits)](
            x, wg, idx, weight, probs, part, counters if splits > 1 else idx, t, e, h, h_chunk,
            x.stride(0), wg.stride(0),
            K=k, K_PAD=_k_pad(k), RENORM=renormalize, WRITE_PROBS=write_probs,
            ROUND=round_logits, F32=x.dtype == torch.float32 or x.dtype != wg.dtype,
            SPLITS=splits, SECOND_BY_LOGIT=second_by_logit and k >= 2,
            BLOCK_T=16, BLOCK_E=block_e, BLOCK_H=block_h,
        )  # fmt: skip
    return idx, weight, probs if write_probs else None


def router_topk(
    x: torch.Tensor,
    wg: torch.Tensor,
    k: int,
    renormalize: bool,
    round_logits: bool = False,
    second_by_logit: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(idx, weight) of the routes; the fused kernel on CUDA tensors when no gradient is needed
    (its outputs have no autograd history), the reference otherwise."""
    # no launch for no rows (a rank's empty share of a batch under expert parallelism)
    if kernels_for(x) and not needs_grad(x, wg) and x.shape[0]:
        return router_topk_triton(x.contiguous(), wg.contiguous(), k, renormalize, round_logits,
                                  second_by_logit=second_by_logit)[:2]  # fmt: skip
    return router_topk_reference(x, wg, k, renormalize, round_logits, second_by_logit)[:2]


def topk_softmax_triton(
    logits: torch.Tensor,
    k: int,
    renormalize: bool,
    write_probs: bool = True,
    second_by_logit: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    if not is_triton_available():
        raise ImportError("Triton is not installed: pip install 'expertswitch[gpu]'")
    if logits.dim() != 2 or logits.stride(1) != 1:
        raise ValueError("logits must be a [T, E] tensor contiguous along E")
    t, e = logits.shape
    if not 1 <= k <= e:
        raise ValueError(f"k={k} must be between 1 and E={e}")
    idx, weight, probs = _outputs(t, e, k, write_probs, logits.device)
    block_e = triton.next_power_of_2(e)
    block_t = max(1, min(64, 4096 // block_e))
    if t:
        _topk_softmax_kernel[(triton.cdiv(t, block_t),)](
            logits, idx, weight, probs, t, e, logits.stride(0),
            K=k, K_PAD=_k_pad(k), RENORM=renormalize, WRITE_PROBS=write_probs,
            SECOND_BY_LOGIT=second_by_logit and k >= 2, BLOCK_T=block_t, BLOCK_E=block_e,
        )  # fmt: skip
    return idx, weight, probs if write_probs else None


def topk_softmax(
    logits: torch.Tensor,
    k: int,
    renormalize: bool,
    use_triton: bool | None = None,
    second_by_logit: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(idx, weight, probs); the Triton kernel on CUDA tensors when no gradient is needed (its
    outputs have no autograd history: a router trained through it would learn nothing from the
    loss), the reference otherwise. use_triton=True forces the kernel."""
    if use_triton is None:
        use_triton = kernels_for(logits) and not needs_grad(logits)
    if use_triton:
        return topk_softmax_triton(logits.contiguous(), k, renormalize,
                                   second_by_logit=second_by_logit)  # fmt: skip
    return topk_softmax_reference(logits, k, renormalize, second_by_logit)
