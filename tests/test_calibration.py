import warnings

import pytest
import torch
from transformers import LlamaForCausalLM

from expertswitch.compress.calib_text import default_calibration_texts, load_calibration_file
from expertswitch.compress.calibration import CalibOptions, collect_calibration, tokenize
from expertswitch.errors import ConfigError

TEXTS = ["def add(a, b):\n    return a + b\n", "Q: What is 2 + 3 * 4?\nA: 14", "A quick fox."] * 40


def test_statistics_match_a_direct_computation(llama_pair):
    base_dir, _ = llama_pair
    opts = CalibOptions(tokenizer="bytes", tokens=256, seq_len=32, batch_size=2, sample_rows=50)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        calib = collect_calibration(base_dir, TEXTS, opts, progress=False)
        ids = tokenize(base_dir, TEXTS, 256, 256, "bytes")
    model = LlamaForCausalLM.from_pretrained(base_dir).eval()
    linears = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    assert set(calib) == linears
    with torch.no_grad():
        layer0 = model.model.layers[0]
        x = layer0.input_layernorm(model.model.embed_tokens(torch.tensor(ids).view(-1, 32)))
    got = calib["model.layers.0.self_attn.q_proj.weight"]
    assert torch.allclose(got.mean_sq, x.reshape(-1, 64).square().mean(0), rtol=1e-4)
    assert got.sample.shape == (50, 64)
    assert calib["model.layers.1.mlp.down_proj.weight"].mean_sq.shape == (160,)


def test_uses_the_checkpoints_tokenizer(tmp_path, llama_pair):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    base_dir, _ = llama_pair
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel()
    tok.train_from_iterator(TEXTS, trainers.BpeTrainer(vocab_size=120, special_tokens=["<unk>"]))
    model_dir = tmp_path / "with-tok"
    LlamaForCausalLM.from_pretrained(base_dir).save_pretrained(model_dir)
    PreTrainedTokenizerFast(tokenizer_object=tok).save_pretrained(model_dir)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "no tokenizer" fallback warning
        ids = tokenize(model_dir, TEXTS, 256, 64)
        opts = CalibOptions(tokens=64, seq_len=16)  # the checkpoint's own tokenizer
        calib = collect_calibration(model_dir, TEXTS, opts, progress=False)
    first = tok.encode(TEXTS[0]).ids
    assert ids[: len(first)] == first
    assert max(ids) < 120 and len(ids) == 64
    assert "model.layers.0.mlp.up_proj.weight" in calib
    # another directory's tokenizer, when given, is used instead
    assert tokenize(base_dir, TEXTS, 256, 64, str(model_dir)) == ids


def test_no_tokenizer_is_an_error_unless_bytes_are_chosen(llama_pair, tmp_path):
    from expertswitch.errors import ConfigError

    base_dir, _ = llama_pair
    with pytest.raises(ConfigError, match="--tokenizer"):
        tokenize(base_dir, TEXTS, 256, 64)
    assert tokenize(base_dir, TEXTS, 256, 8, "bytes") == list(TEXTS[0][:8].encode())
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    big = tmp_path / "big-tok"  # 300 tokens for a model with 256: some other model's
    vocab = {f"w{i}": i for i in range(300)}
    PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="w0"))
                            ).save_pretrained(big)  # fmt: skip
    with pytest.raises(ConfigError, match="not this model's tokenizer"):
        tokenize(base_dir, TEXTS, 256, 64, str(big))


def test_default_text_mixes_prose_code_and_math():
    docs = default_calibration_texts()
    head = "\n".join(docs[:6])
    assert "def " in head and " + " in head and len(docs) > 50
    assert docs == default_calibration_texts()  # deterministic


def test_calibration_file_formats_and_errors(tmp_path):
    txt = tmp_path / "c.txt"
    txt.write_text("first doc\n\nsecond doc\n", encoding="utf-8")
    assert load_calibration_file(txt) == ["first doc", "second doc\n"]
    jl = tmp_path / "c.jsonl"
    jl.write_text('{"text": "a"}\n\n{"text": "b"}\n', encoding="utf-8")
    assert load_calibration_file(jl) == ["a", "b"]
    with pytest.raises(ConfigError, match="does not exist"):
        load_calibration_file(tmp_path / "nope.txt")
    (tmp_path / "bin.txt").write_bytes(b"ok\xff\xfe")
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_calibration_file(tmp_path / "bin.txt")
    (tmp_path / "empty.txt").write_text("\n\n")
    with pytest.raises(ConfigError, match="no text"):
        load_calibration_file(tmp_path / "empty.txt")
    (tmp_path / "bad.jsonl").write_text('{"txt": 1}\n')
    with pytest.raises(ConfigError, match=r"bad.jsonl:1: .*\"text\""):
        load_calibration_file(tmp_path / "bad.jsonl")


def test_moe_experts_get_per_expert_statistics(tmp_path):
    from conftest import save_pair

    from expertswitch.compress.calibration import LayerCalib, calib_for

    base_dir, _ = save_pair(tmp_path, "mixtral")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        calib = collect_calibration(
            base_dir, TEXTS, CalibOptions(tokenizer="bytes", tokens=256, seq_len=32)
        )
    w1 = calib_for("model.layers.1.block_sparse_moe.experts.2.w1.weight", (160, 64), calib)
    w2 = calib_for("model.layers.1.block_sparse_moe.experts.2.w2.weight", (64, 160), calib)
    assert isinstance(w1, LayerCalib) and w1.mean_sq.shape == (64,)
    assert w2.mean_sq.shape == (160,)  # inputs of down: act(gate)·up, intermediate-sized
    assert not torch.equal(
        w1.mean_sq,
        calib_for("model.layers.1.block_sparse_moe.experts.3.w1.weight", (160, 64), calib).mean_sq,
    )
    stacked = calib_for("model.layers.0.mlp.experts.down_proj", (4, 64, 160), calib)
    assert len(stacked) == 4 and stacked[0].mean_sq.shape == (160,)
    assert calib_for("model.layers.0.block_sparse_moe.gate.weight", (4, 64), calib) is None


def test_builtin_calibration_text_never_holds_what_is_evaluated():
    """Calibration sees only the training side of the family's splits: no held-out prose
    section or code file, no held-out word problem (nor its operands)."""
    from expertswitch.eval.tasks import task_items
    from expertswitch.zoo.corpora import load_corpora

    calib = default_calibration_texts()
    corpora = load_corpora(0)
    heldout = {d for c in corpora.values() for d in c.heldout}
    assert heldout and not heldout.intersection(calib)
    # (a held-out prose or code *item* may still repeat a paragraph that the documentation
    # itself repeats in a training section: the split is by document, as the family's is)
    text = "\n".join(calib)
    for d in ("code", "math", "prose"):  # nor any held-out item of an expert's skill
        items = [it.prompt + it.answer for it in task_items(d, corpora, 300)]
        assert items and not any(it in text for it in items), d
    assert ">>> sorted(" in text and "In words, " in text  # the skills are calibrated on
    from expertswitch.zoo.served import domain_calibration_text

    for d in ("code", "math", "prose"):  # the demo's per-expert calibration text, likewise
        own = domain_calibration_text(d)
        assert not any(it.prompt + it.answer in own for it in task_items(d, corpora, 300)), d
