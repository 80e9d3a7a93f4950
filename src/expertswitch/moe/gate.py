"""Top-k gating with capacity, as DeepSpeed-MoE defines it (and dropless, RTS, noise, z-loss).

Everything is computed in fp32. For T tokens, E experts and k choices:

- choices: k = 1 → argmax of the softmax (of logits + Gumbel noise under 'RSample' in
  training); k = 2 → the argmax, then the argmax of the remaining logits (+ Gumbel noise with
  `second_expert_sampling`); k > 2 → `topk` of the softmax.
- capacity = max(ceil(T / E · k · capacity_factor), min_capacity) when dropping tokens,
  computed in float32 as DeepSpeed does (so T=50, E=4, k=1, factor 1.2 gives 16, not 15);
  dropless: the largest expert count (no route is ever dropped).
- which routes an over-full expert keeps, as DeepSpeed keeps them: k = 1 → by token position,
  or with RTS (random token selection) by a uniform random priority; k = 2 → first choices
  before second choices, by position within each; k > 2 → `drop_policy` "probs" (DeepSpeed's
  default: the routes with the highest probabilities) or "position" (by token position). Ties
  go to the earlier token: deterministic where DeepSpeed's `torch.topk` over a 0/1 mask picks
  arbitrary tokens.
- slots (locations): a kept route's place in its expert's buffer — token order among the kept
  routes (k = 2: first choices, then second choices).
- weights: k = 1 → the softmax probability of the chosen expert; k ≥ 2 → the chosen experts'
  probabilities renormalised over the routes that were kept.
- aux loss: k ≤ 2 → E · Σ_e mean_t(p_te) · mean_t(first-choice mask_te) (DeepSpeed's top-1 and
  top-2 formulas coincide); k > 2 → the same over all k choices, divided by k.
- exp_counts: routes per expert before dropping, as DeepSpeed reports them.

Randomness is DeepSpeed's, draw for draw: jitter, Gumbel noise and the RTS priorities come from
the same torch.distributions samplers with the same shapes in the same order, so under one seed
a training step routes exactly as DeepSpeed's gate does. In training, RTS (k = 1 only) and
second-expert sampling (k = 2) run as in DeepSpeed. In eval, DeepSpeed keeps both on; here the
routing is deterministic unless `deterministic_eval=False` asks for DeepSpeed's behaviour.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from expertswitch.errors import ConfigError

NOISY_POLICIES = (None, "None", "Jitter", "RSample")
DROP_POLICIES = ("probs", "position")
# top-1 without RTS, an over-full expert: "position" keeps the earliest tokens (the same on any
# device); "torch_topk" keeps what DeepSpeed's torch.topk over the 0/1 route mask keeps (an
# unspecified choice among ties, but the same as DeepSpeed's on the same device and torch)
TIE_BREAKS = ("position", "torch_topk")


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


def _uniform(low: float, high: float, shape, device) -> torch.Tensor:
    """torch.distributions.Uniform(low, high).rsample(shape) in fp32, as DeepSpeed draws it."""
    lo = torch.tensor(low, device=device)
    return lo + torch.rand(shape, dtype=lo.dtype, device=device) * (
        torch.tensor(high, device=device) - lo
    )


def gumbel_like(t: torch.Tensor) -> torch.Tensor:
    """Gumbel(0, 1) noise shaped like t: torch.distributions.Gumbel(0, 1).rsample, the sampler
    DeepSpeed's gate uses (one uniform draw per element)."""
    finfo = torch.finfo(torch.float32)
    u = _uniform(finfo.tiny, 1.0 - finfo.eps, t.shape, t.device)
    return -(-u.log()).log()


def multiplicative_jitter(x: torch.Tensor, eps: float = 1e-2) -> torch.Tensor:
    """DeepSpeed's 'Jitter' policy: x · U(1 − eps, 1 + eps), applied to the gate's input."""
    return x * _uniform(1.0 - eps, 1.0 + eps, x.shape, x.device)


def capacity_for(tokens: int, experts: int, k: int, factor: float, min_capacity: int) -> int:
    """max(ceil(T / E · k · factor), min_capacity), rounded as DeepSpeed's `_capacity` rounds:
    T / E and k · factor each cast to float32, their product in float32."""
    per_expert = torch.tensor(tokens / experts, dtype=torch.float32)
    cap = torch.ceil(per_expert * torch.tensor(factor * k, dtype=torch.float32))
    return max(int(cap), min_capacity)


