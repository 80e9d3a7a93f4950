"""Many experts' packed deltas in one batch: y[t] += Δ̂_{slot(t)} · x[t] (Punica's SGMV,
DeltaZip's SBMM) for the archive's bit-plane layout (docs/archive.md), never building a dense Δ̂.

    x          [T, K]      rows of one linear layer's input (fp32, fp16 or bf16)
    row_slot   int [T]     slot of each row's expert; −1 = base only (no delta)
    table      DeltaTable  per slot: pointers to its parts, n_salient, 2**scale_exp
    groups     RowGroups   rows sorted by slot, each slot's run padded to BLOCK_M
    → out      [T, N]      out[t] += 2^e_s · (x[t]·dequant(codes_s)ᵀ + x[t, idx_s]·salient_colsᵀ)

One launch for all slots: program (m, n) takes BLOCK_M rows of one slot and BLOCK_N output
columns, fetches that slot's pointers from the table, and walks K in BLOCK_K tiles that lie in
one quantization group: it shifts the codes out of each plane's int32 words, takes the integer
tile (q − z) — or 2q − (2^k − 1) when symmetric — in x's dtype (exact: |·| ≤ 255 fits bf16's
8-bit significand), multiplies by x with fp32 accumulation and scales the tile's product by the
group's step. Keeping the step outside the dot matters: the fp16 parts are stored times
2^−scale_exp with steps up to 2^14, so a dequantized weight (up to 2^14·255) overflows fp16.
The salient channels follow as a thin GEMM over S gathered columns of x (masked by the slot's
own S), and the sum is scaled by the slot's 2^scale_exp and added into out. Rows of slot −1 own
no block and are never touched.

Experts stay in their own allocations (an expert pool moves them independently): a table is
built once per (layer, set of resident experts); row groups once per engine step, shared by
every linear layer. `delta_matmul_reference` is the oracle and the CPU path.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from expertswitch.compress.packed import PackedDelta
from expertswitch.compress.packing import padded_k, plane_widths
from expertswitch.compress.quant import num_groups
from expertswitch.kernels.align import align_block_size, align_block_size_triton
from expertswitch.kernels.moe_config import SMS, device_limits  # SMS: the default target
from expertswitch.utils.imports import is_triton_available

# Table columns: planes 0 and 1 (3-bit codes use two), scales, zeros, salient_idx, salient_cols.
TABLE_COLS = 6
_X_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def delta_matmul_reference(
    x: torch.Tensor, row_slot: torch.Tensor, deltas: list[PackedDelta | None]
) -> torch.Tensor:
    """fp32 [T, N]: each slot's rows through PackedDelta.matmul_reference; rows of slot −1, or
    of a slot whose delta is None, are 0."""
    present = [d for d in deltas if d is not None]
    if not present:
        raise ValueError("no delta given: the output width N is unknown")
    out = torch.zeros(x.shape[0], present[0].shape[0], dtype=torch.float32, device=x.device)
    for s in torch.unique(row_slot[row_slot >= 0]).tolist():
        if s >= len(deltas):
            raise ValueError(f"row_slot holds slot {s}, but only {len(deltas)} deltas are given")
        d = deltas[s]
        if d is None:
            continue
        rows = (row_slot == s).nonzero().flatten()
        out[rows] = d.matmul_reference(x[rows].to(d.scales.device)).to(x.device)
    return out


def _check_delta(i: int, d: PackedDelta | None, ref: PackedDelta) -> None:
    if d is None:
        raise ValueError(f"slot {i}: no delta (a table holds resident experts only)")
    if len(d.shape) != 2:
        raise ValueError(f"slot {i}: delta of shape {d.shape} is not 2-D; index a stacked one")
    fmt = (d.shape, d.bits, d.group_size, d.symmetric)
    want = (ref.shape, ref.bits, ref.group_size, ref.symmetric)
    if fmt != want:
        raise ValueError(f"slot {i}: (shape, bits, group_size, symmetric) = {fmt}, slot 0 has "
                         f"{want}; one table holds one format")  # fmt: skip
    if len(d.planes) != len(plane_widths(d.bits)):
        raise ValueError(f"slot {i}: {len(d.planes)} bit planes for {d.bits}-bit codes")
    n, k = d.shape
    g = num_groups(k, d.group_size)
    parts = [(f"qweight.{p}", t, torch.int32, (n, padded_k(k) * w // 32))
             for p, (t, w) in enumerate(zip(d.planes, plane_widths(d.bits)))]  # fmt: skip
    parts.append(("scales", d.scales, torch.float16, (n, g)))
    if not d.symmetric:
        parts.append(("zeros", d.zeros, torch.uint8, (n, g)))
    if d.salient_idx is not None:
        s = d.n_salient
        parts += [("salient_idx", d.salient_idx, torch.int32, (s,)),
                  ("salient_cols", d.salient_cols, torch.float16, (n, s))]  # fmt: skip
    for name, t, dtype, shape in parts:
        if t is None or t.dtype != dtype or tuple(t.shape) != shape:
            got = None if t is None else (t.dtype, tuple(t.shape))
            raise ValueError(f"slot {i}: part {name} is {got}, expected {(dtype, shape)}")


def _resident(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """On `device`, contiguous and 16-byte aligned: the kernel tells the compiler so (vector
    loads), and a view into a stacked tensor may start anywhere."""
    t = t.to(device).contiguous()
    return t.clone() if t.data_ptr() % 16 else t


@dataclass
class DeltaTable:
    """The resident experts of one linear layer, one row per slot, all on one device:

    ptrs       int64 [n_slots, 6]  data_ptr of plane 0, plane 1, scales, zeros, salient_idx,
                                   salient_cols (0 where absent)
    n_salient  int32 [n_slots]     S of each slot (0: no salient channels)
    mult       fp32  [n_slots]     2**scale_exp of each slot
    """

    ptrs: torch.Tensor
    n_salient: torch.Tensor
    mult: torch.Tensor
    n: int
    k: int
    bits: int
    group_size: int
    symmetric: bool
    max_salient: int
    keep: list[torch.Tensor] = field(default_factory=list, repr=False)  # keeps parts alive

    @property
    def n_slots(self) -> int:
        return self.ptrs.shape[0]

    @property
    def device(self) -> torch.device:
        return self.ptrs.device

    @classmethod
    def build(
        cls, deltas: list[PackedDelta], device: torch.device | str | None = None
    ) -> DeltaTable:
        if not deltas:
            raise ValueError("a delta table needs at least one slot")
        for i, d in enumerate(deltas):
            _check_delta(i, d, deltas[0])
        first = deltas[0]
        device = torch.device(device) if device is not None else first.scales.device
        keep, rows = [], []
        for d in deltas:
            parts = [*d.planes, None][:2] + [d.scales, d.zeros, d.salient_idx, d.salient_cols]
            parts = [None if t is None else _resident(t, device) for t in parts]
            keep += [t for t in parts if t is not None]
            rows.append([0 if t is None else t.data_ptr() for t in parts])
        n, k = first.shape
        return cls(
            ptrs=torch.tensor(rows, dtype=torch.int64).to(device),
            n_salient=torch.tensor([d.n_salient for d in deltas], dtype=torch.int32).to(device),
            mult=torch.tensor([2.0**d.scale_exp for d in deltas], dtype=torch.float32).to(device),
            n=n, k=k, bits=first.bits, group_size=first.group_size, symmetric=first.symmetric,
            max_salient=max(d.n_salient for d in deltas), keep=keep,
        )  # fmt: skip


@dataclass
class RowGroups:
    """Rows grouped by slot, each slot's run padded to block_m (kernels/align.py):

    rows        int32 [P]           row ids sorted by slot; n_rows in padding
    block_slot  int32 [P/block_m]   slot of each block; n_slots past the end (GPU path)
    """

    rows: torch.Tensor
    block_slot: torch.Tensor
    block_m: int
    n_rows: int
    n_slots: int

    @classmethod
    def build(
        cls, row_slot: torch.Tensor, n_slots: int, block_m: int, use_triton: bool | None = None
    ) -> RowGroups:
        """row_slot int [T] in [−1, n_slots). The GPU path (Triton, no host sync) cannot check
        the range; the torch path does."""
        if row_slot.dim() != 1 or row_slot.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"row_slot must be int32/int64 [T], got {row_slot.dtype} "
                             f"{tuple(row_slot.shape)}")  # fmt: skip
        if block_m < 16 or block_m & (block_m - 1):
            raise ValueError(f"block_m={block_m} must be a power of two ≥ 16")
        if use_triton is None:
            use_triton = row_slot.is_cuda and is_triton_available()
        if use_triton:
            rows, block_slot, _ = align_block_size_triton(row_slot[:, None], n_slots, block_m)
        else:
            if row_slot.numel() and not bool(((row_slot >= -1) & (row_slot < n_slots)).all()):
                raise ValueError(f"row_slot values must lie in [-1, {n_slots})")
            rows, block_slot = align_block_size(row_slot[:, None], n_slots, block_m)
        return cls(rows, block_slot, block_m, row_slot.numel(), n_slots)


@dataclass(frozen=True)
class DeltaConfig:
    """Tiles of one launch: BLOCK_M rows of one slot (= the row groups' block_m) × BLOCK_N
    outputs, K walked in BLOCK_K tiles inside one group, salient channels in BLOCK_S tiles."""

    block_m: int
    block_n: int
    block_k: int
    block_s: int = 16
    num_warps: int = 4
    num_stages: int = 2

    def __post_init__(self):
        for name, low in (("block_m", 16), ("block_n", 16), ("block_k", 32), ("block_s", 16)):
            v = getattr(self, name)
            if v < low or v & (v - 1):
                raise ValueError(f"{name}={v}: a power of two ≥ {low}")
        if self.num_warps not in (1, 2, 4, 8, 16) or self.num_stages < 1:
            raise ValueError(f"num_warps={self.num_warps}, num_stages={self.num_stages}")


def pick_block_m(t: int, n_slots: int) -> int:
    """Decode (a few rows per slot) pads each slot to 16 rows; prefill takes 64-row tiles."""
    per_slot = t / max(1, min(t, n_slots))
    return 16 if per_slot <= 16 else 32 if per_slot <= 48 else 64


def delta_config(n: int, k: int, group_size: int, block_m: int, n_row_blocks: int,
                 sms: int = SMS) -> DeltaConfig:  # fmt: skip
    """Untuned defaults (no GPU has timed them yet). BLOCK_K: 64, or 32 when the group is
    narrower; 128-wide tiles unpack 16K codes per program and reach 255 registers on sm_90
    (check_sm90), 64 keeps 2-bit decode at ~167. BLOCK_N: while row blocks are few (decode),
    narrow enough for ~2 programs per each of the GPU's `sms` to stream the weights."""
    bk = 64 if group_size % 64 == 0 else 32
    if group_size >= k:  # one group per row (BitDelta): any tile lies in it
        bk = 64 if k > 32 else 32
    if block_m >= 64:
        return DeltaConfig(block_m, 128, bk, num_warps=8, num_stages=3)
    bn = 128
    while bn > 32 and n_row_blocks * -(-n // bn) < 2 * sms:
        bn //= 2
    return DeltaConfig(block_m, bn, bk, num_warps=4, num_stages=4)


if is_triton_available():
    import triton
    import triton.language as tl

    from expertswitch.kernels.fused_moe import _dot  # fp32 operands in IEEE unless tf32

    @triton.jit
    def _plane_codes(row_ptr, col: tl.constexpr, offs_n, k0, wpr, W: tl.constexpr,
                     EVEN_K: tl.constexpr, BLOCK_N: tl.constexpr,
                     BLOCK_K: tl.constexpr):  # fmt: skip
        """Codes [BLOCK_N, BLOCK_K] of one plane (width W, wpr words a row): load the tile's
        BLOCK_K·W/32 words of each row, shift out 32/W codes per word."""
        PER: tl.constexpr = 32 // W
        base = tl.multiple_of(tl.load(row_ptr + col).to(tl.pointer_type(tl.int32)), 16)
        offs_w = k0 // PER + tl.arange(0, BLOCK_K // PER)
        ptrs = base + offs_n[:, None] * wpr + offs_w[None, :]
        words = tl.load(ptrs) if EVEN_K else tl.load(ptrs, mask=offs_w[None, :] < wpr, other=0)
        shifts = tl.arange(0, PER) * W
        codes = (words[:, :, None] >> shifts[None, None, :]) & ((1 << W) - 1)
        return tl.reshape(codes, (BLOCK_N, BLOCK_K))

    @triton.jit
    def _delta_kernel(
        x_ptr, out_ptr, table_ptr, n_sal_ptr, mult_ptr, rows_ptr, block_slot_ptr,
        T, N, K, n_slots, group_size, n_groups, wpr0, wpr1, stride_xm, stride_om,
        W0: tl.constexpr, W1: tl.constexpr, SYMMETRIC: tl.constexpr, HAS_SALIENT: tl.constexpr,
        EVEN_K: tl.constexpr, IEEE: tl.constexpr, X_BF16: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
        BLOCK_S: tl.constexpr,
    ):  # fmt: skip
        """W0, W1: widths of planes 0 and 1 (W1 = 0: one plane)."""
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        slot = tl.load(block_slot_ptr + pid_m)
        if slot >= n_slots:  # past the last block (GPU alignment allocates an upper bound)
            return
        row_ptr = table_ptr + slot.to(tl.int64) * 6  # TABLE_COLS
        rows = tl.load(rows_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))
        valid = rows < T
        x_rows = tl.where(valid, rows, 0).to(tl.int64)  # padding reads row 0, never stored
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # a part holds < 2^31 elements
        n_mask = offs_n < N
        offs_n_in = offs_n % N  # columns past N re-read column n − N; masked at the store
        offs_k = tl.arange(0, BLOCK_K)
        x_ptrs = x_ptr + x_rows[:, None] * stride_xm + offs_k[None, :]
        scales_ptr = tl.load(row_ptr + 2).to(tl.pointer_type(tl.float16)) + offs_n_in * n_groups
        zeros_ptr = tl.load(row_ptr + 3).to(tl.pointer_type(tl.uint8)) + offs_n_in * n_groups
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            if EVEN_K:
                a = tl.load(x_ptrs)
            else:
                a = tl.load(x_ptrs, mask=offs_k[None, :] < K - k0, other=0.0)
            q = _plane_codes(row_ptr, 0, offs_n_in, k0, wpr0, W0, EVEN_K, BLOCK_N, BLOCK_K)
            if W1 > 0:
                hi = _plane_codes(row_ptr, 1, offs_n_in, k0, wpr1, W1, EVEN_K, BLOCK_N, BLOCK_K)
                q = q | (hi << W0)
            g = k0 // group_size  # the tile lies in one group (the launcher checks)
            step = tl.load(scales_ptr + g).to(tl.float32)  # [BLOCK_N]
            if SYMMETRIC:  # (q − (2^k − 1)/2)·s = (2q − (2^k − 1))·s/2
                qz = 2 * q - ((1 << (W0 + W1)) - 1)
                step = step * 0.5
            else:
                qz = q - tl.load(zeros_ptr + g).to(tl.int32)[:, None]
            acc += _dot(a, tl.trans(qz.to(a.dtype)), IEEE) * step[None, :]
            x_ptrs += BLOCK_K
        if HAS_SALIENT:
            acc += _salient(x_ptr, row_ptr, n_sal_ptr, slot, x_rows, offs_n_in, stride_xm,
                            IEEE, X_BF16, BLOCK_M, BLOCK_N, BLOCK_S)  # fmt: skip
        acc = acc * tl.load(mult_ptr + slot)
        o_ptrs = out_ptr + x_rows[:, None] * stride_om + offs_n[None, :]
        o_mask = valid[:, None] & n_mask[None, :]
        prev = tl.load(o_ptrs, mask=o_mask, other=0.0).to(tl.float32)
        tl.store(o_ptrs, (prev + acc).to(out_ptr.dtype.element_ty), mask=o_mask)

    @triton.jit
    def _salient(x_ptr, row_ptr, n_sal_ptr, slot, x_rows, offs_n_in, stride_xm,
                 IEEE: tl.constexpr, X_BF16: tl.constexpr, BLOCK_M: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_S: tl.constexpr):  # fmt: skip
        """x[:, idx] · salient_colsᵀ [BLOCK_M, BLOCK_N] over this slot's S channels."""
        n_sal = tl.load(n_sal_ptr + slot)
        idx_ptr = tl.load(row_ptr + 4).to(tl.pointer_type(tl.int32))
        cols_ptr = tl.load(row_ptr + 5).to(tl.pointer_type(tl.float16))
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for s0 in range(0, n_sal, BLOCK_S):
            offs_s = s0 + tl.arange(0, BLOCK_S)
            s_mask = offs_s < n_sal
            idx = tl.load(idx_ptr + offs_s, mask=s_mask, other=0)
            xs = tl.load(x_ptr + x_rows[:, None] * stride_xm + idx[None, :],
                         mask=s_mask[None, :], other=0.0)  # fmt: skip
            c = tl.load(cols_ptr + offs_n_in[:, None] * n_sal + offs_s[None, :],
                        mask=s_mask[None, :], other=0.0)  # fmt: skip
            if X_BF16:  # fp16 → bf16 would drop 3 bits: hi + lo bf16 halves hold it exactly
                hi = c.to(tl.bfloat16)
                lo = (c.to(tl.float32) - hi.to(tl.float32)).to(tl.bfloat16)
                acc += tl.dot(xs, tl.trans(hi)) + tl.dot(xs, tl.trans(lo))
            else:
                acc += _dot(xs, tl.trans(c.to(xs.dtype)), IEEE)
        return acc


def _group_ok(block_k: int, group_size: int, k: int) -> bool:
    return group_size % block_k == 0 or group_size >= k


def delta_launch(x, table: DeltaTable, groups: RowGroups, out, cfg: DeltaConfig):
    """(grid, runtime args, constexprs) of one _delta_kernel launch; kernels/check_sm90.py
    compiles the very same specialisation for an H100 on a CPU-only machine."""
    widths = plane_widths(table.bits)
    k_pad = padded_k(table.k)
    grid = (groups.block_slot.numel(), -(-table.n // cfg.block_n))
    args = dict(
        x_ptr=x, out_ptr=out, table_ptr=table.ptrs, n_sal_ptr=table.n_salient,
        mult_ptr=table.mult, rows_ptr=groups.rows, block_slot_ptr=groups.block_slot,
        T=x.shape[0], N=table.n, K=table.k, n_slots=table.n_slots, group_size=table.group_size,
        n_groups=num_groups(table.k, table.group_size), wpr0=k_pad * widths[0] // 32,
        wpr1=k_pad * widths[-1] // 32, stride_xm=x.stride(0), stride_om=out.stride(0),
    )  # fmt: skip
    consts = dict(
        W0=widths[0], W1=widths[1] if len(widths) > 1 else 0, SYMMETRIC=table.symmetric,
        HAS_SALIENT=table.max_salient > 0, EVEN_K=table.k % cfg.block_k == 0,
        IEEE=x.dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32,
        X_BF16=x.dtype == torch.bfloat16, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
        BLOCK_K=cfg.block_k, BLOCK_S=cfg.block_s,
    )  # fmt: skip
    return grid, args, consts


def check_launch(x, table: DeltaTable, groups: RowGroups, out, cfg: DeltaConfig) -> None:
    if x.dim() != 2 or x.shape[1] != table.k:
        raise ValueError(f"x must be [T, {table.k}], got {tuple(x.shape)}")
    if x.dtype not in _X_DTYPES:
        raise ValueError(f"x is {x.dtype}: the kernel takes fp32, fp16 or bf16")
    if out.shape != (x.shape[0], table.n) or out.dtype not in (torch.float32, x.dtype):
        raise ValueError(f"out must be [{x.shape[0]}, {table.n}] in fp32 or {x.dtype}, got "
                         f"{out.dtype} {tuple(out.shape)}")  # fmt: skip
    if x.stride(1) != 1 or out.stride(1) != 1:
        raise ValueError("x and out must be contiguous along their last dimension")
    if groups.n_rows != x.shape[0] or groups.n_slots != table.n_slots:
        raise ValueError(f"row groups of {groups.n_rows} rows over {groups.n_slots} slots; the "
                         f"call has {x.shape[0]} rows and {table.n_slots} slots")  # fmt: skip
    devices = {t.device for t in (x, out, table.ptrs, groups.rows, groups.block_slot)}
    if len(devices) != 1:
        raise ValueError(f"x, out, the table and the row groups are on several devices: {devices}")
    if cfg.block_m != groups.block_m:
        raise ValueError(f"config block_m={cfg.block_m}, row groups padded to {groups.block_m}")
    if not _group_ok(cfg.block_k, table.group_size, table.k):
        raise ValueError(f"block_k={cfg.block_k} must divide group_size={table.group_size}: a "
                         "K tile must lie in one group")  # fmt: skip


def delta_matmul(
    x: torch.Tensor,
    table: DeltaTable,
    groups: RowGroups,
    out: torch.Tensor | None = None,
    config: DeltaConfig | None = None,
) -> torch.Tensor:
    """out [T, N] += each row's delta term (out None: fresh fp32 zeros), in one launch. No host
    synchronisation, so a CUDA graph can capture it; rows of slot −1 are left untouched."""
    if not is_triton_available():
        raise ImportError("Triton is not installed: pip install 'expertswitch[gpu]'")
    if out is None:
        out = torch.zeros(x.shape[0], table.n, dtype=torch.float32, device=x.device)
    sms = device_limits(x.device).sms
    cfg = config or delta_config(table.n, table.k, table.group_size, groups.block_m,
                                 groups.block_slot.numel(), sms)  # fmt: skip
    check_launch(x, table, groups, out, cfg)
    if x.shape[0] == 0 or groups.block_slot.numel() == 0:
        return out
    grid, args, consts = delta_launch(x, table, groups, out, cfg)
    _delta_kernel[grid](**args, **consts, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return out


def delta_matmul_auto(
    x: torch.Tensor,
    row_slot: torch.Tensor,
    deltas: list[PackedDelta | None],
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """The kernel when x is on CUDA and Triton is present, else the reference; adds into out
    (None: fresh fp32). Builds a table and row groups per call — an engine keeps both."""
    if not (x.is_cuda and is_triton_available()):
        ref = delta_matmul_reference(x, row_slot, deltas)
        return ref if out is None else out.copy_(out.float() + ref)
    present = [i for i, d in enumerate(deltas) if d is not None]
    if not present:
        raise ValueError("no delta given: the output width N is unknown")
    # slot ids over the present deltas; the extra last entry maps −1 to −1
    lut = torch.full((len(deltas) + 1,), -1, dtype=torch.int64, device=x.device)
    lut[present] = torch.arange(len(present), device=x.device)
    slots = lut[row_slot.long()]
    groups = RowGroups.build(slots, len(present), pick_block_m(x.shape[0], len(present)))
    return delta_matmul(x, DeltaTable.build([deltas[i] for i in present], x.device), groups, out)
