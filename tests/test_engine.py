"""The serving engine against transformers: greedy tokens with an expert (served from its packed
archive) equal transformers' greedy tokens on the checkpoint `reconstruct` rebuilds from the
same archive; base-only rows equal transformers on the base. Tiny real HF checkpoints, fp32."""

import importlib.util
import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
from conftest import finetune_like, tiny_config

from expertswitch.compress import CompressOptions, compress_expert, make_method, reconstruct
from expertswitch.compress.calibration import CalibOptions
from expertswitch.engine import Engine, SamplingParams
from expertswitch.errors import CompatibilityError, ConfigError
from expertswitch.io.archive import open_archive

OPTS = CompressOptions(
    calib=CalibOptions(tokenizer="bytes", tokens=256, seq_len=64), progress=False
)
GREEDY = SamplingParams(temperature=0.0, max_tokens=24)


def hf_greedy(model_dir: Path, prompt: list[int], n: int) -> list[int]:
    """transformers' own greedy generate (stops at EOS as ours does)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    x = torch.tensor([prompt])
    with torch.no_grad():
        out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n,
                             do_sample=False, pad_token_id=0)  # fmt: skip
    return out[0, len(prompt) :].tolist()


def perturb_small_tensors(model, seed: int, scale: float = 0.05) -> None:
    """Fine-tunes change norms and biases too: the engine applies those per row (exact)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p += scale * torch.randn(p.shape, generator=g) * (p.abs().mean() + 0.01)


def make_family(root: Path, config, n_experts: int = 2, method=None, opts=OPTS,
                embeddings: bool = False):  # fmt: skip
    """base/ + n experts, each compressed and reconstructed; returns (base, [(archive, rec)]).
    embeddings: the experts change the token embedding too (stored exactly)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).float()
    base = root / "base"
    model.save_pretrained(base)
    out = []
    for i in range(n_experts):
        expert = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
        finetune_like(expert, seed=10 + i, scale=0.2)
        perturb_small_tensors(expert, seed=20 + i)
        if embeddings:
            with torch.no_grad():
                emb = expert.get_input_embeddings().weight
                emb += 0.2 * emb.std() * torch.randn(emb.shape, generator=torch.Generator()
                                                     .manual_seed(30 + i))  # fmt: skip
        expert.save_pretrained(root / f"expert{i}")
        archive = compress_expert(base, root / f"expert{i}", root / f"arch{i}",
                                  method or make_method("mixed", bits=2), opts)  # fmt: skip
        out.append((archive, reconstruct(base, archive, root / f"rec{i}", progress=False)))
    return base, out


def prompts(n: int, lengths=(3, 11, 29), vocab: int = 256, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (lengths[i % len(lengths)],), generator=g).tolist()
            for i in range(n)]  # fmt: skip


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return make_family(tmp_path_factory.mktemp("eng-llama"), tiny_config("llama"))


@pytest.fixture(scope="module")
def llama_engine(llama):
    base, experts = llama
    return Engine(base, {f"e{i}": a for i, (a, _) in enumerate(experts)})


@pytest.fixture(scope="module")
def solo(llama):
    """transformers' greedy tokens for every (prompt, expert or base)."""
    base, experts = llama
    dirs = {None: base, **{f"e{i}": rec for i, (_, rec) in enumerate(experts)}}
    ps = prompts(3)
    return ps, {(i, e): hf_greedy(d, p, GREEDY.max_tokens) for e, d in dirs.items()
                for i, p in enumerate(ps)}  # fmt: skip


def test_expert_batch_from_host_lists_equals_build():
    """The runner's segments from one copy of the rows sorted by slot equal the per-slot
    nonzero of ExpertBatch.build, including slots without rows and all-base batches."""
    from expertswitch.models.context import ExpertBatch

    g = torch.Generator().manual_seed(0)
    for n_slots, t in [(0, 5), (1, 1), (3, 17), (4, 40), (2, 0)]:
        slots = torch.randint(-1, n_slots, (t,), generator=g).tolist() if n_slots else [-1] * t
        experts = [object()] * n_slots
        a = ExpertBatch.from_host(experts, slots, "cpu")
        b = ExpertBatch.build(experts, torch.tensor(slots, dtype=torch.long))
        assert torch.equal(a.row_slot, b.row_slot) and a.row_slot.dtype == torch.long
        assert len(a.segments) == n_slots
        assert all(torch.equal(x, y) for x, y in zip(a.segments, b.segments))


def test_llama_experts_and_base_equal_transformers(llama_engine, solo):
    ps, ref = solo
    for expert in (None, "e0", "e1"):
        outs = llama_engine.generate(ps, expert=expert, sampling=GREEDY)
        for i, out in enumerate(outs):
            assert out.token_ids == ref[(i, expert)], (i, expert)
            assert out.expert == expert
            assert out.finish_reason in ("stop", "length")


def test_mixed_batch_gives_every_request_its_solo_tokens(llama_engine, solo):
    ps, ref = solo
    combos = [(i, e) for i in range(len(ps)) for e in (None, "e0", "e1")]
    combos = combos[::2] + combos[1::2]  # interleave experts and base rows
    outs = llama_engine.generate([ps[i] for i, _ in combos], expert=[e for _, e in combos],
                                 sampling=GREEDY)  # fmt: skip
    for (i, e), out in zip(combos, outs):
        assert out.token_ids == ref[(i, e)], (i, e)


def test_fused_projections_serve_transformers_tokens(llama_engine, solo, monkeypatch):
    """q/k/v and gate/up as one product each (models/layers.FusedLinears: one matmul, one
    concatenated delta stack) in prefill and decode steps of a mixed batch: every request
    gets transformers' greedy tokens, and the logprobs of the same batch run linear by
    linear (FUSE_LINEARS off)."""
    from expertswitch.models import layers

    ps, ref = solo
    combos = [(i, e) for i in range(len(ps)) for e in (None, "e0", "e1")]
    calls = {"fused": 0, "apart": 0}
    real = layers.FusedLinears.__call__

    def counted(self, x, eb):
        out = real(self, x, eb)
        calls["apart" if out is None else "fused"] += 1
        return out

    monkeypatch.setattr(layers.FusedLinears, "__call__", counted)
    sp = SamplingParams(temperature=0.0, max_tokens=GREEDY.max_tokens, logprobs=0)
    args = [ps[i] for i, _ in combos], [e for _, e in combos], sp
    fused = llama_engine.generate(*args)
    assert calls["fused"] >= 2 * 2 * GREEDY.max_tokens and not calls["apart"], calls
    for (i, e), out in zip(combos, fused):
        assert out.token_ids == ref[(i, e)], (i, e)
    monkeypatch.setattr(layers, "FUSE_LINEARS", False)
    same_tokens_and_logprobs(llama_engine.generate(*args), fused)


def test_requests_joining_mid_generation(llama_engine, solo):
    ps, ref = solo
    eng = llama_engine
    first = [eng.add_request(ps[0], "e0", GREEDY), eng.add_request(ps[1], None, GREEDY)]
    done = {}
    for _ in range(5):
        for out in eng.step():
            done[out.request_id] = out
    later = [eng.add_request(ps[2], "e1", GREEDY), eng.add_request(ps[0], "e1", GREEDY)]
    while eng.has_unfinished():
        for out in eng.step():
            done[out.request_id] = out
    expected = [ref[(0, "e0")], ref[(1, None)], ref[(2, "e1")], ref[(0, "e1")]]
    assert [done[r].token_ids for r in first + later] == expected


def test_chunked_prefill_interleaves_decoding_and_keeps_every_answer(llama, solo):
    """A budget of 8 tokens a step: a 29-token prompt is prefilled in chunks while a request
    already answering gets a token every step; every answer (tokens, logprobs, prompt
    logprobs) equals the whole-prompt engine's and transformers'; with chunked prefill off
    the long prompt runs alone, stalling the other."""
    base, experts = llama
    ps, ref = solo
    names = {"e0": experts[0][0], "e1": experts[1][0]}
    eng = Engine(base, names, max_num_batched_tokens=8, max_num_seqs=8)
    short = eng.add_request(ps[0], "e0", GREEDY)  # 3 tokens
    got = {short: []}
    for out in eng.step():  # its prefill and first token
        got[out.request_id] = out.token_ids
    long = eng.add_request(ps[2], "e1", GREEDY)  # 29 tokens: 7 a step beside the decode
    stalled = 0
    while long not in got or len(got[long]) < 1:
        outs = {o.request_id: o.token_ids for o in eng.step()}
        assert len(outs.get(short, [])) == len(got[short]) + 1  # never held back
        got.update(outs)
        stalled += 1
    assert stalled == 5  # ceil(29 / 7)
    while eng.has_unfinished():
        got.update({o.request_id: o.token_ids for o in eng.step()})
    assert got[short] == ref[(0, "e0")] and got[long] == ref[(2, "e1")]
    # a mixed crowd under a small budget, with logprobs and prompt logprobs
    sp = SamplingParams(temperature=0.0, max_tokens=24, logprobs=1, prompt_logprobs=1)
    combos = [(2, "e0"), (1, None), (2, "e1"), (0, "e1")]
    args = ([ps[i] for i, _ in combos], [e for _, e in combos], sp)
    chunked = eng.generate(*args)
    whole = Engine(base, names, enable_chunked_prefill=False).generate(*args)
    for (i, e), a, b in zip(combos, chunked, whole):
        assert a.token_ids == b.token_ids == ref[(i, e)], (i, e)
        assert len(a.prompt_logprobs) == len(ps[i]) and a.prompt_logprobs[0] is None
        for x, y in zip(a.prompt_logprobs[1:] + a.logprobs, b.prompt_logprobs[1:] + b.logprobs):
            assert x.token_id == y.token_id and abs(x.logprob - y.logprob) < 1e-4
    # off: whole prompts, a step all-prefill or all-decode
    off = Engine(base, names, max_num_batched_tokens=8, max_num_seqs=8,
                 enable_chunked_prefill=False)  # fmt: skip
    a = off.add_request(ps[0], "e0", GREEDY)
    off.step()
    b = off.add_request(ps[2], "e1", GREEDY)
    assert [o.request_id for o in off.step()] == [b]  # the long prompt's step: a waits
    assert sorted(o.request_id for o in off.step()) == sorted([a, b])
    with pytest.raises(ConfigError, match="max_num_batched_tokens"):
        Engine(base, names, max_num_batched_tokens=4, max_num_seqs=8)
    # a prompt's chunk capped at 3 tokens a step (vLLM's long_prefill_token_threshold): two
    # long prompts share the steps (neither waits for the other) and keep their answers
    capped = Engine(base, names, max_num_batched_tokens=64, long_prefill_token_threshold=3)
    ids = {capped.add_request(ps[2], e, GREEDY): e for e in ("e1", "e0")}
    assert capped.step() == [] and [r.num_cached for r in capped.scheduler.running] == [3, 3]
    got = {}
    while capped.has_unfinished():
        for o in capped.step():
            got[o.request_id] = o.token_ids
    assert all(got[i] == ref[(2, e)] for i, e in ids.items())
    assert Engine(base, names, long_prefill_token_threshold=0).scheduler.long_prefill > 2**60


