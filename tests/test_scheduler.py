"""The scheduler (engine/scheduler.py) with the block manager, without a model: random arrivals
of prompts that share prefixes, small budgets and few blocks, chunked prefill on and off, the
prefix cache on. Each simulated step computes what the scheduler chose, then checks what the
engine relies on: every position a request has computed holds its own keys (its expert and
tokens; shared, chunked, preempted and recomputed alike); a step stays inside its token budget
(chunked) or is all-prefill or all-decode (not chunked); with chunked prefill, a request that
was decoding is never left out of a step unless it was preempted; every request finishes and
every block comes back. Under the priority policy besides: a request is admitted only when
every request that comes before it in (priority, arrival) order is admitted too, and a
preempted request comes after every request still running."""

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from expertswitch.engine.kv_cache import BlockManager
from expertswitch.engine.request import Request, Status
from expertswitch.engine.sampling import SamplingParams
from expertswitch.engine.scheduler import Scheduler

BS = 4


@st.composite
def workloads(draw):
    n = draw(st.integers(1, 12))
    arrivals = [
        (
            draw(st.integers(0, 6)),  # step it arrives at
            draw(st.lists(st.integers(0, 2), min_size=1, max_size=30)),  # prompt tokens
            draw(st.sampled_from([None, "a", "b"])),
            draw(st.integers(1, 6)),  # max_tokens
            draw(st.integers(-1, 2)),  # priority (used under the priority policy)
        )
        for _ in range(n)
    ]
    return (arrivals, draw(st.integers(2, 16)), draw(st.integers(1, 4)),
            draw(st.integers(0, 4)), draw(st.booleans()),
            draw(st.sampled_from([None, 1, 2, 5])), draw(st.booleans()))  # fmt: skip


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(workloads())
def test_scheduled_steps_keep_every_promise(workload):
    arrivals, extra_blocks, seqs, extra_budget, chunked, cap, by_priority = workload
    longest = max(len(p) + m for _, p, _, m, _ in arrivals)
    blocks = BlockManager(-(-longest // BS) + extra_blocks, BS, prefix_caching=True)
    budget = seqs + extra_budget
    sched = Scheduler(blocks, seqs, budget, chunked_prefill=chunked, long_prefill=cap,
                      policy="priority" if by_priority else "fcfs")  # fmt: skip

    def key(r):
        return r.priority, r.arrival

    store: dict[int, tuple] = {}  # cache slot → (expert, tokens up to and with its position)
    reqs = []
    step = 0
    while step < 400:
        for at, prompt, expert, m, prio in arrivals:
            if at == step:
                r = Request(f"r{len(reqs)}", list(prompt), expert, SamplingParams(max_tokens=m),
                            priority=prio if by_priority else 0, arrival=len(reqs))  # fmt: skip
                reqs.append(r)
                sched.add(r)
        if not sched.has_work() and step > 6:
            break
        decoding = [r for r in sched.running if r.num_tokens - r.num_cached == 1]
        preemptions = sched.preemptions
        before = list(sched.running)
        batch = sched.schedule()
        assert len(set(map(id, batch))) == len(batch) and len(batch) <= seqs
        if by_priority:
            admitted = [r for r in sched.running if not any(r is b for b in before)]
            assert not admitted or not sched.waiting or \
                max(map(key, admitted)) < min(map(key, sched.waiting))  # fmt: skip
            out = [r for r in before if r.status is Status.WAITING]
            assert not out or not sched.running or \
                min(map(key, out)) > max(map(key, sched.running))  # fmt: skip
        assert all(r.status is Status.RUNNING and r.num_new >= 1 for r in batch)
        assert all(r.num_cached + r.num_new <= r.num_tokens for r in batch)
        assert all(r.num_cached + r.num_new <= len(r.blocks) * BS for r in batch)
        total = sum(r.num_new for r in batch)
        if chunked:
            assert total <= budget
            assert cap is None or all(r.num_new <= cap for r in batch)
            if sched.preemptions == preemptions:  # answering requests are never held back
                assert all(r in batch for r in decoding)
        else:
            prefill = [r for r in batch if r.num_tokens - r.num_cached > 1]
            assert not prefill or all(r.num_new == r.num_tokens - r.num_cached for r in batch)
            assert total <= budget or len(batch) == 1
        for r in batch:  # the forward pass: every layer writes the step's keys first
            toks = r.all_token_ids
            for p in range(r.num_cached, r.num_cached + r.num_new):
                store[blocks.slot(r, p)] = (r.expert, tuple(toks[: p + 1]))
        for r in batch:  # ... then reads every key before its queries
            toks = r.all_token_ids
            for p in range(r.num_cached + r.num_new):
                assert store[blocks.slot(r, p)] == (r.expert, tuple(toks[: p + 1])), r
        for r in batch:
            r.num_cached += r.num_new
            r.num_new = 0
            blocks.register(r)
            if r.num_cached == r.num_tokens:  # ready: it samples a token
                r.output_token_ids.append(len(r.output_token_ids) % 3)
                if len(r.output_token_ids) >= r.sampling.max_tokens:
                    sched.finish(r)
                    r.status = Status.FINISHED
        step += 1
    assert all(r.status is Status.FINISHED for r in reqs), "a request never finished"
    assert len(reqs) == len(arrivals) and blocks.num_free == blocks.num_blocks
    assert blocks.refs == [0] * blocks.num_blocks


def _req(rid, tokens, priority, arrival, expert=None):
    return Request(rid, list(tokens), expert, SamplingParams(max_tokens=50), priority=priority,
                   arrival=arrival)  # fmt: skip


def _step(sched: Scheduler) -> list[str]:
    """One scheduled step, computed: the ids it ran."""
    batch = sched.schedule()
    for r in batch:
        r.num_cached += r.num_new
        r.num_new = 0
        sched.blocks.register(r)
        if r.num_cached == r.num_tokens:
            r.output_token_ids.append(1)
    return [r.request_id for r in batch]


def test_an_urgent_request_preempts_only_what_lets_it_in():
    """Priority policy: the head of the queue preempts the fewest later requests that make
    room for it — none when even all of them would not: blocks they share with a running
    earlier request are not freed by preempting them, and its expert may stay over the cap."""
    # E (first) and L1, L2 (later) share a two-block prefix; H needs three fresh blocks, and
    # preempting both L's frees two: nobody is preempted, and H waits
    sched = Scheduler(BlockManager(5, BS, prefix_caching=True), 8, 64, policy="priority")
    shared = [5] * 8
    sched.add(_req("E", shared + [1], -1, 0))
    _step(sched)
    sched.add(_req("L1", shared + [2], 1, 1))
    sched.add(_req("L2", shared + [3], 1, 2))
    _step(sched)
    sched.add(_req("H", [9] * 9, 0, 3))
    assert _step(sched) == ["E", "L1", "L2"] and sched.preemptions == 0
    # one expert at a time: H (expert b) cannot run beside E (expert a) however many later
    # requests of a leave, so L keeps running
    sched = Scheduler(BlockManager(4, BS), 8, 64, max_active_experts=1, policy="priority")
    sched.add(_req("E", [0] * 4, -1, 0, "a"))
    sched.add(_req("L", [0] * 4, 1, 1, "a"))
    _step(sched)
    sched.add(_req("H", [0] * 5, 0, 2, "b"))
    assert _step(sched) == ["E", "L"] and sched.preemptions == 0
    # enough room once the last of two later requests leaves: that one alone is preempted,
    # and H runs in the same step
    sched = Scheduler(BlockManager(4, BS), 8, 64, policy="priority")
    sched.add(_req("L1", [0] * 3, 1, 0))
    sched.add(_req("L2", [0] * 3, 2, 1))
    _step(sched)
    sched.add(_req("H", [0] * 9, 0, 2))
    assert sorted(_step(sched)) == ["H", "L1"] and [r.request_id for r in sched.waiting] == ["L2"]
