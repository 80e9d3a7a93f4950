"""The engine's request life cycle under misuse and pressure: bad parameters, aborts, ids,
outputs of other requests, experts that do not fit, per-expert EOS, re-registration."""

import json
import shutil

import pytest
from test_engine import GREEDY, hf_greedy, llama, prompts, solo  # noqa: F401 (fixtures)

from expertswitch.cli import main
from expertswitch.engine import Engine, SamplingParams
from expertswitch.engine.config import EngineConfig
from expertswitch.errors import ConfigError


@pytest.fixture(scope="module")
def engine(llama):  # noqa: F811
    base, experts = llama
    return Engine(base, {f"e{i}": a for i, (a, _) in enumerate(experts)})


@pytest.mark.parametrize("bad", [
    {"temperature": float("inf")}, {"temperature": float("nan")}, {"temperature": -1},
    {"top_k": 2.5}, {"top_k": -2}, {"top_p": 0}, {"seed": 2**70}, {"seed": -1},
    {"max_tokens": True}, {"stop_token_ids": [True]}, {"stop": [""]},
])  # fmt: skip
def test_bad_sampling_params_are_refused(bad):
    with pytest.raises(ConfigError):
        SamplingParams(**bad)


def test_tiny_temperature_is_greedy_and_one_bad_row_fails_alone(engine, solo):  # noqa: F811
    ps, ref = solo
    out = engine.generate(ps[0], "e0", SamplingParams(temperature=1e-40, max_tokens=24))[0]
    assert out.token_ids == ref[(0, "e0")]
    # a request whose logits cannot be sampled (forced NaN) fails; its batch goes on
    import expertswitch.engine.engine as engine_module

    real = engine_module.sample

    def poisoned(logits, reqs, *eos):
        logits = logits.clone()  # an inference-mode tensor: no in-place writes outside it
        logits[[r.request_id == "poison" for r in reqs]] = float("nan")
        return real(logits, reqs, *eos)

    engine_module.sample = poisoned
    try:
        engine.add_request(ps[1], "e1", SamplingParams(temperature=1.0, max_tokens=5),
                           request_id="poison")  # fmt: skip
        outs = engine.generate(ps[0], "e0", GREEDY)
    finally:
        engine_module.sample = real
    assert outs[0].token_ids == ref[(0, "e0")]
    poisoned_out = [o for o in engine.step() if o.request_id == "poison"]
    assert poisoned_out and poisoned_out[0].finish_reason == "error"
    assert "NaN" in poisoned_out[0].error
    assert not engine.has_unfinished()


def test_sampling_samples_and_top_p_narrows(engine, solo):  # noqa: F811
    ps, ref = solo
    runs = {tuple(engine.generate(ps[1], "e1", SamplingParams(temperature=1.5, seed=s,
                                                              max_tokens=12))[0].token_ids)
            for s in range(4)}  # fmt: skip
    assert len(runs) > 1  # temperature > 0 does sample
    narrow = engine.generate(ps[1], "e1", SamplingParams(temperature=1.5, top_p=1e-6, seed=0,
                                                         max_tokens=24))[0]  # fmt: skip
    assert narrow.token_ids == ref[(1, "e1")]  # only the most likely token survives top-p


def test_abort_outputs_and_ids(engine, solo):  # noqa: F811
    ps, ref = solo
    engine.add_request(ps[0], "e0", GREEDY, request_id="a")
    engine.step()
    engine.abort("a")
    outs = engine.step()
    aborted = [o for o in outs if o.request_id == "a"]
    assert aborted and aborted[0].finish_reason == "abort" and aborted[0].finished
    assert not engine.has_unfinished() and engine.blocks.num_free == engine.blocks.num_blocks
    engine.add_request(ps[0], "e0", GREEDY, request_id="a")  # the id is free again
    engine.abort("a")
    engine.step()
    rid = engine.add_request(ps[0], None, GREEDY, request_id="req-0")
    auto = engine.add_request(ps[0], None, GREEDY)  # never collides with a caller's id
    assert auto != rid
    with pytest.raises(ConfigError, match="already in use"):
        engine.add_request(ps[0], None, GREEDY, request_id=auto)
    for r in (rid, auto):
        engine.abort(r)
    engine.step()


