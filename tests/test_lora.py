"""PEFT LoRA adapters served as experts (io/lora.py, models/layers.add_lora) against PEFT itself:
adapters written by PEFT's own save_pretrained on tiny real checkpoints, the reference tokens
from PEFT's PeftModel over transformers (unmerged, fp32)."""

import collections
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from conftest import make_adapter, peft_greedy, tiny_config

from expertswitch.engine import Engine, SamplingParams
from expertswitch.errors import (
    CheckpointError,
    CompatibilityError,
    ConfigError,
    ExpertSwitchError,
)

peft = pytest.importorskip("peft", reason="PEFT writes the adapters and is their oracle")

LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
GREEDY = SamplingParams(temperature=0.0, max_tokens=12)
PROMPTS = [[3, 17, 99, 4, 250, 7], [12, 13, 14], [200, 1, 5, 9, 31, 64, 2, 8, 100, 42, 11]]


def _scale_norm(model):
    norm = model.base_model.model.model.norm.modules_to_save["default"]
    norm.weight.mul_(torch.linspace(0.5, 1.5, norm.weight.numel()))


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """A tiny Llama base and two adapters: `a` on every linear, the embedding and lm_head with
    per-module rank and alpha; `b` rank-stabilised on three projections with the final norm
    replaced whole (modules_to_save)."""
    from transformers import LlamaForCausalLM

    root = tmp_path_factory.mktemp("lora")
    torch.manual_seed(0)
    LlamaForCausalLM(tiny_config()).save_pretrained(root / "base")
    base = root / "base"
    a = make_adapter(base, root / "a", 1, LINEARS + ["embed_tokens", "lm_head"],
                     rank_pattern={"v_proj": 2}, alpha_pattern={"o_proj": 3})  # fmt: skip
    b = make_adapter(base, root / "b", 2, ["q_proj", "v_proj", "down_proj"], r=8, alpha=4,
                     use_rslora=True, modules_to_save=["norm"], tweak=_scale_norm)  # fmt: skip
    ref = {(i, e): peft_greedy(base, {"a": a, "b": b}.get(e), p, GREEDY.max_tokens)
           for i, p in enumerate(PROMPTS) for e in ("a", "b", None)}  # fmt: skip
    return base, {"a": a, "b": b}, ref


def test_adapters_alone_and_mixed_equal_peft(llama):
    """Each adapter alone, then a batch mixing both adapters and the base: every request gets
    PEFT's greedy tokens; each adapter changes them."""
    base, adapters, ref = llama
    eng = Engine(base, adapters)
    for e in ("a", "b", None):
        outs = eng.generate(PROMPTS, e, GREEDY)
        assert [o.token_ids for o in outs] == [ref[(i, e)] for i in range(3)], e
    combos = [(0, "a"), (1, "b"), (2, None), (0, "b"), (2, "a"), (1, None)]
    outs = eng.generate([PROMPTS[i] for i, _ in combos], [e for _, e in combos], GREEDY)
    for (i, e), out in zip(combos, outs):
        assert out.token_ids == ref[(i, e)], (i, e)
    assert ref[(0, "a")] != ref[(0, None)] and ref[(0, "b")] != ref[(0, None)]


def peft_prompt_logprobs(base: Path, adapter: Path, prompt: list[int]) -> list[float]:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter)
    return _logprobs(model, prompt)


def _logprobs(model, prompt: list[int]) -> list[float]:
    with torch.no_grad():
        logits = model.eval()(input_ids=torch.tensor([prompt])).logits[0]
    lp = torch.log_softmax(logits.float(), -1)
    return [lp[t - 1, prompt[t]].item() for t in range(1, len(prompt))]


def test_scales_and_patterns_match_peft_logprobs(llama):
    """The scale of every module (alpha / r, rank_pattern, alpha_pattern, rslora's alpha / √r)
    and the replaced norm, checked finer than greedy tokens can: each prompt token's
    log-probability equals PEFT's within fp32 rounding."""
    base, adapters, _ = llama
    eng = Engine(base, adapters)
    sp = SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=0)
    for name, path in adapters.items():
        out = eng.generate(PROMPTS[2], name, sp)[0]
        ours = [lp.logprob for lp in out.prompt_logprobs[1:]]
        assert ours == pytest.approx(peft_prompt_logprobs(base, path, PROMPTS[2]), abs=1e-4)


