"""The CPU path of a packed delta's matmul: x·Δ̂ᵀ from the archive's parts with as few torch ops
as possible.

`PackedDelta.matmul_reference` is the readable oracle: generic unpacking in int64, a group
reshape with padding, ~25 torch ops per call. At serving sizes on CPU each op costs a few
microseconds of dispatch whatever its size, so the engine's step time was dominated by them
(tiny family, 3 experts × 29 weights per decode step: 15 ms of 21). This path does the same
arithmetic in int32 with shifts by constants, one plane at a time, and applies the group's step
and zero point on a [N, G, g] view, so it costs ~10 ops; it is checked against the reference
in tests/test_delta_kernel.py.
"""

from __future__ import annotations

import torch

from expertswitch.compress.packed import PackedDelta
from expertswitch.compress.packing import plane_widths

_LUTS: dict[tuple[int, torch.device, torch.dtype], torch.Tensor] = {}


def _byte_lut(width: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """[256, 8/width]: the codes one byte of a plane holds, low bits first, as numbers."""
    key = (width, device, dtype)
    if key not in _LUTS:
        b = torch.arange(256, dtype=torch.int32).unsqueeze(-1)
        shifts = torch.arange(0, 8, width, dtype=torch.int32)
        _LUTS[key] = ((b >> shifts) & ((1 << width) - 1)).to(device=device, dtype=dtype)
    return _LUTS[key]


def codes_of(planes: list[torch.Tensor], bits: int, dtype=torch.float32) -> torch.Tensor:
    """Codes [..., N, K_pad] as numbers of `dtype`, from bit planes [..., N, words_p]: each
    plane read as bytes (little-endian words keep channel order) through a 256-entry table,
    so unpacking is one gather rather than shift, mask and convert passes."""
    out = None
    offset = 0
    for plane, w in zip(planes, plane_widths(bits)):
        idx = plane.contiguous().view(torch.uint8).to(torch.int32)  # [..., N, bytes]
        v = torch.nn.functional.embedding(idx, _byte_lut(w, plane.device, dtype))
        v = v.reshape(*plane.shape[:-1], -1)
        out = v if out is None else out + v * (1 << offset)  # exact: small integers
        offset += w
    return out


def dequantized_body(planes, scales, zeros, bits: int, group_size: int, k: int,
                     dtype=torch.float32) -> torch.Tensor:  # fmt: skip
    """(codes − zero)·scale [..., N, K] without the shared 2**scale_exp (a transient: the
    caller multiplies it into x and drops it). q·s − z·s equals (q − z)·s exactly in fp32:
    codes and zero points are integers below 256 and steps come from fp16 (11-bit
    mantissas), so both products and their difference are exact."""
    q = codes_of(planes, bits, dtype)  # [..., N, K_pad]
    lead, groups = q.shape[:-1], scales.shape[-1]
    width = groups * group_size
    if width != q.shape[-1]:  # a partial last group: pad (or cut) to whole groups
        q = torch.nn.functional.pad(q, (0, width - q.shape[-1]))
    s = scales.to(dtype).unsqueeze(-1)  # [..., N, G, 1]
    zero = zeros.to(dtype).unsqueeze(-1) if zeros is not None else ((1 << bits) - 1) / 2
    body = torch.addcmul(-zero * s, q.view(*lead, groups, group_size), s)
    return body.view(*lead, width)[..., :k]


def packed_matmul(x: torch.Tensor, d: PackedDelta) -> torch.Tensor:
    """x [T, K] → fp32 x·Δ̂ᵀ [T, N], the formula of `PackedDelta.matmul_reference`."""
    xf = x.float()
    body = dequantized_body(d.planes, d.scales, d.zeros, d.bits, d.group_size, d.k)
    y = xf @ body.T
    if d.salient_idx is not None:
        y = y + xf.index_select(1, d.salient_idx.long()) @ d.salient_cols.float().T
    return y * 2.0**d.scale_exp
