"""The CPU path of a packed delta's matmul: x·Δ̂ᵀ from the archive's parts with as few torch ops
as possible.

`PackedDelta.matmul_reference` is the readable oracle: generic unpacking in int64, a group
reshape with padding, ~25 torch ops per call. At serving sizes on CPU each op costs a few
microseconds of dispatch whatever its size, so the engine's step time was dominated by them
(tiny family, 3 experts × 29 weights per decode step: 15 ms of 21). This path does the same
arithmetic in int32 with shifts by constants, one plane at a time, and applies the group's step
and zero point on a [N, G, g] view, so it costs ~10 ops; it is checked against the reference
in tests/test_delta_kernel.py. When several active experts store a small weight alike,
`StackedDeltas` applies all of them in ~8 ops, from codes unpacked once when the set of experts
becomes active, without dequantizing (the steps and zero points applied to the products, per
group).

The int4 form (`to_int4`, `int4_matmul`): torch's CPU int4 matmul
(`aten._weight_int4pack_mm_for_cpu`) unpacks 4-bit codes inside its GEMM, so a delta costs about
what a dense matmul does (../shared/CEILINGS.md: 7× less than unpacking with torch ops, tiny
family). Codes of up to 4 bits are repacked into its layout once, when an expert is loaded; the
kernel takes bf16 activations and bf16 steps, so the delta term is rounded to bf16 (~3
significant digits; 2-bit quantization itself moves Δ by tens of percent). Its formula is
w = (c − 8)·s' + z' per group: the codes are shifted to c = q + 8 − 2^(bits−1), centred on 8, so
that (c − 8)·s' and z' = (2^(bits−1) − z)·s stay small and bf16 does not round a difference of
large terms.
"""

from __future__ import annotations

from dataclasses import dataclass

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


def byte_indices(plane: torch.Tensor) -> torch.Tensor:
    """A bit plane [..., N, words] as its bytes [..., N, bytes], int32 (the table's indices;
    little-endian words keep channel order)."""
    return plane.contiguous().view(torch.uint8).to(torch.int32)


def codes_of(planes: list[torch.Tensor], bits: int, dtype=torch.float32) -> torch.Tensor:
    """Codes [..., N, K_pad] as numbers of `dtype`, from bit planes [..., N, words_p]: each
    plane read as bytes through a 256-entry table, so unpacking is one gather rather than
    shift, mask and convert passes."""
    return codes_from_bytes([byte_indices(p) for p in planes], plane_widths(bits), dtype)


def codes_from_bytes(planes: list[torch.Tensor], widths, dtype=torch.float32) -> torch.Tensor:
    """`codes_of` from the planes' byte indices (`byte_indices`) and widths."""
    out = None
    offset = 0
    for idx, w in zip(planes, widths):
        v = torch.nn.functional.embedding(idx, _byte_lut(w, idx.device, dtype))
        v = v.reshape(*idx.shape[:-1], -1)
        out = v if out is None else out + v * (1 << offset)  # exact: small integers
        offset += w
    return out


def dequantized_body(planes, scales, zeros, bits: int, group_size: int, k: int,
                     dtype=torch.float32) -> torch.Tensor:  # fmt: skip
    """(codes − zero)·scale [..., N, K] without the shared 2**scale_exp (a transient: the
    caller multiplies it into x and drops it). q·s − z·s equals (q − z)·s exactly in fp32:
    codes and zero points are integers below 256 and steps come from fp16 (11-bit
    mantissas), so both products and their difference are exact."""
    s = scales.to(dtype).unsqueeze(-1)  # [..., N, G, 1]
    zero = zeros.to(dtype).unsqueeze(-1) if zeros is not None else ((1 << bits) - 1) / 2
    return scaled_body(codes_of(planes, bits, dtype), s, -zero * s, group_size, k)


def scaled_body(q: torch.Tensor, steps: torch.Tensor, offsets, group_size: int,
                k: int) -> torch.Tensor:  # fmt: skip
    """q·step + offset [..., N, K] from codes q [..., N, K_pad] and each group's step and
    offset (−zero·step) [..., N, G, 1]; a partial last group padded (or cut) to whole."""
    lead, groups = q.shape[:-1], steps.shape[-2]
    width = groups * group_size
    if width != q.shape[-1]:
        q = torch.nn.functional.pad(q, (0, width - q.shape[-1]))
    body = torch.addcmul(offsets, q.view(*lead, groups, group_size), steps)
    return body.view(*lead, width)[..., :k]