def _shift_biases(model):
    for name, p in model.named_parameters():
        if name.endswith("bias"):
            p.add_(torch.linspace(-0.5, 0.5, p.numel()))


def test_tied_qwen2_with_biases(tmp_path):
    """Qwen2 (q/k/v biases, lm_head tied to the embedding): LoRA on the embedding's lookup and
    on lm_head are two things (PEFT adapts the modules, not the shared tensor), and
    bias="all" saves the tuned biases whole: PEFT's tokens, alone and beside the base."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, vocab_size=256,
                      max_position_embeddings=256, tie_word_embeddings=True)  # fmt: skip
    torch.manual_seed(3)
    Qwen2ForCausalLM(cfg).save_pretrained(tmp_path / "base")
    base = tmp_path / "base"
    adapter = make_adapter(base, tmp_path / "q", 4, LINEARS + ["embed_tokens", "lm_head"],
                           bias="all", tweak=_shift_biases)  # fmt: skip
    eng = Engine(base, {"q": adapter})
    outs = eng.generate(PROMPTS + PROMPTS[:1], ["q", "q", "q", None], GREEDY)
    for i, p in enumerate(PROMPTS):
        assert outs[i].token_ids == peft_greedy(base, adapter, p, GREEDY.max_tokens), i
    assert outs[3].token_ids == peft_greedy(base, None, PROMPTS[0], GREEDY.max_tokens)
    assert outs[3].token_ids != outs[0].token_ids


def test_decode_graph_path_serves_adapters(llama, monkeypatch):
    """What a CUDA graph replays (engine/graphs.py), run on CPU without the capture: the LoRA
    term from the stacked factors and a mask made from the static buffers' row slots, with
    padding rows (5 sequences → bucket 8) that belong to no adapter: PEFT's tokens."""
    pytest.importorskip("triton")
    from expertswitch.engine import graphs
    from expertswitch.models import attention

    monkeypatch.setattr(graphs, "GRAPH_MODE", "static")
    monkeypatch.setattr(attention, "ATTENTION_PATH", "kernel")
    base, adapters, ref = llama
    eng = Engine(base, adapters, num_kv_blocks=40, block_size=4)
    combos = [(0, "a"), (1, None), (2, "b"), (1, "a"), (0, "b")]
    sp = SamplingParams(temperature=0.0, max_tokens=6)
    outs = eng.generate([PROMPTS[i] for i, _ in combos], [e for _, e in combos], sp)
    for (i, e), out in zip(combos, outs):
        assert out.token_ids == ref[(i, e)][:6], (i, e)
    assert eng.runner.graphs.replays >= 4 and set(eng.runner.graphs.static) == {8}


def _copy(src: Path, dst: Path, config=None, tensors=None) -> Path:
    """A copy of an adapter, its config updated with `config` and its tensors replaced by
    `tensors(dict) → dict`."""
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    if config is not None:
        cfg = json.loads((dst / "adapter_config.json").read_text())
        (dst / "adapter_config.json").write_text(json.dumps({**cfg, **config}))
    if tensors is not None:
        f = dst / "adapter_model.safetensors"
        save_file(tensors(load_file(f)), f)
    return dst


