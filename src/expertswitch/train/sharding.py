"""Expert-parallel training helpers: each rank of an expert-parallel group holds E / ep_size
experts of every MoE layer (parallel/groups.py: EP groups are blocks of ep_size consecutive
ranks, so ranks 0 … ep_size − 1 hold one whole copy of the experts between them).

    shard_from_full(ep_model, full)      every rank starts from the same full model
    state = full_state(ep_model)         the whole model's state dict, gathered (collective)
    norm = clip_grad_norm(ep_model, 1.0) the global gradient norm: experts summed over EP ranks
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from expertswitch.moe.layer import MoE
from expertswitch.parallel.comm import collective


def _moe_modules(model) -> dict[str, MoE]:
    return {name: m for name, m in model.named_modules() if isinstance(m, MoE)}


def _expert_param_names(model) -> dict[str, tuple[str, MoE]]:
    """state-dict key → (the expert tensor's attribute, its MoE layer) of every stacked expert
    tensor ([E_local, ...], dim 0 = experts)."""
    out = {}
    for name, moe in _moe_modules(model).items():
        for attr, _ in moe.experts.named_parameters():
            out[f"{name}.experts.{attr}"] = (attr, moe)
    return out


@torch.no_grad()
def shard_from_full(ep_model, full) -> None:
    """Copy `full` (ep_size 1, identical on every rank) into this rank's shard."""
    src = full.state_dict()
    experts = _expert_param_names(ep_model)
    for key, dst in ep_model.state_dict().items():
        t = src[key]
        if key in experts:
            moe = experts[key][1]
            first = moe.first_local_expert
            t = t[first : first + moe.num_local_experts]
        dst.copy_(t)


@torch.no_grad()
def full_state(ep_model) -> dict[str, torch.Tensor]:
    """The whole model's state dict (experts gathered over the EP group), on every rank."""
    experts = _expert_param_names(ep_model)
    out = {}
    for key, t in ep_model.state_dict().items():
        if key in experts:
            g = experts[key][1].groups
            parts = [torch.empty_like(t) for _ in g.ep_ranks]
            collective("expert all-gather", g.ep_ranks, dist.all_gather, parts, t.contiguous(),
                       group=g.ep_group)  # fmt: skip
            t = torch.cat(parts)
        out[key] = t.detach().cpu()
    return out


@torch.no_grad()
def clip_grad_norm(model, max_norm: float) -> torch.Tensor:
    """torch's clip_grad_norm_ over the whole model when its experts are spread over an EP
    group: Σ g² of the replicated parameters (equal on every rank after the all-reduce) plus
    the EP group's sum of Σ g² of the expert shards."""
    experts = {id(p) for m in _moe_modules(model).values() if m.groups is not None
               for p in m.experts.parameters()}  # fmt: skip
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if not experts:
        return torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    dev = grads[0].device
    dense = torch.zeros((), device=dev, dtype=torch.float32)
    sharded = torch.zeros((), device=dev, dtype=torch.float32)
    for p in model.parameters():
        if p.grad is None:
            continue
        sq = p.grad.float().pow(2).sum()
        if id(p) in experts:
            sharded += sq
        else:
            dense += sq
    g = next(m.groups for m in _moe_modules(model).values() if m.groups is not None)
    collective("gradient-norm all-reduce", g.ep_ranks, dist.all_reduce, sharded,
               group=g.ep_group)  # fmt: skip
    total = (dense + sharded).sqrt()
    coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    for grad in grads:
        grad.mul_(coef.to(grad.dtype))
    return total