@pytest.mark.parametrize("chunked", [True, False])
def test_an_interrupted_step_leaves_no_uncomputed_block_cached(llama, solo, chunked):
    """A forward pass that raises (Ctrl-C, out of memory) after the step's blocks were
    registered: the same prompt afterwards must not reuse keys that were never written
    (the cache is filled with noise to show it); generate aborts its own requests."""
    base, _ = llama
    ps, ref = solo
    eng = Engine(base, block_size=4, enable_chunked_prefill=chunked)
    real = eng.model.forward

    def interrupted(*args, **kw):
        for k, v in eng.kv_cache:  # (nothing is cached yet: no computed key is spoilt)
            k.normal_()
            v.normal_()
        raise KeyboardInterrupt

    def interrupt(*args, **kw):
        raise KeyboardInterrupt

    eng.model.forward = interrupted
    stale = eng.add_request(ps[2], None, GREEDY)
    with pytest.raises(KeyboardInterrupt):
        eng.step()
    eng.model.forward = real
    fresh = eng.add_request(ps[2], None, GREEDY)
    done = {}
    while eng.has_unfinished():
        done.update({o.request_id: o for o in eng.step() if o.finished})
    assert done[fresh].token_ids == ref[(2, None)] == done[stale].token_ids
    eng.model.forward = interrupt
    with pytest.raises(KeyboardInterrupt):
        eng.generate(ps[1], None, GREEDY)
    eng.model.forward = real
    assert not eng.has_unfinished() and not eng.has_outputs()
    assert eng.blocks.num_free == eng.blocks.num_blocks
    assert eng.generate(ps[1], None, GREEDY)[0].token_ids == ref[(1, None)]


@pytest.mark.parametrize("chunked", [True, False])
@pytest.mark.parametrize("where", ["forward", "logits", "sample"])
def test_a_step_interrupted_anywhere_resumes_exactly(llama, chunked, where, monkeypatch):
    """An exception in the forward pass (the second chunk), in the prompt logprobs' logits or
    in sampling: stepping on, the request ends with the answer and prompt logprobs of an
    uninterrupted run, none twice, and every block comes back."""
    from expertswitch.engine import engine as engine_module

    base, _ = llama
    ps = prompts(3)
    opts = {"max_num_batched_tokens": 8, "max_num_seqs": 8} if chunked else {}
    sp = SamplingParams(temperature=0.0, max_tokens=6, prompt_logprobs=1, logprobs=1)
    want = Engine(base, block_size=4, enable_chunked_prefill=chunked, **opts).generate(
        ps[2], None, sp)[0]  # fmt: skip
    eng = Engine(base, block_size=4, enable_chunked_prefill=chunked, **opts)
    owner, name = {"forward": (eng.model, "forward"), "logits": (eng.model, "logits"),
                   "sample": (engine_module, "sample")}[where]  # fmt: skip
    real, calls = getattr(owner, name), []

    def faulty(*args, **kw):
        calls.append(1)
        if len(calls) == (1 if where == "sample" else 2):
            raise KeyboardInterrupt
        return real(*args, **kw)

    monkeypatch.setattr(owner, name, faulty)
    rid = eng.add_request(ps[2], None, sp)
    done = {}
    with pytest.raises(KeyboardInterrupt):
        while eng.has_unfinished():
            done.update({o.request_id: o for o in eng.step() if o.finished})
    for _ in range(100):  # (a bound: a request left unschedulable would spin for ever)
        done.update({o.request_id: o for o in eng.step() if o.finished})
    assert not eng.has_unfinished()
    got = done[rid]
    assert got.token_ids == want.token_ids and len(got.logprobs) == len(want.logprobs)
    assert len(got.prompt_logprobs) == len(ps[2])
    for a, b in zip(got.prompt_logprobs[1:] + got.logprobs,
                    want.prompt_logprobs[1:] + want.logprobs):  # fmt: skip
        assert a.token_id == b.token_id and abs(a.logprob - b.logprob) < 1e-5
    assert eng.blocks.num_free == eng.blocks.num_blocks


@pytest.mark.parametrize("budget", [4096, 8])
def test_preemption_under_kv_pressure_keeps_tokens(llama, solo, budget):
    """budget 8: prompts are prefilled in chunks, so a request can be preempted part-way."""
    base, experts = llama
    ps, ref = solo
    # 6 blocks of 8 tokens: three requests of up to 53 tokens cannot all stay resident
    eng = Engine(base, {"e0": experts[0][0], "e1": experts[1][0]}, num_kv_blocks=6, block_size=8,
                 max_model_len=48, max_num_batched_tokens=budget, max_num_seqs=8)  # fmt: skip
    reqs = [(2, "e0"), (1, "e1"), (2, None)]
    rids = [eng.add_request(ps[i], e, GREEDY) for i, e in reqs]
    preempted, done = 0, {}
    while eng.has_unfinished():
        for out in eng.step():
            done[out.request_id] = out
        preempted = max(preempted, sum(r.preemptions for r in eng._requests.values()))
    assert preempted > 0
    assert eng.blocks.num_free == eng.blocks.num_blocks  # everything given back
    for rid, (i, e) in zip(rids, reqs):
        out = done[rid]
        n = len(out.token_ids)
        assert out.token_ids == ref[(i, e)][:n]
        if n < len(ref[(i, e)]):  # cut only by the context limit, never lost
            assert out.finish_reason == "length"
            assert len(out.prompt_token_ids) + n == eng.max_model_len


def test_logprobs_survive_batching_and_preemption(llama):
    """Each request's generated and prompt logprobs in a mixed batch under KV pressure equal
    those it gets alone; the prompt's are computed once (not again after a preemption)."""
    base, experts = llama
    ps = prompts(3, lengths=(11, 29, 13))
    names = {"e0": experts[0][0], "e1": experts[1][0]}
    sp = SamplingParams(temperature=0.0, max_tokens=24, logprobs=2, prompt_logprobs=1)
    roomy = Engine(base, names)
    reqs = [(2, "e0"), (1, "e1"), (0, None)]
    alone = {(i, e): roomy.generate(ps[i], e, sp)[0] for i, e in reqs}
    tight = Engine(base, names, num_kv_blocks=6, block_size=8, max_model_len=48)
    preempted = []
    real = tight.scheduler.preempt
    tight.scheduler.preempt = lambda r: (preempted.append(r.request_id), real(r))
    outs = tight.generate([ps[i] for i, _ in reqs], [e for _, e in reqs], sp)
    assert preempted  # the pressure this test is about did happen
    for (i, e), out in zip(reqs, outs):
        ref = alone[(i, e)]
        n = len(out.token_ids)
        assert out.token_ids == ref.token_ids[:n] and len(out.logprobs) == n
        for a, b in zip(out.logprobs, ref.logprobs):
            assert a.token_id == b.token_id and abs(a.logprob - b.logprob) < 1e-4
            assert [t for t, _ in a.top] == [t for t, _ in b.top] and len(a.top) == 2
            assert a.logprob == max(a.logprob, a.top[0][1])  # greedy: the most likely token
        assert len(out.prompt_logprobs) == len(ps[i]) and out.prompt_logprobs[0] is None
        for a, b, t in zip(out.prompt_logprobs[1:], ref.prompt_logprobs[1:], ps[i][1:]):
            assert a.token_id == t == b.token_id and abs(a.logprob - b.logprob) < 1e-4


def test_prefix_cache_reuses_only_its_experts_blocks_and_keeps_every_answer(llama):
    """Prompts sharing a 21-token prefix, for the base and both experts: with the prefix cache
    each answer (tokens and logprobs) equals the engine's without it, and transformers'; a
    prompt reuses only blocks its own expert computed, generated tokens included (a follow-up
    turn) and blocks computed in the same step; an archive registered again under an old name
    computes anew."""
    base, experts = llama
    names = {"e0": experts[0][0], "e1": experts[1][0]}
    g = torch.Generator().manual_seed(5)
    system = torch.randint(3, 256, (21,), generator=g).tolist()
    ps = [system + torch.randint(3, 256, (k,), generator=g).tolist() for k in (1, 6, 13)]
    sp = SamplingParams(temperature=0.0, max_tokens=12, logprobs=1)
    on = Engine(base, names, block_size=4)
    off = Engine(base, names, block_size=4, enable_prefix_caching=False)
    combos = [(i, e) for e in (None, "e0", "e1") for i in range(3)]

    def same(a, b):
        assert a.token_ids == b.token_ids
        assert all(abs(x.logprob - y.logprob) < 1e-4 for x, y in zip(a.logprobs, b.logprobs))

    first = on.generate([ps[0]] * 3, [None, "e0", "e1"], sp)  # each model computes the prefix
    assert [o.num_cached_tokens for o in first] == [0, 0, 0]
    outs = on.generate([ps[i] for i, _ in combos], [e for _, e in combos], sp)  # mixed batch
    refs = off.generate([ps[i] for i, _ in combos], [e for _, e in combos], sp)
    for (i, e), out, ref in zip(combos, outs, refs):
        assert out.num_cached_tokens == 20, (i, e)  # 5 full blocks of the shared prefix
        assert ref.num_cached_tokens == 0
        same(out, ref)
    rec = {None: base, "e0": experts[0][1], "e1": experts[1][1]}
    for i, e in [(1, "e0"), (2, "e1"), (0, None)]:
        assert outs[combos.index((i, e))].token_ids == hf_greedy(rec[e], ps[i], 12)
    # a follow-up turn: the answer's blocks were registered as decoding filled them
    turn = ps[0] + outs[combos.index((0, "e1"))].token_ids + [7, 8, 9]
    (a,) = on.generate([turn], "e1", sp)
    (b,) = off.generate([turn], "e1", sp)
    assert a.num_cached_tokens == 32  # 22 + 11 computed tokens (the last one never was)
    same(a, b)
    # prompt logprobs need every prompt row: such a request reuses nothing, and gets them all
    lp = SamplingParams(temperature=0.0, max_tokens=2, prompt_logprobs=1)
    (a,) = on.generate([ps[1]], "e0", lp)
    (b,) = off.generate([ps[1]], "e0", lp)
    assert a.num_cached_tokens == 0 and len(a.prompt_logprobs) == len(ps[1])
    for x, y in zip(a.prompt_logprobs[1:], b.prompt_logprobs[1:]):
        assert x.token_id == y.token_id and abs(x.logprob - y.logprob) < 1e-4
    stats = on.stats()
    assert stats["prefix_cache_hits"] >= 9 * 20 + 32 and off.stats()["prefix_cache_hits"] == 0
    # "e0" now names e1's archive: nothing e0 computed may be reused
    on.remove_expert("e0")
    on.add_expert("e0", experts[1][0])
    (a,) = on.generate([ps[2]], "e0", sp)
    assert a.num_cached_tokens == 0
    same(a, off.generate([ps[2]], "e1", sp)[0])
    on.reset_prefix_cache()
    # admitted in one step, requests share the blocks the first of them computes there
    burst = on.generate([ps[1], ps[2], ps[1]], "e1", sp)
    assert [o.num_cached_tokens for o in burst] == [0, 20, 24]
    for a, b in zip(burst, off.generate([ps[1], ps[2], ps[1]], "e1", sp)):
        same(a, b)