def test_bad_adapters_get_clear_errors(llama, tmp_path):
    """Refused when registered, each with what is wrong and what to do: another PEFT method,
    options that change what the factors mean (DoRA), an adapter for another architecture or
    for another base of the same one (PEFT's saved copy of the embedding differs), a layer
    the engine does not adapt per request, missing or damaged weights; a file damaged after
    registration fails only its own requests."""
    from transformers import LlamaForCausalLM

    base, adapters, ref = llama
    eng = Engine(base, {})
    a = adapters["a"]
    pre = "base_model.model.model.layers.0."

    def refused(path, error, match):
        with pytest.raises(error, match=match):
            eng.add_expert("x", path)
        assert "x" not in eng.experts

    refused(_copy(a, tmp_path / "ia3", {"peft_type": "IA3"}), CheckpointError,
            "is a 'IA3' PEFT adapter; the engine serves LoRA adapters")  # fmt: skip
    dora = make_adapter(base, tmp_path / "dora", 5, ["q_proj"], use_dora=True)
    refused(dora, CheckpointError, r"DoRA \(use_dora\) is not served; merge the adapter")
    refused(_copy(a, tmp_path / "r0", {"r": 0}), CheckpointError, "r must be a positive number")
    with pytest.raises(ConfigError, match="has rank 4, above max_lora_rank 2: raise "
                       "--max-lora-rank"):  # fmt: skip
        Engine(base, {"a": a}, max_lora_rank=2)
    other = tmp_path / "other"  # another architecture: a wider MLP
    LlamaForCausalLM(tiny_config().__class__(**{**tiny_config().to_dict(),
                     "intermediate_size": 96})).save_pretrained(other)  # fmt: skip
    wide = make_adapter(other, tmp_path / "wide", 6, ["down_proj"])
    refused(wide, CompatibilityError, r"does not fit the base .*down_proj have shapes "
            r"A \[4, 96\], B \[64, 4\]; the base's layer is \[64, 160\]")  # fmt: skip
    torch.manual_seed(9)  # the same architecture, other weights: PEFT's embedding copy differs
    LlamaForCausalLM(tiny_config()).save_pretrained(tmp_path / "sibling")
    twin = make_adapter(tmp_path / "sibling", tmp_path / "twin", 7, ["embed_tokens"])
    refused(twin, CompatibilityError, "its copy of model.embed_tokens.weight differs from the "
            "base's in 256 of 256 rows; serve it with the base it was trained on")  # fmt: skip
    refused(_copy(a, tmp_path / "pissa", {"init_lora_weights": "pissa_niter_4"}),
            CheckpointError, "saves factors of a modified base, not of the one it is served "
            "with; save the adapter converted")  # fmt: skip
    refused(_copy(a, tmp_path / "loftq", {"init_lora_weights": "loftq"}), CheckpointError,
            r"with; merge it into the base it was trained with \(peft")  # fmt: skip

    def extra(ts):
        return {**ts, pre + "mlp.act.lora_A.weight": torch.zeros(4, 64),
                pre + "mlp.act.lora_B.weight": torch.zeros(160, 4)}  # fmt: skip

    refused(_copy(a, tmp_path / "act", tensors=extra), CheckpointError,
            "LoRA on model.layers.0.mlp.act, which the engine does not apply")  # fmt: skip
    refused(_copy(a, tmp_path / "mag", tensors=lambda ts: {
        **ts, pre + "self_attn.q_proj.lora_magnitude_vector": torch.ones(64)}),
        CheckpointError, "lora_magnitude_vector is not one the engine serves")  # fmt: skip
    refused(_copy(a, tmp_path / "noB", tensors=lambda ts: {
        k: v for k, v in ts.items() if k != pre + "self_attn.q_proj.lora_B.weight"}),
        CheckpointError, "q_proj has no lora_B: the adapter is incomplete")  # fmt: skip
    gone = _copy(a, tmp_path / "gone")
    (gone / "adapter_model.safetensors").unlink()
    refused(gone, CheckpointError, "has adapter_config.json but no adapter_model.safetensors")
    cut = _copy(a, tmp_path / "cut")
    f = cut / "adapter_model.safetensors"
    f.write_bytes(f.read_bytes()[:-999])
    refused(cut, CheckpointError, "is not a readable adapter weights file .* truncated")
    # registered whole, then its files rewritten: the same tensors are served as before;
    # damaged, or changed to other layers, its requests fail and the others are served
    late = _copy(a, tmp_path / "late")
    eng.add_expert("late", late)
    f = late / "adapter_model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data)
    os.utime(f, ns=(10**9, 10**9))  # (a copy: its modification time is another)
    checked = eng.registry.get("late").lora
    assert eng.generate(PROMPTS[2], "late", GREEDY)[0].token_ids == ref[(2, "a")]
    assert eng.registry.get("late").lora is not checked  # (checked again)
    eng.remove_expert("late")
    eng.add_expert("late", late)
    f.write_bytes(data[:100])
    outs = eng.generate(PROMPTS[:2], ["late", None], GREEDY)
    assert outs[0].finish_reason == "error" and "changed since it was registered as 'late' " \
        "and no longer loads: " in outs[0].error  # fmt: skip
    assert outs[1].token_ids == ref[(1, None)]
    eng.remove_expert("late")
    shutil.rmtree(late)
    _copy(a, late)
    eng.add_expert("late", late)
    shutil.rmtree(late)
    _copy(adapters["b"], late)
    out = eng.generate(PROMPTS[2], "late", GREEDY)[0]
    assert out.finish_reason == "error" and "to other layers, rank or vocabulary: register it " \
        "again" in out.error  # fmt: skip


