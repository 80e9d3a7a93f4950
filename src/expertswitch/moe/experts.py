"""Expert weights: stacked tensors (the fast path) or a list of arbitrary modules (DeepSpeed's
`MoE(expert=...)`, any nn.Module per expert)."""

from __future__ import annotations

import copy
import math

import torch
from torch import nn

from expertswitch.errors import ConfigError
from expertswitch.kernels.grouped_mlp import ACTIVATIONS, activate
from expertswitch.moe.dispatch import Dispatch


class StackedExperts(nn.Module):
    """E expert MLPs as stacked weights.

    w_in   [E, F_in, H]   F_in = 2F for SwiGLU (gate rows, then up rows), F otherwise
    w_out  [E, H, F]
    b_in   [E, F_in], b_out [E, H]   when bias=True
    """

    def __init__(
        self,
        num_experts: int,
        hidden_size: int,
        ffn_size: int,
        activation: str = "swiglu",
        bias: bool = False,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ConfigError(f"activation={activation!r}: choose one of {ACTIVATIONS}")
        f_in = 2 * ffn_size if activation == "swiglu" else ffn_size
        kw = {"dtype": dtype, "device": device}
        self.activation = activation
        self.w_in = nn.Parameter(torch.empty(num_experts, f_in, hidden_size, **kw))
        self.w_out = nn.Parameter(torch.empty(num_experts, hidden_size, ffn_size, **kw))
        self.b_in = nn.Parameter(torch.zeros(num_experts, f_in, **kw)) if bias else None
        self.b_out = nn.Parameter(torch.zeros(num_experts, hidden_size, **kw)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # each expert initialised as nn.Linear would be
        for w in (self.w_in, self.w_out):
            bound = 1.0 / math.sqrt(w.shape[-1])
            nn.init.uniform_(w, -bound, bound)

    @property
    def num_experts(self) -> int:
        return self.w_in.shape[0]


class ModuleExperts(nn.Module):
    """E deep copies of one expert module (DeepSpeed's `Experts`), run on sorted rows."""

    def __init__(self, expert: nn.Module, num_experts: int):
        super().__init__()
        self.experts = nn.ModuleList(copy.deepcopy(expert) for _ in range(num_experts))

    @property
    def num_experts(self) -> int:
        return len(self.experts)

    def forward(self, x_sorted: torch.Tensor, d: Dispatch) -> torch.Tensor:
        bounds = d.offsets.tolist()
        outs = []
        idle: list[torch.Tensor] = []
        for e, expert in enumerate(self.experts):
            lo, hi = bounds[e], bounds[e + 1]
            if hi > lo:
                out = expert(x_sorted[lo:hi])
                outs.append(out[0] if isinstance(out, tuple) else out)
            elif torch.is_grad_enabled():
                idle += [p for p in expert.parameters() if p.requires_grad]
        y = torch.cat(outs) if outs else x_sorted[:0]
        if idle:
            # DeepSpeed runs every expert on its (zero) capacity buffer, so an idle expert's
            # gradients are zeros, not None: an optimizer then still decays it and counts its
            # step. The sum of an empty slice of each parameter is 0 and its gradient is a
            # zero tensor of the parameter's shape: no GEMM, no memory read, and no inf·0 (a
            # sum over the weights could overflow in fp16)
            y = y + sum(p.reshape(-1)[:0].sum() for p in idle).to(y.dtype)
        return y


class DenseMLP(nn.Module):
    """One dense MLP of the experts' shape: the residual branch of a Residual-MoE."""

    def __init__(self, hidden_size, ffn_size, activation="swiglu", bias=False, dtype=None,
                 device=None):  # fmt: skip
        super().__init__()
        f_in = 2 * ffn_size if activation == "swiglu" else ffn_size
        self.activation = activation
        self.up = nn.Linear(hidden_size, f_in, bias=bias, dtype=dtype, device=device)
        self.down = nn.Linear(ffn_size, hidden_size, bias=bias, dtype=dtype, device=device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(activate(self.up(x), self.activation))
