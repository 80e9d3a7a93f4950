"""Paged attention: the torch path (CPU, prefill, and the reference), and on a GPU the Triton
decode kernel (kernels/paged_attention.py) for steps that add one token per sequence.

The cache of one layer is two tensors [num_blocks, block_size, kv_heads, D]; a sequence owns a
list of blocks (its block table), and token i of it lives at slot
block_table[i // block_size]·block_size + i % block_size.

One step's sequences are padded into a batch [B, Q_max] of queries against [B, K_max] keys
gathered through the block tables, with one boolean mask that is causal (query i of a sequence
with kv_len keys and q_len new tokens sits at position kv_len − q_len + i), stops at each
sequence's length, and applies the layer's sliding window (a token sees itself and the
window − 1 tokens before it, as transformers' Mistral/Qwen2 masks do). One SDPA call per layer;
at decode (Q_max = 1) the padding costs nothing. Gemma 2's soft-capped scores
(cap·tanh(s / cap) before the mask and softmax) are written out instead of SDPA, as
transformers' eager attention computes them (SDPA takes no cap; the Triton decode kernel does).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from expertswitch.models.context import AttentionBatch


@dataclass
class PaddedLayout:
    """Index maps of one step, shared by all layers (masks cached per window)."""

    q_rows: torch.Tensor  # int64 [B, Q_max]: flat row of each query, 0 for padding
    q_valid: torch.Tensor  # bool [B, Q_max]
    blocks: torch.Tensor  # int64 [B, M]: each sequence's blocks (0 pads; masked)
    q_pos: torch.Tensor  # int64 [B, Q_max]: position of each query
    k_valid: torch.Tensor  # bool [B, K_max]
    kv_lens: torch.Tensor  # int64 [B]: keys per sequence after this step
    decode: bool  # one new token per sequence
    lens: list[tuple[int, int]]  # (q_len, kv_len) per sequence, on the host
    masks: dict = field(default_factory=dict)

    def gather(self, cache: torch.Tensor) -> torch.Tensor:
        """cache [blocks, bs, kv, D] → [B, kv, M·bs, D]: each sequence's blocks, whole."""
        b, m = self.blocks.shape
        _, bs, kvh, d = cache.shape
        flat = cache.index_select(0, self.blocks.reshape(-1))  # block copies: 4 KB+ memcpys
        return flat.view(b, m * bs, kvh, d).transpose(1, 2)

    @classmethod
    def build(cls, ab: AttentionBatch) -> PaddedLayout:
        dev = ab.slot_mapping.device
        q_lens = torch.tensor(ab.q_lens, device=dev)
        kv_lens = torch.tensor(ab.kv_lens, device=dev)
        q_max = max(ab.q_lens)
        starts = torch.cumsum(q_lens, 0) - q_lens
        i = torch.arange(q_max, device=dev)
        q_valid = i.unsqueeze(0) < q_lens.unsqueeze(1)
        q_rows = torch.where(q_valid, starts.unsqueeze(1) + i, 0)
        q_pos = (kv_lens - q_lens).unsqueeze(1) + i
        # keys are gathered whole blocks at a time: K = blocks per sequence · block size
        k_max = ab.block_tables.shape[1] * ab.block_size
        k_valid = torch.arange(k_max, device=dev).unsqueeze(0) < kv_lens.unsqueeze(1)
        return cls(q_rows, q_valid, ab.block_tables, q_pos, k_valid, kv_lens, q_max == 1,
                   list(zip(ab.q_lens, ab.kv_lens)))  # fmt: skip

    def mask(self, window: int | None, groups: int = 1) -> torch.Tensor:
        """bool [B, 1, groups·Q_max, K]: True where query may attend to key (tiled `groups`
        times along the query axis for query heads folded there)."""
        if (window, groups) in self.masks:
            return self.masks[(window, groups)]
        if window not in self.masks:
            j = torch.arange(self.k_valid.shape[1], device=self.k_valid.device)
            qp = self.q_pos.unsqueeze(-1)  # [B, Q, 1]
            m = (j <= qp) & self.k_valid.unsqueeze(1)
            if window is not None:
                m &= j > qp - window
            m &= self.q_valid.unsqueeze(-1)
            # padded queries attend to key 0 so softmax stays finite (their output is dropped)
            m[..., 0] |= ~self.q_valid
            self.masks[window] = m.unsqueeze(1)
        tiled = self.masks[window].repeat(1, 1, groups, 1) if groups > 1 else self.masks[window]
        self.masks[(window, groups)] = tiled
        return tiled


