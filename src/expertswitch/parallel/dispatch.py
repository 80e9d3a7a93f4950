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
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn

from expertswitch.errors import ParallelError
from expertswitch.parallel.groups import ExpertGroups


def _collective(groups: ExpertGroups, what: str, fn, *args, **kw):
    """Run one collective; a peer that died, hung past the process group's timeout or called
    another collective becomes a ParallelError that says so, not a transport trace."""
    try:
        return fn(*args, **kw)
    except (RuntimeError, dist.DistError) as e:
        first = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
        raise ParallelError(
            f"expert-parallel {what} failed on rank {dist.get_rank()} (EP group ranks "
            f"{list(groups.ep_ranks)}): a rank of the group stopped, timed out or called a "
            f"different collective — check the other ranks' logs; init_process_group("
            f"timeout=...) bounds how long a rank waits. ({first})"
        ) from e


def _exchange(t: torch.Tensor, out_splits: list[int], in_splits: list[int], groups, grad: bool):
    out = t.new_empty((sum(out_splits), *t.shape[1:]))
    if grad:  # autograd: the backward is the reverse exchange. Every rank must reach it, so
        # the exchange is recorded even where nothing upstream needs a gradient (a rank with
        # no rows for its experts): a collective in one rank's backward only would hang
        if not t.requires_grad:
            t = t.detach().requires_grad_()
        return _collective(groups, "all-to-all", dist_fn.all_to_all_single, out, t.contiguous(),
                           out_splits, in_splits, group=groups.ep_group)  # fmt: skip
    _collective(groups, "all-to-all", dist.all_to_all_single, out, t.contiguous(), out_splits,
                in_splits, group=groups.ep_group)  # fmt: skip
    return out


def expert_parallel_moe(
    x: torch.Tensor,
    expert_idx: torch.Tensor,
    weights: torch.Tensor,
    num_experts: int,
    groups: ExpertGroups,
    run_local: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
) -> torch.Tensor:
    """x [T, H], expert_idx int64 [T, k] (global ids, −1 = dropped), weights [T, k] →
    Σ_r weights[t, r] · expert_{idx[t, r]}(x[t]) [T, H], the experts spread over the EP group.
    run_local(rows [R, H], local expert ids int64 [R]) → [R, H] runs this rank's experts."""
    ep, group = groups.ep_size, groups.ep_group
    e_local = num_experts // ep
    t, k = expert_idx.shape
    flat = expert_idx.reshape(-1)
    kept = flat >= 0
    order = torch.argsort(torch.where(kept, flat, num_experts), stable=True)
    order = order[: int(kept.sum())]
    gid = flat[order]
    tokens = torch.div(order, k, rounding_mode="floor")
    send = torch.bincount(torch.div(gid, e_local, rounding_mode="floor"), minlength=ep)
    recv = torch.empty_like(send)
    _collective(groups, "route count exchange", dist.all_to_all_single, recv, send, group=group)
    send_splits, recv_splits = send.tolist(), recv.tolist()
    grad = torch.is_grad_enabled()
    rows = _exchange(x.index_select(0, tokens), recv_splits, send_splits, groups, grad)
    ids = _exchange(gid, recv_splits, send_splits, groups, False) - groups.ep_rank * e_local
    done = run_local(rows, ids)
    back = _exchange(done, send_splits, recv_splits, groups, grad)
    scaled = back.float() * weights.reshape(-1)[order].float().unsqueeze(-1)
    out = torch.zeros(t, x.shape[-1], dtype=torch.float32, device=x.device)
    return out.index_add(0, tokens, scaled).to(x.dtype)