def test_held_bytes_are_the_factors(llama):
    """An adapter is held as its factors (r·(N + K) numbers per layer), never as a dense
    ΔW; PEFT's saved copies of the base's embedding and lm_head are not held."""
    from safetensors import safe_open

    base, adapters, _ = llama
    eng = Engine(base, adapters)
    eng.generate(PROMPTS[0], "a", GREEDY)
    held = eng.pool.status("a").nbytes
    with safe_open(str(adapters["a"] / "adapter_model.safetensors"), "pt") as f:
        factors = sum(f.get_slice(k).get_shape()[0] * f.get_slice(k).get_shape()[1] * 4
                      for k in f.keys() if ".lora_" in k)  # fmt: skip  # noqa: SIM118
    assert held == factors


def _json_values():
    from hypothesis import strategies as st

    leaf = st.one_of(st.none(), st.booleans(), st.integers(-5, 300), st.text(max_size=8),
                     st.sampled_from([10**400, -(10**400), 2**63, ".*", "(q|v)_proj",
                                      "[", "pissa", "gaussian", "all-linear"]),
                     st.floats(allow_nan=True, allow_infinity=True))  # fmt: skip

    def nest(c):
        return st.one_of(st.lists(c, max_size=3), st.dictionaries(st.text(max_size=8), c,
                                                                  max_size=3))  # fmt: skip

    return st.recursive(leaf, nest, max_leaves=6)


def _damaged(ts: dict, how: str, pick: int) -> dict:
    """The adapter's tensors with one of them renamed, retyped, reshaped or removed."""
    keys = sorted(ts)
    k = keys[pick % len(keys)]
    t = ts[k]
    rest = {n: v for n, v in ts.items() if n != k}
    return {"rename": {**rest, k.replace("lora_", "lora"): t},
            "layer": {**rest, k.replace("layers.0.", "layers.99."): t},
            "int": {**rest, k: t.to(torch.int32)},
            "half": {**rest, k: t.half()},
            "double": {**rest, k: t.double()},
            "transpose": {**rest, k: t.t().contiguous() if t.dim() == 2 else t},
            "row": {**rest, k: t[:1].contiguous()},
            "drop": rest}[how]  # fmt: skip


