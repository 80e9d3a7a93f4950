"""Sort-based dispatch for experts given as arbitrary modules: a token→expert mapping table
instead of DeepSpeed's one-hot [S, E, C] einsum (S·E·C·M work to move S·k·M numbers).

Kept routes are sorted by expert; for R kept routes:

    route_ids   int64 [R]    flat route id t·k + r of each sorted row
    token_ids   int64 [R]    = route_ids // k, the token each row reads
    weights     fp32  [R]    the gate weight each row's output is scaled by
    offsets     int64 [E+1]  rows of expert e are offsets[e]:offsets[e+1]

Stacked experts skip this and go straight to kernels.fused_moe, which sorts the same way.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from expertswitch.kernels.align import sort_routes


@dataclass
class Dispatch:
    route_ids: torch.Tensor
    token_ids: torch.Tensor
    weights: torch.Tensor
    offsets: torch.Tensor
    num_tokens: int

    @property
    def counts(self) -> torch.Tensor:
        return self.offsets[1:] - self.offsets[:-1]


def make_dispatch(expert_idx: torch.Tensor, weights: torch.Tensor, num_experts: int) -> Dispatch:
    """expert_idx int64 [T, k] (−1 = dropped), weights [T, k] → the sorted dispatch table."""
    t, k = expert_idx.shape
    route_ids, offsets = sort_routes(expert_idx, num_experts)
    return Dispatch(
        route_ids=route_ids,
        token_ids=torch.div(route_ids, k, rounding_mode="floor"),
        weights=weights.reshape(-1)[route_ids],
        offsets=offsets,
        num_tokens=t,
    )


def permute(x: torch.Tensor, d: Dispatch) -> torch.Tensor:
    """x [T, H] → rows grouped by expert [R, H]."""
    return x.index_select(0, d.token_ids)


def unpermute(y: torch.Tensor, d: Dispatch) -> torch.Tensor:
    """Rows [R, H] → tokens [T, H]: scale each by its gate weight and sum a token's routes in
    fp32 (summing top-k routes in bf16 loses precision), then cast back."""
    out = torch.zeros(d.num_tokens, y.shape[-1], dtype=torch.float32, device=y.device)
    return out.index_add_(0, d.token_ids, y.float() * d.weights.unsqueeze(-1)).to(y.dtype)