def test_memory_holds_packed_parts_only(llama_engine, llama):
    _, experts = llama
    llama_engine.generate(prompts(1), expert="e0", sampling=SamplingParams(max_tokens=2))
    llama_engine.generate(prompts(1), expert="e1", sampling=SamplingParams(max_tokens=2))
    archive_bytes = 0
    for archive, _ in experts:
        parts = open_archive(archive, verify=False).manifest["parts"]
        archive_bytes += sum(_part_bytes(p) for p in parts.values())
    assert llama_engine.pool.bytes_resident()["device"] == archive_bytes
    for name in ("e0", "e1"):
        ew = llama_engine.pool.get(name)
        # every quantized linear stays packed: int32 bit planes, no dense fp32 weight
        assert ew.deltas and all(d.planes[0].dtype == torch.int32 for d in ew.deltas.values())
        dense = [n for n, t in ew.exact.items() if t.dim() == 2]
        assert not dense, dense


def _part_bytes(rec: dict) -> int:
    size = {"int32": 4, "float16": 2, "uint8": 1, "float32": 4, "bfloat16": 2, "int64": 8}
    n = 1
    for s in rec["shape"]:
        n *= s
    return n * size[rec["dtype"]]


def expert_and_base_equal_transformers(eng, base, rec, ps, n: int) -> list:
    """Each prompt with expert "x" and on the base, in one batch: transformers' greedy tokens
    on the reconstructed checkpoint and on the base."""
    sp = SamplingParams(temperature=0.0, max_tokens=n)
    outs = eng.generate(ps + ps, expert=["x"] * len(ps) + [None] * len(ps), sampling=sp)
    for i, p in enumerate(ps):
        assert outs[i].token_ids == hf_greedy(rec, p, n), i
        assert outs[i + len(ps)].token_ids == hf_greedy(base, p, n), i
    return outs


def prompt_logprobs_equal_transformers(eng, model, p: list[int], expert="x") -> None:
    """The engine's prompt logprobs of `p` against transformers' log-softmax (`model`)."""
    with torch.no_grad():
        want = torch.log_softmax(model(torch.tensor([p])).logits[0, :-1].float(), -1)
    want = want.gather(1, torch.tensor(p[1:]).unsqueeze(1)).squeeze(1).tolist()
    lp = SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=0)
    got = [x.logprob for x in eng.generate(p, expert, lp)[0].prompt_logprobs[1:]]
    assert got == pytest.approx(want, abs=1e-4)


def same_tokens_and_logprobs(got, want, tol: float = 1e-5) -> None:
    for a, b in zip(got, want, strict=True):
        assert a.token_ids == b.token_ids
        assert [x.logprob for x in a.logprobs] == pytest.approx(
            [x.logprob for x in b.logprobs], abs=tol)  # fmt: skip


