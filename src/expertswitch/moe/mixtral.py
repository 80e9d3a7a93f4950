"""Mixtral's sparse MoE FFN on stacked experts: router → fp32 softmax → top-k → renormalise →
SwiGLU experts, dropless. Model-agnostic interface: hidden states [..., H] in, same shape out
(router logits kept on `last_router_logits` for an aux loss when autograd is on), so any decoder
can plug it in.

Loads the router and expert tensors of an HF Mixtral checkpoint in either layout:
per expert (`experts.{e}.w1/w3/w2.weight`, as saved on disk and by transformers 4) or fused
(`experts.gate_up_proj` [E, 2F, H] and `experts.down_proj` [E, H, F], transformers 5).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from expertswitch.errors import CheckpointError
from expertswitch.kernels.fused_moe import fused_moe
from expertswitch.kernels.topk_softmax import router_topk, topk_softmax
from expertswitch.moe.experts import StackedExperts


class MixtralSparseMoE(nn.Module):
    def __init__(
        self,
        hidden_size: int,
        ffn_size: int,
        num_experts: int = 8,
        top_k: int = 2,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        renormalize: bool = True,
    ):
        """renormalize: the top-k routing weights divided by their sum (Mixtral; Qwen3-MoE's
        norm_topk_prob)."""
        super().__init__()
        self.top_k, self.renormalize = top_k, renormalize
        self.proj_names = ("w1", "w3", "w2")  # an expert's gate, up, down (the checkpoint's)
        self.gate = nn.Linear(hidden_size, num_experts, bias=False, dtype=dtype, device=device)
        self.experts = StackedExperts(num_experts, hidden_size, ffn_size, "swiglu", False, dtype,
                                      device)  # fmt: skip
        self.last_router_logits: torch.Tensor | None = None

    @classmethod
    def from_config(cls, config, dtype=None, device=None) -> MixtralSparseMoE:
        """From an HF MixtralConfig or Qwen3MoeConfig (its experts' width and
        norm_topk_prob)."""
        ffn = getattr(config, "moe_intermediate_size", None) or config.intermediate_size
        experts = getattr(config, "num_local_experts", None) or config.num_experts
        return cls(config.hidden_size, ffn, experts, config.num_experts_per_tok, dtype, device,
                   renormalize=getattr(config, "norm_topk_prob", True))  # fmt: skip

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """With autograd on, the router logits are kept on `last_router_logits`; without (for
        inference), gate matmul, softmax and top-k run as one fused launch and it is None."""
        x = hidden_states.reshape(-1, hidden_states.shape[-1])  # [T, H]
        if torch.is_grad_enabled():
            logits = self.gate(x)  # [T, E], in the model dtype as in transformers
            idx, weights, _ = topk_softmax(logits, self.top_k, renormalize=self.renormalize)
            self.last_router_logits = logits
        else:  # logits rounded to the model dtype, as the nn.Linear above gives them
            idx, weights = router_topk(x, self.gate.weight, self.top_k, self.renormalize,
                                       round_logits=True)  # fmt: skip
            self.last_router_logits = None
        ex = self.experts
        out = fused_moe(x, ex.w_in, ex.w_out, idx, weights, "swiglu", dropless=True)
        return out.reshape(hidden_states.shape)

    @torch.no_grad()
    def load_hf_state_dict(self, state: Mapping[str, torch.Tensor], prefix: str = "") -> None:
        """Copy `{prefix}gate.weight` and the experts from an HF Mixtral MoE block's tensors
        (experts.{e}.w1/w3/w2), a Qwen3-MoE block's (experts.{e}.gate_proj/up_proj/down_proj)
        or transformers 5's fused ones (experts.gate_up_proj, experts.down_proj)."""
        ex = self.experts
        num_e, f2, _ = ex.w_in.shape
        f = f2 // 2

        def get(name):
            key = prefix + name
            if key not in state:
                raise CheckpointError(f"Mixtral MoE tensor {key} is missing")
            return state[key]

        self.gate.weight.copy_(get("gate.weight"))
        if prefix + "experts.gate_up_proj" in state:
            ex.w_in.copy_(get("experts.gate_up_proj"))
            ex.w_out.copy_(get("experts.down_proj"))
            self.proj_names = None  # (no per-expert tensors: experts cannot change them per row)
            return
        if prefix + "experts.0.gate_proj.weight" in state:
            self.proj_names = ("gate_proj", "up_proj", "down_proj")
        gate, up, down = self.proj_names
        for e in range(num_e):
            ex.w_in[e, :f].copy_(get(f"experts.{e}.{gate}.weight"))
            ex.w_in[e, f:].copy_(get(f"experts.{e}.{up}.weight"))
            ex.w_out[e].copy_(get(f"experts.{e}.{down}.weight"))
