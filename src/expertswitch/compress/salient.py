"""Salient input-channel selection (ME-Switch).

A few input channels of a delta carry most of the output error at very low bit widths: those
whose inputs are large (activation outliers) or whose delta column quantizes badly. The score of
input channel i is its activation-weighted reconstruction error

    score_i = E[x_i²] · Σ_j (Δ_ji − Q(Δ)_ji)²        (j runs over output rows)

and the top channels are kept in 16 bits.
"""

from __future__ import annotations

import torch

from expertswitch.compress.quant import dequantize_groups, quantize_groups


def salient_count(spec: float, k: int) -> int:
    """`spec` < 1 is a fraction of the K input channels, ≥ 1 a count; clamped to [0, K]."""
    n = round(spec * k) if spec < 1 else int(spec)
    return max(0, min(n, k))


def salient_scores(
    delta: torch.Tensor,
    importance: torch.Tensor,
    bits: int,
    group_size: int,
    symmetric: bool,
    clip_steps: int,
    clip_floor: float | None = None,
) -> torch.Tensor:
    """score [K] for delta [N, K] and importance E[x²] [K]."""
    gq = quantize_groups(delta, bits, group_size, symmetric, importance, clip_steps, clip_floor)
    approx = dequantize_groups(gq.codes, gq.scales, gq.zeros, bits, group_size, delta.shape[1])
    col_err = (delta - approx).square().sum(dim=0)  # [K]
    return importance.to(delta.device).float() * col_err


def select_salient(scores: torch.Tensor, n: int) -> torch.Tensor:
    """Indices (sorted, int64) of the n highest-scoring input channels."""
    if n == 0:
        return torch.zeros(0, dtype=torch.int64, device=scores.device)
    return torch.topk(scores, n).indices.sort().values