def packed_matmul(x: torch.Tensor, d: PackedDelta) -> torch.Tensor:
    """x [T, K] → fp32 x·Δ̂ᵀ [T, N], the formula of `PackedDelta.matmul_reference`."""
    xf = x.float()
    body = dequantized_body(d.planes, d.scales, d.zeros, d.bits, d.group_size, d.k)
    y = xf @ body.T
    if d.salient_idx is not None:
        y = y + xf.index_select(1, d.salient_idx.long()) @ d.salient_cols.float().T
    return y * 2.0**d.scale_exp


# experts' deltas of a weight up to this size (N·K) are stacked when several are active: at
# such sizes a delta's matmul costs its ~10 ops' dispatch more than its arithmetic (at 1M,
# 4-bit deltas measured slower stacked than one by one)
STACK_MAX_WEIGHT = 1 << 18


def stack_key(d: PackedDelta) -> tuple | None:
    """Deltas with equal keys stack (same shape and layout); None: this one does not."""
    if len(d.shape) != 2 or d.shape[0] * d.shape[1] > STACK_MAX_WEIGHT or d.bits > 8:
        return None
    return (d.shape, d.bits, d.group_size, d.zeros is None, tuple(d.scales.shape),
            tuple(tuple(p.shape) for p in d.planes), d.scales.device)  # fmt: skip