# a padded prefill batch above this many mask elements runs one sequence at a time
PADDED_LIMIT = 2**24
# ... and so does a step with a prompt of this many new tokens: an uncached prompt without a
# window is then one causal SDPA, the fused kernel, instead of a masked one (tiny family, 2
# CPU cores, a prefill step, ±20% run to run: 2 prompts of 1500 tokens 287 -> 171 ms, 1 of
# 1500 131 -> 116 ms; shorter ones lose: 8 of 400 tokens 156 ms padded against 163 ms, 32 of
# 100 138 against 154 ms)
LONG_PREFILL = 512

# "auto": decode steps on CUDA through kernels/paged_attention (Triton, blocks read in place),
# everything else through the torch path below; "kernel" forces the kernel for decode steps
# (tests, in Triton's interpreter); "torch" never uses it.
ATTENTION_PATH = "auto"


def _kernel_fits(q: torch.Tensor, cache: torch.Tensor) -> bool:
    """The decode kernel takes head dims up to 256 (others padded to a power of two inside it:
    Phi-3-mini's 96, OpenLLaMA's 100) and one dtype for queries and cache."""
    from expertswitch.kernels.paged_attention import MAX_HEAD_DIM

    return q.shape[-1] <= MAX_HEAD_DIM and q.dtype == cache.dtype and q.dtype in (
        torch.float32, torch.float16, torch.bfloat16)  # fmt: skip


def decode_kernel_takes(head_dim: int, dtype: torch.dtype, cache_dtype: torch.dtype,
                        cuda: bool) -> bool:  # fmt: skip
    """Whether decode steps of this model go through the Triton kernel (engine/graphs.py
    captures only those)."""
    if not (ATTENTION_PATH == "kernel" or (ATTENTION_PATH == "auto" and cuda)):
        return False
    q = torch.empty(0, 1, head_dim, dtype=dtype)
    return _kernel_fits(q, torch.empty(0, dtype=cache_dtype))


def write_kv(k_cache, v_cache, k, v, slot_mapping) -> None:
    """Store this step's keys/values [T, kv, D] at their cache slots."""
    kvh, d = k.shape[1], k.shape[2]
    k_cache.view(-1, kvh, d).index_copy_(0, slot_mapping, k.to(k_cache.dtype))
    v_cache.view(-1, kvh, d).index_copy_(0, slot_mapping, v.to(v_cache.dtype))


def paged_attention(q, k_cache, v_cache, layout: PaddedLayout, window: int | None,
                    scale: float, softcap: float | None = None) -> torch.Tensor:  # fmt: skip
    """q [T, h, D] against the cached keys/values (this step's already written) → [T, h·D].

    Grouped-query attention without copying keys per query head: the g = h / kv query heads
    that share a key head are folded into the query axis ([B, kv, g·Q, D] against
    [B, kv, K, D]), and the mask is tiled to match."""
    t, h, d = q.shape
    kvh = k_cache.shape[2]
    g = h // kvh
    kernel = ATTENTION_PATH == "kernel" or (ATTENTION_PATH == "auto" and q.is_cuda)
    if layout.decode and kernel and _kernel_fits(q, k_cache):
        from expertswitch.kernels.paged_attention import paged_decode

        # rows are the sequences, one query each: the Triton kernel reads the blocks in place
        out = paged_decode(q, k_cache, v_cache, layout.blocks, layout.kv_lens, scale, window,
                           softcap=softcap)  # fmt: skip
        return out.reshape(t, h * d)
    b, q_max = layout.q_rows.shape
    scores = b * g * q_max * layout.k_valid.shape[1]  # (the mask's elements; capped scores
    scores *= kvh if softcap is not None else 1  # are written out: every kv head's)
    if q_max >= LONG_PREFILL or (b > 1 and scores > PADDED_LIMIT):
        return _one_sequence_at_a_time(q, k_cache, v_cache, layout, window, scale, softcap)
    keys, vals = layout.gather(k_cache), layout.gather(v_cache)  # [B, kv, K, D]
    qb = q[layout.q_rows]  # [B, Q, h, D]; head i reads key head i // g
    qb = qb.view(b, q_max, kvh, g, d).permute(0, 2, 3, 1, 4).reshape(b, kvh, g * q_max, d)
    mask = layout.mask(window, g)  # [B, 1, g·Q, K]
    if keys.dtype != q.dtype:  # (a cache held in another dtype)
        keys, vals = keys.to(q.dtype), vals.to(q.dtype)
    out = attend(qb, keys, vals, scale, softcap, mask)
    out = out.view(b, kvh, g, q_max, d).permute(0, 3, 1, 2, 4)  # [B, Q, kv, g, D]
    if layout.decode and b == t:  # one query per sequence, each valid: no boolean gather
        return out.reshape(t, h * d)
    return out[layout.q_valid].reshape(t, h * d)