def test_damaged_adapters_load_or_fail_clearly(llama, tmp_path):
    """Any config field set to any JSON value (huge numbers, regexes included), one tensor
    renamed, retyped, reshaped or removed, the weights file cut anywhere or any byte of it
    flipped: registering and serving the adapter either works or fails with an
    ExpertSwitchError (a clear message), and the base keeps answering as before."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    base, adapters, ref = llama
    eng = Engine(base, {})
    fields = ["peft_type", "r", "lora_alpha", "use_rslora", "rank_pattern", "alpha_pattern",
              "use_dora", "fan_in_fan_out", "target_modules", "modules_to_save",
              "bias", "init_lora_weights", "layers_to_transform", "layers_pattern",
              "exclude_modules", "lora_bias", "target_parameters"]  # fmt: skip
    size = (adapters["b"] / "adapter_model.safetensors").stat().st_size
    count = iter(range(10**6))
    seen = collections.Counter()

    ops = ["rename", "layer", "int", "half", "double", "transpose", "row", "drop"]

    @settings(max_examples=120, deadline=None, suppress_health_check=list(HealthCheck))
    @given(which=st.sampled_from(["a", "b"]), field=st.sampled_from([None, *fields]),
           value=_json_values(),
           damage=st.one_of(st.none(), st.tuples(st.just("cut"), st.integers(0, size)),
                            st.tuples(st.just("flip"), st.integers(0, size - 1)),
                            st.tuples(st.sampled_from(ops), st.integers(0, 100))))  # fmt: skip
    def check(which, field, value, damage):
        name = f"x{next(count)}"
        how, at = damage or (None, 0)
        tensors = (lambda ts: _damaged(ts, how, at)) if how in ops else None
        path = _copy(adapters[which], tmp_path / name, field and {field: value}, tensors)
        f = path / "adapter_model.safetensors"
        data = f.read_bytes()
        if how == "flip":
            f.write_bytes(data[:at] + bytes([data[at] ^ 0xFF]) + data[at + 1 :])
        elif how == "cut":
            f.write_bytes(data[:at])
        try:
            eng.add_expert(name, path)
        except ExpertSwitchError:
            seen["refused"] += 1
            return
        seen["served"] += 1
        out = eng.generate([PROMPTS[1], PROMPTS[1]], [name, None], GREEDY)
        assert out[0].finish_reason != "error" or out[0].error
        assert out[1].token_ids == ref[(1, None)]
        eng.remove_expert(name)

    check()
    assert seen["served"] and seen["refused"], seen  # both outcomes were reached


@pytest.mark.gpu
def test_adapters_in_cuda_graphs_on_gpu(llama):
    """fp32 on the GPU with decode steps captured and replayed from CUDA graphs, adapters and
    base rows in one batch: PEFT's tokens, and the eager engine's logprobs."""
    from expertswitch.engine import graphs

    base, adapters, ref = llama
    combos = [(0, "a"), (1, None), (2, "b"), (1, "a"), (0, "b")]
    assert GREEDY.max_tokens > graphs.STEADY_STEPS + 3  # some steps replay
    sp = SamplingParams(temperature=0.0, max_tokens=GREEDY.max_tokens, logprobs=1)
    outs = {}
    for eager in (False, True):
        eng = Engine(base, adapters, device="cuda", enforce_eager=eager)
        outs[eager] = eng.generate([PROMPTS[i] for i, _ in combos], [e for _, e in combos], sp)
        if not eager:
            g = eng.runner.graphs
            assert not g.broken and g.captures >= 1 and g.replays >= 3, g.stats()
    for (i, e), out in zip(combos, outs[False]):
        assert out.token_ids == ref[(i, e)][: len(out.token_ids)], (i, e)
    for a, b in zip(outs[False], outs[True]):
        assert a.token_ids == b.token_ids
        assert max(abs(x.logprob - y.logprob) for x, y in zip(a.logprobs, b.logprobs)) < 1e-4


def _grow(model):
    """Added tokens: embedding and lm_head resized to 264, their new rows trained."""
    model.resize_token_embeddings(264)
    g = torch.Generator().manual_seed(11)
    for w in (model.model.embed_tokens.weight, model.lm_head.weight):
        w[256:] = torch.randn(8, w.shape[1], generator=g) * 0.5


def test_grown_vocabulary_beside_another_adapters_lm_head(llama, tmp_path):
    """An adapter of a fine-tune with added tokens (PEFT saves the resized embedding and
    lm_head whole, its LoRA factors 264 rows long) in one batch with an adapter whose lm_head
    LoRA has the base's 256 rows, and the base: each gets PEFT's tokens (the grown one with
    its new tokens in the prompt and free to answer with them)."""
    base, adapters, ref = llama
    grown = make_adapter(base, tmp_path / "g", 8, LINEARS + ["embed_tokens", "lm_head"],
                         pre=_grow)  # fmt: skip
    eng = Engine(base, {"g": grown, "a": adapters["a"]})
    p = PROMPTS[0] + [259, 260, 7]
    outs = eng.generate([p, PROMPTS[0], PROMPTS[1], PROMPTS[2]], ["g", "a", None, "g"], GREEDY)
    assert outs[0].token_ids == peft_greedy(base, grown, p, GREEDY.max_tokens, vocab=264)
    assert outs[1].token_ids == ref[(0, "a")] and outs[2].token_ids == ref[(1, None)]
    assert outs[3].token_ids == peft_greedy(base, grown, PROMPTS[2], GREEDY.max_tokens, 264)
    with pytest.raises(ConfigError, match="outside"):  # the base's vocabulary is 256
        eng.add_request([3, 259], None)


def test_whole_tensors_held_only_where_they_differ(llama, tmp_path):
    """PEFT saves an adapted embedding's frozen base layer, and with save_embedding_layers
    the embedding and lm_head whole: rows equal to the base's are not held; a copy whose
    rows differ in a few places (tokens re-initialised before training) replaces the base's
    as PEFT loads it — PEFT's logprobs on those tokens, to fp32 rounding; an lm_head trained
    a little (every row 0.5% off the base's) is held whole, never taken for the base's."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base, _, _ = llama
    plain = make_adapter(base, tmp_path / "plain", 9, ["q_proj"],
                         save={"save_embedding_layers": True})  # fmt: skip

    def reinit(model):
        g = torch.Generator().manual_seed(5)
        model.model.embed_tokens.weight[[5, 9]] = torch.randn(2, 64, generator=g)

    rows = make_adapter(base, tmp_path / "rows", 10, ["q_proj", "embed_tokens"], pre=reinit)
    eng = Engine(base, {"plain": plain, "rows": rows})
    eng.generate(PROMPTS[0], "plain", GREEDY)
    q = 2 * 64 * 4 * 4  # q_proj's A and B in both layers, fp32
    assert eng.pool.status("plain").nbytes == 2 * q  # (the whole tensors: not held)
    sp = SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=0)
    out = eng.generate(PROMPTS[2], "rows", sp)[0]
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), rows)
    want = _logprobs(model, PROMPTS[2])
    assert [lp.logprob for lp in out.prompt_logprobs[1:]] == pytest.approx(want, abs=1e-4)
    held = eng.pool.status("rows").nbytes
    assert held > 256 * 64 * 4  # the embedding, whole: its rows 5 and 9 are the adapter's

    def lightly(model):  # an lm_head trained a little: every row 0.5% from the base's
        head = model.base_model.model.lm_head.modules_to_save["default"]
        head.weight.mul_(1.005)

    light = make_adapter(base, tmp_path / "light", 11, ["q_proj"], modules_to_save=["lm_head"],
                         tweak=lightly)  # fmt: skip
    eng.add_expert("light", light)
    out = eng.generate(PROMPTS[2], "light", sp)[0]
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), light)
    want = _logprobs(model, PROMPTS[2])
    assert [lp.logprob for lp in out.prompt_logprobs[1:]] == pytest.approx(want, abs=1e-4)
    assert eng.pool.status("light").nbytes == 2 * q + 256 * 64 * 4  # its lm_head, whole