@dataclass
class StackedDeltas:
    """Several experts' deltas of one weight, stacked so that one batched matmul applies each
    to its own rows: ~8 torch ops for E experts instead of ~10 each (the per-expert path's
    cost at small sizes is those ops' dispatch).

    No dequantized Δ̂ is made, not even transiently. Below 8 bits the codes are stored as
    c = code − zero (asymmetric) or 2·code − (2^bits − 1) with the step halved (symmetric:
    the zero point is a half-integer), integers within ±127, so that

        x·Δ̂ᵀ[r, n] = Σ_g step[n, g]·(x_g · c_g[n])

    is one batched matmul of x by the codes (converted from int8), a multiply by the steps and
    a sum over groups (none with one group per row): the [E, N, K] passes that dequantizing
    made (table lookup, add, multiply-add) are gone (tiny family, 3 experts at 8 rows each:
    2.5-4× faster per weight). 8-bit codes minus their zero point do not fit int8: they are
    centred on m = 128 instead, and each group's offset o = (m − zero)·step is applied to the
    rows' per-group sums, Σ_g (Σ x_g)·o[n, g], one more small batched matmul (an offset
    matrix also for stacks built from a zero point past the code range, which only a damaged
    archive has). The codes are held as int8 [E, G, g, N] (groups of input channels, the
    output channels last: the matmul's layout), one byte a code — what the stack of 2-bit
    planes as int32 byte indices held before, and a quarter of it for 8-bit codes; each step
    and offset has the expert's 2**scale_exp folded in (a power of two: exact). Salient
    channels are padded to the most any expert has (index 0, column 0). Built when a set of
    experts becomes active; only weights up to STACK_MAX_WEIGHT are stacked."""

    codes: torch.Tensor  # int8 [E, G, g, N]: code − zero (see above), 0 past K
    steps: torch.Tensor  # fp32 [E, G, 1, N]
    offsets: torch.Tensor | None  # fp32 [E, G, N]: (128 − zero)·step for centred codes
    k: int
    salient_idx: torch.Tensor | None = None  # int64 [E, 1, S]
    salient_cols: torch.Tensor | None = None  # fp32 [E, S, N]

    def __post_init__(self):
        # one group per row: the codes [E, K, N] and steps [E, 1, N] as views, made once
        # (at decode sizes each torch op, a view's too, costs more than its arithmetic)
        self.one_group = None
        if self.codes.shape[1] == 1:
            self.one_group = (self.codes[:, 0], self.steps[:, 0])

    @classmethod
    def build(cls, deltas: list[PackedDelta]) -> StackedDeltas:
        d0 = deltas[0]
        if d0.bits > 8:
            raise ValueError(f"{d0.bits}-bit codes do not fit int8; stack_key refuses them")
        n, k = d0.shape
        gs = d0.group_size
        groups = d0.scales.shape[-1]
        width = groups * gs  # K rounded up to whole groups
        codes = torch.stack([codes_of(d.planes, d.bits, torch.int32)[:, :k] for d in deltas])
        mult = torch.tensor([2.0**d.scale_exp for d in deltas], device=d0.scales.device)
        steps = torch.stack([d.scales.float() for d in deltas]) * mult.view(-1, 1, 1)  # [E,N,G]
        if d0.zeros is None:  # a half-integer zero point: twice the code, half the step
            codes, steps = 2 * codes - ((1 << d0.bits) - 1), steps / 2
        else:  # each code minus its group's zero point
            zeros = torch.stack([d.zeros.to(torch.int32) for d in deltas])  # [E, N, G]
            codes = codes - zeros.repeat_interleave(gs, dim=-1)[..., :k]
        offsets = None
        if codes.numel() and not -128 <= int(codes.min()) <= int(codes.max()) <= 127:
            # 8 bits: centred on 128, the rest of each code's (code − zero) an offset per group
            zero = zeros.float() if d0.zeros is not None else ((1 << d0.bits) - 1) / 2
            mid = 1 << (d0.bits - 1)
            if d0.zeros is None:
                codes, steps = (codes + (1 << d0.bits) - 1) // 2 - mid, steps * 2
            else:
                codes = codes + zeros.repeat_interleave(gs, dim=-1)[..., :k] - mid
            offsets = ((mid - zero) * steps).transpose(1, 2).contiguous()  # [E, G, N]
        codes = torch.nn.functional.pad(codes, (0, width - k)).to(torch.int8)
        codes = codes.view(len(deltas), n, groups, gs).permute(0, 2, 3, 1).contiguous()
        out = cls(codes, steps.transpose(1, 2).unsqueeze(2).contiguous(), offsets, k)
        idx, out.salient_cols = _padded_salient(deltas)
        out.salient_idx = None if idx is None else idx.unsqueeze(1)
        return out

    @classmethod
    def concat(cls, stacks: list[StackedDeltas]) -> StackedDeltas:
        """One stack whose output channels are the stacks' in turn (q, k and v of the same
        experts, applied by one batched matmul): the same experts, input size and groups.
        Each salient channel keeps its own weight's columns (a block of zeros in the
        others'); a stack without offsets gets zero ones beside a stack that has them."""
        s0 = stacks[0]
        for s in stacks[1:]:
            if s.codes.shape[:3] != s0.codes.shape[:3] or s.k != s0.k:
                raise ValueError(
                    "stacks concatenate along output channels only: "
                    f"{tuple(s.codes.shape)} beside {tuple(s0.codes.shape)}"
                )
        widths = [s.codes.shape[-1] for s in stacks]
        e, groups = s0.codes.shape[0], s0.codes.shape[1]
        offsets = None
        if any(s.offsets is not None for s in stacks):
            offsets = torch.cat([s.offsets if s.offsets is not None
                                 else s.steps.new_zeros(e, groups, n)
                                 for s, n in zip(stacks, widths)], dim=-1)  # fmt: skip
        out = cls(torch.cat([s.codes for s in stacks], dim=-1),
                  torch.cat([s.steps for s in stacks], dim=-1), offsets, s0.k)  # fmt: skip
        counts = [0 if s.salient_idx is None else s.salient_idx.shape[-1] for s in stacks]
        if sum(counts):
            dev = s0.steps.device
            out.salient_idx = torch.cat([s.salient_idx for s in stacks if s.salient_idx
                                         is not None], dim=-1)  # fmt: skip
            cols = torch.zeros(e, sum(counts), sum(widths), device=dev)
            row = col = 0
            for s, c, n in zip(stacks, counts, widths):
                if c:
                    cols[:, row : row + c, col : col + n] = s.salient_cols
                row, col = row + c, col + n
            out.salient_cols = cols
        return out

    def select(self, experts: list[int]) -> StackedDeltas:
        """The stack of some of its experts (in that order)."""
        idx = torch.tensor(experts, dtype=torch.long, device=self.steps.device)

        def pick(t):
            return None if t is None else t.index_select(0, idx)

        return StackedDeltas(pick(self.codes), pick(self.steps), pick(self.offsets), self.k,
                             pick(self.salient_idx), pick(self.salient_cols))  # fmt: skip

    def bmm(self, xg: torch.Tensor) -> torch.Tensor:
        """xg [E, R, K] (expert e's rows in xg[e]) → fp32 [E, R, N]: each its expert's x·Δ̂ᵀ."""
        e, groups, gs, _ = self.codes.shape
        xf = xg if xg.dtype == torch.float32 else xg.float()
        xp = xf
        if groups * gs != self.k:  # a partial last group: zero inputs against zero codes
            xp = torch.nn.functional.pad(xf, (0, groups * gs - self.k))
        if self.one_group is not None:  # one batched matmul, the steps multiplied in place
            codes, steps = self.one_group
            y = torch.bmm(xp, codes.float()).mul_(steps)
        else:
            xv = xp.view(e, -1, groups, gs).transpose(1, 2)  # [E, G, R, g]
            y = (torch.matmul(xv, self.codes.float()) * self.steps).sum(1)  # [E, R, N]
        if self.offsets is not None:  # centred 8-bit codes: [E, R, G] × [E, G, N]
            y.baddbmm_(xp.view(e, -1, groups, gs).sum(-1), self.offsets)
        if self.salient_idx is not None:
            xs = xf.gather(2, self.salient_idx.expand(-1, xf.shape[1], -1))
            y.baddbmm_(xs, self.salient_cols)
        return y


