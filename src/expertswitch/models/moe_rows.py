"""Mixtral's MoE FFN with weights that differ per row: an expert (a fine-tune of a Mixtral base)
may change the router and any MoE expert's w1/w2/w3, each stored in its archive as a packed
delta (or exactly), and its rows must use them while base rows and other experts' rows in the
same batch do not.

Batches whose active experts leave this layer alone take the base's fused path
(MixtralSparseMoE). Rows whose expert changes it go through the same computation written out
per MoE expert: router logits = x·Gᵀ + the row's router delta, fp32 softmax, top-k,
renormalised; then for each MoE expert j and the rows routed to it, SwiGLU with every
projection a MultiExpertLinear (base weight + the row's packed delta term, never a dense Δ̂),
weighted and summed as transformers' Mixtral does.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from expertswitch.kernels.topk_softmax import topk_softmax
from expertswitch.models.context import ExpertBatch
from expertswitch.models.layers import MultiExpertLinear


class RowMixtralMoE:
    def __init__(self, prefix: str, moe):
        """prefix: the block's checkpoint prefix ("model.layers.3.block_sparse_moe."); moe: the
        loaded MixtralSparseMoE (its stacked weights are shared, not copied)."""
        self.moe, self.prefix = moe, prefix
        w_in, w_out = moe.experts.w_in, moe.experts.w_out  # [E, 2F, H], [E, H, F]
        f = w_in.shape[1] // 2
        self.router = MultiExpertLinear(prefix + "gate.weight", moe.gate.weight)
        self.w1, self.w3, self.w2 = [], [], []
        if moe.proj_names is None:  # a base in transformers 5's fused layout: its experts'
            self.names = frozenset()  # archives are refused (registry), none is applied here
            return
        gate, up, down = moe.proj_names  # (Mixtral's w1, w3, w2; Qwen3-MoE's gate/up/down)
        for j in range(w_in.shape[0]):
            e = f"{prefix}experts.{j}."
            self.w1.append(MultiExpertLinear(e + gate + ".weight", w_in[j, :f]))
            self.w3.append(MultiExpertLinear(e + up + ".weight", w_in[j, f:]))
            self.w2.append(MultiExpertLinear(e + down + ".weight", w_out[j]))
        self.names = frozenset(
            [self.router.name] + [lin.name for lin in self.w1 + self.w2 + self.w3]
        )

    def _slots(self, eb: ExpertBatch) -> list[int]:
        """Slots of the batch's experts that change this block and have rows in it (cached per
        step; which experts change it at all, while the active set stays: a 128-expert block
        has 385 names)."""
        key = ("moe-slots", self.prefix)
        if key not in eb.cache:
            if key not in eb.tables:
                eb.tables[key] = [s for s, ex in enumerate(eb.experts)
                                  if not self.names.isdisjoint(ex.deltas.keys())
                                  or not self.names.isdisjoint(ex.exact.keys())]  # fmt: skip
            eb.cache[key] = [s for s in eb.tables[key] if eb.segments[s].numel()]
        return eb.cache[key]

    def __call__(self, x: torch.Tensor, eb: ExpertBatch) -> torch.Tensor:
        slots = self._slots(eb)
        if not slots:
            return self.moe(x)
        if len(slots) == len(eb.experts) and not bool((eb.row_slot < 0).any()):
            return self._per_row(x, eb)  # every row's expert changes the block
        mine = torch.zeros(len(eb.experts) + 1, dtype=torch.bool, device=x.device)
        mine[slots] = True
        changed = mine[eb.row_slot].nonzero().flatten()  # row_slot −1 reads the last: False
        rest = (~mine[eb.row_slot]).nonzero().flatten()
        out = torch.empty_like(x)
        if rest.numel():
            out[rest] = self.moe(x.index_select(0, rest))
        out[changed] = self._per_row(x.index_select(0, changed), eb.subset(changed))
        return out

    def _per_row(self, x: torch.Tensor, eb: ExpertBatch) -> torch.Tensor:
        logits = self.router(x, eb)  # [T, E] in the model dtype, as transformers' nn.Linear
        idx, weights, _ = topk_softmax(logits, self.moe.top_k, renormalize=self.moe.renormalize)
        out = torch.zeros_like(x)
        for j in torch.unique(idx).tolist():
            tok, which = (idx == j).nonzero(as_tuple=True)
            sub, xj = eb.subset(tok), x.index_select(0, tok)
            h = F.silu(self.w1[j](xj, sub)) * self.w3[j](xj, sub)
            y = self.w2[j](h, sub) * weights[tok, which, None].to(x.dtype)
            out.index_add_(0, tok, y)
        return out
