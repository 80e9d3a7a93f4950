"""k-bit group quantization of a weight delta: pure functions of tensors.

A matrix W [N, K] (N output rows, K input channels) is cut along K into G = ceil(K / group_size)
groups. Each (row, group) has its own step size s and, when asymmetric, an integer zero point z:

    asymmetric:  W ≈ (q − z) · s,            q, z ∈ [0, 2^k − 1]
    symmetric:   W ≈ (q − (2^k − 1) / 2) · s, q ∈ [0, 2^k − 1]   (levels symmetric about 0;
                 at k = 1 this is ±s/2, BitDelta's α·sign with α = s/2)

Step sizes come from the group's range shrunk by a clip ratio chosen per group on a grid to
minimise the importance-weighted squared error Σ_c imp_c (W − Ŵ)² (imp = E[x_c²] of the layer's
inputs, so the error that counts is the error in the layer's output, not in the weight).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from expertswitch.compress.packing import padded_k

# Rows handled at once: bounds the temporaries of the clip search to ~1 GB at K = 14336.
_ROW_CHUNK = 2048


@dataclass
class GroupQuant:
    """Quantized matrix before packing.

    codes:  uint8 [..., N, K_pad]  (K_pad = padded_k(K); padding codes are 0)
    scales: fp32  [..., N, G]
    zeros:  uint8 [..., N, G] or None (symmetric)
    """

    codes: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor | None


def num_groups(k: int, group_size: int) -> int:
    return -(-k // group_size)


def qmax(bits: int) -> int:
    return (1 << bits) - 1


def to_groups(w: torch.Tensor, group_size: int) -> torch.Tensor:
    """[..., K] → [..., G, group_size]; a partial last group is filled by repeating its last
    column, which leaves the group's min and max unchanged."""
    k = w.shape[-1]
    pad = num_groups(k, group_size) * group_size - k
    if pad:
        w = torch.cat([w, w[..., -1:].expand(*w.shape[:-1], pad)], dim=-1)
    return w.reshape(*w.shape[:-1], -1, group_size)


def from_groups(wg: torch.Tensor, k: int) -> torch.Tensor:
    """[..., G, group_size] → [..., K] (drops the padding of the last group)."""
    return wg.reshape(*wg.shape[:-2], -1)[..., :k]


