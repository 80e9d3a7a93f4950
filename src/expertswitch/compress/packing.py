"""Exact bit packing of k-bit codes along the input dimension.

Layout (the one the serving kernel reads, see docs/archive.md): a k-bit code is split into
*bit planes* of power-of-two widths, low bits first: 1 → [1], 2 → [2], 3 → [2, 1], 4 → [4],
8 → [8]. Plane p of width w packs 32 / w consecutive input channels into one int32 word, channel
i of the word at bits [i·w, (i+1)·w). So every plane is a dense [..., K_pad·w/32] int32 tensor,
a kernel loads one word and shifts out 32/w codes, and 3-bit codes cost exactly 3 bits (a
"10 codes per word" layout would cost 3.2).
"""

from __future__ import annotations

import torch

from expertswitch.errors import ConfigError

SUPPORTED_BITS = (1, 2, 3, 4, 8)
_PLANES = {1: (1,), 2: (2,), 3: (2, 1), 4: (4,), 8: (8,)}
WORD_BITS = 32


def plane_widths(bits: int) -> tuple[int, ...]:
    """Widths of the bit planes that store a `bits`-bit code, low bits first."""
    if bits not in _PLANES:
        raise ConfigError(f"bits={bits} is not supported: choose one of {SUPPORTED_BITS}")
    return _PLANES[bits]


def padded_k(k: int) -> int:
    """Input dimension rounded up to a whole word for every plane width (a multiple of 32)."""
    return -(-k // WORD_BITS) * WORD_BITS


def pack_codes(codes: torch.Tensor, bits: int) -> list[torch.Tensor]:
    """Pack integer codes [..., K_pad] (K_pad a multiple of 32, values < 2**bits) into planes.

    Returns one int32 tensor [..., K_pad * w / 32] per plane width w of `plane_widths(bits)`.
    """
    k_pad = codes.shape[-1]
    if k_pad % WORD_BITS:
        raise ValueError(f"last dim {k_pad} must be a multiple of {WORD_BITS}; pad with padded_k")
    c = codes.to(torch.int64)
    if c.numel() and (c.min() < 0 or c.max() >= (1 << bits)):
        raise ValueError(f"codes out of range for {bits} bits")
    planes = []
    offset = 0
    for w in plane_widths(bits):
        per_word = WORD_BITS // w
        vals = ((c >> offset) & ((1 << w) - 1)).reshape(*c.shape[:-1], k_pad // per_word, per_word)
        shifts = torch.arange(per_word, dtype=torch.int64, device=c.device) * w
        words = (vals << shifts).sum(dim=-1)  # [..., K_pad/per_word], values in [0, 2**32)
        words = torch.where(words >= 1 << 31, words - (1 << 32), words)
        planes.append(words.to(torch.int32))
        offset += w
    return planes


def unpack_codes(planes: list[torch.Tensor], bits: int) -> torch.Tensor:
    """Inverse of `pack_codes`: planes → uint8 codes [..., K_pad]."""
    widths = plane_widths(bits)
    if len(planes) != len(widths):
        raise ValueError(f"{bits}-bit codes need {len(widths)} planes, got {len(planes)}")
    out = None
    offset = 0
    for words, w in zip(planes, widths):
        per_word = WORD_BITS // w
        wd = words.to(torch.int64) & 0xFFFFFFFF
        shifts = torch.arange(per_word, dtype=torch.int64, device=wd.device) * w
        vals = (wd.unsqueeze(-1) >> shifts) & ((1 << w) - 1)  # [..., words, per_word]
        vals = vals.reshape(*wd.shape[:-1], wd.shape[-1] * per_word) << offset
        out = vals if out is None else out | vals
        offset += w
    return out.to(torch.uint8)
