"""Serving over ranks: rank 0 takes the requests, every rank runs every step.

Under expert parallelism each rank holds a share of every MoE layer's experts, and under tensor
slicing a share of every layer's heads and rows, so all ranks run every forward pass on the same
batch. `generate` hands every rank the same prompts and they step in lockstep. A server receives
requests on rank 0 alone, so rank 0's engine is the leader: it records each operation that
changes engine state (a request queued or aborted, an expert registered, removed, pinned or
unpinned, the prefix cache reset) and broadcasts the pending operations before each step. The
other ranks (`StepMirror.follow`) replay them, then step too. Their schedulers, KV blocks and
expert pools stay identical by construction: the engines agreed on their sizes when they
started, and expert loads happen on the step, never in a background thread (`Engine._submit`
does not prefetch under expert parallelism).

One check runs on every step (`agree`, one all-reduce), before the forward pass: the batch the
scheduler chose, together with the previous step's outputs (tokens, finished, reasons). A step's
tokens are rank 0's draw from logits every rank computed together, so they are right when
served; what a divergence would break is the next forward pass, and the check comes before it
(`generate` checks its last step on its own). If the ranks differ, every rank stops with a
ParallelError that names the step, instead of serving answers from diverged states or hanging
in a collective that the other ranks never call. While idle, the leader sends
a heartbeat every HEARTBEAT_S seconds, so a waiting rank never reaches the process group's
timeout; a rank that died shows on the next broadcast as a ParallelError.
"""

from __future__ import annotations

import time
import zlib

import torch

from expertswitch.errors import ParallelError

HEARTBEAT_S = 5.0


def _dist():
    import torch.distributed as dist

    return dist


def _device() -> torch.device:
    """Where small collective tensors live: the current GPU under NCCL, else the CPU."""
    if _dist().get_backend() == "nccl":  # this rank's GPU, from any thread (the current
        import os  # device is per thread, and the serving loop runs in its own)

        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def agree(what: str, step: int, payload) -> None:
    """ParallelError on every rank unless every rank passed an equal `payload` (compared by a
    CRC of its repr: one all-reduce of two integers)."""
    from expertswitch.parallel.comm import collective

    h = zlib.crc32(repr(payload).encode())
    t = torch.tensor([h, -h], dtype=torch.int64, device=_device())
    collective(f"the ranks' agreement on step {step}", None, _dist().all_reduce, t,
               op=_dist().ReduceOp.MAX)  # fmt: skip
    if int(t[0]) != -int(t[1]):  # the largest and the smallest hash differ
        raise ParallelError(
            f"the serving ranks disagree on {what} at step {step}: their engine states "
            "diverged, so every rank stops rather than serve wrong tokens — report this with "
            "the ranks' logs"
        )


def step_digest(outs) -> list:
    """What every rank must have produced in a step (an error's text may name this rank's
    device: whether there was one counts)."""
    return [(o.request_id, o.new_token_ids, o.finished, o.finish_reason, o.error is not None)
            for o in outs]  # fmt: skip


def rank0_value(value):
    """Rank 0's value on every rank (`generate`'s ranks add requests in the same order)."""
    from expertswitch.parallel.comm import collective

    box = [value]
    collective("sampling seed broadcast", None, _dist().broadcast_object_list, box, 0)
    return box[0]


def min_over_ranks(*values: int | None) -> tuple:
    """The smallest of each value over all ranks (None stays None)."""
    from expertswitch.parallel.comm import collective

    got: list = [None] * _dist().get_world_size()
    collective("engine size agreement", None, _dist().all_gather_object, got, values)
    return tuple(None if v is None else min(g[i] for g in got) for i, v in enumerate(values))


