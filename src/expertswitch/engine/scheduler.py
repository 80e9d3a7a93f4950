"""Continuous batching across experts (nano-vllm's scheduler, with vLLM's per-step expert cap).

A step is all-prefill or all-decode. Waiting requests go first: admitted in arrival order while
the step's token budget (tokens to compute: a prefix found in the prefix cache costs none), the
sequence cap, free KV blocks and the cap on distinct experts per step allow. A request whose
expert would exceed the cap waits at the head of the queue, first come first served (vLLM skips
it instead, which lets steady traffic to the running experts starve it). Otherwise every running
request decodes one token; when a request needs a new block and none is free, the most recently
admitted running request is preempted: its blocks are freed and it goes back to the head of the
queue, to be recomputed (prompt + tokens generated so far) — nothing crashes and no request
loses its tokens.
"""

from __future__ import annotations

from collections import deque

from expertswitch.engine.kv_cache import BlockManager
from expertswitch.engine.request import Request, Status


class Scheduler:
    def __init__(self, blocks: BlockManager, max_num_seqs: int, max_num_batched_tokens: int,
                 max_active_experts: int | None = None):  # fmt: skip
        self.blocks = blocks
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_active_experts = max_active_experts
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []

    def add(self, req: Request) -> None:
        self.waiting.append(req)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def _experts_ok(self, active: set, expert) -> bool:
        cap = self.max_active_experts
        return cap is None or expert is None or expert in active or \
            len({e for e in active if e is not None}) < cap  # fmt: skip

    def _admit(self) -> list[Request]:
        scheduled: list[Request] = []
        tokens = 0
        active = {r.expert for r in self.running}
        while self.waiting and len(self.running) + len(scheduled) < self.max_num_seqs:
            req = self.waiting[0]
            n = req.num_tokens
            hits = self.blocks.match(req)  # prefix-cached blocks: their tokens are not computed
            new = n - len(hits) * self.blocks.block_size
            if scheduled and tokens + new > self.max_num_batched_tokens:
                break
            if not self.blocks.can_allocate(n, hits):
                break
            if not self._experts_ok(active, req.expert):
                # first come, first served: later requests of the running experts must not
                # overtake it, or steady traffic to those experts would starve it
                break
            self.waiting.popleft()
            self.blocks.allocate(req, n, hits)
            req.status = Status.RUNNING
            scheduled.append(req)
            active.add(req.expert)
            tokens += new
        return scheduled

    def schedule(self) -> list[Request]:
        """The requests of this step: newly admitted ones (prefill), else all running ones
        (decode)."""
        scheduled = self._admit()
        if scheduled:
            self.running.extend(scheduled)
            return scheduled
        decoding: list[Request] = []
        for req in list(self.running):
            if req not in self.running:  # preempted below to make room
                continue
            while self.blocks.needs_block(req) and not self.blocks.num_free:
                victim = self.running[-1]
                self.preempt(victim)
                if victim is req:
                    break
            if req in self.running:
                if self.blocks.needs_block(req):
                    self.blocks.append_block(req)
                decoding.append(req)
        return decoding

    def preempt(self, req: Request) -> None:
        self.running.remove(req)
        self.blocks.release(req)
        req.status = Status.WAITING
        req.preemptions += 1
        self.waiting.appendleft(req)

    def finish(self, req: Request) -> None:
        """Free a finished (or aborted/failed) request's blocks and forget it."""
        if req in self.running:
            self.running.remove(req)
        elif req in self.waiting:
            self.waiting.remove(req)
        self.blocks.release(req)
