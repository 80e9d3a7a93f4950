"""Continuous batching across experts (nano-vllm's scheduler, with vLLM's per-step expert cap
and, by default, vLLM's chunked prefill).

Each step has a budget of max_num_batched_tokens tokens to compute. Running requests go first:
one token each for those decoding, then for each prompt still being prefilled its next chunk
(as much as the budget has left). Then waiting requests are admitted in arrival
order while the budget, the sequence cap, free KV blocks and the cap on distinct experts per
step allow, each with as much of its prompt as the budget has left (a prefix found in the prefix
cache costs nothing), and at most `long_prefill` tokens of it when that is set (vLLM's
long_prefill_token_threshold: long prompts then share the steps with each other and with the
short prompts behind them). So a long prompt no longer stalls the running requests' decoding, and a
step can hold decode rows beside prefill chunks. A request whose expert would exceed the cap
waits at the head of the queue, first come first served (vLLM skips it instead, which lets
steady traffic to the running experts starve it). When a decoding request needs a new block and
none is free, the most recently admitted running request is preempted: its blocks are freed and
it goes back to the head of the queue, to be recomputed (prompt + tokens generated so far) —
nothing crashes and no request loses its tokens; nothing is admitted in that step.

Under the priority policy (vLLM's scheduling_policy="priority") the queue is kept in order of
(priority, arrival), lower first; the victim of a preemption is the running request that comes
last in that order, and running requests decode in that order (so none is preempted after it
was scheduled), as in vLLM. Beyond vLLM's v1 scheduler (which preempts only when a running
request cannot grow; its v0 scheduler did this too), the head of the queue that finds no
room — blocks, a sequence slot, its expert under the cap — preempts the fewest running
requests that come after it that let it in, so an urgent request does not wait for
less urgent ones to finish.

With chunked prefill off (`enable_chunked_prefill=False`), a step is all-prefill or all-decode
as before: waiting requests first, each with its whole prompt (one longer than the budget runs
alone), else one token for every running request.
"""

from __future__ import annotations

from collections import Counter, deque

from expertswitch.engine.kv_cache import BlockManager
from expertswitch.engine.request import Request, Status