@pytest.mark.parametrize("arch", ["mistral", "qwen2", "qwen3"])
def test_mistral_window_and_qwen2_tied_biases(tmp_path, monkeypatch, arch):
    """Sliding windows, tied embeddings and biases, Qwen3's q/k norms (changed by the expert,
    per row) and a head_dim other than hidden / heads: transformers' greedy tokens."""
    from transformers import Qwen2Config, Qwen3Config

    if arch == "mistral":
        config = tiny_config("mistral")  # sliding window 64: prompt + generation = 80 tokens
        lengths = (50, 56)
    else:  # tied embeddings, q/k/v biases, a sliding window on the second layer only
        config = (Qwen2Config if arch == "qwen2" else Qwen3Config)(
            hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=256, max_position_embeddings=256,
            tie_word_embeddings=True, use_sliding_window=True, sliding_window=16,
            max_window_layers=1, **({"head_dim": 24} if arch == "qwen3" else {}))  # fmt: skip
        lengths = (9, 30)
    base, experts = make_family(tmp_path, config, n_experts=1)
    ((archive, rec),) = experts
    if arch != "mistral":
        entries = open_archive(archive).entries
        name = "q_proj.bias" if arch == "qwen2" else "q_norm.weight"
        assert entries[f"model.layers.0.self_attn.{name}"].kind == "exact"
        assert "lm_head.weight" not in entries  # tied
    eng = Engine(base, {"x": archive})
    ps = prompts(2, lengths)
    sp = SamplingParams(temperature=0.0, max_tokens=30)
    outs = expert_and_base_equal_transformers(eng, base, rec, ps, 30)
    # again, from the prefix cache (Mistral: 3 blocks of 16, its window reaching into them)
    again = eng.generate(ps, expert="x", sampling=sp)
    assert [o.num_cached_tokens for o in again] == [(len(p) - 1) // 16 * 16 for p in ps]
    assert [o.token_ids for o in again] == [o.token_ids for o in outs[:2]]
    if arch == "qwen3" and importlib.util.find_spec("triton"):  # head_dim 24 (not a power
        from expertswitch.models import attention  # of two) through the decode kernel

        four = SamplingParams(temperature=0.0, max_tokens=4, logprobs=0)
        want = Engine(base, {"x": archive}).generate(ps, "x", four)
        monkeypatch.setattr(attention, "ATTENTION_PATH", "kernel")
        same_tokens_and_logprobs(Engine(base, {"x": archive}).generate(ps, "x", four), want)


def test_phi3_fused_projections_and_longrope(tmp_path):
    """Phi-3: one qkv_proj and one gate_up_proj (an expert's deltas of them applied per row),
    LongRoPE over a partial rotary dimension — short factors within the pretrained 16 tokens,
    long ones past them, mid-generation too: transformers' greedy tokens for the base and an
    expert in one batch, its prompt logprobs either side of 16, PEFT's tokens for a LoRA
    adapter on the fused layers; prefix caching is off (a key's rotation depends on the
    length)."""
    from transformers import Phi3Config

    rope = {"rope_type": "longrope", "rope_theta": 10000.0, "partial_rotary_factor": 0.75,
            "short_factor": [1.0, 1.1, 1.3, 1.6, 2.0, 2.5],
            "long_factor": [1.0, 1.5, 2.5, 4.0, 6.0, 9.0]}  # fmt: skip
    config = Phi3Config(hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, vocab_size=256,
                        max_position_embeddings=64, original_max_position_embeddings=16,
                        rope_parameters=rope, tie_word_embeddings=False, pad_token_id=0,
                        eos_token_id=1, bos_token_id=2)  # fmt: skip
    base, ((archive, rec),) = make_family(tmp_path, config, n_experts=1)
    entries = open_archive(archive).entries
    assert entries["model.layers.0.self_attn.qkv_proj.weight"].kind != "exact"
    assert "model.layers.1.mlp.gate_up_proj.weight" in entries
    eng = Engine(base, {"x": archive})
    assert not eng.blocks.prefix_caching
    ps = prompts(2, (9, 20))  # 9 + 12 crosses 16 while decoding; 20 starts past it
    sp = SamplingParams(temperature=0.0, max_tokens=12)
    outs = expert_and_base_equal_transformers(eng, base, rec, ps, 12)
    # the logprobs of a prompt past 16 tokens (long factors) and of one within (short)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(rec, dtype=torch.float32)
    for p in (ps[1], ps[1][:14]):
        prompt_logprobs_equal_transformers(eng, model, p)
    # a step budget of exactly the pretrained length: the recompute's chunk ends where the
    # switch is, and the request still finishes (once recomputed), with the same tokens
    assert Engine(base, max_model_len=16).blocks.prefix_caching  # (no sequence can cross)
    small = Engine(base, {"x": archive}, max_num_batched_tokens=16, max_num_seqs=4)
    again = small.generate(ps[0], "x", sp)[0]
    assert again.token_ids == outs[0].token_ids and small.scheduler.preemptions == 1
    # 4.x configs: "su" is LongRoPE's old name; the top-level pretrained length wins
    from expertswitch.models.config import ModelConfig

    scaling = {**rope, "type": "su", "original_max_position_embeddings": 32}
    old = {**config.to_dict(), "rope_parameters": None, "rope_scaling": scaling}
    del old["rope_scaling"]["rope_type"]
    got = ModelConfig.from_dict(old).rope
    assert got["rope_type"] == "longrope" and got["original_max_position_embeddings"] == 16
    # a PEFT LoRA adapter on the fused projections: PEFT's own greedy tokens
    pytest.importorskip("peft")
    from conftest import make_adapter, peft_greedy

    lora = make_adapter(base, tmp_path / "lora", 3, ["qkv_proj", "gate_up_proj", "down_proj"])
    eng.add_expert("lora", lora)
    assert eng.generate(ps[0], "lora", sp)[0].token_ids == peft_greedy(base, lora, ps[0], 12)
    with pytest.raises(ConfigError, match="fused qkv_proj and gate_up_proj are not sliced"):
        from expertswitch.models.decoder import Decoder

        Decoder.load(base, tp_size=2)


def gemma_config(arch: str):
    """Tiny Gemma / Gemma 2 configs; Gemma 2's caps small enough to change the scores and
    logprobs of this model, every other layer windowed."""
    from transformers import Gemma2Config, GemmaConfig

    common = dict(hidden_size=64, intermediate_size=160, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, vocab_size=256,
                  max_position_embeddings=256, pad_token_id=0, eos_token_id=1,
                  bos_token_id=2)  # fmt: skip
    if arch == "gemma":
        return GemmaConfig(num_hidden_layers=2, **common)
    return Gemma2Config(num_hidden_layers=3, sliding_window=16, query_pre_attn_scalar=24,
                        attn_logit_softcapping=0.02, final_logit_softcapping=3.0,
                        **common)  # fmt: skip


@pytest.mark.parametrize("arch", ["gemma", "gemma2"])
def test_gemma_norms_scaled_embeddings_and_soft_caps(tmp_path, monkeypatch, arch):
    """Gemma: (1 + w) norms in fp32 (an expert's changed norms per row), √H-scaled and tied
    embeddings, GeGLU; Gemma 2 also: sandwich norms, query_pre_attn_scalar, every other layer
    windowed, attention scores and logits soft-capped (caps small enough to matter here):
    transformers' greedy tokens for the base and an expert in one batch, and its prompt
    logprobs (the logit cap changes no argmax; it shows in the logprobs)."""
    from transformers import AutoModelForCausalLM

    config = gemma_config(arch)
    base, ((archive, rec),) = make_family(tmp_path, config, n_experts=1)
    entries = open_archive(archive).entries
    assert "lm_head.weight" not in entries  # tied
    norm = "pre_feedforward_layernorm" if arch == "gemma2" else "post_attention_layernorm"
    assert f"model.layers.1.{norm}.weight" in entries
    eng = Engine(base, {"x": archive})
    if arch == "gemma2":
        assert eng.model.cfg.sliding_windows == [16, None, 16]
    ps = prompts(2, (9, 30))  # past the window while decoding; past it in the prompt
    sp = SamplingParams(temperature=0.0, max_tokens=24)
    outs = expert_and_base_equal_transformers(eng, base, rec, ps, 24)
    model = AutoModelForCausalLM.from_pretrained(rec, dtype=torch.float32)
    prompt_logprobs_equal_transformers(eng, model, ps[1])
    if arch == "gemma2":  # one sequence at a time (a long prompt): the capped scores too
        from expertswitch.models import attention

        attention.LONG_PREFILL, keep = 8, attention.LONG_PREFILL
        try:
            again = eng.generate(ps, "x", SamplingParams(temperature=0.0, max_tokens=4))
        finally:
            attention.LONG_PREFILL = keep
        assert [o.token_ids for o in again] == [o.token_ids[:4] for o in outs[:2]]
        if importlib.util.find_spec("triton"):  # decode steps through the Triton kernel,
            four = SamplingParams(temperature=0.0, max_tokens=4, logprobs=0)  # capped in it:
            want = eng.generate(ps, "x", four)  # the logprobs show the cap, the tokens
            monkeypatch.setattr(attention, "ATTENTION_PATH", "kernel")  # here do not
            got = eng.generate(ps, "x", four)
            monkeypatch.undo()
            same_tokens_and_logprobs(got, want)
        # capped scores a few queries at a time (a long prefill's memory): the same logprobs
        monkeypatch.setattr(attention, "CAPPED_QUERY_BLOCK", 4)
        prompt_logprobs_equal_transformers(eng, model, ps[1])
        monkeypatch.undo()
        # an expert with a larger vocabulary beside base rows: their logits past the base's
        # vocabulary stay −inf under the cap (tanh(−inf)·cap would be a finite −cap, and a hot
        # temperature would then sample tokens the base does not have)
        grown = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
        grown.resize_token_embeddings(264)
        finetune_like(grown, seed=3, scale=0.2)
        grown.save_pretrained(tmp_path / "grown")
        eng.add_expert("grown", compress_expert(base, tmp_path / "grown", tmp_path / "a-grown",
                                                make_method("mixed", bits=3), OPTS))  # fmt: skip
        hot = SamplingParams(temperature=50.0, max_tokens=64, seed=1, ignore_eos=True)
        outs = eng.generate([ps[0]] * 5, [None] * 4 + ["grown"], hot)
        assert max(max(o.token_ids) for o in outs[:4]) < 256
        assert max(outs[4].token_ids) >= 256  # (the grown expert does sample its own)
        from expertswitch.models.config import ModelConfig

        with pytest.raises(ConfigError, match="attn_logit_softcapping must be a positive"):
            ModelConfig.from_dict({**config.to_dict(), "attn_logit_softcapping": -1})
        old = {k: v for k, v in config.to_dict().items() if k != "layer_types"}
        assert ModelConfig.from_dict(old).sliding_windows == [16, None, 16]
    with pytest.raises(ConfigError, match="served, not trained"):
        from expertswitch.models.causal_lm import CausalLM

        CausalLM.from_config(config.to_dict())
    # a PEFT LoRA adapter on the (scaled) embedding and the attention: PEFT's tokens (PEFT
    # scales an embedding adapter's rows by √H too)
    pytest.importorskip("peft")
    from conftest import make_adapter, peft_greedy

    lora = make_adapter(base, tmp_path / "lora", 3, ["embed_tokens", "q_proj", "o_proj"])
    eng.add_expert("lora", lora)
    assert eng.generate(ps[1], "lora", sp)[0].token_ids == peft_greedy(base, lora, ps[1], 24)


GEMMA3_ROPES = {"full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 5000.0},
                "sliding_attention": {"rope_type": "default", "rope_theta": 50.0}}  # fmt: skip


def gemma3_config():
    """A tiny Gemma 3 text model: windowed, global, windowed layers, each kind with its own
    RoPE (far apart, so that a layer rotated by the other's would change the logprobs); a
    logit cap small enough to matter, and a score cap, which transformers' Gemma 3 ignores."""
    from transformers import Gemma3TextConfig

    return Gemma3TextConfig(hidden_size=64, intermediate_size=160, num_hidden_layers=3,
                            num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                            vocab_size=256, max_position_embeddings=256, sliding_window=16,
                            layer_types=["sliding_attention", "full_attention",
                                         "sliding_attention"],
                            rope_parameters=GEMMA3_ROPES, query_pre_attn_scalar=24,
                            attn_logit_softcapping=0.02, final_logit_softcapping=3.0,
                            pad_token_id=0, eos_token_id=1, bos_token_id=2)  # fmt: skip


def test_gemma3_local_and_global_rope_and_qk_norms(tmp_path, monkeypatch, caplog):
    """Gemma 3's text model: Gemma 2's layout without soft caps, (1 + w) q/k norms (an
    expert's changed ones per row), and two RoPEs — the sliding-window layers' own base
    frequency, the global layers' scaled one: transformers' greedy tokens for the base and an
    expert in one batch and its prompt logprobs; the padded static decode path (what CUDA
    graphs capture, through the Triton decode kernel) gives the same logprobs; 4.x configs
    (rope_local_base_freq, sliding_window_pattern) read alike; a PEFT LoRA adapter gives
    PEFT's tokens."""
    from transformers import AutoModelForCausalLM

    from expertswitch.engine import graphs
    from expertswitch.models.config import ModelConfig

    config = gemma3_config()
    base, ((archive, rec),) = make_family(tmp_path, config, n_experts=1)
    entries = open_archive(archive).entries
    assert entries["model.layers.1.self_attn.k_norm.weight"].kind == "exact"
    eng = Engine(base, {"x": archive})
    cfg = eng.model.cfg
    assert cfg.sliding_windows == [16, None, 16] and cfg.local_layers == [True, False, True]
    assert cfg.final_softcap == 3.0 and cfg.attn_softcap is None  # (as transformers runs it)
    ps = prompts(2, (9, 30))  # past the window while decoding; past it in the prompt
    outs = expert_and_base_equal_transformers(eng, base, rec, ps, 24)
    model = AutoModelForCausalLM.from_pretrained(rec, dtype=torch.float32)
    prompt_logprobs_equal_transformers(eng, model, ps[1])
    four = SamplingParams(temperature=0.0, max_tokens=6, logprobs=0)
    want = eng.generate(ps + ps, ["x", "x", None, None], four)
    assert [o.token_ids for o in want[:2]] == [o.token_ids[:6] for o in outs[:2]]
    if importlib.util.find_spec("triton"):
        from expertswitch.models import attention

        monkeypatch.setattr(graphs, "GRAPH_MODE", "static")  # (its attention: the Triton
        monkeypatch.setattr(attention, "ATTENTION_PATH", "kernel")  # kernel, interpreted)
        static = Engine(base, {"x": archive})
        same_tokens_and_logprobs(static.generate(ps + ps, ["x", "x", None, None], four), want)
        assert static.runner.graphs.replays > 0
        monkeypatch.undo()
    # transformers 4.x's keys: rope_theta, rope_scaling (the global layers'),
    # rope_local_base_freq, sliding_window_pattern (every 2nd layer global here)
    old = {k: v for k, v in config.to_dict().items() if k not in ("rope_parameters",
                                                                  "layer_types")}  # fmt: skip
    full, local = GEMMA3_ROPES["full_attention"], GEMMA3_ROPES["sliding_attention"]
    old.update(
        rope_theta=full["rope_theta"],
        rope_local_base_freq=local["rope_theta"],
        rope_scaling={"rope_type": "linear", "factor": 4.0},
        sliding_window_pattern=2,
    )
    got = ModelConfig.from_dict(old)
    assert (got.rope, got.local_rope) == (cfg.rope, cfg.local_rope)
    assert got.sliding_windows == cfg.sliding_windows and got.local_layers == cfg.local_layers
    from transformers import Gemma3TextConfig  # (transformers reads those keys alike)

    theirs = Gemma3TextConfig(**old).rope_parameters
    assert {**theirs["full_attention"], "max_position_embeddings": 256} == cfg.rope
    assert theirs["sliding_attention"] == cfg.local_rope
    # transformers 5 merges a top-level rope_scaling into the global layers' parameters
    merged = {**config.to_dict(), "rope_scaling": {"rope_type": "linear", "factor": 2.0}}
    assert ModelConfig.from_dict(merged).rope["factor"] == 2.0
    # transformers' defaults: 1e6 and 1e4, five windowed layers of 4096, then a global one;
    # no soft caps (Gemma 2's defaults are caps), 256^−½, 131072 positions
    bare = {k: v for k, v in old.items() if k not in ("rope_theta", "rope_local_base_freq",
            "rope_scaling", "sliding_window_pattern", "sliding_window", "query_pre_attn_scalar",
            "attn_logit_softcapping", "final_logit_softcapping", "head_dim",
            "max_position_embeddings")}  # fmt: skip
    got = ModelConfig.from_dict({**bare, "num_hidden_layers": 7})
    assert (got.rope["rope_theta"], got.local_rope["rope_theta"]) == (1e6, 1e4)
    assert got.sliding_windows == [4096] * 5 + [None, 4096]
    assert (got.attn_softcap, got.final_softcap, got.attn_scale) == (None, None, 1 / 16)
    assert (got.head_dim, got.max_position_embeddings) == (256, 131072)
    for bad, match in (({"layer_types": ["sliding_attention"]}, "layer_types must list 3"),
                       ({"sliding_window_pattern": 0}, "sliding_window_pattern must be"),
                       ({"sliding_window": None}, "sliding_window is null")):  # fmt: skip
        with pytest.raises(ConfigError, match=match):
            ModelConfig.from_dict({**old, **bad})
    from expertswitch.io.checkpoint import open_checkpoint
    from expertswitch.models.decoder import Decoder

    with caplog.at_level(logging.WARNING, logger="expertswitch.models.decoder"):
        Decoder(cfg, open_checkpoint(base), "cpu", torch.float16)  # (a bf16 family)
    assert "gemma3_text in float16: its activations can overflow" in caplog.text
    with pytest.raises(ConfigError, match="not served beside the global one"):
        dynamic = {**GEMMA3_ROPES["sliding_attention"], "rope_type": "dynamic", "factor": 2.0}
        cfg_dict = {
            **config.to_dict(),
            "rope_parameters": {**GEMMA3_ROPES, "sliding_attention": dynamic},
        }
        Decoder(ModelConfig.from_dict(cfg_dict), open_checkpoint(base), "cpu", torch.float32)
    # a PEFT LoRA adapter on the scaled embedding, the attention and the MLP: PEFT's tokens
    pytest.importorskip("peft")
    from conftest import make_adapter, peft_greedy

    lora = make_adapter(base, tmp_path / "lora", 3, ["embed_tokens", "k_proj", "down_proj"])
    eng.add_expert("lora", lora)
    sp = SamplingParams(temperature=0.0, max_tokens=24)
    assert eng.generate(ps[1], "lora", sp)[0].token_ids == peft_greedy(base, lora, ps[1], 24)


def gemma3_image_and_text_config():
    """A tiny Gemma 3 image-and-text model (Gemma3ForConditionalGeneration): gemma3_config's
    language model (its two RoPEs) beside a one-layer SigLIP vision tower. No logit cap:
    transformers 5's image-and-text model ignores its language model's (4.x's applied it, as
    vLLM does and so the engine; Gemma 3's checkpoints set none)."""
    from transformers import Gemma3Config, SiglipVisionConfig

    text = {**gemma3_config().to_dict(), "final_logit_softcapping": None}
    vision = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                num_attention_heads=2, image_size=28, patch_size=14)  # fmt: skip
    return Gemma3Config(text_config=text, vision_config=vision.to_dict(), mm_tokens_per_image=4,
                        boi_token_index=253, eoi_token_index=254,
                        image_token_index=255)  # fmt: skip