def test_generate_keeps_other_requests_outputs(engine, solo):  # noqa: F811
    ps, ref = solo
    other = engine.add_request(ps[2], "e1", GREEDY)
    mine = engine.generate(ps[0], None, GREEDY)[0]
    streamed = [o.new_token_ids for o in engine.stream(ps[1], "e0", GREEDY)]
    assert mine.token_ids == ref[(0, None)] and sum(streamed, []) == ref[(1, "e0")]
    seen: list[int] = []
    while True:
        outs = [o for o in engine.step() if o.request_id == other]
        seen += sum((o.new_token_ids for o in outs), [])
        if any(o.finished for o in outs):
            break
    assert seen == ref[(2, "e1")]


def test_generate_checks_every_prompt_before_queueing(engine):
    with pytest.raises(ConfigError, match="empty"):
        engine.generate([[5, 6], [7], []], None, GREEDY)
    assert not engine.has_unfinished()


def test_engine_limits_are_validated(llama):  # noqa: F811
    base, _ = llama
    bads = (
        {"max_num_seqs": 0},
        {"block_size": 0},
        {"max_active_experts": 0},
        {"num_kv_blocks": -3},
        {"max_model_len": 1},
        {"max_num_batched_tokens": 1.5},
        {"long_prefill_token_threshold": -1},
        {"long_prefill_token_threshold": 8, "enable_chunked_prefill": False},
    )
    for bad in bads:
        with pytest.raises(ConfigError):
            Engine(base, **bad)
    with pytest.raises(ConfigError, match="unknown engine option"):
        Engine(base, max_seqs=4)
    with pytest.raises(ConfigError, match="not both"):
        Engine(base, config=EngineConfig(), block_size=8)


def _finish_steps(eng, submit_late):
    """Steps until every request finished: {request id: the step it finished at}, the late
    request (submit_late(eng) → its id) added after the second step."""
    done, step, late = {}, 0, None
    while eng.has_unfinished() or late is None:
        if step == 2:
            late = submit_late(eng)
        for out in eng.step():
            if out.finished:
                done[out.request_id] = (step, out)
        step += 1
    return done, late


def test_priority_scheduling_preempts_for_an_urgent_request(llama, solo):  # noqa: F811
    """scheduling_policy="priority": a request of a lower priority value that arrives while
    the sequence slots are full preempts the running request that comes last and finishes
    long before it would under fcfs; every request still gets transformers' own tokens (the
    preempted one recomputed). Under fcfs a priority is refused, as vLLM does."""
    base, experts = llama
    ps, ref = solo
    finish = {}
    for policy in ("fcfs", "priority"):
        eng = Engine(base, {"e0": experts[0][0]}, max_num_seqs=3, scheduling_policy=policy)
        low = 1 if policy == "priority" else 0
        for i in range(3):
            eng.add_request(ps[i], "e0", GREEDY, f"low{i}", priority=low)
        done, late = _finish_steps(eng, lambda e, low=low: e.add_request(
            ps[1], "e0", GREEDY, "urgent", priority=low - 1 if low else 0))  # fmt: skip
        for rid, (_, out) in done.items():
            i = 1 if rid == "urgent" else int(rid[-1])
            assert out.token_ids == ref[(i, "e0")], (policy, rid)
        finish[policy] = done["urgent"][0]
        if policy == "priority":  # the last low request made room, and finished after it
            assert eng.scheduler.preemptions >= 1
            assert done["low2"][0] > done["urgent"][0]
    steps = GREEDY.max_tokens
    assert finish["priority"] <= 2 + steps + 2 < finish["fcfs"], finish
    eng = Engine(base, {})
    with pytest.raises(ConfigError, match="needs priority scheduling: start the engine with "
                       "scheduling_policy='priority'"):  # fmt: skip
        eng.add_request(ps[0], None, GREEDY, priority=3)
    with pytest.raises(ConfigError, match="priority must be an integer"):
        Engine(base, {}, scheduling_policy="priority").add_request(ps[0], None, priority=0.5)
    with pytest.raises(ConfigError, match="scheduling_policy must be 'fcfs' or 'priority'"):
        Engine(base, {}, scheduling_policy="lifo")


