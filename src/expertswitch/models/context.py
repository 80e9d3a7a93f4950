"""Per-step metadata shared by every layer of one forward pass (nano-vllm's `Context`): which
expert each row belongs to, and where each sequence's keys and values live in the paged cache.

Rows are the flattened new tokens of all scheduled sequences, sequence after sequence.

    ExpertBatch     experts    the active experts in slot order (slot s = experts[s])
                    row_slot   int64 [T]  slot of each row, −1 = base only
                    segments   per slot: the row indices that belong to it (computed once per
                               step, reused by all 7·L linear layers, as Punica does)
    AttentionBatch  slot_mapping  int64 [T]   cache slot (block·block_size + offset) per row
                    block_tables  int64 [B, M] blocks of each sequence (0 pads: masked)
                    q_lens, kv_lens, q_starts  per sequence
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import torch

from expertswitch.models.expert_weights import ExpertWeights


@dataclass
class ExpertBatch:
    experts: list[ExpertWeights]
    row_slot: torch.Tensor  # int64 [T]
    segments: list[torch.Tensor] = field(default_factory=list)  # per slot: int64 row indices
    # per-step cache (stacked exact tensors, row groupings)
    cache: dict = field(default_factory=dict)
    # kernel pointer tables, valid while the same expert objects are active (runner-owned)
    tables: dict = field(default_factory=dict)
    # rows sorted by slot (the runner orders them so): each slot's rows are [start, end), so the
    # CPU paths slice instead of gathering and scattering
    ranges: list[tuple[int, int]] | None = None

    @classmethod
    def build(cls, experts: list[ExpertWeights], row_slot: torch.Tensor) -> ExpertBatch:
        segments = [torch.nonzero(row_slot == s).flatten() for s in range(len(experts))]
        return cls(experts, row_slot, segments)

    @classmethod
    def from_host(cls, experts: list[ExpertWeights], slots: list[int], device) -> ExpertBatch:
        """From each row's slot as a host list: the segments come from one copy of the rows
        sorted by slot (no per-slot nonzero, each a host synchronisation on a GPU)."""
        order = sorted(range(len(slots)), key=slots.__getitem__)  # stable: rows ascending
        counts = [0] * (len(experts) + 1)
        for s in slots:
            counts[s + 1] += 1  # −1 (base) first
        both = torch.tensor([slots, order], dtype=torch.long, device=device)
        segments = list(both[1].split(counts))[1:]
        ranges = None
        if all(a <= b for a, b in zip(slots, slots[1:])):
            ends = list(itertools.accumulate(counts))
            ranges = [(ends[i], ends[i + 1]) for i in range(len(experts))]
        return cls(experts, both[0], segments, ranges=ranges)

    def subset(self, rows: torch.Tensor) -> ExpertBatch:
        """The batch of rows `rows` (int64 indices), in that order: same experts and kernel
        tables, its own per-step cache."""
        sub = ExpertBatch.build(self.experts, self.row_slot.index_select(0, rows))
        sub.tables = self.tables
        return sub

    def users_of(self, name: str, table: str) -> list[tuple[int, object]]:
        """(slot, value) for every active expert that stores tensor `name` in `table`
        ("deltas", "exact", "lora" or "lora_embedding"), with at least one row in this batch.
        Cached for the step (every linear asks three times)."""
        key = ("users", name, table)
        out = self.cache.get(key)
        if out is None:
            out = []
            for s, ex in enumerate(self.experts):
                v = getattr(ex, table).get(name)
                if v is not None and self.segments[s].numel():
                    out.append((s, v))
            self.cache[key] = out
        return out


@dataclass
class AttentionBatch:
    slot_mapping: torch.Tensor  # int64 [T]
    block_tables: torch.Tensor  # int64 [B, M], 0 past a sequence's blocks
    q_lens: list[int]
    kv_lens: list[int]  # keys after this step (cached + new)
    positions: torch.Tensor  # int64 [T]
    seq_lens: torch.Tensor  # int64 [T]: each row's sequence length after this step (dynamic RoPE)
    block_size: int


@dataclass
class StepContext:
    experts: ExpertBatch
    attention: AttentionBatch