class Scheduler:
    def __init__(self, blocks: BlockManager, max_num_seqs: int, max_num_batched_tokens: int,
                 max_active_experts: int | None = None, chunked_prefill: bool = True,
                 long_prefill: int | None = None, policy: str = "fcfs"):  # fmt: skip
        self.blocks = blocks
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_active_experts = max_active_experts
        self.chunked_prefill = chunked_prefill
        self.long_prefill = long_prefill or 1 << 62  # a prompt's chunk in one step, at most
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.preemptions = 0
        self.priority = policy == "priority"

    @staticmethod
    def _key(req: Request) -> tuple[int, int]:
        return req.priority, req.arrival

    def add(self, req: Request) -> None:
        if self.priority:
            self._enqueue(req)
        else:
            self.waiting.append(req)

    def _enqueue(self, req: Request) -> None:
        """Into the queue at its place in (priority, arrival) order."""
        k = self._key(req)
        at = next((i for i, w in enumerate(self.waiting) if self._key(w) > k), len(self.waiting))
        self.waiting.insert(at, req)

    def _victim(self) -> Request:
        """The running request a preemption takes: the most recently admitted one, or under
        the priority policy the one that comes last (of equals, the last admitted: running
        requests decode in that order, so it is never one already scheduled this step)."""
        if self.priority:
            return max(reversed(self.running), key=self._key)
        return self.running[-1]

    def _make_room(self, growing: bool = True) -> None:
        """Priority policy: when the head of the queue finds no sequence slot, too few free
        blocks (counting one for each running request that starts a block this step, when
        `growing`) or its expert over the cap, it preempts the fewest running requests that
        come after it (last first) that let it in — none when no number of them would."""
        if not (self.priority and self.waiting and self.running):
            return
        head, bm = self.waiting[0], self.blocks
        later = sorted((r for r in self.running if self._key(r) > self._key(head)),
                       key=self._key, reverse=True)  # fmt: skip
        hits = bm.match(head)
        experts = Counter(r.expert for r in self.running)
        growth = sum(map(bm.needs_block, self.running)) if growing else 0
        dropped: Counter = Counter()  # block → references the victims so far hold
        freed = 0
        for k in range(len(later) + 1):
            if k:  # one more victim: what releasing it would free
                v = later[k - 1]
                experts[v.expert] -= 1
                growth -= growing and bm.needs_block(v)
                for b in v.blocks:
                    dropped[b] += 1
                    freed += bm.refs[b] == dropped[b]
            revived = sum(1 for b in hits if bm.refs[b] == dropped[b])
            blocks_ok = bm.blocks_for(head.num_tokens) - len(hits) + revived + growth \
                <= bm.num_free + freed  # fmt: skip
            active = {e for e, n in experts.items() if n > 0}
            if blocks_ok and len(self.running) - k < self.max_num_seqs \
                    and self._experts_ok(active, head.expert):  # fmt: skip
                for v in later[:k]:
                    self.preempt(v)
                return

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def _experts_ok(self, active: set, expert) -> bool:
        cap = self.max_active_experts
        return cap is None or expert is None or expert in active or \
            len({e for e in active if e is not None}) < cap  # fmt: skip

    def _admit(self, budget: int, scheduled: list[Request], chunked: bool) -> None:
        """Admit waiting requests into `scheduled` while `budget` tokens are left; chunked: a
        prompt may take what is left of the budget and go on in later steps."""
        active = {r.expert for r in self.running}
        while self.waiting and len(self.running) < self.max_num_seqs and budget > 0:
            req = self.waiting[0]
            n = req.num_tokens
            hits = self.blocks.match(req)  # prefix-cached blocks: their tokens are not computed
            new = n - len(hits) * self.blocks.block_size
            if not chunked and scheduled and new > budget:
                break
            if not self.blocks.can_allocate(n, hits):
                break
            if not self._experts_ok(active, req.expert):
                # first come, first served: later requests of the running experts must not
                # overtake it, or steady traffic to those experts would starve it
                break
            self.waiting.popleft()
            req.num_new = min(new, budget, self.long_prefill) if chunked else new
            # blocks for the whole prompt at once; registered as their chunks are computed
            self.blocks.allocate(req, n, hits, computing=req.num_new)
            req.status = Status.RUNNING
            self.running.append(req)
            scheduled.append(req)
            active.add(req.expert)
            budget -= req.num_new

    def _grow(self, req: Request) -> bool:
        """Room for a decoding request's next token: a new block when it starts one, taken
        from the most recently admitted running request when none is free. False if `req`
        itself was preempted."""
        while self.blocks.needs_block(req) and not self.blocks.num_free:
            victim = self._victim()
            self.preempt(victim)
            if victim is req:
                return False
        if self.blocks.needs_block(req):
            self.blocks.append_block(req)
        return True

    def schedule(self) -> list[Request]:
        """The requests of this step, each with `num_new` tokens to compute (the uncomputed
        tokens it has, or the chunk of them this step's budget holds)."""
        if not self.chunked_prefill:
            return self._schedule_whole()
        scheduled: list[Request] = []
        budget = self.max_num_batched_tokens
        self._make_room()
        preemptions = self.preemptions
        # decoding requests first, then prompts part-way through their prefill: a long
        # prompt's chunks never hold back the tokens of requests already answering
        running = sorted(self.running, key=self._key) if self.priority else self.running
        decoding = [r for r in running if r.num_tokens - r.num_cached == 1]
        filling = [r for r in running if r.num_tokens - r.num_cached > 1]
        for req in decoding + filling:
            if budget <= 0:
                break
            if req in self.running and self._grow(req):  # (not preempted to make room)
                req.num_new = min(req.num_tokens - req.num_cached, budget, self.long_prefill)
                budget -= req.num_new
                scheduled.append(req)
        if self.preemptions == preemptions:  # a request just preempted must not come back
            self._admit(budget, scheduled, chunked=True)  # in the step that preempted it
        return scheduled

    def _schedule_whole(self) -> list[Request]:
        """All-prefill or all-decode steps, whole prompts (chunked prefill off)."""
        scheduled: list[Request] = []
        self._make_room(growing=False)  # (a step that admits is all-prefill)
        self._admit(self.max_num_batched_tokens, scheduled, chunked=False)
        if scheduled:
            return scheduled
        for req in sorted(self.running, key=self._key) if self.priority else list(self.running):
            if req in self.running and self._grow(req):
                req.num_new = req.num_tokens - req.num_cached
                scheduled.append(req)
        return scheduled

    def preempt(self, req: Request) -> None:
        self.running.remove(req)
        self.blocks.release(req)
        req.status = Status.WAITING
        req.preemptions += 1
        self.preemptions += 1
        if self.priority:
            self._enqueue(req)
        else:
            self.waiting.appendleft(req)

    def finish(self, req: Request) -> None:
        """Free a finished (or aborted/failed) request's blocks and forget it."""
        if req in self.running:
            self.running.remove(req)
        elif req in self.waiting:
            self.waiting.remove(req)
        self.blocks.release(req)
