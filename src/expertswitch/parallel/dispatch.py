"""Expert-parallel dispatch: routes travel to the rank that holds their expert and back, by
`torch.distributed` all-to-all with variable split sizes (dropless: nothing is padded to a
capacity), with autograd through both exchanges.

On every rank of an EP group of size ep, with E experts (rank r holds experts
[r·E/ep, (r+1)·E/ep)):

    1. kept routes sorted by global expert id (so by destination rank), each a row of x
    2. routes per destination exchanged first (all_to_all_single of ep integers)
    3. rows and their expert ids exchanged (all_to_all_single, variable splits)
    4. the local experts run on the received rows (ids made local: minus r·E/ep)
    5. results exchanged back, scaled by their gate weights and summed per token in fp32

Ranks that receive no rows still take part in every exchange, so a rank whose tokens all go
elsewhere (or that has no tokens) never stalls the others.

Padded (capacity given): DeepSpeed's wire format, a [E, capacity, H] buffer per rank with equal
splits — no count exchange, static shapes, more bytes.

Hierarchical (groups made with ranks_per_node, DeepSpeed-MoE's inference all-to-all): the
exchange runs in two stages — inside each node, to the rank with the destination's index in
its node; then across nodes among the ranks with that index — so each rank sends one message
per other node rather than one per other rank (latency-bound at scale), for one extra NVLink
hop of the bytes.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist

from expertswitch.errors import ConfigError
from expertswitch.parallel.comm import AllToAll, all_to_all, collective
from expertswitch.parallel.groups import ExpertGroups

# bytes this rank has handed to all-to-all (forward exchanges) since the last reset: all of
# them, and those bound for other ranks (what crosses a link); benchmarks/parallel.py reads it
TRAFFIC = {"calls": 0, "bytes": 0, "remote_bytes": 0, "messages": 0}


def reset_traffic() -> None:
    TRAFFIC.update(calls=0, bytes=0, remote_bytes=0, messages=0)


def _count(t: torch.Tensor, splits: list[int], me: int) -> None:
    """Bytes handed to one exchange, those bound for other ranks, and the non-empty messages
    to other ranks (rows and ids travel together: one message)."""
    row = t[0].numel() * t.element_size() if t.shape[0] else 0
    TRAFFIC["bytes"] += sum(splits) * row
    TRAFFIC["remote_bytes"] += (sum(splits) - splits[me]) * row
    if t.is_floating_point():
        TRAFFIC["messages"] += sum(1 for i, n in enumerate(splits) if i != me and n)


def _collective(groups: ExpertGroups, what: str, fn, *args, **kw):
    return collective(f"expert-parallel {what}", groups.ep_ranks, fn, *args, **kw)


def _exchange(t: torch.Tensor, out_splits: list[int], in_splits: list[int], groups, grad: bool,
              group=None, me: int | None = None):  # fmt: skip
    """all_to_all_single of t's rows over group (default: the EP group); me: this rank's index
    in that group (for the traffic count)."""
    group = groups.ep_group if group is None else group
    _count(t, in_splits, groups.ep_rank if me is None else me)
    if grad and not t.requires_grad:  # autograd: the backward is the reverse exchange. Every
        # rank must reach it, so the exchange is recorded even where nothing upstream needs a
        # gradient (a rank with no rows for its experts): one rank's collective alone hangs
        t = t.detach().requires_grad_()
    exchange = AllToAll.apply if grad else all_to_all
    return exchange(t, out_splits, in_splits, group, groups.ep_ranks, "expert-parallel all-to-all")


def _run_local(run_local, rows: torch.Tensor, ids: torch.Tensor, grad: bool) -> torch.Tensor:
    """The local experts on the received rows, their output always tied to those rows: an
    expert path with no rows returns a fresh zero tensor, which would leave this rank out of
    the backward exchanges the other ranks then wait in."""
    done = run_local(rows, ids)
    if grad and rows.requires_grad and (rows.shape[0] == 0 or not done.requires_grad):
        done = done + rows.sum() * 0
    return done


def _splits(keys: torch.Tensor, n: int, groups, group) -> tuple[list[int], list[int]]:
    """(send, receive) split sizes over group for rows whose destinations are keys (0..n−1):
    the counts are exchanged first, as every variable all-to-all needs."""
    send = torch.bincount(keys, minlength=n)
    recv = torch.empty_like(send)
    _collective(groups, "route count exchange", dist.all_to_all_single, recv, send, group=group)
    TRAFFIC["bytes"] += n * send.element_size()
    TRAFFIC["remote_bytes"] += (n - 1) * send.element_size()
    return send.tolist(), recv.tolist()


def _inverse(order: torch.Tensor) -> torch.Tensor:
    inv = torch.empty_like(order)
    inv[order] = torch.arange(order.numel(), device=order.device)
    return inv


def _padded(rows, gid, e_local, groups, run_local, grad, capacity: int):
    """DeepSpeed's exchange: a [E, capacity, H] buffer (route r of expert e at slot r's rank
    among e's routes, in token order), equal splits both ways."""
    n, ep = gid.numel(), groups.ep_size
    first = torch.searchsorted(gid, gid)  # gid is sorted: the first route of each expert
    slot = torch.arange(n, device=gid.device) - first
    if n and int(slot.max()) >= capacity:
        raise ConfigError(f"an expert got {int(slot.max()) + 1} routes for a capacity of "
                          f"{capacity}: the padded all-to-all needs the gate's capacity (or "
                          "the dropless maximum)")  # fmt: skip
    where = gid * capacity + slot
    buffer = rows.new_zeros(e_local * ep * capacity, rows.shape[-1]).index_copy(0, where, rows)
    splits = [e_local * capacity] * ep
    received = _exchange(buffer, splits, splits, groups, grad)
    local = torch.arange(received.shape[0], device=gid.device) // capacity % e_local
    done = _run_local(run_local, received, local, grad)
    return _exchange(done, splits, splits, groups, grad).index_select(0, where)


