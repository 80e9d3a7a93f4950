"""Collectives that fail clearly: a peer that died, hung past the process group's timeout or
called a different collective becomes a ParallelError naming the operation, the rank and the
group — in the forward pass, the backward pass (the all-to-all below) and every other
collective this package makes — instead of a transport trace from gloo or NCCL."""

from __future__ import annotations

import torch
import torch.distributed as dist

from expertswitch.errors import ParallelError


def collective(what: str, ranks, fn, *args, **kw):
    """fn(*args, **kw), a torch.distributed collective among `ranks` (for the message)."""
    try:
        return fn(*args, **kw)
    except (RuntimeError, dist.DistError) as e:
        if isinstance(e, ParallelError):
            raise
        first = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
        rank = dist.get_rank() if dist.is_initialized() else 0
        raise ParallelError(
            f"{what} failed on rank {rank} (ranks {list(ranks) if ranks else 'all'}): a rank "
            "stopped, timed out or called a different collective — check the other ranks' "
            f"logs; init_process_group(timeout=...) bounds how long a rank waits. ({first})"
        ) from e


def all_to_all(x: torch.Tensor, out_splits: list[int], in_splits: list[int], group, ranks,
               what: str) -> torch.Tensor:  # fmt: skip
    """Rows of x sent in_splits[i] to rank i of group; out_splits[i] rows received from it."""
    out = x.new_empty((sum(out_splits), *x.shape[1:]))
    collective(what, ranks, dist.all_to_all_single, out, x.contiguous(), out_splits, in_splits,
               group=group)  # fmt: skip
    return out


class AllToAll(torch.autograd.Function):
    """all_to_all with autograd: the backward is the reverse exchange (failing clearly too)."""

    @staticmethod
    def forward(ctx, x, out_splits, in_splits, group, ranks, what):
        ctx.meta = (out_splits, in_splits, group, ranks, what)
        return all_to_all(x, out_splits, in_splits, group, ranks, what)

    @staticmethod
    def backward(ctx, grad):
        out_splits, in_splits, group, ranks, what = ctx.meta
        back = all_to_all(grad, in_splits, out_splits, group, ranks, what + " (backward)")
        return back, None, None, None, None, None