def test_experts_that_do_not_fit_wait_instead_of_failing(llama, solo):  # noqa: F811
    """A device budget for one expert: a batch over two experts is served one expert at a
    time, every request with its own tokens."""
    base, experts = llama
    ps, ref = solo
    probe = Engine(base, {"e0": experts[0][0]})
    one = probe.pool.get("e0").nbytes()
    eng = Engine(base, {"e0": experts[0][0], "e1": experts[1][0]},
                 device_budget_bytes=int(one * 1.5))  # fmt: skip
    combos = [(0, "e0"), (1, "e1"), (2, "e0"), (0, "e1"), (1, None)]
    outs = eng.generate([ps[i] for i, _ in combos], [e for _, e in combos], GREEDY)
    for (i, e), out in zip(combos, outs):
        assert out.finish_reason != "error", out.error
        assert out.token_ids == ref[(i, e)], (i, e)


def test_prefetch_never_evicts_running_experts(llama):  # noqa: F811
    base, experts = llama
    probe = Engine(base, {"e0": experts[0][0]})
    one = probe.pool.get("e0").nbytes()
    eng = Engine(base, {"e0": experts[0][0], "e1": experts[1][0]},
                 device_budget_bytes=int(one * 1.5))  # fmt: skip
    sp = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    eng.add_request(prompts(1)[0], "e0", sp)
    eng.step()
    eng.step()
    eng.add_request(prompts(1)[0], "e1", sp)  # its prefetch finds no room: e0 is running
    eng.pool.close()  # wait for the prefetch thread
    assert eng.pool.residency()["e0"] == "device"
    assert eng.pool.stats()["evictions_device"] == 0


def test_reregistering_and_reserved_names(llama, solo):  # noqa: F811
    base, experts = llama
    ps, ref = solo
    eng = Engine(base, {"x": experts[0][0]})
    assert eng.generate(ps[0], "x", GREEDY)[0].token_ids == ref[(0, "e0")]
    with pytest.raises(ConfigError, match="already registered"):
        eng.add_expert("x", experts[1][0])
    eng.remove_expert("x")
    eng.add_expert("x", experts[1][0])
    assert eng.generate(ps[0], "x", GREEDY)[0].token_ids == ref[(0, "e1")]  # the new weights
    for name in ("base", "auto", "__base__", ""):
        with pytest.raises(ConfigError, match="reserved"):
            eng.add_expert(name, experts[0][0])
    eng.add_request(ps[0], "x", GREEDY, request_id="busy")
    with pytest.raises(ConfigError, match="still serves"):
        eng.remove_expert("x")


def test_each_expert_stops_at_its_own_eos(llama, tmp_path):  # noqa: F811
    """A chat fine-tune declares another EOS than its base (e.g. <|im_end|>): the engine stops
    that expert's requests there, as transformers does on the reconstruction."""
    base, experts = llama
    archive, rec = experts[0]
    p = prompts(1)[0]
    full = hf_greedy(rec, p, 24)
    eos = full[3]
    arch2, rec2 = tmp_path / "arch", tmp_path / "rec"
    shutil.copytree(archive, arch2)
    shutil.copytree(rec, rec2)
    for d in (arch2, rec2):
        cfg = json.loads((d / "config.json").read_text())
        cfg["eos_token_id"] = eos
        (d / "config.json").write_text(json.dumps(cfg))
        gen = d / "generation_config.json"
        if gen.is_file():
            g = json.loads(gen.read_text())
            g["eos_token_id"] = eos
            gen.write_text(json.dumps(g))
    # the archive re-records its edited files (a plain edit is refused: test_archive_safety)
    from expertswitch.io.archive import file_checksum, sealed

    m = json.loads((arch2 / "expert.json").read_text())
    for name in m["files"]:
        m["files"][name] = {"bytes": (arch2 / name).stat().st_size,
                            "sha256": file_checksum(arch2 / name)}  # fmt: skip
    (arch2 / "expert.json").write_text(json.dumps(sealed(m)))
    eng = Engine(base, {"chat": arch2, "plain": archive})
    outs = eng.generate([p, p], ["chat", "plain"], GREEDY)
    assert outs[0].token_ids == hf_greedy(rec2, p, 24) == full[: full.index(eos) + 1]
    assert outs[0].finish_reason == "stop"
    assert outs[1].token_ids == full  # the other expert keeps the base's EOS


