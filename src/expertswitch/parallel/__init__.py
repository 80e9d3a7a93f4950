"""Expert parallelism on torch.distributed (DeepSpeed-MoE's layout): process groups, all-to-all
dispatch, gradient reduction, checkpoints reloadable at another ep_size. `MoE(..., ep_size=N)`
uses it."""

from expertswitch.parallel.checkpoint import load_sharded, read_manifest, save_sharded
from expertswitch.parallel.grads import allreduce_gradients
from expertswitch.parallel.groups import (
    ExpertGroups,
    expert_data_parallel_ranks,
    expert_groups,
    expert_parallel_ranks,
)
from expertswitch.parallel.tensor import (
    ColumnParallelLinear,
    RowParallelLinear,
    tensor_parallel_group,
    tensor_parallel_ranks,
)

__all__ = [
    "ColumnParallelLinear",
    "ExpertGroups",
    "RowParallelLinear",
    "allreduce_gradients",
    "expert_data_parallel_ranks",
    "expert_groups",
    "expert_parallel_ranks",
    "load_sharded",
    "read_manifest",
    "save_sharded",
    "tensor_parallel_group",
    "tensor_parallel_ranks",
]
