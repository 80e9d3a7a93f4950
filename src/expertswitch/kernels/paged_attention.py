"""Paged attention for decode: one new query per sequence against its cached keys and values.

    q             [B, H, D]                          query of each sequence, at position kv_len − 1
    k/v_cache     [num_blocks, block_size, kv, D]    one layer's cache (contiguous); the query's
                                                     own key and value are already written
    block_tables  int32/int64 [B, M]                 blocks of each sequence (entries past its
                                                     length are never read: any value pads)
    kv_lens       int32/int64 [B]                    keys of each sequence (≥ 1)
    → out         [B, H, D] in q's dtype             query head h reads kv head h // (H / kv)

Token i of a sequence lives in block block_tables[b, i // block_size] at offset i % block_size.
A sliding window w keeps keys j with p − w < j ≤ p (p = kv_len − 1), as models/attention.py.
`softcap` (Gemma 2): each score s = q·k·scale becomes cap·tanh(s / cap) before the softmax.

GPU path (Triton), no host synchronisation (a CUDA graph can capture it). One program per
(sequence, kv head[, split]) takes the g = H / kv query heads that share the kv head as one
[16+, D] tile (padded so tl.dot applies: decode is bound by reading the cache, the padded rows
cost tensor-core time only; a head dim that is not a power of two, e.g. Phi-3-mini's 96, is
padded to one with masked loads: zeros that add nothing to q·k and are never stored), and
walks the sequence's keys in tiles of TILE tokens — each token finds its block through the
table, so a tile may span several small blocks or part of a big one — skipping tiles outside
the window, with an online softmax in fp32 (exp2, running max and
sum). P is rounded to the cache dtype before P·V, as FlashAttention does. Split-K
("flash-decoding"): when B·kv programs leave the SMs idle, each sequence's tiles are divided
among `splits` programs that write fp32 partial sums and their (max, sum); a second small launch
combines them. Splits are divided per sequence on the device, so their count needs no lengths.
`paged_decode_reference` is the oracle and the CPU path.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from expertswitch.kernels.moe_config import SMS, device_limits
from expertswitch.utils.imports import is_triton_available

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_NO_WINDOW = 2**31 - 1  # kv_len − this stays in int32 and below 0: every key is in the window
_LOG2E = 1.4426950408889634
MAX_HEAD_DIM = 256  # (Gemma's; a [16, 512] fp32 accumulator per program would spill)
MIN_TILES_PER_SPLIT = 4  # a guess (untimed): fewer tiles do not pay for partials + combine
MAX_SPLITS = 32


def paged_decode_reference(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    kv_lens: torch.Tensor,
    scale: float,
    window: int | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """The oracle: per sequence, gather its window of keys block by block, softmax in fp32."""
    b, h, d = q.shape
    _, bs, kvh, _ = k_cache.shape
    out = torch.empty_like(q)
    for i, n in enumerate(kv_lens.tolist()):
        lo = max(0, n - window) if window is not None else 0
        blocks = block_tables[i, : -(-n // bs)].long()
        k = k_cache[blocks].reshape(-1, kvh, d)[lo:n].float()  # [L, kv, D]
        v = v_cache[blocks].reshape(-1, kvh, d)[lo:n].float()
        qg = q[i].float().view(kvh, h // kvh, d)  # [kv, g, D]
        s = torch.einsum("kgd,lkd->kgl", qg, k) * scale
        if softcap is not None:
            s = torch.tanh(s / softcap) * softcap
        p = torch.softmax(s, dim=-1)
        out[i] = torch.einsum("kgl,lkd->kgd", p, v).reshape(h, d).to(q.dtype)
    return out


@dataclass(frozen=True)
class DecodeConfig:
    """TILE keys per loop step; `splits` programs per (sequence, kv head), 1 = no split."""

    tile: int = 32
    splits: int = 1
    num_warps: int = 4
    num_stages: int = 2

    def __post_init__(self):
        if self.tile < 16 or self.tile & (self.tile - 1):
            raise ValueError(f"tile={self.tile}: a power of two ≥ 16 (tl.dot needs 16)")
        if self.splits < 1:
            raise ValueError(f"splits={self.splits}: at least 1")
        if self.num_warps not in (1, 2, 4, 8, 16) or self.num_stages < 1:
            raise ValueError(f"num_warps={self.num_warps}, num_stages={self.num_stages}")


def decode_config(batch: int, kv_heads: int, max_blocks: int, block_size: int,
                  window: int | None = None, sms: int = SMS) -> DecodeConfig:  # fmt: skip
    """Untuned defaults (no GPU has timed them yet). Tiles of 32 keys (or one whole block when
    bigger). Split while B·kv programs fill less than the GPU's `sms`: enough splits to reach
    ~`sms` programs, each with at least MIN_TILES_PER_SPLIT tiles of the longest possible sequence
    (the table's width, capped by the window) — known on the host without reading kv_lens."""
    tile = max(32, block_size)
    keys = max_blocks * block_size if window is None else min(max_blocks * block_size, window)
    tiles = -(-keys // tile) + (window is not None)  # a window may straddle one more tile
    programs = batch * kv_heads
    splits = 1
    if programs < sms:
        splits = max(1, min(-(-sms // programs), tiles // MIN_TILES_PER_SPLIT, MAX_SPLITS))
    return DecodeConfig(tile=tile, splits=splits)


if is_triton_available():
    import triton
    import triton.language as tl

    from expertswitch.kernels.fused_moe import _dot  # fp32 operands in IEEE unless tf32

    @triton.jit
    def _paged_decode_kernel(
        q_ptr, k_ptr, v_ptr, table_ptr, lens_ptr, out_ptr, m_ptr, l_ptr,
        window, max_blocks, H,
        stride_qb, stride_qh, stride_tb, stride_ob, stride_oh, stride_kb, stride_kt,
        QK_SCALE: tl.constexpr, G: tl.constexpr, G_PAD: tl.constexpr, D: tl.constexpr,
        BLOCK_SIZE: tl.constexpr, TILE: tl.constexpr, SPLITS: tl.constexpr, IEEE: tl.constexpr,
        D_PAD: tl.constexpr, SOFTCAP: tl.constexpr = 0.0,
    ):  # fmt: skip
        """Program (b, kv head, split). QK_SCALE = scale·log2(e) (scores in log2 units; a
        constant: one model has one scale, and aot.py compiles ints and pointers only); with
        SOFTCAP > 0, QK_SCALE = scale and each score becomes SOFTCAP·tanh(s / SOFTCAP), then
        log2 units (tanh as 1 − 2 / (e^{2x} + 1): ±1 where e^{2x} over- or underflows).
        SPLITS > 1: out is fp32 [B, H, SPLITS, D] partial sums (unnormalised), m/l fp32
        [B, H, SPLITS] their running max (log2 units) and sum; an empty split writes −inf, 0."""
        b = tl.program_id(0)
        kvh = tl.program_id(1)
        kv_len = tl.load(lens_ptr + b).to(tl.int32)
        hi = tl.minimum(kv_len, max_blocks * BLOCK_SIZE)  # never reads past the table
        lo = tl.maximum(kv_len - window, 0)
        t_lo = lo // TILE
        t_hi = tl.cdiv(hi, TILE)  # every tile in [t_lo, t_hi) holds a key to attend to
        if SPLITS > 1:
            per = tl.cdiv(t_hi - t_lo, SPLITS)
            t_lo = t_lo + tl.program_id(2) * per
            t_hi = tl.minimum(t_hi, t_lo + per)
        offs_g = tl.arange(0, G_PAD)
        offs_d = tl.arange(0, D_PAD)  # (D_PAD = D when D is a power of two)
        d_mask = offs_d < D
        offs_t = tl.arange(0, TILE)
        heads = kvh * G + offs_g
        g_mask = offs_g < G
        b64 = b.to(tl.int64)
        q = tl.load(q_ptr + b64 * stride_qb + heads[:, None] * stride_qh + offs_d[None, :],
                    mask=g_mask[:, None] & d_mask[None, :], other=0.0)  # fmt: skip
        table_row = table_ptr + b64 * stride_tb
        m_i = tl.full((G_PAD,), float("-inf"), tl.float32)
        l_i = tl.zeros((G_PAD,), tl.float32)
        acc = tl.zeros((G_PAD, D_PAD), tl.float32)
        for t in range(t_lo, t_hi):
            tok = t * TILE + offs_t
            valid = (tok >= lo) & (tok < hi)
            block = tl.load(table_row + tok // BLOCK_SIZE, mask=valid, other=0).to(tl.int64)
            rows = block * stride_kb + (tok % BLOCK_SIZE) * stride_kt + kvh * D  # [TILE]
            kv_mask = valid[:, None] & d_mask[None, :]
            k = tl.load(k_ptr + rows[:, None] + offs_d[None, :], mask=kv_mask, other=0.0)
            s = _dot(q, tl.trans(k), IEEE) * QK_SCALE  # [G_PAD, TILE]
            if SOFTCAP > 0:
                e2x = tl.exp2(s * (2.0 * 1.4426950408889634 / SOFTCAP))
                s = (SOFTCAP * 1.4426950408889634) * (1.0 - 2.0 / (e2x + 1.0))
            s = tl.where(valid[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))  # finite: the tile holds a valid key
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, axis=1)
            v = tl.load(v_ptr + rows[:, None] + offs_d[None, :], mask=kv_mask, other=0.0)
            acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, IEEE)
            m_i = m_new
        if SPLITS == 1:
            o = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]  # kv_len < 1 writes zeros
            o_ptrs = out_ptr + b64 * stride_ob + heads[:, None] * stride_oh + offs_d[None, :]
            tl.store(o_ptrs, o.to(out_ptr.dtype.element_ty), mask=g_mask[:, None] & d_mask[None, :])
        else:
            row = (b64 * H + heads) * SPLITS + tl.program_id(2)  # [G_PAD]
            tl.store(out_ptr + row[:, None] * D + offs_d[None, :], acc,
                     mask=g_mask[:, None] & d_mask[None, :])  # fmt: skip
            tl.store(m_ptr + row, m_i, mask=g_mask)
            tl.store(l_ptr + row, l_i, mask=g_mask)

    @triton.jit
    def _combine_splits_kernel(
        part_ptr, m_ptr, l_ptr, out_ptr, H, stride_ob, stride_oh,
        SPLITS: tl.constexpr, S_PAD: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr,
    ):  # fmt: skip
        """Program (b, h): out = Σ_s 2^(m_s − M)·acc_s / Σ_s 2^(m_s − M)·l_s, M = max_s m_s."""
        b = tl.program_id(0).to(tl.int64)
        h = tl.program_id(1)
        offs_s = tl.arange(0, S_PAD)
        offs_d = tl.arange(0, D_PAD)
        d_mask = offs_d < D
        s_mask = offs_s < SPLITS
        row = (b * H + h) * SPLITS + offs_s
        m = tl.load(m_ptr + row, mask=s_mask, other=float("-inf"))
        l_s = tl.load(l_ptr + row, mask=s_mask, other=0.0)
        m_max = tl.max(m, axis=0)
        m_max = tl.where(m_max == float("-inf"), 0.0, m_max)  # no key at all (kv_len < 1)
        w = tl.exp2(m - m_max)  # empty splits: 0
        acc = tl.load(part_ptr + row[:, None] * D + offs_d[None, :],
                      mask=s_mask[:, None] & d_mask[None, :], other=0.0)  # fmt: skip
        num = tl.sum(acc * w[:, None], axis=0)
        den = tl.sum(l_s * w, axis=0)
        o = num / tl.where(den > 0, den, 1.0)
        tl.store(out_ptr + b * stride_ob + h * stride_oh + offs_d,
                 o.to(out_ptr.dtype.element_ty), mask=d_mask)  # fmt: skip


def _d_pad(d: int) -> int:
    """The head dim the kernel's tiles use: the next power of two, at least 16 (tl.dot)."""
    return max(16, 1 << (d - 1).bit_length())


def decode_launch(q, k_cache, v_cache, block_tables, kv_lens, out, partials, scale: float,
                  window: int | None, cfg: DecodeConfig,
                  softcap: float | None = None) -> tuple[tuple, dict, dict]:  # fmt: skip
    """(grid, runtime args, constexprs) of one _paged_decode_kernel launch; partials = (acc
    [B, H, S, D], m [B, H, S], l [B, H, S]) in fp32 when cfg.splits > 1, else None.
    kernels/check_sm90.py compiles the very same specialisation for an H100 on a CPU."""
    b, h, d = q.shape
    _, bs, kvh, _ = k_cache.shape
    g = h // kvh
    dst, m, l_ = partials if cfg.splits > 1 else (out, out, out)  # m/l unused without split
    grid = (b, kvh, cfg.splits)
    args = dict(
        q_ptr=q, k_ptr=k_cache, v_ptr=v_cache, table_ptr=block_tables, lens_ptr=kv_lens,
        out_ptr=dst, m_ptr=m, l_ptr=l_,
        window=_NO_WINDOW if window is None else window, max_blocks=block_tables.shape[1], H=h,
        stride_qb=q.stride(0), stride_qh=q.stride(1), stride_tb=block_tables.stride(0),
        stride_ob=out.stride(0), stride_oh=out.stride(1), stride_kb=k_cache.stride(0),
        stride_kt=k_cache.stride(1),
    )  # fmt: skip
    consts = dict(
        QK_SCALE=float(scale) * (_LOG2E if softcap is None else 1.0), G=g,
        G_PAD=max(16, 1 << (g - 1).bit_length()), D=d, D_PAD=_d_pad(d),
        BLOCK_SIZE=bs, TILE=cfg.tile, SPLITS=cfg.splits,
        IEEE=q.dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32,
        SOFTCAP=0.0 if softcap is None else float(softcap),
    )  # fmt: skip
    return grid, args, consts


def combine_launch(partials, out, splits: int) -> tuple[tuple, dict, dict]:
    """(grid, runtime args, constexprs) of the _combine_splits_kernel launch."""
    acc, m, l_ = partials
    b, h, _, d = acc.shape
    args = dict(part_ptr=acc, m_ptr=m, l_ptr=l_, out_ptr=out, H=h, stride_ob=out.stride(0),
                stride_oh=out.stride(1))  # fmt: skip
    consts = dict(SPLITS=splits, S_PAD=1 << (splits - 1).bit_length(), D=d, D_PAD=_d_pad(d))
    return (b, h), args, consts


def check_decode(q, k_cache, v_cache, block_tables, kv_lens, window, out=None,
                 softcap=None) -> None:  # fmt: skip
    """Shapes, dtypes and devices; the values of kv_lens and block_tables only when they are
    on the CPU (reading them from a GPU would synchronise with the host)."""
    if q.dim() != 3 or k_cache.dim() != 4:
        raise ValueError(f"expected q [B, H, D] and caches [blocks, block_size, kv, D], got "
                         f"{tuple(q.shape)} and {tuple(k_cache.shape)}")  # fmt: skip
    b, h, d = q.shape
    _, bs, kvh, dk = k_cache.shape
    if v_cache.shape != k_cache.shape or dk != d or h % kvh:
        raise ValueError(f"q {tuple(q.shape)}, k_cache {tuple(k_cache.shape)}, v_cache "
                         f"{tuple(v_cache.shape)}: caches must match, share D with q, and kv "
                         "heads must divide the query heads")  # fmt: skip
    if not 1 <= d <= MAX_HEAD_DIM:
        raise ValueError(f"head dim {d}: the kernel takes 1 to {MAX_HEAD_DIM}")
    if bs & (bs - 1):
        raise ValueError(f"block_size={bs} must be a power of two")
    if q.dtype not in _DTYPES or not q.dtype == k_cache.dtype == v_cache.dtype:
        raise ValueError(f"q {q.dtype}, k_cache {k_cache.dtype}, v_cache {v_cache.dtype}: one "
                         "dtype of fp32, fp16, bf16")  # fmt: skip
    if block_tables.dim() != 2 or block_tables.shape[0] != b or kv_lens.shape != (b,):
        raise ValueError(f"block_tables must be [{b}, M] and kv_lens [{b}], got "
                         f"{tuple(block_tables.shape)} and {tuple(kv_lens.shape)}")  # fmt: skip
    for name, t in (("block_tables", block_tables), ("kv_lens", kv_lens)):
        if t.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"{name} is {t.dtype}: int32 or int64")
    if window is not None and window < 1:
        raise ValueError(f"window={window}: at least 1 (None: no window)")
    if softcap is not None and not 0 < softcap < float("inf"):
        raise ValueError(f"softcap={softcap}: a positive number (None: no cap)")
    if out is not None and (out.shape != q.shape or out.dtype != q.dtype):
        raise ValueError(f"out must be {q.dtype} {tuple(q.shape)}, got {out.dtype} "
                         f"{tuple(out.shape)}")  # fmt: skip
    tensors = [q, k_cache, v_cache, block_tables, kv_lens] + ([out] if out is not None else [])
    if len({t.device for t in tensors}) != 1:
        raise ValueError(f"inputs on several devices: {sorted({str(t.device) for t in tensors})}")
    if kv_lens.device.type == "cpu" and b:
        lens = kv_lens.long()
        if int(lens.min()) < 1 or int(lens.max()) > block_tables.shape[1] * bs:
            raise ValueError(f"kv_lens must lie in [1, {block_tables.shape[1] * bs}] (the "
                             f"table's {block_tables.shape[1]} blocks of {bs})")  # fmt: skip
        used = torch.arange(block_tables.shape[1]) < (-(-lens // bs))[:, None]  # [B, M]
        ids = block_tables[used]
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= k_cache.shape[0]):
            raise ValueError(f"block_tables holds ids outside [0, {k_cache.shape[0]}) within "
                             "the sequences' lengths")  # fmt: skip


def paged_decode(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    kv_lens: torch.Tensor,
    scale: float,
    window: int | None = None,
    out: torch.Tensor | None = None,
    config: DecodeConfig | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """The Triton path: one launch, plus a combine launch when split. On a GPU, kv_lens and
    block_tables are not read on the host (no synchronisation): a length past the table reads
    only the table's blocks, and a length < 1 gives zeros; ids must lie in the cache."""
    if not is_triton_available():
        raise ImportError("Triton is not installed: pip install 'expertswitch[gpu]'")
    check_decode(q, k_cache, v_cache, block_tables, kv_lens, window, out, softcap)
    if q.stride(2) != 1 or (out is not None and out.stride(2) != 1):
        raise ValueError("q and out must be contiguous along their last dimension")
    if not (k_cache.is_contiguous() and v_cache.is_contiguous()):
        raise ValueError("k_cache and v_cache must be contiguous")
    if block_tables.stride(1) != 1 or kv_lens.stride(0) != 1:
        raise ValueError("block_tables rows and kv_lens must be contiguous")
    b, h, d = q.shape
    out = torch.empty_like(q) if out is None else out
    if b == 0:
        return out
    kvh = k_cache.shape[2]
    cfg = config or decode_config(b, kvh, block_tables.shape[1], k_cache.shape[1], window,
                                  device_limits(q.device).sms)  # fmt: skip
    partials = None
    if cfg.splits > 1:
        f32 = dict(dtype=torch.float32, device=q.device)
        partials = (torch.empty(b, h, cfg.splits, d, **f32), torch.empty(b, h, cfg.splits, **f32),
                    torch.empty(b, h, cfg.splits, **f32))  # fmt: skip
    grid, args, consts = decode_launch(q, k_cache, v_cache, block_tables, kv_lens, out,
                                       partials, scale, window, cfg, softcap)  # fmt: skip
    _paged_decode_kernel[grid](**args, **consts, num_warps=cfg.num_warps,
                               num_stages=cfg.num_stages)  # fmt: skip
    if partials is not None:
        grid, args, consts = combine_launch(partials, out, cfg.splits)
        _combine_splits_kernel[grid](**args, **consts, num_warps=4)
    return out


def paged_decode_auto(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    kv_lens: torch.Tensor,
    scale: float,
    window: int | None = None,
    out: torch.Tensor | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """The kernel when q is on CUDA and Triton is present, else the reference."""
    if q.is_cuda and is_triton_available():
        return paged_decode(q, k_cache, v_cache, block_tables, kv_lens, scale, window, out,
                            softcap=softcap)  # fmt: skip
    check_decode(q, k_cache, v_cache, block_tables, kv_lens, window, out, softcap)
    ref = paged_decode_reference(q, k_cache, v_cache, block_tables, kv_lens, scale, window,
                                 softcap)  # fmt: skip
    return ref if out is None else out.copy_(ref)
