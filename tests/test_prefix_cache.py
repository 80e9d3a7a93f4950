"""The prefix cache's bookkeeping (engine/kv_cache.py): which blocks a prompt reuses, reference
counts, eviction order, experts kept apart; and a fuzz test that plays random admissions,
forward passes, growth and releases against a model of what each cache slot holds: every
position a request counts as computed must hold that request's own keys (its expert, its
tokens up to there), however blocks were shared, freed and handed out again."""

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from expertswitch.engine.kv_cache import BlockManager
from expertswitch.engine.request import Request
from expertswitch.engine.sampling import SamplingParams

BS = 4


def req(tokens, expert=None, rid="r", prompt_logprobs=None):
    return Request(rid, list(tokens), expert, SamplingParams(prompt_logprobs=prompt_logprobs))


def admit(bm: BlockManager, r: Request) -> list[int]:
    hits = bm.match(r)
    assert bm.can_allocate(r.num_tokens, hits)
    bm.allocate(r, r.num_tokens, hits)
    return hits


def compute(bm: BlockManager, r: Request) -> None:
    """What the runner does after a forward pass."""
    r.num_cached = r.num_tokens
    bm.register(r)


def test_a_second_request_takes_the_first_ones_full_blocks():
    bm = BlockManager(16, BS, prefix_caching=True)
    a = req(range(10), rid="a")
    assert admit(bm, a) == [] and a.num_cached == 0 and len(a.blocks) == 3
    compute(bm, a)
    assert len(bm.cached) == 2  # tokens 0-7; the third block holds 2 of 4
    b = req([*range(8), 50, 51, 52], rid="b")
    hits = admit(bm, b)
    assert hits == a.blocks[:2] and b.num_cached == 8
    assert b.blocks[2] not in a.blocks and bm.refs[hits[0]] == 2
    compute(bm, b)  # counted once its prefill ran
    assert b.num_cached_tokens == 8 and (bm.queries, bm.hits) == (21, 8)
    bm.release(a)
    assert bm.refs[hits[0]] == 1 and hits[0] not in bm.free  # b still reads it
    bm.release(b)
    assert bm.num_free == 16 and all(h in bm.free for h in hits)
    # freed, the blocks keep their hashes: a third request revives them from the free list
    c = req([*range(8), 9], rid="c")
    assert bm.match(c) == hits
    assert bm.can_allocate(9, hits)
    admit(bm, c)
    assert bm.num_free == 16 - 3 and c.num_cached == 8


def test_the_last_token_is_always_computed():
    """A prompt that is all full cached blocks still computes its last block: it needs that
    token's logits, and nobody writes into a shared block."""
    bm = BlockManager(8, BS, prefix_caching=True)
    a = req(range(8), rid="a")
    admit(bm, a)
    compute(bm, a)
    b = req(range(8), rid="b")
    assert admit(bm, b) == a.blocks[:1] and b.num_cached == 4
    c = req(range(5), rid="c")
    assert admit(bm, c) == a.blocks[:1] and c.num_cached == 4
    d = req(range(4), rid="d")
    assert admit(bm, d) == [] and d.num_cached == 0


def test_experts_prompt_logprobs_and_removal_keep_apart():
    bm = BlockManager(16, BS, prefix_caching=True)
    a = req(range(9), expert="math", rid="a")
    admit(bm, a)
    compute(bm, a)
    assert bm.match(req(range(9), expert="code")) == []  # another expert's keys differ
    assert bm.match(req(range(9))) == []  # and the base's
    assert bm.match(req(range(9), expert="math", prompt_logprobs=1)) == []  # needs every row
    assert len(bm.match(req(range(9), expert="math"))) == 2
    bm.release(a)
    bm.forget_expert("math")
    assert bm.match(req(range(9), expert="math")) == [] and not bm.cached and not bm.hash_of
    off = BlockManager(16, BS, prefix_caching=False)
    b = req(range(9), rid="b")
    admit(off, b)
    compute(off, b)
    assert off.match(req(range(9))) == [] and (off.queries, off.hits) == (0, 0)


def test_cache_salts_keep_requests_apart():
    """vLLM's cache_salt: a request reuses only blocks computed under its own salt (none:
    unsalted blocks only), of the same expert."""
    bm = BlockManager(16, BS, prefix_caching=True)
    a = req(range(9), rid="a")
    a.cache_salt = "tenant-1"
    admit(bm, a)
    compute(bm, a)

    def salted(salt, expert=None):
        r = req(range(9), expert=expert)
        r.cache_salt = salt
        return bm.match(r)

    assert salted("tenant-1") == a.blocks[:2]
    assert salted("tenant-2") == [] and salted(None) == [] and salted("tenant-1", "math") == []
    assert salted("\ud800") == []  # any str (a lone surrogate from JSON too) is a salt
    from expertswitch.engine.kv_cache import root_hash  # (expert, salt) pairs never collide

    assert root_hash("x\0salt\0t") != root_hash("x", "t") != root_hash("xt")


