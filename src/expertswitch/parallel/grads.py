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

from expertswitch.parallel.comm import collective


def expert_parameter_groups(model: nn.Module) -> dict[int, object]:
    """id(parameter) → the expert-data-parallel group of every expert-parallel parameter."""
    from expertswitch.moe.layer import MoE

    out = {}
    for module in model.modules():
        if isinstance(module, MoE) and module.groups is not None:
            for p in module.experts.parameters():
                out[id(p)] = module.groups.expert_dp_group
    return out


def sliced_parameter_groups(model: nn.Module) -> dict[int, tuple[object, int]]:
    """id(parameter) → (its data-parallel replicas' group, the tensor-parallel size) of every
    tensor-sliced parameter (parallel/tensor.py)."""
    from expertswitch.errors import ConfigError
    from expertswitch.parallel.tensor import ColumnParallelLinear, RowParallelLinear

    out = {}
    for m in model.modules():
        if isinstance(m, (ColumnParallelLinear, RowParallelLinear)):
            if m.dp_group is None and m.tp < dist.get_world_size():
                raise ConfigError("a tensor-sliced layer's group was not made by "
                                  "tensor_parallel_group(), so its replicas are unknown: make "
                                  "the group with it")  # fmt: skip
            for p in m.linear.parameters():  # the row layer's bias is whole: not here
                out[id(p)] = (m.dp_group, m.tp)
    return out


def allreduce_gradients(model: nn.Module) -> None:
    """Average the gradients of a data + expert (+ tensor) parallel model (see above). The ranks
    of a tensor-parallel group share one batch, so a tensor-sliced parameter's gradient is the
    sum over its replicas divided by world / tp. A parameter without a gradient on this rank
    (an expert that got no tokens) counts as 0."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return
    world = dist.get_world_size()
    expert = expert_parameter_groups(model)
    sliced = sliced_parameter_groups(model)
    buckets: dict[tuple, list[nn.Parameter]] = {}
    for p in model.parameters():
        if p.requires_grad:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            if id(p) in sliced:
                group, tp = sliced[id(p)]
                key = (group, world // tp)
            else:
                key = (expert.get(id(p)), world)
            buckets.setdefault(key, []).append(p)
    # the same order on every rank (the model's parameter order): world, then groups as met
    for (group, divisor), params in buckets.items():
        grads = [p.grad for p in params]
        flat = _flatten_dense_tensors(grads)
        if group is not None or divisor == world:  # a group of one needs no exchange
            collective("gradient all-reduce", None, dist.all_reduce, flat, group=group)
        flat.div_(divisor)
        for g, reduced in zip(grads, _unflatten_dense_tensors(flat, grads)):
            g.copy_(reduced)
