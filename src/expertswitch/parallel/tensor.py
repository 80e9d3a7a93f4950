"""Tensor slicing of the dense layers (Megatron-style), to combine with expert parallelism.

    col = ColumnParallelLinear.from_linear(fc1, group)   # this rank: rows r·N/tp .. of W
    row = RowParallelLinear.from_linear(fc2, group)      # this rank: columns r·K/tp .. of W
    y = row(act(col(x)))                                 # one all-reduce per pair

The column-parallel layer keeps its slice of the output (no communication); the row-parallel
layer takes that slice as input and sums the partial products over the group (all-reduce),
so an MLP or an attention projection pair costs one all-reduce. Every rank of the group
holds the same tokens. Gradients follow Megatron (the input's gradient summed over the group
in the backward of the column layer, none added in the row layer's), and
`from_linear` slices an existing nn.Linear, so a model built on one process can be split
after loading its checkpoint.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from expertswitch.errors import ConfigError
from expertswitch.parallel.comm import collective


def _group_shape(group) -> tuple[int, int]:
    if not (dist.is_available() and dist.is_initialized()):
        raise ConfigError("tensor slicing needs torch.distributed: launch with torchrun first")
    return dist.get_world_size(group), dist.get_rank(group)


def tensor_parallel_ranks(world_size: int, tp_size: int) -> list[list[int]]:
    """Tensor-parallel groups: consecutive blocks of tp_size ranks (Megatron's layout, the
    ranks of one node when tp_size ≤ its GPUs)."""
    if tp_size < 1 or world_size % tp_size:
        raise ConfigError(f"tp_size={tp_size} must divide the world size ({world_size})")
    return [list(range(g, g + tp_size)) for g in range(0, world_size, tp_size)]


_REPLICAS: dict[int, object] = {}  # id(tensor-parallel group) → its slices' replica group


def tensor_parallel_group(tp_size: int):
    """This rank's tensor-parallel group (collective: every rank calls it). Also made: the
    group of ranks holding the same slices (the same place in their tensor-parallel group),
    over which allreduce_gradients reduces the sliced parameters."""
    if not (dist.is_available() and dist.is_initialized()):
        raise ConfigError("tensor slicing needs torch.distributed: launch with torchrun first")
    world, rank = dist.get_world_size(), dist.get_rank()
    mine = replicas = None
    blocks = tensor_parallel_ranks(world, tp_size)
    for ranks in blocks:
        g = dist.new_group(ranks)
        if rank in ranks:
            mine = g
    for ranks in (list(column) for column in zip(*blocks)):
        g = dist.new_group(ranks)
        if rank in ranks:
            replicas = g
    _REPLICAS[id(mine)] = replicas
    return mine


class _CopyToGroup(torch.autograd.Function):
    """Megatron's f: identity forward; backward sums the input gradient over the group (each
    rank's slice of the next layer contributed part of it)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        collective("tensor-parallel all-reduce (backward)", None, dist.all_reduce, grad,
                   group=ctx.group)  # fmt: skip
        return grad, None


