"""Grouped expert MLP over rows already sorted by expert: the pure-torch reference.

    x        [R, H]         rows grouped by expert (rows of expert e: offsets[e]:offsets[e+1])
    w_in     [E, F_in, H]   F_in = 2F for SwiGLU (gate rows, then up rows), F otherwise
    w_out    [E, H, F]
    b_in     [E, F_in] | None,  b_out [E, H] | None
    → y      [R, H]

This is the CPU path and the oracle of the Triton kernel (kernels/fused_moe.py). It is
differentiable: autograd goes through index views and matmuls.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

ACTIVATIONS = ("swiglu", "gelu", "relu", "silu")


def activate(h: torch.Tensor, activation: str) -> torch.Tensor:
    """h [R, F_in] → [R, F]; SwiGLU splits h into (gate, up) halves: silu(gate) · up."""
    if activation == "swiglu":
        gate, up = h.chunk(2, dim=-1)
        return F.silu(gate) * up
    if activation == "gelu":
        return F.gelu(h)
    if activation == "relu":
        return F.relu(h)
    if activation == "silu":
        return F.silu(h)
    raise ValueError(f"unknown activation {activation!r}: choose one of {ACTIVATIONS}")


def grouped_mlp_reference(
    x: torch.Tensor,
    offsets: torch.Tensor,
    w_in: torch.Tensor,
    w_out: torch.Tensor,
    activation: str = "swiglu",
    b_in: torch.Tensor | None = None,
    b_out: torch.Tensor | None = None,
) -> torch.Tensor:
    bounds = offsets.tolist()
    outs = []
    for e in range(w_in.shape[0]):
        lo, hi = bounds[e], bounds[e + 1]
        if hi == lo:
            continue
        h = F.linear(x[lo:hi], w_in[e], None if b_in is None else b_in[e])
        outs.append(
            F.linear(activate(h, activation), w_out[e], None if b_out is None else b_out[e])
        )
    if not outs:
        return x.new_zeros(0, w_out.shape[1])
    return torch.cat(outs)