def _padded_salient(deltas: list[PackedDelta]):
    """(int64 [E, S], fp32 [E, S, N] scaled by 2**scale_exp) of the deltas' salient channels,
    padded with channel 0 and zero columns to the most any has; (None, None) if none has."""
    counts = [0 if d.salient_idx is None else d.salient_idx.shape[-1] for d in deltas]
    if not max(counts):
        return None, None
    dev = deltas[0].scales.device
    idx = torch.zeros(len(deltas), max(counts), dtype=torch.long, device=dev)
    cols = torch.zeros(len(deltas), max(counts), deltas[0].shape[0], device=dev)
    for e, (d, s) in enumerate(zip(deltas, counts)):
        if s:
            idx[e, :s] = d.salient_idx.long()
            cols[e, :s] = d.salient_cols.float().T * 2.0**d.scale_exp
    return idx, cols


INT4_GROUPS = (32, 64, 128, 256)  # the group sizes torch's CPU int4 matmul takes


@dataclass
class Int4Form:
    """A delta in torch's CPU int4 layout: weight uint8 [N, K/2], scales_zeros bf16 [G, N, 2]
    (s' and z' of each group), salient channels' indices and columns (fp32 [S, N]); the
    delta's 2**scale_exp is folded into the steps and columns (a power of two: exact)."""

    weight: torch.Tensor
    scales_zeros: torch.Tensor
    group_size: int
    salient_idx: torch.Tensor | None = None
    salient_cols: torch.Tensor | None = None

    def tensors(self) -> list[torch.Tensor]:
        extra = [t for t in (self.salient_idx, self.salient_cols) if t is not None]
        return [self.weight, self.scales_zeros, *extra]

    def map(self, fn) -> Int4Form:
        """A copy with `fn` applied to every tensor (device moves, pinning)."""

        def opt(t):
            return None if t is None else fn(t)

        return Int4Form(fn(self.weight), fn(self.scales_zeros), self.group_size,
                        opt(self.salient_idx), opt(self.salient_cols))  # fmt: skip


def int4_available() -> bool:
    return hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu")


def to_int4(d: PackedDelta) -> Int4Form | None:
    """The int4 form of a 2-D delta on CPU, or None where the kernel cannot take it (codes of
    more than 4 bits, output rows not a multiple of 16, a group size it lacks). A partial last
    group is padded with code 8, times the zero columns `int4_matmul` pads x with."""
    gs = d.group_size
    if (len(d.shape) != 2 or d.bits > 4 or d.shape[0] % 16 or gs not in INT4_GROUPS
            or d.scales.device.type != "cpu" or not int4_available()):  # fmt: skip
        return None
    k = d.shape[1]
    mid = 1 << (d.bits - 1)
    codes = codes_of(d.planes, d.bits, torch.int32)[:, :k] + (8 - mid)  # centred on 8
    width = d.scales.shape[-1] * gs
    codes = torch.nn.functional.pad(codes, (0, width - k), value=8)
    weight = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.contiguous(), 1)
    mult = 2.0**d.scale_exp
    s = d.scales.float() * mult  # [N, G]
    z = d.zeros.float() if d.zeros is not None else torch.full_like(s, ((1 << d.bits) - 1) / 2)
    sz = torch.stack([s.T, ((mid - z) * s).T], dim=-1).to(torch.bfloat16).contiguous()
    form = Int4Form(weight, sz, gs)
    if d.salient_idx is not None:
        form.salient_idx = d.salient_idx.long()
        form.salient_cols = (d.salient_cols.float() * mult).T.contiguous()
    return form


def int4_matmul(x: torch.Tensor, form: Int4Form) -> torch.Tensor:
    """x [T, K] → fp32 x·Δ̂ᵀ [T, N] through the int4 form (salient columns in fp32)."""
    xb = x.to(torch.bfloat16)
    width = form.scales_zeros.shape[0] * form.group_size
    if width != x.shape[1]:  # a partial last group
        xb = torch.nn.functional.pad(xb, (0, width - x.shape[1]))
    y = torch.ops.aten._weight_int4pack_mm_for_cpu(xb.contiguous(), form.weight, form.group_size,
                                                   form.scales_zeros).float()  # fmt: skip
    if form.salient_idx is not None:
        y.addmm_(x.index_select(1, form.salient_idx).float(), form.salient_cols)
    return y