def test_gemma3_image_and_text_checkpoint_serves_its_language_model(tmp_path, caplog):
    """gemma-3-4b/12b/27b are saved as Gemma3ForConditionalGeneration (model_type "gemma3"):
    the engine serves their language model as text, and compression calibrates it. Against
    transformers' image-and-text model on text prompts: greedy tokens of the base and of an
    expert (whose fine-tune also moved the vision tower: those tensors are skipped, not
    refused) in one batch, and prompt logprobs; the same from transformers 4.52+'s tensor
    layout ("model.language_model.…"); a fine-tune of the vision tower alone serves as the
    base, with a warning; a text_config listing only what differs from transformers'
    defaults (as the hub's config.json files do) reads as transformers reads it, and the top
    level's untied head and token ids count; an untied head; PEFT adapters on the language
    model's and the vision tower's projections (and lm_head, with an alpha_pattern), as
    transformers 5 or 4.x lay them out or trained on the language model alone, give PEFT's
    logprobs."""
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM, Gemma3TextConfig

    from expertswitch.models.config import ModelConfig

    config = gemma3_image_and_text_config()
    base, ((archive, rec),) = make_family(tmp_path, config, n_experts=1)
    stored = open_archive(archive).entries
    assert any(n.startswith("vision_tower.") for n in stored)  # (the fine-tune moved it)
    # compressed with the base's activations: the run names the language model's layers by
    # transformers' module tree, the checkpoint by its own keys
    lm = [e for n, e in stored.items() if n.startswith("language_model.")
          and e.kind == "quantized"]  # fmt: skip
    assert lm and all(e.meta["calibrated"] for e in lm)
    assert "language_model.model.layers.1.self_attn.q_proj.weight" in stored
    eng = Engine(base, {"x": archive})
    assert eng.model.multimodal and eng.model.cfg.local_layers == [True, False, True]
    ps = prompts(2, (9, 30))
    expert_and_base_equal_transformers(eng, base, rec, ps, 24)
    model = AutoModelForCausalLM.from_pretrained(rec, dtype=torch.float32)
    assert type(model).__name__ == "Gemma3ForConditionalGeneration"
    prompt_logprobs_equal_transformers(eng, model, ps[1])
    w = eng._load("x")  # (the expert's tensors under the language model's names)
    assert w.deltas and all(n.startswith("model.") for n in [*w.deltas, *w.exact])
    # a fine-tune of the vision tower alone: served (as the base, for text), with a warning
    seeing = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    with torch.no_grad():
        for n, t in seeing.named_parameters():
            if "vision_tower" in n and t.dim() == 2:
                t.add_(0.1 * torch.randn_like(t))
    seeing.save_pretrained(tmp_path / "seeing")
    only = compress_expert(base, tmp_path / "seeing", tmp_path / "a-seeing",
                           make_method("mixed", bits=2), OPTS)  # fmt: skip
    assert all(n.startswith("vision_tower.") for n in open_archive(only).entries)
    with caplog.at_level(logging.WARNING, logger="expertswitch.engine.registry"):
        eng.add_expert("seeing", only)
    assert "changes only the vision tower" in caplog.text
    sp = SamplingParams(temperature=0.0, max_tokens=8)
    assert eng.generate(ps[0], "seeing", sp)[0].token_ids == eng.generate(ps[0], None, sp)[
        0].token_ids  # fmt: skip
    # transformers 4.52+'s module-tree layout of the same weights
    moved = tmp_path / "moved"
    moved.mkdir()
    for f in base.iterdir():
        if f.name != "model.safetensors":
            (moved / f.name).write_bytes(f.read_bytes())
    tensors = load_file(base / "model.safetensors")
    old = "language_model.model."
    save_file({("model.language_model." + k.removeprefix(old) if k.startswith(old)
                else "model." + k): v for k, v in tensors.items()},
              str(moved / "model.safetensors"), metadata={"format": "pt"})  # fmt: skip
    again = Engine(moved)
    assert again.model.multimodal
    p = ps[1]
    lp = SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=0)
    want = [x.logprob for x in eng.generate(p, None, lp)[0].prompt_logprobs[1:]]
    assert [x.logprob for x in again.generate(p, None, lp)[0].prompt_logprobs[1:]] == want
    theirs = AutoModelForCausalLM.from_pretrained(moved, dtype=torch.float32)
    prompt_logprobs_equal_transformers(again, theirs, p, expert=None)
    # a sparse text_config: transformers' defaults fill what it leaves out
    text = config.text_config.to_dict()
    defaults = Gemma3TextConfig().to_dict()
    sparse = {k: v for k, v in text.items() if k in ("model_type", "rope_parameters")
              or v != defaults.get(k)}  # fmt: skip
    assert len(sparse) < len(text) - 5
    full = ModelConfig.from_dict(text)
    assert ModelConfig.from_dict({"model_type": "gemma3", "text_config": sparse}) == full
    assert ModelConfig.from_dict({"model_type": "gemma3"}) == ModelConfig.from_dict(defaults)
    for bad in ([], {"model_type": "siglip_vision_model"}):
        with pytest.raises(ConfigError, match="text_config must be an object"):
            ModelConfig.from_dict({"model_type": "gemma3", "text_config": bad})
    # PEFT on q_proj and v_proj: the language model's and (PEFT matches names) SigLIP's
    pytest.importorskip("peft")
    from conftest import make_adapter
    from peft import PeftModel

    # (alpha_pattern names layer 0's q_proj as PEFT's module tree does: language_model.…)
    raw_q = "language_model.layers.0.self_attn.q_proj"
    lora = make_adapter(base, tmp_path / "lora", 5, ["q_proj", "v_proj", "lm_head"],
                        alpha_pattern={raw_q: 32})  # fmt: skip
    keys = load_file(lora / "adapter_model.safetensors")
    assert any("vision" in k for k in keys) and any(".language_model." in k for k in keys)
    eng.add_expert("lora", lora)
    peft = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), lora
    ).eval()
    prompt_logprobs_equal_transformers(eng, peft, ps[1], expert="lora")
    want = [x.logprob for x in eng.generate(p, "lora", lp)[0].prompt_logprobs[1:]]
    # the same factors in transformers 4.x's layout, and trained on the language model
    # alone (a text model's names, no vision tower): the same logprobs
    for layout, q_name, rename in (
        ("legacy", "language_model.model.layers.0.self_attn.q_proj",
         lambda k: k.replace("base_model.model.model.language_model.",
                             "base_model.model.language_model.model.")
         .replace("base_model.model.model.vision_tower.", "base_model.model.vision_tower.")
         .replace("base_model.model.lm_head.", "base_model.model.language_model.lm_head.")),
        ("text", "model.layers.0.self_attn.q_proj",
         lambda k: None if "vision" in k else k.replace("model.language_model.", "model.")),
    ):  # fmt: skip
        out = tmp_path / f"lora-{layout}"
        out.mkdir()
        moved_keys = {rename(k): v for k, v in keys.items() if rename(k) is not None}
        assert moved_keys.keys() != keys.keys()
        save_file(moved_keys, str(out / "adapter_model.safetensors"))
        adapter_cfg = json.loads((lora / "adapter_config.json").read_text())
        adapter_cfg["alpha_pattern"] = {q_name: 32}
        (out / "adapter_config.json").write_text(json.dumps(adapter_cfg))
        eng.add_expert(layout, out)
        got = [x.logprob for x in eng.generate(p, layout, lp)[0].prompt_logprobs[1:]]
        assert got == pytest.approx(want, abs=1e-6), layout
    # an untied lm_head (stored beside the language model): transformers' logprobs; the
    # top level unties it, and gives token ids text_config leaves out
    cfg_dict = config.to_dict()
    cfg_dict["tie_word_embeddings"] = False
    cfg_dict["text_config"]["tie_word_embeddings"] = False
    untied = AutoModelForCausalLM.from_config(type(config).from_dict(cfg_dict))
    assert not untied.config.tie_word_embeddings
    untied.save_pretrained(tmp_path / "untied")
    stored_names = load_file(tmp_path / "untied" / "model.safetensors").keys()
    assert any(n.endswith("lm_head.weight") for n in stored_names)
    separate = Engine(tmp_path / "untied")
    assert not separate.model.cfg.tie_word_embeddings
    prompt_logprobs_equal_transformers(separate, untied.eval(), p, expert=None)
    text = {k: v for k, v in config.text_config.to_dict().items()
            if k not in ("eos_token_id", "tie_word_embeddings")}  # fmt: skip
    top = ModelConfig.from_dict({"model_type": "gemma3", "tie_word_embeddings": False,
                                 "eos_token_id": [1, 106], "text_config": text})  # fmt: skip
    assert not top.tie_word_embeddings and top.eos_token_ids == [1, 106]