def _hierarchical(rows, gid, e_local, groups, run_local, grad):
    """The two-stage exchange: inside the node to the rank whose node index matches the
    destination's, then across nodes among same-index ranks — one message per node pair
    instead of one per rank pair. Results return along the same path, reversed."""
    ppn = groups.ranks_per_node
    nodes = groups.ep_size // ppn
    me_local, me_node = groups.ep_rank % ppn, groups.ep_rank // ppn
    dest = torch.div(gid, e_local, rounding_mode="floor")
    o1 = torch.argsort(dest % ppn, stable=True)  # stage 1: by destination's index in a node
    s1, r1 = _splits((dest % ppn)[o1], ppn, groups, groups.node_group)
    rows1 = _exchange(rows.index_select(0, o1), r1, s1, groups, grad, groups.node_group, me_local)
    gid1 = _exchange(gid[o1], r1, s1, groups, False, groups.node_group, me_local)
    node_of = torch.div(torch.div(gid1, e_local, rounding_mode="floor"), ppn, rounding_mode="floor")
    o2 = torch.argsort(node_of, stable=True)  # stage 2: by destination node
    s2, r2 = _splits(node_of[o2], nodes, groups, groups.cross_node_group)
    cross = groups.cross_node_group
    rows2 = _exchange(rows1.index_select(0, o2), r2, s2, groups, grad, cross, me_node)
    gid2 = _exchange(gid1[o2], r2, s2, groups, False, cross, me_node)
    done = _run_local(run_local, rows2, gid2 - groups.ep_rank * e_local, grad)
    back2 = _exchange(done, s2, r2, groups, grad, cross, me_node).index_select(0, _inverse(o2))
    back1 = _exchange(back2, s1, r1, groups, grad, groups.node_group, me_local)
    return back1.index_select(0, _inverse(o1))


def expert_parallel_moe(
    x: torch.Tensor,
    expert_idx: torch.Tensor,
    weights: torch.Tensor,
    num_experts: int,
    groups: ExpertGroups,
    run_local: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    capacity: int | None = None,
) -> torch.Tensor:
    """x [T, H], expert_idx int64 [T, k] (global ids, −1 = dropped), weights [T, k] →
    Σ_r weights[t, r] · expert_{idx[t, r]}(x[t]) [T, H], the experts spread over the EP group.
    run_local(rows [R, H], local expert ids int64 [R]) → [R, H] runs this rank's experts.
    capacity: DeepSpeed's wire format instead — every rank sends each expert a [capacity, H]
    block (zero rows where it has fewer routes), equal splits, no count exchange; the same
    result, more bytes (the gate must not keep more than capacity routes per expert)."""
    ep, group = groups.ep_size, groups.ep_group
    e_local = num_experts // ep
    t, k = expert_idx.shape
    flat = expert_idx.reshape(-1)
    kept = flat >= 0
    order = torch.argsort(torch.where(kept, flat, num_experts), stable=True)
    order = order[: int(kept.sum())]
    gid = flat[order]
    tokens = torch.div(order, k, rounding_mode="floor")
    TRAFFIC["calls"] += 1
    grad = torch.is_grad_enabled()
    if capacity is not None:
        back = _padded(x.index_select(0, tokens), gid, e_local, groups, run_local, grad,
                       capacity)  # fmt: skip
    elif groups.ranks_per_node:
        back = _hierarchical(x.index_select(0, tokens), gid, e_local, groups, run_local, grad)
    else:
        dest = torch.div(gid, e_local, rounding_mode="floor")
        send_splits, recv_splits = _splits(dest, ep, groups, group)
        rows = _exchange(x.index_select(0, tokens), recv_splits, send_splits, groups, grad)
        ids = _exchange(gid, recv_splits, send_splits, groups, False) - groups.ep_rank * e_local
        done = _run_local(run_local, rows, ids, grad)
        back = _exchange(done, send_splits, recv_splits, groups, grad)
    scaled = back.float() * weights.reshape(-1)[order].float().unsqueeze(-1)
    out = torch.zeros(t, x.shape[-1], dtype=torch.float32, device=x.device)
    return out.index_add(0, tokens, scaled).to(x.dtype)