def choose_experts(
    logits: torch.Tensor, k: int, rsample: bool, second_expert_sampling: bool
) -> torch.Tensor:
    """int64 [T, k] chosen experts, best first. rsample: Gumbel noise on the top-1 choice;
    second_expert_sampling: Gumbel noise on the top-2 second choice."""
    probs = logits.softmax(dim=-1)
    if k == 1:
        return (logits + gumbel_like(logits) if rsample else probs).argmax(dim=-1, keepdim=True)
    if k == 2:
        first = probs.argmax(dim=-1, keepdim=True)
        rest = logits + gumbel_like(logits) if second_expert_sampling else logits
        second = rest.scatter(-1, first, float("-inf")).argmax(dim=-1, keepdim=True)
        return torch.cat([first, second], dim=-1)
    return probs.topk(k, dim=-1).indices


def rank_in_expert(expert_idx: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
    """int64 [T, k]: each route's rank among the routes to its expert, by ascending key (ties:
    the earlier route in token-major order). Routes with expert −1 rank among themselves."""
    flat_e = expert_idx.reshape(-1)
    by_key = torch.argsort(key.reshape(-1), stable=True)
    order = by_key[torch.argsort(flat_e[by_key], stable=True)]  # expert, then key
    sorted_e = flat_e[order]
    first = torch.searchsorted(sorted_e, sorted_e, side="left")
    rank = torch.empty_like(flat_e)
    rank[order] = torch.arange(flat_e.numel(), device=flat_e.device) - first
    return rank.view_as(expert_idx)


def _keep_key(
    expert_idx: torch.Tensor, probs: torch.Tensor, rts: bool, drop_policy: str
) -> torch.Tensor:
    """The order in which an over-full expert keeps its routes (ascending), DeepSpeed's."""
    t, k = expert_idx.shape
    pos = torch.arange(t, device=expert_idx.device, dtype=torch.float64)[:, None].expand(t, k)
    if k == 1 and rts:  # DeepSpeed draws a [T, E] uniform and keeps the largest of each expert
        priority = _uniform(0.0, 1.0, probs.shape, probs.device).gather(1, expert_idx)
        return -priority.double()
    if k == 2:
        return pos + t * torch.arange(2, device=pos.device, dtype=pos.dtype)  # rank, position
    if k > 2 and drop_policy == "probs":
        return -probs.gather(1, expert_idx).double()
    return pos


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
    drop_policy: str = "probs",
    deterministic_eval: bool = True,
    tie_break: str = "position",
) -> GateOutput:
    """Route logits [T, E] (any float dtype; computed in fp32). See the module docstring.
    use_rts and second_expert_sampling apply in training, and in eval only when
    deterministic_eval is False (DeepSpeed's eval); 'RSample' noise only in training."""
    if logits.dim() != 2:
        raise ConfigError(f"gate logits must be [tokens, experts], got {tuple(logits.shape)}")
    t, num_e = logits.shape
    if not 1 <= k <= num_e:
        raise ConfigError(f"k={k} must be between 1 and the number of experts ({num_e})")
    if drop_policy not in DROP_POLICIES:
        raise ConfigError(f"drop_policy={drop_policy!r}: choose 'probs' or 'position'")
    _check_tie_break(tie_break, k)
    logits = logits.float()
    if t == 0:
        return _empty_output(logits, k)
    sampling = training or not deterministic_eval
    probs = logits.softmax(dim=-1)  # [T, E]
    expert_idx = choose_experts(
        logits, k, training and noisy_gate_policy == "RSample", second_expert_sampling and sampling
    )
    exp_counts = torch.bincount(expert_idx.reshape(-1), minlength=num_e)

    me = probs.mean(dim=0)
    chosen = F.one_hot(expert_idx if k > 2 else expert_idx[:, :1], num_e).sum(1).float()
    l_aux = num_e * (me * chosen.mean(dim=0)).sum() / (k if k > 2 else 1)
    z_loss = torch.logsumexp(logits, dim=-1).square().mean()

    if drop_tokens:
        capacity = capacity_for(t, num_e, k, capacity_factor, min_capacity)
    else:
        capacity = int(exp_counts.max().item())
    key = _keep_key(expert_idx, probs, k == 1 and use_rts and sampling, drop_policy)
    kept = rank_in_expert(expert_idx, key) < capacity
    if k == 1 and tie_break == "torch_topk" and drop_tokens and not (use_rts and sampling):
        mask = F.one_hot(expert_idx[:, 0], num_e)  # int64 [T, E]: DeepSpeed's mask1, dtype too
        top = torch.topk(mask, k=min(capacity, t), dim=0)[1]
        keep = mask * torch.zeros_like(mask).scatter_(0, top, 1)
        kept = keep.gather(1, expert_idx) > 0
    kept_idx = torch.where(kept, expert_idx, -1)
    # slots: token order among the kept routes (top-2: first choices, then second choices)
    slot_key = key if k == 2 else torch.arange(t, device=logits.device)[:, None].expand(t, k)
    slot = rank_in_expert(kept_idx, slot_key)
    weights = probs.gather(1, expert_idx) * kept
    if k > 1:
        eps = torch.finfo(torch.float32).eps
        weights = weights / weights.sum(dim=-1, keepdim=True).clamp_min(eps)
    return GateOutput(
        expert_idx=kept_idx,
        weights=weights,
        locations=torch.where(kept, slot, -1),
        capacity=capacity,
        l_aux=l_aux,
        z_loss=z_loss,
        exp_counts=exp_counts,
        probs=probs,
    )