def test_eviction_reuses_unhashed_blocks_first_then_tails_before_heads():
    bm = BlockManager(4, BS, prefix_caching=True)
    a = req(range(10), rid="a")  # 3 blocks, the first 2 full (registered)
    admit(bm, a)
    compute(bm, a)
    head, mid, tail = a.blocks
    bm.release(a)
    # the unhashed third block goes first, then the never-used one, then the cached tail
    assert list(bm.free)[:2] == [tail, 3] and list(bm.free)[2:] == [mid, head]
    b = req(range(100, 110), rid="b")  # 3 fresh blocks: evicts `mid`, keeps `head`
    admit(bm, b)
    assert sorted(b.blocks) == sorted([tail, 3, mid])
    assert bm.hash_of.keys() == {head, *b.blocks[:2]}  # b's own full blocks, registered
    assert len(bm.match(req(range(12)))) == 1


def test_decode_growth_registers_each_block_as_it_fills():
    bm = BlockManager(8, BS, prefix_caching=True)
    a = req(range(3), rid="a")
    admit(bm, a)
    compute(bm, a)
    assert not bm.cached
    a.output_token_ids += [7]  # the sampled token; its keys come with the next step
    compute(bm, a)  # position 3 computed: block 0 is full now
    assert bm.hash_of.keys() == {a.blocks[0]}
    b = req([0, 1, 2, 7, 9], rid="b")
    assert bm.match(b) == a.blocks[:1]


@pytest.mark.parametrize("caching", [True, False])
def test_reset_forgets_everything_but_blocks_in_use(caching):
    bm = BlockManager(8, BS, prefix_caching=caching)
    a = req(range(9), rid="a")
    admit(bm, a)
    compute(bm, a)
    bm.reset_prefix_cache()
    assert bm.match(req(range(9))) == [] and bm.refs[a.blocks[0]] == 1
    bm.release(a)
    assert bm.num_free == 8


def test_requests_admitted_together_share_and_a_failed_step_unregisters():
    """Blocks are registered when handed out for tokens the step computes: a request admitted
    in the same step takes them too. Released before the step ran (its expert failed or was
    deferred: every sharer goes with it), they are unregistered, their keys never written."""
    bm = BlockManager(8, BS, prefix_caching=True)
    a = req(range(10), expert="e", rid="a")
    admit(bm, a)  # not computed yet
    b = req([*range(8), 42], expert="e", rid="b")
    assert admit(bm, b) == a.blocks[:2] and b.num_cached == 8
    bm.release(a)
    bm.release(b)
    assert not bm.cached and not bm.hash_of and bm.num_free == 8
    assert (bm.queries, bm.hits) == (0, 0) and b.num_cached_tokens is None  # never ran
    assert bm.match(req(range(10), expert="e")) == []


def test_blocks_whose_hashes_are_dropped_are_reused_first():
    bm = BlockManager(6, BS, prefix_caching=True)
    for rid, toks, expert in (("a", range(8), "x"), ("b", range(20, 28), "y")):
        r = req(toks, expert=expert, rid=rid)
        admit(bm, r)
        compute(bm, r)
        bm.release(r)  # 2 cached blocks each, at the back of the free list
    assert list(bm.free) == [4, 5, 1, 0, 3, 2]
    bm.forget_expert("x")  # its blocks now hold nothing anyone can reuse
    assert set(list(bm.free)[:2]) == {0, 1} and list(bm.free)[2:] == [4, 5, 3, 2]
    bm.reset_prefix_cache()
    assert set(list(bm.free)[:2]) == {2, 3}


def test_a_chunked_prompt_registers_its_blocks_as_chunks_are_computed():
    """Blocks of later chunks hold no keys yet: nobody may match them before their chunk ran."""
    bm = BlockManager(8, BS, prefix_caching=True)
    a = req(range(13), rid="a")
    bm.allocate(a, 13, [], computing=5)  # the first chunk: tokens 0-4
    assert len(bm.hash_of) == 1 and len(bm.match(req(range(13), rid="b"))) == 1
    a.num_cached = 5
    bm.register(a)
    assert len(bm.hash_of) == 1  # block 1 holds token 4 only
    a.num_cached = 13
    bm.register(a)
    assert len(bm.hash_of) == 3 and len(bm.match(req(range(13), rid="c"))) == 3