@pytest.mark.parametrize("rope", [
    {"rope_type": "linear", "factor": 2.0},
    {"rope_type": "dynamic", "factor": 2.0},
    {"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 16},
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16},
])  # fmt: skip
def test_rope_scaling_kinds_equal_transformers(tmp_path, rope):
    """Base only (no compression needed); max_position_embeddings 32 < prompt + generation, so
    dynamic NTK rescales mid-generation."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=256,
                         max_position_embeddings=32,
                         rope_parameters={"rope_theta": 10000.0, **rope})  # fmt: skip
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "base")
    eng = Engine(tmp_path / "base", max_model_len=64)
    # a prompt past max_position_embeddings prefilled in chunks of 8: dynamic NTK rotates
    # every prompt key by the whole prompt's length, as transformers does
    chunked = Engine(tmp_path / "base", max_model_len=64, max_num_batched_tokens=8,
                     max_num_seqs=8)  # fmt: skip
    sp = SamplingParams(temperature=0.0, max_tokens=16, logprobs=0)
    for p in prompts(3, (5, 24, 40)):
        ref = hf_greedy(tmp_path / "base", p, 16)
        whole, parts = eng.generate(p, sampling=sp)[0], chunked.generate(p, sampling=sp)[0]
        assert whole.token_ids == parts.token_ids == ref
        # (a chunk rotated by its own end instead differs by ~5e-4 here, without a flip)
        for a, b in zip(whole.logprobs, parts.logprobs):
            assert abs(a.logprob - b.logprob) < 2e-5


def test_expert_with_larger_vocabulary_and_quantized_embeddings(tmp_path):
    """An expert that added tokens (exact embed/lm_head of 264 rows) and one whose embedding
    and lm_head deltas are quantized, in one batch with the base."""
    from transformers import AutoModelForCausalLM

    config = tiny_config("llama")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).float()
    model.save_pretrained(tmp_path / "base")
    grown = AutoModelForCausalLM.from_pretrained(tmp_path / "base", dtype=torch.float32)
    grown.resize_token_embeddings(264)
    finetune_like(grown, seed=3, scale=0.2)
    grown.save_pretrained(tmp_path / "grown")
    qe = AutoModelForCausalLM.from_pretrained(tmp_path / "base", dtype=torch.float32)
    with torch.no_grad():
        for p in qe.parameters():
            p.add_(0.01 * torch.randn_like(p))
    qe.save_pretrained(tmp_path / "qe")
    qopts = CompressOptions(calib=OPTS.calib, progress=False, quantize_embeddings=True)
    archives, recs = {}, {}
    for name, opts in (("grown", OPTS), ("qe", qopts)):
        archives[name] = compress_expert(tmp_path / "base", tmp_path / name, tmp_path / f"a-{name}",
                                         make_method("mixed", bits=3), opts)  # fmt: skip
        recs[name] = reconstruct(tmp_path / "base", archives[name], tmp_path / f"r-{name}",
                                 progress=False)  # fmt: skip
    assert open_archive(archives["qe"]).entries["model.embed_tokens.weight"].kind == "quantized"
    eng = Engine(tmp_path / "base", archives)
    p_new = [5, 260, 263, 7]  # uses the added tokens
    p = prompts(1)[0]
    outs = eng.generate([p_new, p, p], expert=["grown", "qe", None], sampling=GREEDY)
    assert outs[0].token_ids == hf_greedy(recs["grown"], p_new, GREEDY.max_tokens)
    assert outs[1].token_ids == hf_greedy(recs["qe"], p, GREEDY.max_tokens)
    assert outs[2].token_ids == hf_greedy(tmp_path / "base", p, GREEDY.max_tokens)
    with pytest.raises(ConfigError, match="outside the vocabulary"):
        eng.add_request(p_new, None, GREEDY)  # the base has no token 260


@pytest.mark.parametrize("arch", ["mixtral", "qwen3_moe", "qwen2_moe"])
def test_mixtral_experts_that_change_the_moe_layers(tmp_path, monkeypatch, arch):
    """A fine-tune of a Mixtral base changes the router and every MoE expert's w1/w2/w3: its
    rows use those deltas (packed, per row), in a batch with the base and another expert,
    and get transformers' tokens on the checkpoint reconstructed from its archive; the base's
    rows keep the fused path's tokens. Qwen3-MoE alike (its experts' gate/up/down_proj, a
    dense first layer, top-k weights not renormalised, q/k norms); Qwen2-MoE alike, with its
    shared expert and its sigmoid gate changed too, and q/k/v biases."""
    from transformers import Qwen2MoeConfig, Qwen3MoeConfig

    from expertswitch.models import layers

    if arch == "mixtral":
        config, block, moe = tiny_config("mixtral"), "block_sparse_moe", (0, 1)
        names = ("experts.3.w2.weight", "gate.weight")
    else:
        config = Qwen3MoeConfig(hidden_size=64, intermediate_size=160, moe_intermediate_size=48,
                                num_hidden_layers=3, num_attention_heads=4, head_dim=16,
                                num_key_value_heads=2, vocab_size=256, num_experts=4,
                                num_experts_per_tok=2, mlp_only_layers=[0], norm_topk_prob=False,
                                max_position_embeddings=256)  # fmt: skip
        block, moe = "mlp", (1, 2)
        names = ("experts.3.down_proj.weight", "gate.weight")
        if arch == "qwen2_moe":  # (head_dim: hidden / heads)
            config = Qwen2MoeConfig(hidden_size=64, intermediate_size=160,
                                    moe_intermediate_size=48, shared_expert_intermediate_size=80,
                                    num_hidden_layers=3, num_attention_heads=4,
                                    num_key_value_heads=2, vocab_size=256, num_experts=4,
                                    num_experts_per_tok=2, mlp_only_layers=[0],
                                    norm_topk_prob=False, max_position_embeddings=256)  # fmt: skip
            names += ("shared_expert.up_proj.weight", "shared_expert_gate.weight")
    if arch == "qwen3_moe":  # transformers' layer rule, and bad routing sizes refused
        from expertswitch.models.config import ModelConfig

        d = {**config.to_dict(), "num_hidden_layers": 4, "decoder_sparse_step": 2}
        assert ModelConfig.from_dict(d).sparse_layers == [False, True, False, True]
        with pytest.raises(ConfigError, match="num_experts_per_tok 5 must be from 1 to"):
            ModelConfig.from_dict({**d, "num_experts_per_tok": 5})
        # transformers' windows: every Qwen3-MoE layer; Qwen3 from max_window_layers (28 when
        # left out), and its head_dim 128 when left out
        windowed = {**d, "use_sliding_window": True, "sliding_window": 4}
        assert ModelConfig.from_dict(windowed).sliding_windows == [4] * 4
        dense = {k: v for k, v in windowed.items() if k not in ("head_dim", "layer_types")}
        got = ModelConfig.from_dict({**dense, "model_type": "qwen3", "num_hidden_layers": 30})
        assert got.sliding_windows == [None] * 28 + [4, 4] and got.head_dim == 128
        assert ModelConfig.from_dict({**d, "num_local_experts": 0}).sparse_layers == []
    if arch == "qwen2_moe":  # transformers 5's windows (even layers below max_window_layers),
        # q/k/v biases (qkv_bias, on when left out), the shared expert's default width
        from expertswitch.models.config import ModelConfig

        d = {**config.to_dict(), "num_hidden_layers": 6, "use_sliding_window": True,
             "sliding_window": 4, "max_window_layers": 3}  # fmt: skip
        d.pop("layer_types", None)  # (a 4.x config.json has none)
        got = ModelConfig.from_dict(d)
        assert got.sliding_windows == [4, None, 4, None, None, None]
        assert got.qkv_bias and not got.o_bias
        assert not ModelConfig.from_dict({**d, "qkv_bias": False}).qkv_bias
        assert (
            ModelConfig.from_dict(  # null: as wide as the dense MLP (transformers 4.x)
                {**d, "shared_expert_intermediate_size": None}
            ).shared_expert_intermediate_size
            == 160
        )
        with pytest.raises(ConfigError, match="max_window_layers must be an integer"):
            ModelConfig.from_dict({**d, "max_window_layers": None})
        d.pop("shared_expert_intermediate_size")
        assert ModelConfig.from_dict(d).shared_expert_intermediate_size == 5632
    # transformers' defaults for a config.json that leaves the expert counts out
    from expertswitch.models.config import ModelConfig

    keys = ("num_local_experts", "num_experts", "num_experts_per_tok")
    bare = ModelConfig.from_dict({k: v for k, v in config.to_dict().items() if k not in keys})
    assert (bare.num_experts, bare.experts_per_token) == {
        "mixtral": (8, 2), "qwen2_moe": (60, 4), "qwen3_moe": (128, 8)}[arch]  # fmt: skip
    base, experts = make_family(tmp_path, config, n_experts=2, method=make_method("rtn", bits=4))
    entries = open_archive(experts[0][0]).entries
    for i, name in enumerate(names):
        assert f"model.layers.{moe[i % 2]}.{block}.{name}" in entries
    eng = Engine(base, {"e0": experts[0][0], "e1": experts[1][0]})
    ps = prompts(4)
    use = ["e0", None, "e1", "e0"]
    outs = eng.generate(ps, use, sampling=GREEDY)
    for p, u, o in zip(ps, use, outs):
        model = base if u is None else experts[int(u[1])][1]
        assert o.token_ids == hf_greedy(model, p, GREEDY.max_tokens), u
    assert outs[0].token_ids != eng.generate(ps[0], sampling=GREEDY)[0].token_ids
    # alone, each expert's rows take the per-row path for the whole batch
    assert eng.generate(ps[2], "e1", sampling=GREEDY)[0].token_ids == outs[2].token_ids
    # the delta term from the reference formula, and from the GPU's Triton kernel (one launch
    # for the experts of the rows routed to each MoE expert), gives the same tokens
    paths = ["reference"] + (["kernel"] if importlib.util.find_spec("triton") else [])
    for path in paths:  # (the interpreter is slow: two requests, four tokens)
        monkeypatch.setattr(layers, "DELTA_PATH", path)
        again = eng.generate([ps[0], ps[2]], ["e0", "e1"],
                             sampling=SamplingParams(temperature=0.0, max_tokens=4))  # fmt: skip
        assert [o.token_ids for o in again] == [outs[0].token_ids[:4], outs[2].token_ids[:4]]


def test_bad_input_gets_clear_errors(llama, llama_engine, tmp_path):
    base, experts = llama
    eng = llama_engine
    with pytest.raises(ConfigError, match="unknown expert 'nope'"):
        eng.add_request([1, 2, 3], "nope")
    with pytest.raises(ConfigError, match="empty"):
        eng.add_request([], None)
    with pytest.raises(ConfigError, match="context holds"):
        eng.add_request([5] * (eng.max_model_len + 3), None)
    with pytest.raises(ConfigError, match="max_tokens"):
        SamplingParams(max_tokens=0)
    with pytest.raises(ConfigError, match="no tokenizer"):
        eng.add_request("hello", None)
    with pytest.raises(ConfigError, match="prompts need"):
        eng.generate(prompts(2), expert=["e0"])
    # an archive made against another base: refused when registered
    other = tmp_path / "other"
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).save_pretrained(other)
    finetune_like_base = AutoModelForCausalLM.from_pretrained(other, dtype=torch.float32)
    finetune_like(finetune_like_base, seed=99)
    finetune_like_base.save_pretrained(other)
    with pytest.raises(CompatibilityError, match="different base"):
        Engine(other, {"e0": experts[0][0]})


def test_corrupt_archive_fails_only_its_requests(llama, solo, tmp_path):
    import shutil

    base, experts = llama
    ps, ref = solo
    bad = tmp_path / "bad"
    shutil.copytree(experts[1][0], bad)
    f = bad / "delta.safetensors"
    data = bytearray(f.read_bytes())
    data[-100] ^= 0xFF
    f.write_bytes(bytes(data))
    eng = Engine(base, {"good": experts[0][0], "bad": bad})
    outs = eng.generate([ps[0], ps[0], ps[1]], expert=["good", "bad", None], sampling=GREEDY)
    assert outs[0].token_ids == ref[(0, "e0")]
    assert outs[1].finish_reason == "error" and "checksum" in outs[1].error
    assert outs[2].token_ids == ref[(1, None)]
    # the engine keeps serving after the failure
    assert eng.generate(ps[2], "good", GREEDY)[0].token_ids == ref[(2, "e0")]


def test_sampling_seeded_stop_tokens_and_streaming(llama_engine, solo):
    ps, ref = solo
    eng = llama_engine
    sp = SamplingParams(temperature=0.8, top_p=0.9, top_k=50, seed=7, max_tokens=12)
    alone = eng.generate(ps[0], "e0", sp)[0].token_ids
    crowd = eng.generate([ps[1], ps[0], ps[2]], ["e1", "e0", None], [GREEDY, sp, GREEDY])
    assert crowd[1].token_ids == alone  # a seeded request ignores its batch
    assert eng.generate(ps[0], "e0", SamplingParams(top_k=1, seed=3, max_tokens=24))[0] \
        .token_ids == ref[(0, "e0")]  # fmt: skip
    target = ref[(1, "e1")]
    stop_at = target[5]
    out = eng.generate(ps[1], "e1", SamplingParams(temperature=0, stop_token_ids=[stop_at],
                                                   max_tokens=24))[0]  # fmt: skip
    assert out.token_ids == target[: target.index(stop_at) + 1]
    assert out.finish_reason == "stop" and out.stop_reason == stop_at
    streamed = [o.new_token_ids for o in eng.stream(ps[2], "e0", GREEDY)]
    assert all(len(n) == 1 for n in streamed)
    assert sum(streamed, []) == ref[(2, "e0")]


def test_mixed_batch_through_the_gpu_kernels(llama_engine, solo, monkeypatch):
    """The GPU paths (here in Triton's interpreter): MultiExpertLinear's delta kernel, one
    launch for all experts, and the paged-attention decode kernel reading the cache's blocks in
    place; tokens equal transformers' on the reconstructed checkpoints."""
    pytest.importorskip("triton")
    from expertswitch.kernels import delta_gemm, paged_attention
    from expertswitch.models import attention, layers

    calls = {"delta": 0, "attention": 0}

    def counting(module, fn, key):
        real = getattr(module, fn)

        def wrapped(*a, **k):
            calls[key] += 1
            return real(*a, **k)

        monkeypatch.setattr(module, fn, wrapped)

    monkeypatch.setattr(layers, "DELTA_PATH", "kernel")
    monkeypatch.setattr(attention, "ATTENTION_PATH", "kernel")
    counting(delta_gemm, "delta_matmul", "delta")
    counting(paged_attention, "paged_decode", "attention")
    ps, ref = solo
    combos = [(0, "e0"), (1, None), (2, "e1"), (1, "e0")]
    sp = SamplingParams(temperature=0.0, max_tokens=8)
    outs = llama_engine.generate([ps[i] for i, _ in combos], [e for _, e in combos], sp)
    assert calls["delta"] and calls["attention"]  # both kernels ran
    for (i, e), out in zip(combos, outs):
        assert out.token_ids == ref[(i, e)][:8], (i, e)


def test_sliding_window_through_the_attention_kernel(tmp_path, monkeypatch):
    """Mistral past its window (64) with the decode kernel forced: transformers' tokens."""
    pytest.importorskip("triton")
    from expertswitch.models import attention

    monkeypatch.setattr(attention, "ATTENTION_PATH", "kernel")
    base, experts = make_family(tmp_path, tiny_config("mistral"), n_experts=1)
    ((archive, rec),) = experts
    eng = Engine(base, {"x": archive})
    p = prompts(1, (60,))[0]
    sp = SamplingParams(temperature=0.0, max_tokens=12)
    assert eng.generate(p, "x", sp)[0].token_ids == hf_greedy(rec, p, 12)


def test_cpu_int4_deltas_score_like_the_exact_path(llama, solo):
    """cpu_int4_deltas (kernels/delta_cpu.to_int4): every expert's linear deltas held also in
    torch's int4 layout and computed by its CPU int4 matmul; prompt and generated logprobs
    within bf16 rounding of the exact fp32 path's, mixed batch; counted in the expert's
    bytes; on by default for bf16 engines only."""
    from expertswitch.kernels.delta_cpu import int4_available

    if not int4_available():
        pytest.skip("torch's CPU int4 matmul")
    base, experts = llama
    ps, _ = solo
    archives = {f"e{i}": a for i, (a, _) in enumerate(experts)}
    exact = Engine(base, archives)
    fast = Engine(base, archives, cpu_int4_deltas=True)
    sp = SamplingParams(temperature=0.0, max_tokens=8, logprobs=0, prompt_logprobs=0)
    use = ["e0", None, "e1"]
    a, b = exact.generate(ps, use, sp), fast.generate(ps, use, sp)
    diffs = [abs(x.logprob - y.logprob) for oa, ob in zip(a, b)
             for x, y in zip(oa.prompt_logprobs[1:], ob.prompt_logprobs[1:])]  # fmt: skip
    assert max(diffs) < 2e-2 and max(diffs) > 0  # the int4 path ran, and rounded to bf16
    w = fast._load("e0")
    assert len(w.cpu_int4) == len(w.deltas)  # every tiny-family delta fits the kernel
    assert w.nbytes() > exact._load("e0").nbytes()
    assert not exact.cpu_int4 and Engine(base, archives, dtype=torch.bfloat16).cpu_int4


def test_decode_graph_path_pads_and_equals_transformers(llama, solo, tmp_path, monkeypatch):
    """What a CUDA graph replays (engine/graphs.py), run on CPU without the capture: decode
    steps padded to their bucket (5 sequences → 8, 3 → 4), the layers on static buffers, the
    padding rows writing to the scratch block, through the delta and decode kernels (Triton's
    interpreter). Mixed experts and base rows get transformers' tokens; then Mistral past its
    sliding window."""
    pytest.importorskip("triton")
    from expertswitch.engine import graphs
    from expertswitch.models import attention, layers

    monkeypatch.setattr(graphs, "GRAPH_MODE", "static")
    monkeypatch.setattr(layers, "DELTA_PATH", "kernel")
    monkeypatch.setattr(attention, "ATTENTION_PATH", "kernel")
    base, experts = llama
    ps, ref = solo
    eng = Engine(base, {f"e{i}": a for i, (a, _) in enumerate(experts)}, num_kv_blocks=40,
                 block_size=4)  # fmt: skip
    scratch = eng.kv_cache[0][0][eng.blocks.num_blocks]
    scratch.fill_(7.0)
    sp = SamplingParams(temperature=0.0, max_tokens=5)
    for combos in ([(0, "e0"), (1, None), (2, "e1"), (1, "e0"), (0, None)],
                   [(2, None), (0, "e1"), (1, "e1")]):  # fmt: skip
        outs = eng.generate([ps[i] for i, _ in combos], [e for _, e in combos], sp)
        for (i, e), out in zip(combos, outs):
            assert out.token_ids == ref[(i, e)][:5], (i, e)
    graph = eng.runner.graphs
    assert graph.replays >= 2 * 4 and set(graph.static) == {4, 8}
    # the padding rows (zero inputs: zero keys) wrote to the scratch block's first slot only
    assert scratch[0].abs().sum() == 0 and bool((scratch[1:] == 7.0).all())
    # an engine that never pads: the same tokens (and it ran no static step)
    eager = Engine(base, {f"e{i}": a for i, (a, _) in enumerate(experts)}, enforce_eager=True)
    out = eager.generate(ps[0], "e0", sp)[0]
    assert out.token_ids == ref[(0, "e0")][:5] and eager.runner.graphs is None
    mistral, (m_exp,) = make_family(tmp_path, tiny_config("mistral"), n_experts=1)
    eng = Engine(mistral, {"x": m_exp[0]})
    p = prompts(1, (62,))[0]  # 62 + 6 tokens: past the window of 64
    outs = eng.generate([p, p[:50]], ["x", None], SamplingParams(temperature=0.0, max_tokens=6))
    assert outs[0].token_ids == hf_greedy(m_exp[1], p, 6)
    assert outs[1].token_ids == hf_greedy(mistral, p[:50], 6)
    assert eng.runner.graphs.replays == 5


def test_decode_graphs_leave_out_what_they_cannot_capture(tmp_path, monkeypatch):
    """Experts that change a Mixtral MoE block run eagerly (their rows are gathered by host-side
    index lists); the base's decode steps on the same engine take the graph path."""
    pytest.importorskip("triton")
    from expertswitch.engine import graphs
    from expertswitch.models import attention

    monkeypatch.setattr(graphs, "GRAPH_MODE", "static")
    monkeypatch.setattr(attention, "ATTENTION_PATH", "kernel")
    base, experts = make_family(tmp_path, tiny_config("mixtral"), n_experts=1,
                                method=make_method("rtn", bits=4))  # fmt: skip
    eng = Engine(base, {"m": experts[0][0]})
    p = prompts(1)[0]
    sp = SamplingParams(temperature=0.0, max_tokens=6)
    assert eng.generate(p, "m", sp)[0].token_ids == hf_greedy(experts[0][1], p, 6)
    assert eng.runner.graphs.replays == 0
    assert eng.generate(p, None, sp)[0].token_ids == hf_greedy(base, p, 6)
    assert eng.runner.graphs.replays == 5
    assert graphs.buckets(64)[:5] == [1, 2, 4, 8, 16] and graphs.buckets(64)[-1] == 64
    assert graphs.buckets(20) == [1, 2, 4, 8, 16, 24]


@pytest.mark.gpu
def test_decode_graphs_on_gpu_equal_eager_and_transformers(llama, solo):
    """CUDA graphs captured and replayed: 5 sequences in the bucket of 8, whose per-expert row
    counts change as they finish; then two more expert sets (each recaptured, in a fresh
    pool). Tokens and logprobs equal the eager engine's; tokens up to EOS equal transformers'."""
    from expertswitch.engine import graphs

    base, experts = llama
    ps, ref = solo
    archives = {f"e{i}": a for i, (a, _) in enumerate(experts)}
    runs = [[(0, "e0"), (1, None), (2, "e1"), (1, "e0"), (0, None)],
            [(0, "e1"), (1, "e1")], [(2, "e0"), (1, None), (0, "e0")]]  # fmt: skip
    n = graphs.STEADY_STEPS + 12
    outs = {}
    for eager in (False, True):
        eng = Engine(base, archives, device="cuda", enforce_eager=eager)
        outs[eager] = []
        for combos in runs:
            lens = [n - 4 * k for k in range(len(combos))]  # finishing one by one
            sps = [SamplingParams(temperature=0.0, max_tokens=m, logprobs=1, ignore_eos=True)
                   for m in lens]  # fmt: skip
            outs[eager] += eng.generate([ps[i] for i, _ in combos], [e for _, e in combos], sps)
        if not eager:
            g = eng.runner.graphs
            assert not g.broken and g.captures >= 3 and g.replays >= 3 * 4, g.stats()
    eos = 2  # tiny_config's eos_token_id
    for (i, e), out in zip(sum(runs, []), outs[False]):
        mine, theirs = out.token_ids, ref[(i, e)]
        cut = mine.index(eos) + 1 if eos in mine else len(mine)
        assert mine[:cut] == theirs[:cut], (i, e)
    for a, b in zip(outs[False], outs[True]):
        assert a.token_ids == b.token_ids
        assert max(abs(x.logprob - y.logprob) for x, y in zip(a.logprobs, b.logprobs)) < 1e-4


@pytest.mark.gpu
def test_engine_on_gpu_equals_transformers(llama, solo):
    """fp32 on the GPU: the delta kernel (IEEE fp32 dots) and the torch attention path."""
    base, experts = llama
    ps, ref = solo
    eng = Engine(base, {f"e{i}": a for i, (a, _) in enumerate(experts)}, device="cuda")
    combos = [(0, "e0"), (1, None), (2, "e1"), (1, "e0")]
    outs = eng.generate([ps[i] for i, _ in combos], [e for _, e in combos], GREEDY)
    for (i, e), out in zip(combos, outs):
        assert out.token_ids == ref[(i, e)], (i, e)


@pytest.mark.gpu
@pytest.mark.parametrize("arch", ["gemma2", "gemma3"])
def test_gemma2_on_gpu_caps_in_the_decode_kernel_and_graphs(tmp_path, monkeypatch, arch):
    """fp32 on the GPU: Gemma 2's soft-capped scores in the Triton decode kernel, and Gemma
    3's two RoPEs, replayed from decode graphs, give the CPU engine's tokens and logprobs
    (which equal transformers': test_gemma_norms_scaled_embeddings_and_soft_caps,
    test_gemma3_local_and_global_rope_and_qk_norms)."""
    from expertswitch.engine import graphs

    config = gemma_config("gemma2") if arch == "gemma2" else gemma3_config()
    base, ((archive, _),) = make_family(tmp_path, config, n_experts=1)
    ps = prompts(2, (9, 30))
    sp = SamplingParams(temperature=0.0, max_tokens=24, logprobs=0)
    want = Engine(base, {"x": archive}).generate(ps + ps, ["x", "x", None, None], sp)
    monkeypatch.setattr(graphs, "GRAPH_MODE", "static")
    eng = Engine(base, {"x": archive}, device="cuda")
    same_tokens_and_logprobs(eng.generate(ps + ps, ["x", "x", None, None], sp), want, 1e-4)
    assert eng.runner.graphs.replays > 0


def test_reconstruct_in_float32_keeps_the_delta(tmp_path):
    """A bf16 expert rebuilt with dtype=float32: every floating tensor and config.json say
    float32, and base + Δ̂ is not rounded to bf16 (what the engine computes)."""
    import json

    from conftest import save_pair
    from safetensors import safe_open

    base, expert = save_pair(tmp_path, "llama", dtype=torch.bfloat16)
    archive = compress_expert(base, expert, tmp_path / "a", make_method("rtn", bits=4), OPTS)
    rec = reconstruct(base, archive, tmp_path / "rec", progress=False, dtype=torch.float32)
    with safe_open(str(rec / "model.safetensors"), framework="pt") as f:
        name = "model.layers.0.mlp.up_proj.weight"
        assert all(f.get_tensor(k).dtype == torch.float32 for k in f.keys())  # noqa: SIM118
        got = f.get_tensor(name)
    assert json.loads((rec / "config.json").read_text())["dtype"] == "float32"
    from expertswitch.compress.packed import PackedDelta
    from expertswitch.io.checkpoint import open_checkpoint

    a = open_archive(archive)
    delta = PackedDelta.from_parts(a.entries[name].meta, a.parts(name)).dequantize()
    assert torch.equal(got, open_checkpoint(base).get(name).float() + delta)


@pytest.mark.parametrize("arch", ["llama", "mistral"])
def test_attention_one_sequence_at_a_time(arch, llama_engine, solo, tmp_path, monkeypatch):
    """The per-sequence attention path (taken when a padded batch would be huge or a prompt
    is long), forced for every step, one sequence alone included: causal without a mask for
    whole prompts, masks for decode and the window."""
    from expertswitch.models import attention

    monkeypatch.setattr(attention, "PADDED_LIMIT", 0)
    monkeypatch.setattr(attention, "LONG_PREFILL", 1)
    monkeypatch.setattr(attention, "ATTENTION_PATH", "torch")
    if arch == "llama":
        ps, ref = solo
        combos = [(0, "e0"), (1, None), (2, "e1")]
        outs = llama_engine.generate([ps[i] for i, _ in combos], [e for _, e in combos], GREEDY)
        assert [o.token_ids for o in outs] == [ref[c] for c in combos]
        return
    base, experts = make_family(tmp_path, tiny_config("mistral"), n_experts=1)
    ((archive, rec),) = experts
    eng = Engine(base, {"x": archive})
    ps = prompts(2, (60, 9))
    outs = eng.generate(ps, ["x", None], SamplingParams(temperature=0.0, max_tokens=12))
    assert outs[0].token_ids == hf_greedy(rec, ps[0], 12)
    assert outs[1].token_ids == hf_greedy(base, ps[1], 12)


def hf_beam_search(model_dir: Path, prompt: list[int], width: int, n: int, eos: set[int],
                   length_penalty: float = 1.0) -> list[tuple[list[int], float, bool]]:  # fmt: skip
    """Beam search written out over transformers' log-softmax (vLLM's rule: 2·width
    candidates a beam, score = cumulative logprob / (prompt + generated)^length_penalty)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()

    def score(b):
        return b[1] / (len(prompt) + len(b[0])) ** length_penalty

    live, done = [([], 0.0, False)], []
    for _ in range(n):
        grown = []
        for toks, cum, _ in live:
            with torch.no_grad():
                logits = model(torch.tensor([prompt + toks])).logits[0, -1].float()
            top = torch.log_softmax(logits, -1).topk(2 * width)
            for t, lp in zip(top.indices.tolist(), top.values.tolist()):
                if t in eos:  # finished, the EOS token left out of its tokens
                    done.append((toks, cum + lp, True))
                else:
                    grown.append((toks + [t], cum + lp, False))
        live = sorted(grown, key=score, reverse=True)[:width]
    return sorted(done + live, key=score, reverse=True)[:width]


@pytest.mark.parametrize("expert, width, penalty", [("e0", 3, 1.0), (None, 2, 0.5)])
def test_beam_search_equals_a_beam_search_over_transformers(llama, llama_engine, expert, width,
                                                            penalty):  # fmt: skip
    from expertswitch.engine import BeamSearchParams

    base, experts = llama
    model_dir = base if expert is None else experts[int(expert[1])][1]
    p = prompts(1, (7,))[0]
    params = BeamSearchParams(beam_width=width, max_tokens=6, length_penalty=penalty)
    got = llama_engine.beam_search(p, expert, params)
    want = hf_beam_search(model_dir, p, width, 6, set(llama_engine.registry.eos(expert)), penalty)
    assert [o.token_ids for o in got] == [t for t, _, _ in want]
    assert [o.cumulative_logprob for o in got] == pytest.approx([c for _, c, _ in want], abs=1e-4)
    assert [o.finish_reason for o in got] == ["stop" if e else "length" for _, _, e in want]
    with pytest.raises(ConfigError, match="beam width"):
        BeamSearchParams(beam_width=11, max_tokens=4)
    with pytest.raises(ConfigError, match="params must be a BeamSearchParams, got dict"):
        llama_engine.beam_search(p, expert, {"beam_width": 2})
    with pytest.raises(ConfigError, match="the context holds .* lower max_tokens"):
        llama_engine.beam_search(p, expert, BeamSearchParams(2, llama_engine.max_model_len))


def test_beam_search_bookkeeping_on_given_logprobs():
    """BeamSearch on hand-made step outputs: EOS candidates finish (kept only with
    include_stop_str_in_output; the score's length then leaves the EOS out), the sampled
    token joins the candidates when outside the top, the best beams rank finished and live
    together, and ignore_eos keeps extending."""
    from expertswitch.engine.beam import BeamSearch, BeamSearchParams
    from expertswitch.engine.request import Logprob, RequestOutput

    def out(top, sampled=None):
        token, lp = sampled or top[0]
        return RequestOutput("r", [], [token], None, None, True, "length",
                             logprobs=[Logprob(token, lp, top)])  # fmt: skip

    for keep in (False, True):
        s = BeamSearch([5, 6], BeamSearchParams(2, 3, include_stop_str_in_output=keep), {2})
        s.advance([out([(2, -0.1), (7, -1.0), (8, -2.0), (9, -3.0)])])
        assert [b.tokens for b in s.live] == [[7], [8]] and len(s.finished) == 1
        assert s.finished[0].tokens == ([2] if keep else [])
        assert s.score(s.finished[0]) == pytest.approx(-0.1 / 2)  # prompt only: EOS left out
        s.advance([out([(3, -0.5), (4, -0.6)], sampled=(10, -0.05)), out([(3, -0.1), (4, -9)])])
        assert [b.tokens for b in s.live] == [[7, 10], [7, 3]]  # −1.05, −1.5 (then [8, 3])
        assert s.best()[0].eos and s.best()[0].cum_logprob == -0.1  # −0.05 a token
    s = BeamSearch([5], BeamSearchParams(1, 2, ignore_eos=True), {2})
    s.advance([out([(2, -0.1), (7, -1.0)])])
    assert [b.tokens for b in s.live] == [[2]] and not s.finished
    s.advance([out([(2, -0.1), (7, -1.0)])])
    assert s.done and s.best()[0].tokens == [2, 2]
    # several EOS ids (Llama 3's three): a beam finishes once, on the likeliest
    s = BeamSearch([5], BeamSearchParams(2, 4), {2, 3})
    s.advance([out([(7, -0.5), (3, -0.7), (2, -0.9), (8, -3.0)])])
    assert [(b.tokens, b.cum_logprob) for b in s.finished] == [([], -0.7)]
    # settled: no live beam can still beat the width-th finished one (cum only falls), so
    # the search ends before max_tokens with the answer it would end with
    s = BeamSearch([5], BeamSearchParams(1, 50), {2})
    s.advance([out([(2, -0.01), (7, -4.0)])])
    assert s.done and s.steps == 1 and s.best()[0].eos
    s = BeamSearch([5], BeamSearchParams(1, 50), {2})  # (a live beam that could still win)
    s.advance([out([(2, -3.0), (7, -0.5)])])
    assert not s.done
    with pytest.raises(ConfigError, match="length_penalty must be from -16 to 16"):
        BeamSearchParams(2, 4, length_penalty=400)


@pytest.mark.parametrize("change, tensor, says", [
    ({"intermediate_size": 200}, "mlp.gate_proj.weight", "intermediate_size"),
    ({"num_key_value_heads": 4}, "k_proj.weight", "num_key_value_heads"),
    ({"head_dim": 8}, "q_proj.weight", "num_attention_heads · head_dim"),
    ({"vocab_size": 300}, "embed_tokens.weight", "vocab_size"),
    ({"hidden_size": 96}, "embed_tokens.weight", "hidden_size"),
])  # fmt: skip
def test_a_config_that_does_not_describe_the_weights_is_refused(llama, tmp_path, change,
                                                                tensor, says):  # fmt: skip
    """A config.json that does not match its weights (damaged, or from another model) is a
    CheckpointError naming the tensor, both shapes and the config keys — not a failure
    inside a matmul at the first request, nor an engine that runs on misread weights."""
    from expertswitch.errors import CheckpointError

    base, _ = llama
    bad = tmp_path / "bad"
    shutil.copytree(base, bad)
    cfg = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**cfg, **change}))
    with pytest.raises(CheckpointError, match=f"{tensor} is .*but config.json makes it") as e:
        Engine(bad)
    assert says in str(e.value)
