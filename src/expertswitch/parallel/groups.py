"""Process groups for expert parallelism, laid out as DeepSpeed lays them out.

For a world of W ranks and expert-parallel size ep (W % ep == 0):

    expert-parallel (EP) groups       consecutive ranks: [0..ep), [ep..2ep), …
                                      — the ranks that together hold one copy of every expert
    expert-data-parallel groups       ranks with the same EP rank: [0, ep, 2ep, …], [1, ep+1, …]
                                      — the replicas of one expert shard (gradients reduce here)

e.g. W = 16, ep = 2 → EP [0,1], [2,3], …, [14,15]; expert-DP [0,2,…,14], [1,3,…,15]
(DeepSpeed's `_create_expert_and_data_parallel`). Groups are made once per ep size, so the layers
of a Pyramid-MoE model with different expert counts (hence different ep sizes) share one world.
`torch.distributed.new_group` is collective: every rank must ask for the same ep sizes in the same
order, which building the same model on every rank does.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as dist

from expertswitch.errors import ConfigError


def expert_parallel_ranks(world_size: int, ep_size: int) -> list[list[int]]:
    """The EP groups: consecutive blocks of ep_size ranks."""
    _check_sizes(world_size, ep_size)
    return [list(range(g, g + ep_size)) for g in range(0, world_size, ep_size)]


def expert_data_parallel_ranks(world_size: int, ep_size: int) -> list[list[int]]:
    """The expert-DP groups: ranks that hold the same experts, one per EP group."""
    _check_sizes(world_size, ep_size)
    return [list(range(r, world_size, ep_size)) for r in range(ep_size)]


def _check_sizes(world_size: int, ep_size: int) -> None:
    if ep_size < 1 or world_size < 1 or world_size % ep_size:
        raise ConfigError(f"ep_size={ep_size} must divide the world size ({world_size}): "
                          "expert-parallel groups are blocks of ep_size ranks")  # fmt: skip


@dataclass(frozen=True)
class ExpertGroups:
    ep_size: int
    ep_rank: int  # this rank's place in its EP group: it holds experts [ep_rank·E/ep, …)
    ep_group: object  # torch ProcessGroup (None when ep_size = 1)
    expert_dp_group: object  # torch ProcessGroup of this rank's expert replicas
    ep_ranks: tuple[int, ...]
    expert_dp_ranks: tuple[int, ...]
    # the hierarchical all-to-all's groups (None unless asked for, or one node only): this
    # rank's node within the EP group, and the same-local-index ranks of the other nodes
    ranks_per_node: int = 0
    node_group: object = None
    cross_node_group: object = None


_GROUPS: dict[tuple[int, int], ExpertGroups] = {}


def node_ranks(ep_ranks: list[int], ranks_per_node: int) -> tuple[list[list[int]], list[list[int]]]:
    """(intra-node groups, cross-node groups) of one EP group: consecutive blocks of
    ranks_per_node, and the ranks with the same index inside their node."""
    if ranks_per_node < 1 or len(ep_ranks) % ranks_per_node:
        raise ConfigError(f"ranks_per_node={ranks_per_node} must divide ep_size={len(ep_ranks)} "
                          "for the hierarchical all-to-all (whole nodes per EP group)")  # fmt: skip
    nodes = [ep_ranks[i : i + ranks_per_node] for i in range(0, len(ep_ranks), ranks_per_node)]
    return nodes, [list(column) for column in zip(*nodes)]


def expert_groups(ep_size: int, ranks_per_node: int = 0) -> ExpertGroups:
    """This rank's groups for ep_size, made on first use (a collective call: every rank must
    reach it). ranks_per_node > 0 (and < ep_size) adds the hierarchical all-to-all's groups."""
    if ep_size == 1 and not (dist.is_available() and dist.is_initialized()):
        return ExpertGroups(1, 0, None, None, (0,), (0,))
    if not (dist.is_available() and dist.is_initialized()):
        raise ConfigError(f"ep_size={ep_size} needs torch.distributed: launch with torchrun "
                          "(or call torch.distributed.init_process_group) before building "
                          "the model")  # fmt: skip
    if ranks_per_node >= ep_size:
        ranks_per_node = 0  # the EP group fits one node: nothing to be hierarchical about
    key = (ep_size, ranks_per_node)
    if key not in _GROUPS:
        world, rank = dist.get_world_size(), dist.get_rank()
        mine_ep = mine_dp = None
        for ranks in expert_parallel_ranks(world, ep_size):
            g = dist.new_group(ranks)
            if rank in ranks:
                mine_ep = (g, tuple(ranks))
        for ranks in expert_data_parallel_ranks(world, ep_size):
            g = dist.new_group(ranks)
            if rank in ranks:
                mine_dp = (g, tuple(ranks))
        node = cross = None
        if ranks_per_node:
            for ep_ranks in expert_parallel_ranks(world, ep_size):
                intra, inter = node_ranks(ep_ranks, ranks_per_node)
                for ranks in intra + inter:
                    g = dist.new_group(ranks)
                    if rank in ranks:
                        node, cross = (g, cross) if ranks in intra else (node, g)
        _GROUPS[key] = ExpertGroups(ep_size, mine_ep[1].index(rank), mine_ep[0], mine_dp[0],
                                    mine_ep[1], mine_dp[1], ranks_per_node, node,
                                    cross)  # fmt: skip
    return _GROUPS[key]