@st.composite
def programs(draw):
    ops = draw(st.lists(st.tuples(st.sampled_from("aasscddrx"), st.integers(0, 2**16)),
                        min_size=1, max_size=60))  # fmt: skip
    return draw(st.integers(2, 12)), ops


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(programs())
def test_fuzz_every_computed_position_holds_its_own_keys(program):
    """The engine's life: admissions (a) gather until a prefill step (s) computes them all;
    a step may fail for one expert before it runs (d: all its admitted requests released);
    decode steps (c) grow one request, preempting it when no block is free; releases (r) and
    cache resets (x) at any time."""
    num_blocks, ops = program
    bm = BlockManager(num_blocks, BS, prefix_caching=True)
    store: dict[int, tuple] = {}  # cache slot → (expert, tokens up to and with its position)
    live: list[Request] = []  # computed
    admitted: list[Request] = []  # allocated, their step not yet run
    n = 0

    def forward(r: Request, sampled: int) -> None:
        """A step: the request's uncomputed tokens are written, then it samples one more
        (whose keys the next step computes), as in the engine."""
        toks = r.all_token_ids
        for p in range(r.num_cached, r.num_tokens):
            store[bm.slot(r, p)] = (r.expert, tuple(toks[: p + 1]))
        compute(bm, r)
        r.output_token_ids.append(sampled)

    for op, x in ops:
        if op == "a":  # a request from few tokens and two experts: prefixes often repeat
            toks = [(x >> (2 * i)) % 3 for i in range(1 + x % 13)]
            r = req(toks, expert=("e", None)[x % 2], rid=f"r{n}")
            n += 1
            hits = bm.match(r)
            assert len(hits) <= (r.num_tokens - 1) // BS
            if bm.can_allocate(r.num_tokens, hits):
                bm.allocate(r, r.num_tokens, hits)
                admitted.append(r)
        elif op == "s":  # the prefill step: every layer writes all rows before reading any
            for r in admitted:
                forward(r, x % 3)
            live += admitted
            admitted = []
        elif op == "d" and admitted:  # the step fails for one expert before it runs
            expert = admitted[x % len(admitted)].expert
            for r in [r for r in admitted if r.expert == expert]:
                bm.release(r)
                admitted.remove(r)
        elif op == "c" and live and not admitted:  # a decode step of one request
            r = live[x % len(live)]
            if bm.needs_block(r):
                if not bm.num_free:  # preempted: its blocks go back
                    bm.release(r)
                    live.remove(r)
                    continue
                bm.append_block(r)
            forward(r, x % 3)
        elif op == "r" and live:
            r = live.pop(x % len(live))
            bm.release(r)
        elif op == "x":
            bm.reset_prefix_cache()
        # every computed request reads its own keys at every position it counts as computed
        for r in live:
            toks = r.all_token_ids
            for p in range(r.num_cached):
                assert store[bm.slot(r, p)] == (r.expert, tuple(toks[: p + 1]))
        # reference counts are the holders; the free list is exactly the unreferenced blocks
        holders = [0] * num_blocks
        for r in live + admitted:
            for b in r.blocks:
                holders[b] += 1
        assert holders == bm.refs
        assert set(bm.free) == {b for b in range(num_blocks) if not holders[b]}
        assert {b: h for h, b in bm.cached.items()} == {b: h for b, (h, _) in bm.hash_of.items()}
        # a cached block not in a pending step holds what its hash says: full, one expert
        pending = {b for r in admitted for b in r.blocks}
        for b, (_, expert) in bm.hash_of.items():
            if b not in pending:
                first, last = store[b * BS], store[b * BS + BS - 1]
                assert first[0] == last[0] == expert and first[1] == last[1][: len(first[1])]
    for r in live + admitted:
        bm.release(r)
    assert bm.num_free == num_blocks


def test_cached_blocks_on_the_free_list_count_against_it():
    """Reviving a free cached block takes it off the free list: admission must count it."""
    bm = BlockManager(3, BS, prefix_caching=True)
    a = req(range(9), rid="a")
    admit(bm, a)
    compute(bm, a)
    bm.release(a)  # 3 free, 2 of them cached
    other = req([50], rid="o")
    admit(bm, other)  # takes the unhashed block
    b = req(range(9), rid="b")
    hits = bm.match(b)
    assert len(hits) == 2 and bm.num_free == 2
    assert not bm.can_allocate(9, hits)  # 2 revived + 1 fresh > 2 free
    bm.release(other)
    assert bm.can_allocate(9, hits)
    bm.allocate(b, 9, hits)
    assert bm.num_free == 0 and b.num_cached == 8