def test_generate_command_without_tokenizer_prints_ids(llama, capsys):  # noqa: F811
    base, experts = llama
    argv = ["generate", "--base", str(base), "--expert", f"x={experts[0][0]}",
            "--prompt-ids", "5,6,7", "--use", "x", "--max-tokens", "4"]  # fmt: skip
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "[x] '5,6,7' -> '" in out and "''" not in out
    from expertswitch.kernels.delta_cpu import int4_available

    if int4_available():  # the same greedy answer through the int4 delta matmul (4 tokens)
        assert main(argv + ["--cpu-int4-deltas", "--enforce-eager"]) == 0
        assert capsys.readouterr().out == out
    assert main(["generate", "--base", str(base), "--expert", f"base={experts[0][0]}",
                 "--prompt-ids", "5"]) == 2  # fmt: skip
    assert "reserved" in capsys.readouterr().err
    # the step flags reach the engine: one request at a time gives the same two answers
    two = argv + ["--prompt-ids", "9,8"]
    assert main(two) == 0
    both = capsys.readouterr().out
    assert main(two + ["--max-num-seqs", "1", "--max-num-batched-tokens", "2"]) == 0
    assert capsys.readouterr().out == both and both.startswith(out)
    assert main(argv + ["--max-model-len", "5"]) == 0  # 3 prompt tokens leave room for 2
    ids = out.split(" -> '")[1].split("'")[0].split()
    cut = out.replace(" ".join(ids), " ".join(ids[:2]))
    assert len(ids) == 4 and capsys.readouterr().out == cut
    assert main(argv + ["--max-model-len", "3"]) == 2  # no room for one token
    assert "the context holds 3" in capsys.readouterr().err


def test_stream_ends_after_abort_and_caps_come_back(llama, solo):  # noqa: F811
    base, experts = llama
    ps, _ = solo
    eng = Engine(base, {"e0": experts[0][0]})
    stream = eng.stream(ps[0], "e0", SamplingParams(temperature=0.0, max_tokens=20))
    first = next(stream)
    eng.abort(first.request_id)
    rest = list(stream)  # ends: its final output is the abort
    assert rest and rest[-1].finish_reason == "abort"
    # a cap learned while the device was full is dropped once nothing is held
    eng.scheduler.max_active_experts = 1
    eng.generate(ps[0], "e0", GREEDY)
    assert eng.scheduler.max_active_experts is None