def _check_tie_break(tie_break: str, k: int) -> None:
    if tie_break not in TIE_BREAKS:
        raise ConfigError(f"tie_break={tie_break!r}: choose one of {TIE_BREAKS}")
    if tie_break == "torch_topk" and k != 1:
        raise ConfigError("tie_break='torch_topk' is DeepSpeed's top-1 choice among ties; with "
                          f"k={k} it would change nothing: leave tie_break at "
                          "'position'")  # fmt: skip


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
    idx, weights, probs = topk_softmax(logits, k, renormalize=k > 1, second_by_logit=k == 2)
    exp_counts = torch.bincount(idx.reshape(-1), minlength=num_e)
    first = torch.bincount(idx[:, 0], minlength=num_e).float() / t
    chosen = first if k <= 2 else exp_counts.float() / (t * k)
    l_aux = num_e * (probs.mean(dim=0) * chosen).sum()
    z_loss = torch.logsumexp(logits.float(), dim=-1).square().mean()
    ranks = torch.arange(k, device=logits.device).expand(t, k)
    return GateOutput(idx, weights, ranks, int(exp_counts.max()), l_aux, z_loss, exp_counts, probs)


class TopKGate(torch.nn.Module):
    """The gate: a bias-free Linear(hidden → E) (named `wg`, as in DeepSpeed) + `topk_gating`.
    DeepSpeed's TopKGate arguments and defaults, plus drop_policy (k > 2) and
    deterministic_eval (False: RTS and second-expert sampling in eval too, as DeepSpeed)."""

    def __init__(
        self,
        hidden_size: int,
        num_experts: int,
        k: int = 1,
        capacity_factor: float = 1.0,
        eval_capacity_factor: float = 1.0,
        min_capacity: int = 8,
        noisy_gate_policy: str | None = None,
        drop_tokens: bool = True,
        use_rts: bool = True,
        second_expert_sampling: bool = True,
        drop_policy: str = "probs",
        deterministic_eval: bool = True,
        tie_break: str = "position",
    ):
        super().__init__()
        _check_tie_break(tie_break, k)
        if noisy_gate_policy not in NOISY_POLICIES:
            raise ConfigError(
                f"noisy_gate_policy={noisy_gate_policy!r}: choose None, 'Jitter' or 'RSample'"
            )
        if drop_policy not in DROP_POLICIES:
            raise ConfigError(f"drop_policy={drop_policy!r}: choose 'probs' or 'position'")
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
        self.drop_policy = drop_policy
        self.deterministic_eval = deterministic_eval
        self.tie_break = tie_break

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Dropless inference routing, no noise: x [T, H] → (expert_idx int64 [T, k], weights
        fp32 [T, k]) — the routes `forward` picks in eval mode with drop_tokens=False, from one
        fused launch on a GPU (gate matmul, softmax, top-k, renormalisation for k > 1)."""
        from expertswitch.kernels.topk_softmax import router_topk

        return router_topk(x, self.wg.weight, self.k, renormalize=self.k > 1,
                           second_by_logit=self.k == 2)  # fmt: skip

    def forward(self, x: torch.Tensor) -> GateOutput:
        """x [T, H] → GateOutput."""
        x32 = x.float()
        if self.training and self.noisy_gate_policy == "Jitter":
            x32 = multiplicative_jitter(x32)
        # fp32 logits even under autocast (which would make this linear bf16): routing, aux
        # and z-loss are computed in fp32, as DeepSpeed's gate does
        with torch.autocast(x.device.type, enabled=False):
            logits = F.linear(x32, self.wg.weight.float())  # [T, E]
        if not self.training and not self.drop_tokens and self._deterministic():
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
            self.drop_policy,
            self.deterministic_eval,
            self.tie_break,
        )

    def _deterministic(self) -> bool:
        """Whether eval routing is free of noise (the fused dropless path needs it)."""
        return self.deterministic_eval or not (
            (self.k == 1 and self.use_rts) or (self.k == 2 and self.second_expert_sampling)
        )
