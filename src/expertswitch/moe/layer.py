"""The MoE layer: DeepSpeed's `MoE` signature and semantics, sort-based dispatch underneath.

    out, l_aux, exp_counts = MoE(hidden_size, expert, num_experts, k=...)(hidden_states)

A DeepSpeed user switches by changing the import (`convert_deepspeed_state_dict` maps a
checkpoint's keys). `MoE.stacked(...)` builds the fast variant: experts as stacked [E, ...]
weights run by one grouped kernel (kernels/fused_moe.py) instead of a module per expert.

Keyword-only additions to DeepSpeed's signature: `tie_break` (top-1 without RTS: "position"
keeps an over-full expert's earliest tokens; "torch_topk" keeps what DeepSpeed's torch.topk
keeps), `drop_policy` ("probs", DeepSpeed's default,
or "position": which routes an over-full expert keeps when k > 2), `deterministic_eval`
(True: no random token selection or second-expert sampling in eval; False: DeepSpeed's eval),
and `hierarchical_all_to_all` (+ `ranks_per_node`, default torchrun's LOCAL_WORLD_SIZE) for
ep_size > 1: the all-to-all in two stages, inside nodes then across them (parallel/).
Training routes as DeepSpeed's does, random draws included (moe/gate.py).

Residual-MoE (DeepSpeed-MoE §4.1, `use_residual=True`): a dense MLP runs beside the experts and
a learned per-token softmax coefficient mixes them: out = moe(x)·c₀ + mlp(x)·c₁ with
c = softmax(Linear(hidden → 2)(x)).
"""

from __future__ import annotations

import os
import re

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from expertswitch.errors import ConfigError
from expertswitch.kernels.fused_moe import fused_moe
from expertswitch.moe.dispatch import make_dispatch, permute, unpermute
from expertswitch.moe.experts import DenseMLP, ModuleExperts, StackedExperts
from expertswitch.moe.gate import TopKGate
from expertswitch.parallel.comm import collective
from expertswitch.parallel.dispatch import expert_parallel_moe
from expertswitch.parallel.groups import expert_groups


