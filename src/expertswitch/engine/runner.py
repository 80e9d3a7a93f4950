"""One forward pass for a scheduled step: flatten the tokens each sequence computes this step
(a decode token, a whole prompt, or a chunk of one), build the step's context (expert slots,
cache slots, block tables), run the decoder, return the logits of the last token of each
sequence whose tokens are then all computed."""

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
        """Flat inputs of this step's tokens of `reqs` (each request's `num_new` from
        `num_cached` on); `order`: the experts of `reqs` in slot order. → (ids, context,
        each request's expert slot)."""
        ids, positions, seq_lens, slots, q_lens, kv_lens, slot_of_row = [], [], [], [], [], [], []
        slot_index = {name: i for i, name in enumerate(order)}
        for r in reqs:
            toks = r.all_token_ids
            start, end = r.num_cached, r.num_cached + r.num_new
            ids.extend(toks[start:end])
            positions.extend(range(start, end))
            # dynamic NTK RoPE rotates by the sequence's length: a chunk's keys as the whole
            # prompt's (transformers rotates every prompt key by the prompt's length)
            seq_lens.extend([r.num_tokens] * (end - start))
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
        return self._tensor(ids), StepContext(eb, attention), [slot_index.get(r.expert, -1)
                                                                for r in reqs]  # fmt: skip

    def run(self, reqs: list[Request], experts: dict[str | None, ExpertWeights]):
        """Compute each request's `num_new` tokens (marking them cached) → (fp32 logits
        [R, V], the R requests whose tokens are now all computed, in the logits' row order:
        those sample a token). A prompt prefilled in chunks gets its prompt logprobs, when it
        asks for them, chunk by chunk."""
        # slots in name order: the same experts give the same tables (and decode graphs);
        # each expert's rows in one run (base first, then experts by slot): the CPU paths
        # slice them
        names = sorted({r.expert for r in reqs if r.expert is not None})
        rank = {n: i for i, n in enumerate(names)}
        reqs = sorted(reqs, key=lambda r: rank.get(r.expert, -1))  # stable
        ids, ctx, slots = self.prepare(reqs, experts, names)
        if self.graphs is not None and self.graphs.usable(ctx):
            hidden = self.graphs.forward(ids, ctx)
        else:
            hidden = self.model.forward(ids, ctx, self.kv_cache)
        q_lens = ctx.attention.q_lens
        ready = [i for i, r in enumerate(reqs) if r.num_cached + r.num_new == r.num_tokens]
        last_eb = ExpertBatch.from_host(ctx.experts.experts, [slots[i] for i in ready],
                                        self.device)  # fmt: skip
        last_eb.tables = self._tables
        logits = None  # (no sequence finished its prompt this step)
        if len(ready) == len(reqs) and all(q == 1 for q in q_lens):  # decode: rows are last
            logits = self.model.logits(hidden, last_eb)
        elif ready:
            ends = torch.cumsum(self._tensor(q_lens), 0) - 1
            rows = ends.index_select(0, self._tensor(ready))
            logits = self.model.logits(hidden.index_select(0, rows), last_eb)
        start, scored = 0, []
        for r, n, slot in zip(reqs, q_lens, slots):
            k = r.sampling.prompt_logprobs
            p = len(r.prompt_token_ids)
            if k is not None and r.num_cached < p and len(r.prompt_logprobs or ()) < p:
                scored.append((r, self._prompt_logprobs(r, hidden[start : start + n], slot,
                                                        last_eb, k)))  # fmt: skip
            start += n
        for r, lps in scored:  # (kept only once the whole step has run)
            r.prompt_logprobs = ([None] if r.num_cached == 0 else r.prompt_logprobs) + lps
        for r in reqs:
            r.num_cached += r.num_new
            r.num_new = 0
            self.blocks.register(r)  # its full blocks, now computed, join the prefix cache
        return logits, [reqs[i] for i in ready]

    def _prompt_logprobs(self, r: Request, hidden, slot: int, like: ExpertBatch,
                         k: int) -> list:  # fmt: skip
        """This step's rows of the prompt, from position num_cached: position t's logits
        score prompt token t+1 (the first token has none; the last prompt position scores
        the first generated token, not reported here), in chunks of rows so that a long
        prompt holds [chunk, V] logits, not [P, V]."""
        prompt = r.prompt_token_ids
        first = r.num_cached  # positions first .. first + rows − 1
        rows = min(len(hidden), len(prompt) - 1 - first)  # the last position scores nothing
        out: list = []
        chunk = 256
        for a in range(0, rows, chunk):
            b = min(a + chunk, rows)
            eb = ExpertBatch.build(like.experts, self._tensor([slot] * (b - a)))
            eb.tables = like.tables
            logits = self.model.logits(hidden[a:b], eb)
            out += logprobs_of(logits, prompt[first + a + 1 : first + b + 1], k)
        return out