# soft-capped scores are computed this many queries at a time: the whole [heads, Q, K] score
# tensor of a 4096-token prefill chunk against 8192 keys would be ~1 G elements a layer (~8 GiB
# with the fp32 softmax, at Gemma-2-27B's 32 heads), a block of 256 queries 1/16 of it
CAPPED_QUERY_BLOCK = 256


def attend(
    q, k, v, scale: float, softcap: float | None = None, mask=None, causal: bool = False
) -> torch.Tensor:
    """SDPA [.., Q, D] × [.., K, D]; with `softcap`, the scores capped as transformers' eager
    attention does: cap·tanh(q·kᵀ·scale / cap), masked, softmax in fp32, then q's dtype —
    CAPPED_QUERY_BLOCK queries at a time (each query's row is independent of the others)."""
    if softcap is None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
                                              scale=scale)  # fmt: skip
    n_q, n_k = q.shape[-2], k.shape[-2]
    if causal:  # (queries are the last Q of the K positions)
        mask = torch.ones(n_q, n_k, dtype=torch.bool, device=q.device).tril(n_k - n_q)
    outs = []
    for a in range(0, n_q, CAPPED_QUERY_BLOCK):
        b = min(a + CAPPED_QUERY_BLOCK, n_q)
        s = torch.matmul(q[..., a:b, :], k.transpose(-1, -2)) * scale
        s = torch.tanh(s / softcap) * softcap
        if mask is not None:
            part = mask if mask.shape[-2] == 1 else mask[..., a:b, :]
            s = s.masked_fill(~part, float("-inf"))
        p = torch.softmax(s, dim=-1, dtype=torch.float32).to(q.dtype)
        outs.append(torch.matmul(p, v))
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=-2)


def _one_sequence_at_a_time(q, k_cache, v_cache, layout: PaddedLayout, window, scale,
                            softcap=None):  # fmt: skip
    """Prefill of prompts of very different lengths: padding all of them to the longest would
    make a [B, g·Q_max, K_max] mask and score tensor (31 short prompts beside one of 4000
    tokens: ~2 G elements); one SDPA per sequence keeps memory to one sequence's (soft-capped
    scores: a block of its queries'), and a whole uncached prompt without a window needs no
    mask at all (is_causal: the flash path on a GPU)."""
    t, h, d = q.shape
    _, bs, kvh, _ = k_cache.shape
    outs, start = [], 0
    for i, (q_len, kv_len) in enumerate(layout.lens):
        blocks = layout.blocks[i, : -(-kv_len // bs)]
        keys = k_cache.index_select(0, blocks).view(-1, kvh, d)[:kv_len]
        vals = v_cache.index_select(0, blocks).view(-1, kvh, d)[:kv_len]
        keys = keys.transpose(0, 1).repeat_interleave(h // kvh, dim=0).to(q.dtype)  # [h, K, D]
        vals = vals.transpose(0, 1).repeat_interleave(h // kvh, dim=0).to(q.dtype)
        # 4-D [1, h, Q, D]: SDPA's fused kernels take only batched inputs (3-D ones fall back
        # to the math path: 70 ms against 9 ms for 1500 causal queries, 4 heads, 2 CPU cores)
        qs = q[start : start + q_len].transpose(0, 1).unsqueeze(0)
        keys, vals = keys.unsqueeze(0), vals.unsqueeze(0)
        if q_len == kv_len and window is None:
            o = attend(qs, keys, vals, scale, softcap, causal=True)
        else:
            pos = torch.arange(kv_len - q_len, kv_len, device=q.device).unsqueeze(1)
            j = torch.arange(kv_len, device=q.device)
            mask = (j <= pos) & (j > pos - window) if window is not None else j <= pos
            o = attend(qs, keys, vals, scale, softcap, mask)
        outs.append(o[0].transpose(0, 1).reshape(q_len, h * d))
        start += q_len
    return torch.cat(outs)