def test_an_adapter_too_large_for_fp16_fails_alone(llama, tmp_path):
    """An fp16 engine: an adapter whose factors overflow fp16 fails its own requests with a
    clear error; another adapter and the base in the same batch are served as alone."""
    from safetensors.torch import load_file, save_file

    base, adapters, _ = llama
    hot = make_adapter(base, tmp_path / "hot", 11, ["down_proj"])
    f = hot / "adapter_model.safetensors"
    save_file({k: v * 1e6 if "lora_B" in k else v for k, v in load_file(f).items()}, f)
    eng = Engine(base, {"hot": hot, "b": adapters["b"]}, dtype=torch.float16)
    sp = SamplingParams(temperature=0.0, max_tokens=4)
    alone = eng.generate([PROMPTS[1], PROMPTS[1]], ["b", None], sp)
    mixed = eng.generate([PROMPTS[1], PROMPTS[1], PROMPTS[1]], ["hot", "b", None], sp)
    assert mixed[0].finish_reason == "error" and "not finite in float16" in mixed[0].error
    assert [o.token_ids for o in mixed[1:]] == [o.token_ids for o in alone]
    assert all(o.finish_reason != "error" for o in alone)


def test_adapters_evicted_and_reloaded(llama):
    """A device budget that holds one adapter: requests alternating between two evict and
    reload them, each still PEFT's tokens."""
    base, adapters, ref = llama
    eng = Engine(base, adapters)
    eng.generate([PROMPTS[0]] * 2, ["a", "b"], GREEDY)
    sizes = [eng.pool.status(e).nbytes for e in ("a", "b")]
    eng = Engine(base, adapters, device_budget_bytes=max(sizes) + 1)
    for _ in range(2):
        for e in ("a", "b"):
            out = eng.generate(PROMPTS[2], e, GREEDY)[0]
            assert out.token_ids == ref[(2, e)], (e, out.error)
    assert eng.pool.stats()["disk_loads"] == 4, eng.pool.stats()
