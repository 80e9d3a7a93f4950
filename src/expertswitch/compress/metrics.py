"""Error measures for lossy compression, in decibels (STYLE.md §4)."""

from __future__ import annotations

import math

import torch


def sqnr_db(ref: torch.Tensor, approx: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio 20·log10(‖ref‖ / ‖ref − approx‖); inf when exact."""
    ref = ref.float()
    noise = (ref - approx.float()).norm().item()
    signal = ref.norm().item()
    if noise == 0.0:
        return math.inf
    if signal == 0.0:
        return -math.inf
    return 20.0 * math.log10(signal / noise)


def output_sqnr_db(x: torch.Tensor, delta: torch.Tensor, approx: torch.Tensor) -> float:
    """SQNR of the layer's delta output x·Δᵀ vs x·Δ̂ᵀ on calibration inputs x [R, K]."""
    x = x.float()
    return sqnr_db(x @ delta.float().T, x @ approx.float().T)