def test_mixed_formats_and_odd_head_dims_through_the_gpu_paths(tmp_path, monkeypatch):
    """Experts compressed at 2 and 4 bits in one batch (one kernel launch per format), and a
    head dim of 24, which the attention kernel does not take (torch path instead)."""
    pytest.importorskip("triton")
    from test_engine import make_family
    from transformers import LlamaConfig

    from expertswitch.compress import CompressOptions, compress_expert, make_method, reconstruct
    from expertswitch.compress.calibration import CalibOptions
    from expertswitch.models import attention, layers

    monkeypatch.setattr(layers, "DELTA_PATH", "kernel")
    monkeypatch.setattr(attention, "ATTENTION_PATH", "kernel")
    config = LlamaConfig(hidden_size=96, intermediate_size=160, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=256,
                         max_position_embeddings=256)  # fmt: skip
    base, experts = make_family(tmp_path, config, n_experts=1)
    opts = CompressOptions(
        calib=CalibOptions(tokenizer="bytes", tokens=256, seq_len=64), progress=False
    )
    four = compress_expert(base, tmp_path / "expert0", tmp_path / "four",
                           make_method("mixed", bits=4), opts)  # fmt: skip
    rec4 = reconstruct(base, four, tmp_path / "rec4", progress=False)
    eng = Engine(base, {"two": experts[0][0], "four": four})
    p = prompts(1)[0]
    n = 8  # interpreted kernels: ~2 s a decode step; 8 steps show the formats apart
    outs = eng.generate(
        [p, p, p], ["two", "four", None], SamplingParams(temperature=0, max_tokens=n)
    )
    assert outs[0].token_ids == hf_greedy(experts[0][1], p, n)
    assert outs[1].token_ids == hf_greedy(rec4, p, n)
    assert outs[2].token_ids == hf_greedy(base, p, n)
    assert len({tuple(o.token_ids) for o in outs}) == 3  # the three answers differ


@pytest.mark.parametrize("kind", ["bpe", "wordpiece"])
def test_decode_ids_equals_the_tokenizers_decode(kind, monkeypatch):
    """engine/tokenizer.decode_ids (the answer's text at every token, past transformers'
    per-element conversion) gives what `tok.decode` gives, special tokens skipped or kept, for
    a byte-level BPE and a WordPiece tokenizer whose clean-up of spaces applies; a tokenizer
    class that overrides `decode` is decoded through its own `decode`."""
    import random

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from expertswitch.engine.tokenizer import _plain_decode, decode_ids

    texts = ["def f(x):\n    return x + 1  # a comment, isn't it?", "Hello , world ! 12 + 3 = 15 ."]
    specials = ["[UNK]", "<s>", "</s>"]
    if kind == "bpe":
        raw = Tokenizer(models.BPE())
        raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        raw.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=specials,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                      show_progress=False)  # fmt: skip
    else:
        raw = Tokenizer(models.WordPiece(unk_token="[UNK]"))
        raw.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        raw.decoder = decoders.WordPiece()
        trainer = trainers.WordPieceTrainer(vocab_size=200, special_tokens=specials,
                                            show_progress=False)  # fmt: skip
    raw.train_from_iterator(texts * 20, trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<s>", eos_token="</s>",
                                  unk_token="[UNK]",
                                  clean_up_tokenization_spaces=kind == "wordpiece")  # fmt: skip
    rng = random.Random(0)
    seqs = [tok.encode(t) for t in texts] + [[rng.randrange(len(tok)) for _ in range(n)]
                                             for n in (0, 1, 7, 40)]  # fmt: skip
    seqs.append([tok.bos_token_id, *tok.encode(texts[1]), tok.eos_token_id])
    for ids in seqs:
        for skip in (True, False):
            assert decode_ids(tok, ids, skip) == tok.decode(ids, skip_special_tokens=skip)
    # the fast path is the one taken: transformers' per-element conversion never runs
    import transformers.tokenization_utils_base as base_mod

    assert _plain_decode(PreTrainedTokenizerFast)
    want = tok.decode(seqs[0], skip_special_tokens=True)
    monkeypatch.setattr(base_mod, "to_py_obj", lambda x: pytest.fail("decode() was called"))
    assert decode_ids(tok, seqs[0], True) == want
    monkeypatch.undo()

    class Own(PreTrainedTokenizerFast):
        def decode(self, token_ids, skip_special_tokens=False, **kw):
            return "own:" + super().decode(token_ids, skip_special_tokens=skip_special_tokens)

    own = Own(tokenizer_object=raw, eos_token="</s>")
    plain = PreTrainedTokenizerFast.decode(own, seqs[0], skip_special_tokens=True)
    assert decode_ids(own, seqs[0], True) == "own:" + plain
