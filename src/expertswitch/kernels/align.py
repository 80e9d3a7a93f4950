"""Block alignment of routes for a grouped GEMM (vLLM's `moe_align_block_size`, in torch).

Given expert ids [T, k] (−1 = dropped route), lay the routes out sorted by expert with each
expert's run padded to a multiple of BLOCK_M, so every block of BLOCK_M rows belongs to one
expert and one kernel launch covers all experts:

    sorted_routes  int32 [P]       flat route id t·k + r, or the sentinel T·k in padding
    block_expert   int32 [P/BM]    expert of each block
    P = Σ_e ceil(count_e / BM) · BM

Empty experts own no block; a launch over all blocks touches only experts that have rows.

`align_block_size` is the torch reference (exact size P, host syncs for the sizes).
`align_block_size_triton` is the GPU path: three launches, no host sync (so it can be captured
in a CUDA graph), the same order as the reference — routes of one expert stay in route-id order.
It cannot know P on the host, so it allocates the bound P_max = min(R, ceil(R/BM) + E)·BM and
marks blocks past the end with the sentinel expert E; kernels return early on those. It also
returns the per-expert route counts (exp_counts) it computes on the way.
"""

from __future__ import annotations

import torch

from expertswitch.utils.imports import is_triton_available


def sort_routes(expert_idx: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Kept routes sorted by expert: (route ids int64 [R], offsets int64 [E+1]). Stable, so
    within an expert routes stay in route-id order (token order)."""
    flat = expert_idx.reshape(-1)
    kept = flat >= 0
    counts = torch.bincount(flat[kept], minlength=num_experts)
    offsets = torch.zeros(num_experts + 1, dtype=torch.long, device=flat.device)
    offsets[1:] = torch.cumsum(counts, 0)
    order = torch.argsort(torch.where(kept, flat, num_experts), stable=True)
    return order[: int(offsets[-1])], offsets


def align_block_size(
    expert_idx: torch.Tensor, num_experts: int, block_m: int
) -> tuple[torch.Tensor, torch.Tensor]:
    flat = expert_idx.reshape(-1)
    n_routes = flat.numel()
    order, offsets = sort_routes(expert_idx, num_experts)
    counts = offsets[1:] - offsets[:-1]  # [E]
    padded = (counts + block_m - 1) // block_m * block_m
    pad_start = torch.cumsum(padded, 0) - padded
    start = offsets[:-1]
    e_sorted = flat[order]
    dest = pad_start[e_sorted] + torch.arange(order.numel(), device=flat.device) - start[e_sorted]
    total = int(padded.sum())
    sorted_routes = torch.full((total,), n_routes, dtype=torch.int32, device=flat.device)
    sorted_routes[dest] = order.to(torch.int32)
    block_expert = torch.repeat_interleave(
        torch.arange(num_experts, device=flat.device, dtype=torch.int32), padded // block_m
    )
    return sorted_routes, block_expert


def max_blocks(n_routes: int, num_experts: int, block_m: int) -> int:
    """Upper bound on Σ_e ceil(count_e / BM): each expert adds at most one partial block, and
    no block is empty."""
    return min(n_routes, -(-n_routes // block_m) + num_experts)


if is_triton_available():
    import triton
    import triton.language as tl

    @triton.jit
    def _expert_ids(idx_ptr, r, R, E):
        """Expert of each route, −1 for a dropped route or an id outside [0, E)."""
        e = tl.load(idx_ptr + r, mask=r < R, other=-1).to(tl.int32)
        return tl.where((e >= 0) & (e < E), e, -1)

    @triton.jit
    def _chunk_counts_kernel(idx_ptr, counts_ptr, R, E, BLOCK_R: tl.constexpr,
                             E_PAD: tl.constexpr):  # fmt: skip
        """counts[c, e] = routes of chunk c (BLOCK_R routes) that go to expert e."""
        c = tl.program_id(0)
        r = c * BLOCK_R + tl.arange(0, BLOCK_R)
        e = _expert_ids(idx_ptr, r, R, E)
        cols = tl.arange(0, E_PAD)
        hist = tl.sum((e[:, None] == cols[None, :]).to(tl.int32), axis=0)  # [E_PAD]
        tl.store(counts_ptr + c * E_PAD + cols, hist)

    @triton.jit
    def _block_layout_kernel(
        counts_ptr, base_ptr, exp_counts_ptr, routes_ptr, block_expert_ptr,
        n_chunks, n_blocks, R, E,
        BM: tl.constexpr, E_PAD: tl.constexpr, C_BLOCK: tl.constexpr, B_BLOCK: tl.constexpr,
    ):  # fmt: skip
        """One program: expert totals, padded starts, each chunk's first slot per expert
        (base[c, e]), the expert of every block (E past the end) and the padding sentinels."""
        cols = tl.arange(0, E_PAD)
        emask = cols < E
        total = tl.zeros((E_PAD,), dtype=tl.int32)
        for c0 in range(0, n_chunks, C_BLOCK):
            rows = c0 + tl.arange(0, C_BLOCK)
            ptrs = counts_ptr + rows[:, None] * E_PAD + cols[None, :]
            total += tl.sum(tl.load(ptrs, mask=(rows < n_chunks)[:, None], other=0), axis=0)
        padded = (total + BM - 1) // BM * BM
        pad_end = tl.cumsum(padded, axis=0)
        pad_start = pad_end - padded
        tl.store(exp_counts_ptr + cols, total.to(tl.int64), mask=emask)
        run = pad_start
        for c0 in range(0, n_chunks, C_BLOCK):
            rows = c0 + tl.arange(0, C_BLOCK)
            rmask = (rows < n_chunks)[:, None]
            ptrs = counts_ptr + rows[:, None] * E_PAD + cols[None, :]
            h = tl.load(ptrs, mask=rmask, other=0)
            tl.store(base_ptr + rows[:, None] * E_PAD + cols[None, :],
                     run[None, :] + tl.cumsum(h, axis=0) - h, mask=rmask)  # fmt: skip
            run += tl.sum(h, axis=0)
        for b0 in range(0, n_blocks, B_BLOCK):
            b = b0 + tl.arange(0, B_BLOCK)
            done = (pad_end[None, :] <= b[:, None] * BM) & emask[None, :]
            tl.store(block_expert_ptr + b, tl.sum(done.to(tl.int32), axis=1), mask=b < n_blocks)
        j = tl.arange(0, BM)
        slot = pad_start[:, None] + total[:, None] + j[None, :]
        tl.store(routes_ptr + slot, tl.full((E_PAD, BM), 0, tl.int32) + R,
                 mask=emask[:, None] & (slot < pad_end[:, None]))  # fmt: skip

    @triton.jit
    def _scatter_routes_kernel(idx_ptr, base_ptr, routes_ptr, R, E, BLOCK_R: tl.constexpr,
                               E_PAD: tl.constexpr):  # fmt: skip
        """Each route goes to base[c, e] + (earlier routes of its chunk with the same expert)."""
        c = tl.program_id(0)
        i = tl.arange(0, BLOCK_R)
        r = c * BLOCK_R + i
        e = _expert_ids(idx_ptr, r, R, E)
        earlier = (e[:, None] == e[None, :]) & (i[None, :] < i[:, None])
        rank = tl.sum(earlier.to(tl.int32), axis=1)
        keep = (r < R) & (e >= 0)
        base = tl.load(base_ptr + c * E_PAD + e, mask=keep, other=0)
        tl.store(routes_ptr + base + rank, r, mask=keep)


def align_block_size_triton(
    expert_idx: torch.Tensor, num_experts: int, block_m: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(sorted_routes int32 [P_max], block_expert int32 [P_max/BM], exp_counts int64 [E]);
    ids outside [0, E) count as dropped routes. block_m: a power of two."""
    if not is_triton_available():
        raise ImportError("Triton is not installed: pip install 'expertswitch[gpu]'")
    if block_m & (block_m - 1) or block_m < 1:
        raise ValueError(f"block_m={block_m} must be a power of two")
    flat = expert_idx.reshape(-1).contiguous()
    n_routes, dev = flat.numel(), flat.device
    e_pad = max(16, triton.next_power_of_2(num_experts))
    block_r = 128 if e_pad <= 128 else 64  # the [BLOCK_R, BLOCK_R] and [BLOCK_R, E_PAD] tiles
    n_chunks = max(1, triton.cdiv(n_routes, block_r))
    n_blocks = max_blocks(n_routes, num_experts, block_m)
    counts = torch.empty(n_chunks, e_pad, dtype=torch.int32, device=dev)
    base = torch.empty_like(counts)
    exp_counts = torch.empty(num_experts, dtype=torch.int64, device=dev)
    routes = torch.empty(n_blocks * block_m, dtype=torch.int32, device=dev)
    block_expert = torch.empty(n_blocks, dtype=torch.int32, device=dev)
    _chunk_counts_kernel[(n_chunks,)](flat, counts, n_routes, num_experts, BLOCK_R=block_r,
                                      E_PAD=e_pad)  # fmt: skip
    _block_layout_kernel[(1,)](
        counts, base, exp_counts, routes, block_expert, n_chunks, n_blocks, n_routes,
        num_experts, BM=block_m, E_PAD=e_pad, C_BLOCK=max(1, 8192 // e_pad), B_BLOCK=64,
    )  # fmt: skip
    _scatter_routes_kernel[(n_chunks,)](flat, base, routes, n_routes, num_experts,
                                        BLOCK_R=block_r, E_PAD=e_pad)  # fmt: skip
    return routes, block_expert, exp_counts
