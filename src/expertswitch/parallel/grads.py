"""Gradient reduction for data + expert parallel training.

Every parameter's gradient is summed over the ranks that hold a copy of it and divided by the
world size, so each step follows the gradient of the mean of all ranks' losses (as one process
with the whole batch would): expert parameters over their expert-data-parallel group (the
replicas of one expert shard: the all-to-all already summed the contributions of their EP
group's tokens), every other parameter over the whole world. One flat all-reduce per group.

DeepSpeed divides expert gradients by the expert-data-parallel size instead of the world size,
which scales them by ep_size relative to the dense ones; here both are means over the world.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors


def expert_parameter_groups(model: nn.Module) -> dict[int, object]:
    """id(parameter) → the expert-data-parallel group of every expert-parallel parameter."""
    from expertswitch.moe.layer import MoE

    out = {}
    for module in model.modules():
        if isinstance(module, MoE) and module.groups is not None:
            for p in module.experts.parameters():
                out[id(p)] = module.groups.expert_dp_group
    return out


def allreduce_gradients(model: nn.Module) -> None:
    """Average the gradients of a data + expert parallel model across the world (see above).
    A parameter without a gradient on this rank (an expert that got no tokens) counts as 0."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return
    world = dist.get_world_size()
    expert = expert_parameter_groups(model)
    buckets: dict[object, list[nn.Parameter]] = {}
    for p in model.parameters():
        if p.requires_grad:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            buckets.setdefault(expert.get(id(p)), []).append(p)
    # the same order on every rank: the world first, then each expert-DP group as met
    for group, params in buckets.items():
        grads = [p.grad for p in params]
        flat = _flatten_dense_tensors(grads)
        dist.all_reduce(flat, group=group)
        flat.div_(world)
        for g, reduced in zip(grads, _unflatten_dense_tensors(flat, grads)):
            g.copy_(reduced)
