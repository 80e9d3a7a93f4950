"""Paged attention, torch path (CPU, and the reference for GPU kernels).

The cache of one layer is two tensors [num_blocks, block_size, kv_heads, D]; a sequence owns a
list of blocks (its block table), and token i of it lives at slot
block_table[i // block_size]·block_size + i % block_size.

One step's sequences are padded into a batch [B, Q_max] of queries against [B, K_max] keys
gathered through the block tables, with one boolean mask that is causal (query i of a sequence
with kv_len keys and q_len new tokens sits at position kv_len − q_len + i), stops at each
sequence's length, and applies the layer's sliding window (a token sees itself and the
window − 1 tokens before it, as transformers' Mistral/Qwen2 masks do). One SDPA call per layer;
at decode (Q_max = 1) the padding costs nothing.
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
    k_slots: torch.Tensor  # int64 [B, K_max]: cache slot of each key, 0 for padding
    q_pos: torch.Tensor  # int64 [B, Q_max]: position of each query
    k_valid: torch.Tensor  # bool [B, K_max]
    masks: dict = field(default_factory=dict)

    @classmethod
    def build(cls, ab: AttentionBatch) -> PaddedLayout:
        dev = ab.slot_mapping.device
        q_lens = torch.tensor(ab.q_lens, device=dev)
        kv_lens = torch.tensor(ab.kv_lens, device=dev)
        q_max, k_max = max(ab.q_lens), max(ab.kv_lens)
        starts = torch.cumsum(q_lens, 0) - q_lens
        i = torch.arange(q_max, device=dev)
        q_valid = i.unsqueeze(0) < q_lens.unsqueeze(1)
        q_rows = torch.where(q_valid, starts.unsqueeze(1) + i, 0)
        q_pos = (kv_lens - q_lens).unsqueeze(1) + i
        j = torch.arange(k_max, device=dev)
        k_valid = j.unsqueeze(0) < kv_lens.unsqueeze(1)
        blocks = ab.block_tables.gather(
            1, (j // ab.block_size).unsqueeze(0).expand(len(ab.q_lens), -1)
        )
        k_slots = torch.where(k_valid, blocks * ab.block_size + j % ab.block_size, 0)
        return cls(q_rows, q_valid, k_slots, q_pos, k_valid)

    def mask(self, window: int | None) -> torch.Tensor:
        """bool [B, 1, Q_max, K_max]: True where query may attend to key."""
        if window not in self.masks:
            j = torch.arange(self.k_slots.shape[1], device=self.k_slots.device)
            qp = self.q_pos.unsqueeze(-1)  # [B, Q, 1]
            m = (j <= qp) & self.k_valid.unsqueeze(1)
            if window is not None:
                m &= j > qp - window
            m &= self.q_valid.unsqueeze(-1)
            # padded queries attend to key 0 so softmax stays finite (their output is dropped)
            m[..., 0] |= ~self.q_valid
            self.masks[window] = m.unsqueeze(1)
        return self.masks[window]


def write_kv(k_cache, v_cache, k, v, slot_mapping) -> None:
    """Store this step's keys/values [T, kv, D] at their cache slots."""
    kvh, d = k.shape[1], k.shape[2]
    k_cache.view(-1, kvh, d).index_copy_(0, slot_mapping, k.to(k_cache.dtype))
    v_cache.view(-1, kvh, d).index_copy_(0, slot_mapping, v.to(v_cache.dtype))


def paged_attention(q, k_cache, v_cache, layout: PaddedLayout, window: int | None,
                    scale: float) -> torch.Tensor:  # fmt: skip
    """q [T, h, D] against the cached keys/values (this step's already written) → [T, h·D]."""
    t, h, d = q.shape
    kvh = k_cache.shape[2]
    keys = k_cache.view(-1, kvh, d)[layout.k_slots]  # [B, K, kv, D]
    vals = v_cache.view(-1, kvh, d)[layout.k_slots]
    qb = q[layout.q_rows]  # [B, Q, h, D]
    if h != kvh:
        keys = keys.repeat_interleave(h // kvh, dim=2)
        vals = vals.repeat_interleave(h // kvh, dim=2)
    out = F.scaled_dot_product_attention(
        qb.transpose(1, 2),
        keys.transpose(1, 2).to(q.dtype),
        vals.transpose(1, 2).to(q.dtype),
        attn_mask=layout.mask(window),
        scale=scale,
    )  # [B, h, Q, D]
    out = out.transpose(1, 2)[layout.q_valid]  # [T, h, D] in row order
    return out.reshape(t, h * d)
