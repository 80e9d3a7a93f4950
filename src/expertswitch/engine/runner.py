"""One forward pass for a scheduled step: flatten the sequences' new tokens, build the step's
context (expert slots, cache slots, block tables), run the decoder, return the logits of each
sequence's last token."""

from __future__ import annotations

import torch

from expertswitch.engine.graphs import DecodeGraphs
from expertswitch.engine.kv_cache import BlockManager
from expertswitch.engine.request import Request
from expertswitch.engine.sampler import logprobs_of
from expertswitch.models.context import AttentionBatch, ExpertBatch, StepContext
from expertswitch.models.decoder import Decoder
from expertswitch.models.expert_weights import ExpertWeights


class ModelRunner:
    def __init__(self, model: Decoder, blocks: BlockManager, kv_cache,
                 graphs: DecodeGraphs | None = None):  # fmt: skip
        """graphs: decode steps replayed from CUDA graphs (engine/graphs.py), or None."""
        self.model, self.blocks, self.kv_cache = model, blocks, kv_cache
        self.device = model.device
        self.graphs = graphs
        # delta-kernel pointer tables for the current set of active expert objects: rebuilt
        # when the set changes (a table holds its experts' tensors alive, so it must not
        # outlive their residency)
        self._tables_key: tuple = ()
        self._tables: dict = {}
        self._tables_objs: list = []

    def _tensor(self, values, dtype=torch.long) -> torch.Tensor:
        return torch.tensor(values, dtype=dtype, device=self.device)

    def prepare(self, reqs: list[Request], experts: dict[str | None, ExpertWeights],
                order: list[str]):  # fmt: skip
        """Flat inputs of the new tokens of `reqs` (prefill: all uncached tokens; decode: the
        last one); `order`: the experts of `reqs` in slot order."""
        ids, positions, seq_lens, slots, q_lens, kv_lens, slot_of_row = [], [], [], [], [], [], []
        slot_index = {name: i for i, name in enumerate(order)}
        for r in reqs:
            toks = r.all_token_ids
            start, end = r.num_cached, len(toks)
            ids.extend(toks[start:end])
            positions.extend(range(start, end))
            seq_lens.extend([end] * (end - start))
            slots.extend(self.blocks.slot(r, p) for p in range(start, end))
            q_lens.append(end - start)
            kv_lens.append(end)
            slot_of_row.extend([slot_index.get(r.expert, -1)] * (end - start))
        width = max(len(r.blocks) for r in reqs)
        tables = [r.blocks + [0] * (width - len(r.blocks)) for r in reqs]
        attention = AttentionBatch(
            slot_mapping=self._tensor(slots),
            block_tables=self._tensor(tables),
            q_lens=q_lens,
            kv_lens=kv_lens,
            positions=self._tensor(positions),
            seq_lens=self._tensor(seq_lens),
            block_size=self.blocks.block_size,
        )
        active = [experts[name] for name in order]
        key = tuple((name, id(experts[name])) for name in order)
        if key != self._tables_key:  # the objects stay referenced, so their ids stay unique
            self._tables_key, self._tables = key, {}
            self._tables_objs = active
            if self.graphs is not None:
                self.graphs.reset()  # its graphs read the old tables
        eb = ExpertBatch.from_host(active, slot_of_row, self.device)
        eb.tables = self._tables
        last_slots = [slot_index.get(r.expert, -1) for r in reqs]
        last_eb = ExpertBatch.from_host(active, last_slots, self.device)
        last_eb.tables = self._tables
        return self._tensor(ids), StepContext(eb, attention), last_eb

    def run(self, reqs: list[Request], experts: dict[str | None, ExpertWeights]) -> torch.Tensor:
        """→ fp32 logits [B, V], one row per request; marks their tokens as cached. A request
        that asks for prompt logprobs gets them on its first prefill."""
        # slots in name order: the same experts give the same tables (and decode graphs);
        # each expert's rows in one run (base first, then experts by slot): the CPU paths
        # slice them; the logits go back to the callers' order at the end
        names = sorted({r.expert for r in reqs if r.expert is not None})
        rank = {n: i for i, n in enumerate(names)}
        perm = sorted(range(len(reqs)), key=lambda i: rank.get(reqs[i].expert, -1))
        moved = perm != list(range(len(reqs)))
        if moved:
            reqs = [reqs[i] for i in perm]
        ids, ctx, last_eb = self.prepare(reqs, experts, names)
        if self.graphs is not None and self.graphs.usable(ctx):
            hidden = self.graphs.forward(ids, ctx)
        else:
            hidden = self.model.forward(ids, ctx, self.kv_cache)
        q_lens = ctx.attention.q_lens
        if all(q == 1 for q in q_lens):  # decode: every row is a sequence's last
            logits = self.model.logits(hidden, last_eb)
        else:
            ends = torch.cumsum(self._tensor(q_lens), 0) - 1
            logits = self.model.logits(hidden.index_select(0, ends), last_eb)
        start = 0
        wanted = any(r.sampling.prompt_logprobs is not None and r.num_cached == 0 for r in reqs)
        slots = last_eb.row_slot.tolist() if wanted else [None] * len(reqs)  # (a host sync)
        for r, n, slot in zip(reqs, q_lens, slots):
            k = r.sampling.prompt_logprobs
            if k is not None and r.prompt_logprobs is None and r.num_cached == 0:
                r.prompt_logprobs = self._prompt_logprobs(r, hidden[start : start + n], slot,
                                                          last_eb, k)  # fmt: skip
            start += n
        for r in reqs:
            r.num_cached = r.num_tokens
            self.blocks.register(r)  # its full blocks, now computed, join the prefix cache
        if moved:  # row j is request perm[j]
            inverse = [0] * len(perm)
            for j, i in enumerate(perm):
                inverse[i] = j
            logits = logits.index_select(0, self._tensor(inverse))
        return logits

    def _prompt_logprobs(self, r: Request, hidden, slot: int, like: ExpertBatch, k: int):
        """Position t's logits score prompt token t+1 (the first token has none), in chunks of
        rows so that a long prompt holds [chunk, V] logits, not [P, V]."""
        prompt = r.prompt_token_ids
        out: list = [None]
        chunk = 256
        for a in range(0, len(prompt) - 1, chunk):
            b = min(a + chunk, len(prompt) - 1)
            eb = ExpertBatch.build(like.experts, self._tensor([slot] * (b - a)))
            eb.tables = like.tables
            logits = self.model.logits(hidden[a:b], eb)
            out += logprobs_of(logits, prompt[a + 1 : b + 1], k)
        return out
