"""Block alignment of routes for a grouped GEMM (vLLM's `moe_align_block_size`, in torch).

Given expert ids [T, k] (−1 = dropped route), lay the routes out sorted by expert with each
expert's run padded to a multiple of BLOCK_M, so every block of BLOCK_M rows belongs to one
expert and one kernel launch covers all experts:

    sorted_routes  int32 [P]       flat route id t·k + r, or the sentinel T·k in padding
    block_expert   int32 [P/BM]    expert of each block
    P = Σ_e ceil(count_e / BM) · BM

Empty experts own no block; a launch over all blocks touches only experts that have rows.
"""

from __future__ import annotations

import torch


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