class MoE(nn.Module):
    def __init__(
        self,
        hidden_size: int,
        expert: nn.Module | None = None,
        num_experts: int = 1,
        ep_size: int = 1,
        k: int = 1,
        capacity_factor: float = 1.0,
        eval_capacity_factor: float = 1.0,
        min_capacity: int = 4,
        use_residual: bool = False,
        noisy_gate_policy: str | None = None,
        drop_tokens: bool = True,
        use_rts: bool = True,
        use_tutel: bool = False,
        enable_expert_tensor_parallelism: bool = False,
        top2_2nd_expert_sampling: bool = True,
        *,
        experts: StackedExperts | None = None,
        residual_mlp: nn.Module | None = None,
        z_loss_coef: float = 0.0,
        drop_policy: str = "probs",
        deterministic_eval: bool = True,
        tie_break: str = "position",
        hierarchical_all_to_all: bool = False,
        ranks_per_node: int | None = None,
        padded_all_to_all: bool = False,
    ):
        super().__init__()
        if enable_expert_tensor_parallelism:
            raise ConfigError("expert tensor parallelism is not supported yet; leave it False")
        if (expert is None) == (experts is None):
            raise ConfigError("pass exactly one of expert= (a module, copied per expert) or "
                              "experts= (StackedExperts; see MoE.stacked)")  # fmt: skip
        self.hidden_size = hidden_size
        if experts is not None:  # stacked experts: this rank's share
            num_experts = experts.num_experts * ep_size
        if ep_size < 1 or num_experts % ep_size:
            raise ConfigError(f"num_experts={num_experts} must be a multiple of ep_size="
                              f"{ep_size}: each rank of an expert-parallel group holds the "
                              "same number of experts")  # fmt: skip
        self.num_experts = num_experts
        self.ep_size = ep_size
        ppn = 0
        if hierarchical_all_to_all:  # torchrun sets LOCAL_WORLD_SIZE: the ranks of one node
            ppn = ranks_per_node or int(os.environ.get("LOCAL_WORLD_SIZE", "0") or 0)
            if ppn < 1:
                raise ConfigError("hierarchical_all_to_all needs the ranks per node: launch "
                                  "with torchrun, or pass ranks_per_node=")  # fmt: skip
        self.groups = expert_groups(ep_size, ppn) if ep_size > 1 else None
        if padded_all_to_all and hierarchical_all_to_all:
            raise ConfigError("choose the padded (DeepSpeed's) or the hierarchical all-to-all")
        self.padded_all_to_all = padded_all_to_all
        self.use_residual = use_residual
        self.z_loss_coef = z_loss_coef
        self.gate = TopKGate(
            hidden_size, self.num_experts, k, capacity_factor, eval_capacity_factor,
            min_capacity, noisy_gate_policy, drop_tokens, use_rts, top2_2nd_expert_sampling,
            drop_policy, deterministic_eval, tie_break,
        )  # fmt: skip
        # each rank holds experts [ep_rank·E/ep, (ep_rank+1)·E/ep) (all of them when ep = 1)
        self.num_local_experts = num_experts // ep_size
        self.experts = (experts if experts is not None
                        else ModuleExperts(expert, self.num_local_experts))  # fmt: skip
        if use_residual:
            if residual_mlp is None and expert is None:
                raise ConfigError("use_residual with stacked experts needs residual_mlp=")
            # DeepSpeed's `self.mlp = expert`: the module passed in, not a copy (two layers given
            # one module share their residual MLP and its gradient); the experts are copies
            self.mlp = residual_mlp if residual_mlp is not None else expert
            self.coefficient = nn.Linear(hidden_size, 2)
        self.exp_counts: torch.Tensor | None = None

    @classmethod
    def stacked(
        cls,
        hidden_size: int,
        ffn_size: int,
        num_experts: int,
        k: int = 1,
        activation: str = "swiglu",
        bias: bool = False,
        use_residual: bool = False,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        ep_size: int = 1,
        **gate_kwargs,
    ) -> MoE:
        """Experts as stacked weights [E, ...] (SwiGLU or GELU/ReLU/SiLU MLPs), run by the
        grouped kernel; with ep_size > 1 this rank stacks its E / ep_size experts. gate_kwargs:
        capacity_factor, eval_capacity_factor, min_capacity, noisy_gate_policy, drop_tokens,
        use_rts, top2_2nd_expert_sampling, z_loss_coef, drop_policy, deterministic_eval,
        tie_break."""
        if ep_size < 1 or num_experts % ep_size:
            raise ConfigError(f"num_experts={num_experts} must be a multiple of ep_size="
                              f"{ep_size}")  # fmt: skip
        experts = StackedExperts(num_experts // ep_size, hidden_size, ffn_size, activation, bias,
                                 dtype, device)  # fmt: skip
        residual = (
            DenseMLP(hidden_size, ffn_size, activation, bias, dtype, device)
            if use_residual
            else None
        )
        return cls(hidden_size, k=k, use_residual=use_residual, experts=experts, ep_size=ep_size,
                   residual_mlp=residual, **gate_kwargs).to(device=device)  # fmt: skip

    @property
    def first_local_expert(self) -> int:
        """Global id of this rank's first expert."""
        return self.groups.ep_rank * self.num_local_experts if self.groups else 0

    def _experts_forward(self, x: torch.Tensor, gate) -> torch.Tensor:
        return self._run_experts(x, gate.expert_idx, gate.weights, capacity=gate.capacity)

    def _run_experts(self, x, expert_idx, weights, dropless: bool = False,
                     capacity: int | None = None) -> torch.Tensor:  # fmt: skip
        """Σ_r weights · expert(x) over each token's routes: here, or across the EP group."""
        if self.groups is None:
            return self._local_experts(x, expert_idx, weights, dropless)
        cap = None
        if self.padded_all_to_all:  # DeepSpeed's format: one capacity for the whole group
            if capacity is None:  # dropless inference: the fullest expert's routes
                kept = expert_idx[expert_idx >= 0]
                capacity = int(torch.bincount(kept, minlength=self.num_experts).max())
            cap = torch.tensor(max(capacity, 1), device=x.device)
            g = self.groups
            collective("expert-parallel capacity all-reduce", g.ep_ranks, dist.all_reduce, cap,
                       op=dist.ReduceOp.MAX, group=g.ep_group)  # fmt: skip
            cap = int(cap)
        return expert_parallel_moe(x, expert_idx, weights, self.num_experts, self.groups,
                                   self._run_local, cap)  # fmt: skip

    def _run_local(self, rows: torch.Tensor, local_ids: torch.Tensor) -> torch.Tensor:
        """This rank's experts on rows [R, H] whose experts are local_ids [R] (0-based here)."""
        ones = torch.ones(rows.shape[0], 1, dtype=torch.float32, device=rows.device)
        return self._local_experts(rows, local_ids.unsqueeze(-1), ones, True)

    def _local_experts(self, x, expert_idx, weights, dropless: bool = False) -> torch.Tensor:
        """This rank's experts, with expert_idx local (0 .. num_local_experts − 1, −1 dropped)."""
        ex = self.experts
        if isinstance(ex, StackedExperts):
            w_in, w_out, b_in, b_out = ex.w_in, ex.w_out, ex.b_in, ex.b_out
            dt = _autocast_dtype(x)
            if dt is not None:  # autocast does not reach a custom autograd Function: cast here
                x, w_in, w_out = x.to(dt), w_in.to(dt), w_out.to(dt)
                b_in = None if b_in is None else b_in.to(dt)
                b_out = None if b_out is None else b_out.to(dt)
            return fused_moe(x, w_in, w_out, expert_idx, weights, ex.activation, b_in, b_out,
                             dropless=dropless)  # fmt: skip
        d = make_dispatch(expert_idx, weights, self.num_local_experts)
        return unpermute(ex(permute(x, d), d), d)

    def forward(
        self, hidden_states: torch.Tensor, used_token: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """hidden_states [..., H] → (output [..., H], l_aux scalar, exp_counts int64 [E])."""
        if used_token is not None:
            raise ConfigError("used_token is not supported; drop padding tokens before the layer")
        self._check_hidden(hidden_states)
        x = hidden_states.reshape(-1, self.hidden_size)
        gate = self.gate(x)
        out = self._mix_residual(hidden_states, self._experts_forward(x, gate))
        l_aux = gate.l_aux + self.z_loss_coef * gate.z_loss if self.z_loss_coef else gate.l_aux
        self.exp_counts = gate.exp_counts
        return out, l_aux, gate.exp_counts

    def infer(self, hidden_states: torch.Tensor, replicated: bool = False) -> torch.Tensor:
        """The inference fast path: hidden_states [..., H] → output [..., H], equal to
        `forward(...)[0]` of this dropless layer in eval mode, without the aux loss and expert
        counts. Stacked experts on a GPU: fused gating, then the grouped GEMMs — 3 to 6 launches,
        no host synchronisation, so a CUDA graph can capture it (kernels/graphs.py).

        replicated (ep_size > 1): every rank of the EP group holds the same tokens (lockstep
        serving, tensor slicing). Each rank then routes and sends only its 1/ep share of them
        and the outputs are all-gathered — DeepSpeed-MoE's parallelism-coordinated
        all-to-all: ep times fewer bytes in the all-to-all and no expert runs a token twice,
        for one all-gather of the outputs. (Across ranks, both forms exchange split sizes and
        synchronise with the host: only the single-rank path is CUDA-graph capturable.)"""
        if self.gate.drop_tokens:
            raise ConfigError("infer() is the dropless path: build the layer with "
                              "drop_tokens=False, or call forward() for capacity and "
                              "token dropping")  # fmt: skip
        if self.training:
            raise ConfigError("infer() is for inference: call .eval() first, or forward()")
        if not self.gate._deterministic():
            raise ConfigError("infer() routes deterministically, but this layer samples in eval "
                              "(deterministic_eval=False): call forward()")  # fmt: skip
        if not isinstance(self.experts, StackedExperts):
            return self.forward(hidden_states)[0]
        self._check_hidden(hidden_states)
        x = hidden_states.reshape(-1, self.hidden_size)
        if replicated and self.groups is not None:
            return self._infer_share(x).reshape(hidden_states.shape)
        idx, weights = self.gate.route(x)
        return self._mix_residual(hidden_states, self._run_experts(x, idx, weights, True))

    def _infer_share(self, x: torch.Tensor) -> torch.Tensor:
        """infer() on this rank's rows of tokens every EP rank holds, then all-gathered. The
        shares are ceil(T / ep) rows (the last ones shorter or empty: an empty share still
        takes part in the all-to-all)."""
        g = self.groups
        t = x.shape[0]
        share = -(-t // g.ep_size)
        mine = x[g.ep_rank * share : (g.ep_rank + 1) * share]
        idx, weights = self.gate.route(mine)
        out = self._mix_residual(mine, self._run_experts(mine, idx, weights, True))
        padded = out.new_zeros((share, x.shape[1]))
        padded[: out.shape[0]] = out
        parts = [torch.empty_like(padded) for _ in range(g.ep_size)]
        collective("expert-parallel output all-gather", g.ep_ranks, dist.all_gather, parts,
                   padded, group=g.ep_group)  # fmt: skip
        return torch.cat(parts)[:t]

    def _check_hidden(self, hidden_states: torch.Tensor) -> None:
        if hidden_states.shape[-1] != self.hidden_size:
            raise ConfigError(f"MoE expects hidden size {self.hidden_size}, got input of shape "
                              f"{tuple(hidden_states.shape)}")  # fmt: skip

    def _mix_residual(self, hidden_states: torch.Tensor, moe_out: torch.Tensor) -> torch.Tensor:
        out = moe_out.reshape(hidden_states.shape)
        if not self.use_residual:
            return out
        coef = F.softmax(self.coefficient(hidden_states), dim=-1)
        mlp_out = self.mlp(hidden_states)
        mlp_out = mlp_out[0] if isinstance(mlp_out, tuple) else mlp_out
        return out * coef[..., 0:1] + mlp_out * coef[..., 1:]


def _autocast_dtype(x: torch.Tensor) -> torch.dtype | None:
    """The autocast dtype in effect for x's device (CUDA only: the grouped kernels run there;
    on a CPU the experts run in torch ops, which autocast reaches itself)."""
    if x.device.type != "cuda" or not torch.is_autocast_enabled("cuda"):
        return None
    return torch.get_autocast_dtype("cuda")


_DS_KEYS = (
    (re.compile(r"(^|\.)deepspeed_moe\.gate\.wg\."), r"\1gate.wg."),
    (re.compile(r"(^|\.)deepspeed_moe\.experts\.deepspeed_experts\.(\d+)\."),
     r"\1experts.experts.\2."),
)  # fmt: skip


def convert_deepspeed_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Keys of a DeepSpeed `MoE` state dict → keys of `MoE(expert=...)`, at any depth: a bare
    layer's (`deepspeed_moe.gate.wg.weight`) or a whole model's
    (`moe_1.deepspeed_moe.experts.deepspeed_experts.0.0.bias`). The mlp and coefficient of a
    Residual-MoE keep their names."""
    out = {}
    for key, value in state.items():
        new = key[1:] if key.startswith(".deepspeed_moe.") else key  # a bare layer's engine
        for pattern, repl in _DS_KEYS:
            new = pattern.sub(repl, new)
        out[new] = value
    return out
