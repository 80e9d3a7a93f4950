"""Top-k gating with capacity, as DeepSpeed-MoE defines it (and dropless, RTS, noise, z-loss).

Everything is computed in fp32. For T tokens, E experts and k choices:

- choices: k = 1 → argmax of the softmax (of logits + Gumbel noise under 'RSample' in
  training); k = 2 → the argmax, then the argmax of the remaining logits (+ Gumbel noise when
  `second_expert_sampling` and training); k > 2 → `topk` of the softmax.
- capacity = max(ceil(T / E · k · capacity_factor), min_capacity) when dropping tokens;
  dropless: the largest expert count (no route is ever dropped).
- which routes an over-full expert keeps: first choices before second choices, and within a
  choice rank by token position — deterministic, unlike DeepSpeed's `torch.topk` over a 0/1 mask
  whose ties pick arbitrary tokens. With RTS (random token selection) a random priority replaces
  the position inside each rank, so late tokens are not always the ones dropped.
- weights: k = 1 → the softmax probability of the chosen expert; k ≥ 2 → the chosen experts'
  probabilities renormalised over the routes that were kept.
- aux loss: k ≤ 2 → E · Σ_e mean_t(p_te) · mean_t(first-choice mask_te) (DeepSpeed's top-1 and
  top-2 formulas coincide); k > 2 → the same over all k choices, divided by k.
- exp_counts: routes per expert before dropping, as DeepSpeed reports them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from expertswitch.errors import ConfigError

NOISY_POLICIES = (None, "None", "Jitter", "RSample")


@dataclass
class GateOutput:
    """expert_idx: int64 [T, k], −1 where the route was dropped; weights: fp32 [T, k] (0 where
    dropped); locations: int64 [T, k], slot in the expert's capacity buffer (−1 where dropped);
    capacity: int; l_aux, z_loss: fp32 scalars; exp_counts: int64 [E]; probs: fp32 [T, E]."""

    expert_idx: torch.Tensor
    weights: torch.Tensor
    locations: torch.Tensor
    capacity: int
    l_aux: torch.Tensor
    z_loss: torch.Tensor
    exp_counts: torch.Tensor
    probs: torch.Tensor


def gumbel_like(t: torch.Tensor) -> torch.Tensor:
    u = torch.rand_like(t).clamp_(1e-20, 1.0 - 1e-7)
    return -torch.log(-torch.log(u))


def multiplicative_jitter(x: torch.Tensor, eps: float = 1e-2) -> torch.Tensor:
    """DeepSpeed's 'Jitter' policy: x · U(1 − eps, 1 + eps), applied to the gate's input."""
    return x * torch.empty_like(x).uniform_(1.0 - eps, 1.0 + eps)


def capacity_for(tokens: int, experts: int, k: int, factor: float, min_capacity: int) -> int:
    return max(math.ceil(tokens / experts * k * factor), min_capacity)


def choose_experts(
    logits: torch.Tensor, k: int, noisy_gate_policy, second_expert_sampling: bool, training: bool
) -> torch.Tensor:
    """int64 [T, k] chosen experts, best first."""
    probs = logits.softmax(dim=-1)
    if k == 1:
        noisy = training and noisy_gate_policy == "RSample"
        return (logits + gumbel_like(logits) if noisy else probs).argmax(dim=-1, keepdim=True)
    if k == 2:
        first = probs.argmax(dim=-1, keepdim=True)
        rest = logits + gumbel_like(logits) if (second_expert_sampling and training) else logits
        second = rest.scatter(-1, first, float("-inf")).argmax(dim=-1, keepdim=True)
        return torch.cat([first, second], dim=-1)
    return probs.topk(k, dim=-1).indices


def _route_order(expert_idx: torch.Tensor, use_rts: bool) -> torch.Tensor:
    """Rank of each route [T, k] inside its expert: choice rank first, then token position
    (or a random priority with RTS)."""
    t, k = expert_idx.shape
    num_e = int(expert_idx.max().item()) + 1 if expert_idx.numel() else 1
    rank_major = expert_idx.T.reshape(-1)  # [k·T], route r·T + t
    within = torch.randperm(t, device=expert_idx.device) if use_rts else None
    # sort key: expert, then choice rank, then token position / random priority
    pos = torch.arange(t, device=expert_idx.device) if within is None else within
    key = (rank_major * k + torch.arange(k, device=expert_idx.device).repeat_interleave(t)) * t
    key = key + pos.repeat(k)
    order = torch.argsort(key, stable=True)
    sorted_e = rank_major[order]
    counts = torch.bincount(sorted_e, minlength=num_e)
    starts = torch.cumsum(counts, 0) - counts
    slot_sorted = torch.arange(order.numel(), device=order.device) - starts[sorted_e]
    slot = torch.empty_like(slot_sorted).scatter_(0, order, slot_sorted)
    return slot.view(k, t).T  # [T, k]


def topk_gating(
    logits: torch.Tensor,
    k: int = 1,
    capacity_factor: float = 1.0,
    min_capacity: int = 4,
    drop_tokens: bool = True,
    use_rts: bool = False,
    noisy_gate_policy: str | None = None,
    second_expert_sampling: bool = False,
    training: bool = False,
) -> GateOutput:
    """Route logits [T, E] (any float dtype; computed in fp32). See the module docstring."""
    if logits.dim() != 2:
        raise ConfigError(f"gate logits must be [tokens, experts], got {tuple(logits.shape)}")
    t, num_e = logits.shape
    if not 1 <= k <= num_e:
        raise ConfigError(f"k={k} must be between 1 and the number of experts ({num_e})")
    logits = logits.float()
    if t == 0:
        return _empty_output(logits, k)
    probs = logits.softmax(dim=-1)  # [T, E]
    expert_idx = choose_experts(logits, k, noisy_gate_policy, second_expert_sampling, training)
    exp_counts = torch.bincount(expert_idx.reshape(-1), minlength=num_e)

    me = probs.mean(dim=0)
    chosen = F.one_hot(expert_idx if k > 2 else expert_idx[:, :1], num_e).sum(1).float()
    l_aux = num_e * (me * chosen.mean(dim=0)).sum() / (k if k > 2 else 1)
    z_loss = torch.logsumexp(logits, dim=-1).square().mean()

    if drop_tokens:
        capacity = capacity_for(t, num_e, k, capacity_factor, min_capacity)
    else:
        capacity = int(exp_counts.max().item())
    slot = _route_order(expert_idx, use_rts and training)
    kept = slot < capacity
    if use_rts and training:
        # slots follow token position among the kept routes, as DeepSpeed lays out its buffers
        slot = _route_order(torch.where(kept, expert_idx, num_e), False)
    weights = probs.gather(1, expert_idx) * kept
    if k > 1:
        eps = torch.finfo(torch.float32).eps
        weights = weights / weights.sum(dim=-1, keepdim=True).clamp_min(eps)
    return GateOutput(
        expert_idx=torch.where(kept, expert_idx, -1),
        weights=weights,
        locations=torch.where(kept, slot, -1),
        capacity=capacity,
        l_aux=l_aux,
        z_loss=z_loss,
        exp_counts=exp_counts,
        probs=probs,
    )


def _empty_output(logits: torch.Tensor, k: int) -> GateOutput:
    idx = torch.zeros(0, k, dtype=torch.long, device=logits.device)
    zero = logits.new_zeros(())
    counts = torch.zeros(logits.shape[1], dtype=torch.long, device=logits.device)
    return GateOutput(idx, logits.new_zeros(0, k), idx, 0, zero, zero, counts, logits.softmax(-1))


def dropless_inference_gating(logits: torch.Tensor, k: int) -> GateOutput:
    """`topk_gating` for inference without capacity or noise, in few launches: the fused
    softmax + top-k kernel on GPU (kernels/topk_softmax.py), no slot bookkeeping
    (`locations` is the choice rank, unused by dispatch)."""
    from expertswitch.kernels.topk_softmax import topk_softmax

    t, num_e = logits.shape
    if not 1 <= k <= num_e:
        raise ConfigError(f"k={k} must be between 1 and the number of experts ({num_e})")
    if t == 0:
        return _empty_output(logits.float(), k)
    idx, weights, probs = topk_softmax(logits, k, renormalize=k > 1)
    exp_counts = torch.bincount(idx.reshape(-1), minlength=num_e)
    first = torch.bincount(idx[:, 0], minlength=num_e).float() / t
    chosen = first if k <= 2 else exp_counts.float() / (t * k)
    l_aux = num_e * (probs.mean(dim=0) * chosen).sum()
    z_loss = torch.logsumexp(logits.float(), dim=-1).square().mean()
    ranks = torch.arange(k, device=logits.device).expand(t, k)
    return GateOutput(idx, weights, ranks, int(exp_counts.max()), l_aux, z_loss, exp_counts, probs)


class TopKGate(torch.nn.Module):
    """The gate: a bias-free Linear(hidden → E) (named `wg`, as in DeepSpeed) + `topk_gating`."""

    def __init__(
        self,
        hidden_size: int,
        num_experts: int,
        k: int = 1,
        capacity_factor: float = 1.0,
        eval_capacity_factor: float = 1.0,
        min_capacity: int = 4,
        noisy_gate_policy: str | None = None,
        drop_tokens: bool = True,
        use_rts: bool = True,
        second_expert_sampling: bool = True,
    ):
        super().__init__()
        if noisy_gate_policy not in NOISY_POLICIES:
            raise ConfigError(
                f"noisy_gate_policy={noisy_gate_policy!r}: choose None, 'Jitter' or 'RSample'"
            )
        if num_experts < 1 or not 1 <= k <= num_experts:
            raise ConfigError(f"need 1 ≤ k ({k}) ≤ num_experts ({num_experts})")
        if capacity_factor <= 0 or eval_capacity_factor <= 0 or min_capacity < 0:
            raise ConfigError("capacity factors must be > 0 and min_capacity ≥ 0")
        self.wg = torch.nn.Linear(hidden_size, num_experts, bias=False)
        self.k = k
        self.capacity_factor = capacity_factor
        self.eval_capacity_factor = eval_capacity_factor
        self.min_capacity = min_capacity
        self.noisy_gate_policy = None if noisy_gate_policy == "None" else noisy_gate_policy
        self.drop_tokens = drop_tokens
        self.use_rts = use_rts
        self.second_expert_sampling = second_expert_sampling

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Dropless inference routing, no noise: x [T, H] → (expert_idx int64 [T, k], weights
        fp32 [T, k]) — the routes `forward` picks in eval mode with drop_tokens=False, from one
        fused launch on a GPU (gate matmul, softmax, top-k, renormalisation for k > 1)."""
        from expertswitch.kernels.topk_softmax import router_topk

        return router_topk(x, self.wg.weight, self.k, renormalize=self.k > 1)

    def forward(self, x: torch.Tensor) -> GateOutput:
        """x [T, H] → GateOutput."""
        x32 = x.float()
        if self.training and self.noisy_gate_policy == "Jitter":
            x32 = multiplicative_jitter(x32)
        logits = F.linear(x32, self.wg.weight.float())  # [T, E]
        if not self.training and not self.drop_tokens:
            return dropless_inference_gating(logits, self.k)
        return topk_gating(
            logits,
            self.k,
            self.capacity_factor if self.training else self.eval_capacity_factor,
            self.min_capacity,
            self.drop_tokens,
            self.use_rts,
            self.noisy_gate_policy,
            self.second_expert_sampling,
            self.training,
        )