class StepMirror:
    """Rank 0 records and broadcasts engine operations; the other ranks replay them."""

    def __init__(self):
        dist = _dist()
        if not (dist.is_available() and dist.is_initialized()):
            raise ParallelError("serving over ranks needs a process group: launch with "
                                "torchrun")  # fmt: skip
        self.rank = dist.get_rank()
        self.pending: list[tuple] = []
        self.last_sent = time.monotonic()
        self.closed = False  # stopped, or broken by a failed collective: nothing more is sent

    @property
    def leader(self) -> bool:
        return self.rank == 0

    def record(self, *op) -> None:
        """An operation rank 0's engine just applied (no-op on the other ranks)."""
        if self.leader and not self.closed:
            self.pending.append(op)

    def before_step(self) -> None:
        """Leader: send what changed and 'step'."""
        if self.leader:
            self._send(step=True)

    def idle(self) -> None:
        """Leader, with nothing to run: send pending operations, or a heartbeat when due."""
        if self.leader and (self.pending or time.monotonic() - self.last_sent >= HEARTBEAT_S):
            self._send(step=False)

    def close(self) -> None:
        """Leader: tell the other ranks to stop (their `follow` returns)."""
        if self.leader and not self.closed:
            self._send(step=False, stop=True)
            self.closed = True

    def _send(self, step: bool, stop: bool = False) -> None:
        box = [(self.pending, step, stop, False)]
        self.pending = []
        self._put(box)

    def _put(self, box: list) -> None:
        if self.closed:
            raise ParallelError("serving over ranks has stopped: the ranks no longer step "
                                "together (see the earlier error)")  # fmt: skip
        self._broadcast(box)
        self.last_sent = time.monotonic()

    def confirm(self, op: tuple) -> list[str | None]:
        """Leader: send `op`, just applied here, on its own (after what is pending) and return
        every rank's outcome: None where it applied, else why not. The other ranks undo it
        themselves when any rank failed; the caller undoes it here."""
        if self.pending:
            self._send(step=False)
        self._put([([op], False, False, True)])
        return self._outcomes(None)

    def _outcomes(self, mine: str | None) -> list[str | None]:
        from expertswitch.parallel.comm import collective

        got: list = [None] * _dist().get_world_size()
        try:
            collective("the ranks' outcomes of an operation", None, _dist().all_gather_object,
                       got, mine)  # fmt: skip
        except ParallelError:
            self.closed = True
            raise
        return got

    def _broadcast(self, box: list) -> None:
        from expertswitch.parallel.comm import collective

        try:
            collective("the leader's step broadcast", None, _dist().broadcast_object_list, box,
                       0, device=_device())  # fmt: skip
        except ParallelError:
            self.closed = True
            raise

    def follow(self, engine) -> None:
        """Every rank but 0: replay the leader's operations and step with it, until it stops.
        An expert registered over the admin API is confirmed on its own: if any rank cannot
        register it (an archive it cannot read), every rank undoes it and rank 0 answers with
        the error. Any other operation that fails here stops this rank with the error: the
        leader sees it on its next collective."""
        import signal
        import threading

        if self.leader:
            raise ParallelError("rank 0 leads: it serves, the other ranks follow")
        if threading.current_thread() is threading.main_thread():
            # Ctrl-C in a terminal reaches every rank: this one waits for the leader's stop
            # (which it could no longer receive if it died first); SIGTERM still ends it
            signal.signal(signal.SIGINT, signal.SIG_IGN)
        while True:
            box = [None]
            self._broadcast(box)
            ops, step, stop, check = box[0]
            if check:  # one operation whose outcome every rank reports
                why = None
                try:
                    engine._replay(ops[0])
                except Exception as e:  # noqa: BLE001 - reported to rank 0, which answers it
                    why = f"{type(e).__name__}: {e}"
                got = self._outcomes(why)
                if why is None and any(got):  # applied here, not everywhere: take it back
                    engine._undo(ops[0])
                continue
            for op in ops:
                engine._replay(op)
            if stop:
                self.closed = True
                return
            if step:
                engine.step()