def qparams(
    wmin: torch.Tensor, wmax: torch.Tensor, bits: int, symmetric: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Step size (and integer zero point) that map [wmin, wmax] onto the k-bit grid."""
    qm = qmax(bits)
    tiny = torch.finfo(torch.float32).tiny
    if symmetric:
        absmax = torch.maximum(wmin.abs(), wmax.abs())
        return (2.0 * absmax / qm).clamp_min(tiny), None
    wmin = wmin.clamp(max=0.0)
    wmax = wmax.clamp(min=0.0)
    scale = ((wmax - wmin) / qm).clamp_min(tiny)
    zero = torch.round(-wmin / scale).clamp(0, qm)
    return scale, zero


def quantize_values(
    wg: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, bits: int
) -> torch.Tensor:
    """Codes for grouped values wg [..., G, gs] with per-group scale/zero [..., G] (float)."""
    qm = qmax(bits)
    s = scale.unsqueeze(-1)
    if zero is None:
        return torch.clamp(torch.round(wg / s + qm / 2), 0, qm)
    return torch.clamp(torch.round(wg / s) + zero.unsqueeze(-1), 0, qm)


def dequantize_values(
    q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, bits: int
) -> torch.Tensor:
    offset = qmax(bits) / 2 if zero is None else zero.unsqueeze(-1).float()
    return (q.float() - offset) * scale.unsqueeze(-1)


def clip_grid(bits: int, steps: int, floor: float | None = None) -> torch.Tensor:
    """Clip ratios tried per group, geometrically spaced from 1 down to a floor. At 1-2 bits
    the best range lies far inside [min, max]: for a Gaussian group of 128 the 1-bit optimum
    ±mean|w| is ~0.3 of max|w|, for a heavy-tailed (Student-t, ν = 2.5) one under 0.1.
    floor: the lowest ratio (default by bits); a higher floor trades output error for the
    delta's largest entries (see MixedConfig.clip_floor)."""
    if steps <= 1:
        return torch.ones(1)
    low = floor or {1: 0.03, 2: 0.12}.get(bits, 0.4 if bits <= 4 else 0.8)
    return torch.logspace(0.0, torch.log10(torch.tensor(low)).item(), steps)


def _quantize_chunk(
    w: torch.Tensor, bits: int, group_size: int, symmetric: bool, imp: torch.Tensor, grid
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    wg = to_groups(w, group_size)  # [R, G, gs]
    impg = to_groups(imp, group_size)  # [G, gs]
    wmin, wmax = wg.amin(dim=-1), wg.amax(dim=-1)  # [R, G]
    best_err = best_scale = best_zero = None
    for ratio in grid.tolist():
        scale, zero = qparams(wmin * ratio, wmax * ratio, bits, symmetric)
        q = quantize_values(wg, scale, zero, bits)
        err = ((dequantize_values(q, scale, zero, bits) - wg).square() * impg).sum(dim=-1)
        if best_err is None:
            best_err, best_scale, best_zero = err, scale, zero
            continue
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_scale = torch.where(better, scale, best_scale)
        if zero is not None:
            best_zero = torch.where(better, zero, best_zero)
    q = quantize_values(wg, best_scale, best_zero, bits)
    return from_groups(q, w.shape[-1]), best_scale, best_zero


def quantize_groups(
    w: torch.Tensor,
    bits: int,
    group_size: int,
    symmetric: bool = False,
    importance: torch.Tensor | None = None,
    clip_steps: int = 1,
    clip_floor: float | None = None,
) -> GroupQuant:
    """Quantize w [N, K] (fp32) in groups of `group_size` input channels.

    importance: [K] non-negative weight of each input channel's squared error (E[x²]); channels
    with weight 0 (e.g. salient ones kept in fp16) do not influence the step sizes.
    clip_steps: 1 = plain min/max (RTN); > 1 = search that many clip ratios per group.
    """
    n, k = w.shape
    imp = torch.ones(k, device=w.device) if importance is None else importance.to(w.device).float()
    grid = clip_grid(bits, clip_steps, clip_floor)
    codes, scales, zeros = [], [], []
    for r0 in range(0, n, _ROW_CHUNK):
        rows = w[r0 : r0 + _ROW_CHUNK].float()
        q, s, z = _quantize_chunk(rows, bits, group_size, symmetric, imp, grid)
        codes.append(q)
        scales.append(s)
        zeros.append(z)
    zero = None if symmetric else torch.cat(zeros).to(torch.uint8)
    return GroupQuant(codes=_pad_codes(torch.cat(codes), k), scales=torch.cat(scales), zeros=zero)


def _pad_codes(q: torch.Tensor, k: int) -> torch.Tensor:
    return torch.nn.functional.pad(q, (0, padded_k(k) - k)).to(torch.uint8)


def quantize_with_scales(
    w: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, bits: int, group_size: int
) -> torch.Tensor:
    """Codes uint8 [N, K_pad] of w [N, K] under given step sizes / zero points [N, G]."""
    k = w.shape[-1]
    q = quantize_values(to_groups(w.float(), group_size), scales.float(), zeros, bits)
    return _pad_codes(from_groups(q, k), k)


def dequantize_groups(
    codes: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    bits: int,
    group_size: int,
    k: int,
) -> torch.Tensor:
    """codes uint8 [..., N, K_pad], scales [..., N, G], zeros [..., N, G] | None
    → fp32 [..., N, K]."""
    qg = to_groups(codes[..., :k], group_size)
    return from_groups(dequantize_values(qg, scales.float(), zeros, bits), k)