class _ReduceFromGroup(torch.autograd.Function):
    """Megatron's g: all-reduce forward; identity backward (the output is replicated)."""

    @staticmethod
    def forward(ctx, x, group):
        x = x.contiguous().clone()
        collective("tensor-parallel all-reduce", None, dist.all_reduce, x, group=group)
        return x

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _GatherFromGroup(torch.autograd.Function):
    """All-gather along the last dimension forward; this rank's slice of the gradient back."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group, ctx.width = group, x.shape[-1]
        ctx.rank = dist.get_rank(group)
        return _gather_last(x, group)

    @staticmethod
    def backward(ctx, grad):
        lo = ctx.rank * ctx.width
        return grad[..., lo : lo + ctx.width].contiguous(), None


class _ScatterToGroup(torch.autograd.Function):
    """This rank's slice of the last dimension forward; the slices' gradients all-gathered
    back (the whole input's gradient)."""

    @staticmethod
    def forward(ctx, x, group, width):
        ctx.group = group
        rank = dist.get_rank(group)
        return x[..., rank * width : (rank + 1) * width].contiguous()

    @staticmethod
    def backward(ctx, grad):
        return _gather_last(grad, ctx.group), None, None


def _gather_last(x: torch.Tensor, group) -> torch.Tensor:
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
    collective("tensor-parallel all-gather", None, dist.all_gather, parts, x.contiguous(),
               group=group)  # fmt: skip
    return torch.cat(parts, dim=-1)


def _split(n: int, tp: int, what: str) -> int:
    if n % tp:
        raise ConfigError(f"{what}={n} does not split into {tp} equal slices: choose a "
                          "tensor-parallel size that divides it")  # fmt: skip
    return n // tp


class ColumnParallelLinear(nn.Module):
    """y = x Wᵀ + b with W's output rows split over the group; the output stays split
    ([..., N/tp]) unless gather_output (all-gather along the last dimension)."""

    def __init__(self, in_features: int, out_features: int, group, bias: bool = True,
                 gather_output: bool = False, dtype=None, device=None):  # fmt: skip
        super().__init__()
        self.group = group
        self.tp, self.rank = _group_shape(group)
        self.dp_group = _REPLICAS.get(id(group))  # ranks holding the same slice
        self.out_per_rank = _split(out_features, self.tp, "out_features")
        self.gather_output = gather_output
        self.linear = nn.Linear(in_features, self.out_per_rank, bias=bias, dtype=dtype,
                                device=device)  # fmt: skip

    @classmethod
    def from_linear(cls, full: nn.Linear, group, gather_output: bool = False):
        layer = cls(full.in_features, full.out_features, group, full.bias is not None,
                    gather_output, full.weight.dtype, full.weight.device)  # fmt: skip
        rows = slice(layer.rank * layer.out_per_rank, (layer.rank + 1) * layer.out_per_rank)
        with torch.no_grad():
            layer.linear.weight.copy_(full.weight[rows])
            if full.bias is not None:
                layer.linear.bias.copy_(full.bias[rows])
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.linear(_CopyToGroup.apply(x, self.group))
        return _GatherFromGroup.apply(y, self.group) if self.gather_output else y


class RowParallelLinear(nn.Module):
    """y = x Wᵀ + b with W's input columns split over the group: x is this rank's slice
    ([..., K/tp], input_is_parallel) or the whole input (sliced here); partial products are
    summed over the group (all-reduce), the bias added once."""

    def __init__(self, in_features: int, out_features: int, group, bias: bool = True,
                 input_is_parallel: bool = True, dtype=None, device=None):  # fmt: skip
        super().__init__()
        self.group = group
        self.tp, self.rank = _group_shape(group)
        self.dp_group = _REPLICAS.get(id(group))
        self.in_per_rank = _split(in_features, self.tp, "in_features")
        self.input_is_parallel = input_is_parallel
        self.linear = nn.Linear(self.in_per_rank, out_features, bias=False, dtype=dtype,
                                device=device)  # fmt: skip
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device)) if bias \
            else None  # fmt: skip

    @classmethod
    def from_linear(cls, full: nn.Linear, group, input_is_parallel: bool = True):
        layer = cls(full.in_features, full.out_features, group, full.bias is not None,
                    input_is_parallel, full.weight.dtype, full.weight.device)  # fmt: skip
        cols = slice(layer.rank * layer.in_per_rank, (layer.rank + 1) * layer.in_per_rank)
        with torch.no_grad():
            layer.linear.weight.copy_(full.weight[:, cols])
            if full.bias is not None:
                layer.bias.copy_(full.bias)
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.input_is_parallel:
            x = _ScatterToGroup.apply(x, self.group, self.in_per_rank)
        if x.shape[-1] != self.in_per_rank:
            raise ConfigError(f"RowParallelLinear expects this rank's {self.in_per_rank} input "
                              f"features, got {x.shape[-1]} (input_is_parallel="
                              f"{self.input_is_parallel})")  # fmt: skip
        y = _ReduceFromGroup.apply(self.linear(x), self.group)
        return y if self.bias is None else y + self.bias
