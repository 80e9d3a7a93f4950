"""`PackedDelta`: one quantized delta tensor in the archive layout (docs/archive.md).

For a matrix Δ [N, K] (N output rows, K input channels, G = ceil(K / group_size) groups,
S salient input channels); a stacked expert tensor [E, N, K] adds a leading E to every part:

    planes[p]     int32 [N, K_pad·w_p/32]  codes packed along K, bit plane p of width w_p
    scales        fp16  [N, G]             step size per (row, group), times 2**-scale_exp
    zeros         uint8 [N, G]             integer zero point (asymmetric only)
    salient_idx   int32 [S]                sorted input channels kept in 16 bits
    salient_cols  fp16  [N, S]             Δ[:, idx] − dequant(codes)[:, idx], times 2**-scale_exp

so that Δ̂ = dequant(codes) + scatter(salient_cols) exactly reproduces the salient columns (up to
fp16 rounding) whatever the codes hold there. Fine-tuning deltas are small (|Δ| ~ 1e-5..1e-3):
plain fp16 would store their step sizes as subnormals with few significant bits, so all fp16
parts share one power-of-two exponent `scale_exp` per tensor; a kernel multiplies its fp32
accumulator by 2**scale_exp once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from expertswitch.compress.packing import pack_codes, plane_widths, unpack_codes
from expertswitch.compress.quant import dequantize_groups

# Largest fp16 part maps to at most 2**14 (fp16 max is 65504 ≈ 2**16), so 28 binades of
# normal fp16 lie below it.
_FP16_TOP_EXP = 14


@dataclass
class PackedDelta:
    shape: tuple[int, ...]
    bits: int
    group_size: int
    symmetric: bool
    scale_exp: int
    planes: list[torch.Tensor]
    scales: torch.Tensor
    zeros: torch.Tensor | None = None
    salient_idx: torch.Tensor | None = None
    salient_cols: torch.Tensor | None = None

    @classmethod
    def build(
        cls,
        shape: tuple[int, ...],
        codes: torch.Tensor,
        scales: torch.Tensor,
        zeros: torch.Tensor | None,
        bits: int,
        group_size: int,
        symmetric: bool,
        salient_idx: torch.Tensor | None = None,
        salient_resid: torch.Tensor | None = None,
    ) -> PackedDelta:
        """Pack fp32 quantization results (codes uint8 [..., N, K_pad]) into the archive layout."""
        peak = scales.abs().max().item() if scales.numel() else 0.0
        if salient_resid is not None and salient_resid.numel():
            peak = max(peak, salient_resid.abs().max().item())
        exp = math.ceil(math.log2(peak)) - _FP16_TOP_EXP if peak > 0 else 0
        mult = 2.0**-exp
        has_salient = salient_idx is not None and salient_idx.shape[-1] > 0
        return cls(
            shape=tuple(shape),
            bits=bits,
            group_size=group_size,
            symmetric=symmetric,
            scale_exp=exp,
            planes=pack_codes(codes, bits),
            scales=(scales.float() * mult).half(),
            zeros=zeros,
            salient_idx=salient_idx.to(torch.int32) if has_salient else None,
            salient_cols=(salient_resid.float() * mult).half() if has_salient else None,
        )

    @property
    def k(self) -> int:
        return self.shape[-1]

    @property
    def n_salient(self) -> int:
        return 0 if self.salient_idx is None else self.salient_idx.shape[-1]

    def dequantize(self, device: torch.device | str | None = None) -> torch.Tensor:
        """Dense fp32 Δ̂ of `shape` (the reference path; serving kernels never build this)."""

        def dev(t):
            return None if t is None else t.to(device) if device is not None else t

        codes = unpack_codes([dev(p) for p in self.planes], self.bits)
        mult = 2.0**self.scale_exp
        w = dequantize_groups(
            codes,
            dev(self.scales).float() * mult,
            dev(self.zeros),
            self.bits,
            self.group_size,
            self.k,
        )
        if self.salient_idx is not None:
            idx = dev(self.salient_idx).long()
            idx = idx.unsqueeze(-2).expand(*w.shape[:-1], idx.shape[-1])
            w.scatter_add_(-1, idx, dev(self.salient_cols).float() * mult)
        return w

    def matmul_reference(self, x: torch.Tensor) -> torch.Tensor:
        """x [T, K] → x·Δ̂ᵀ [T, N] the way a serving kernel computes it (docs/archive.md): the
        k-bit codes times x, plus the salient fp16 columns times the gathered x[:, idx], with
        the shared 2**scale_exp applied once to the sum. 2-D deltas only."""
        if len(self.shape) != 2:
            raise ValueError("matmul_reference takes a 2-D delta; index a stacked one first")
        codes = unpack_codes(self.planes, self.bits)
        body = dequantize_groups(codes, self.scales.float(), self.zeros, self.bits,
                                 self.group_size, self.k)  # fmt: skip
        y = x.float() @ body.T  # [T, N]
        if self.salient_idx is not None:
            y = y + x.float()[:, self.salient_idx.long()] @ self.salient_cols.float().T
        return y * 2.0**self.scale_exp

    # --- slices (tensor parallelism: each rank keeps the part its slice of the base uses) ----

    def rows(self, lo: int, hi: int) -> PackedDelta:
        """Output rows [lo, hi) of a 2-D delta, as a packed delta of its own (copies)."""
        if len(self.shape) != 2 or not 0 <= lo < hi <= self.shape[0]:
            raise ValueError(f"rows [{lo}, {hi}) of a delta of shape {list(self.shape)}")

        def cut(t):
            return None if t is None else t[lo:hi].clone()

        return PackedDelta((hi - lo, self.k), self.bits, self.group_size, self.symmetric,
                           self.scale_exp, [cut(p) for p in self.planes], cut(self.scales),
                           cut(self.zeros), None if self.salient_idx is None
                           else self.salient_idx.clone(), cut(self.salient_cols))  # fmt: skip

    def cols(self, lo: int, hi: int) -> PackedDelta:
        """Input channels [lo, hi) of a 2-D delta, as a packed delta of its own: whole words of
        every bit plane and whole quantization groups, so lo must be a multiple of 32 and of
        group_size (hi too, unless it is K), and the salient channels that fall inside, renumbered.
        A ConfigError names the alignment otherwise."""
        from expertswitch.compress.packing import WORD_BITS, padded_k, plane_widths
        from expertswitch.errors import ConfigError

        n, k = self.shape if len(self.shape) == 2 else (None, None)
        if k is None or not 0 <= lo < hi <= k:
            raise ValueError(f"columns [{lo}, {hi}) of a delta of shape {list(self.shape)}")
        row_group = self.group_size >= k  # one group per row (BitDelta): the scale applies to all
        step = WORD_BITS if row_group else math.lcm(WORD_BITS, self.group_size)
        if lo % step or (hi != k and hi % step):
            raise ConfigError(f"a slice of {hi - lo} of the {k} input channels of a "
                              f"{self.bits}-bit delta with group_size {self.group_size} must "
                              f"start and end on multiples of {step} (whole quantization "
                              "groups and 32-channel words)")  # fmt: skip
        end = padded_k(hi) if hi == k else hi
        planes = [p[:, lo * w // WORD_BITS : end * w // WORD_BITS].contiguous()
                  for p, w in zip(self.planes, plane_widths(self.bits))]  # fmt: skip
        g0, g1 = (0, 1) if row_group else (lo // self.group_size, -(-hi // self.group_size))
        scales = self.scales[:, g0:g1].contiguous()
        zeros = None if self.zeros is None else self.zeros[:, g0:g1].contiguous()
        idx = cols = None
        if self.salient_idx is not None:
            inside = (self.salient_idx >= lo) & (self.salient_idx < hi)
            if bool(inside.any()):
                idx = (self.salient_idx[inside] - lo).to(torch.int32)
                cols = self.salient_cols[:, inside].contiguous()
        group = hi - lo if row_group else self.group_size
        return PackedDelta((n, hi - lo), self.bits, group, self.symmetric, self.scale_exp, planes,
                           scales, zeros, idx, cols)  # fmt: skip

    # --- archive round trip: parts are named tensors, meta is JSON ---------------------------

    def parts(self) -> dict[str, torch.Tensor]:
        out = {f"qweight.{i}": p for i, p in enumerate(self.planes)}
        out["scales"] = self.scales
        if self.zeros is not None:
            out["zeros"] = self.zeros
        if self.salient_idx is not None:
            out["salient_idx"] = self.salient_idx
            out["salient_cols"] = self.salient_cols
        return out

    def meta(self) -> dict:
        return {
            "shape": list(self.shape),
            "bits": self.bits,
            "group_size": self.group_size,
            "symmetric": self.symmetric,
            "scale_exp": self.scale_exp,
            "n_salient": self.n_salient,
        }

    @classmethod
    def from_parts(cls, meta: dict, parts: dict[str, torch.Tensor]) -> PackedDelta:
        n_planes = len(plane_widths(meta["bits"]))
        return cls(
            shape=tuple(meta["shape"]),
            bits=meta["bits"],
            group_size=meta["group_size"],
            symmetric=meta["symmetric"],
            scale_exp=meta["scale_exp"],
            planes=[parts[f"qweight.{i}"] for i in range(n_planes)],
            scales=parts["scales"],
            zeros=parts.get("zeros"),
            salient_idx=parts.get("salient_idx"),
            salient_cols=parts.get("salient_cols"),
        )

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.parts().values())

    @classmethod
    def stack(cls, items: list[PackedDelta]) -> PackedDelta:
        """Stack per-expert matrices [N, K] into one [E, N, K] tensor with a shared exponent
        (rescaling fp16 parts by powers of two is exact while they stay normal)."""
        first = items[0]
        exp = max(it.scale_exp for it in items)

        def rescaled(t, it):
            return (t.float() * 2.0 ** (it.scale_exp - exp)).half()

        def stacked(get):
            vals = [get(it) for it in items]
            return None if vals[0] is None else torch.stack(vals)

        return cls(
            shape=(len(items), *first.shape),
            bits=first.bits,
            group_size=first.group_size,
            symmetric=first.symmetric,
            scale_exp=exp,
            planes=[torch.stack([it.planes[i] for it in items]) for i in range(len(first.planes))],
            scales=stacked(lambda it: rescaled(it.scales, it)),
            zeros=stacked(lambda it: it.zeros),
            salient_idx=stacked(lambda it: it.salient_idx),
            salient_cols=stacked(
                lambda it: None if it.salient_cols is None else rescaled(it.salient_cols, it)
            ),
        )
