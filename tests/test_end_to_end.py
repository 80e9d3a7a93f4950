"""compress → archive → reconstruct → transformers loads it, on tiny real HF checkpoints."""

import json
import subprocess
import sys

import pytest
import torch
from conftest import logits, model_class, save_pair, tiny_config

from expertswitch.cli import main
from expertswitch.compress import CompressOptions, compress_expert, make_method, reconstruct
from expertswitch.compress.calibration import CalibOptions
from expertswitch.errors import ArchiveError, CompatibilityError, ExpertSwitchError
from expertswitch.io.archive import open_archive

OPTS = CompressOptions(
    calib=CalibOptions(tokenizer="bytes", tokens=1024, seq_len=64, sample_rows=128), progress=False
)
IDS = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))


def delta_error(base_dir, expert_dir, rec_dir) -> float:
    """‖logits(reconstructed) − logits(expert)‖ / ‖logits(expert) − logits(base)‖: the share of
    the fine-tune's effect on the logits that compression lost."""
    lb, le, lr = logits(base_dir, IDS), logits(expert_dir, IDS), logits(rec_dir, IDS)
    return ((lr - le).norm() / (le - lb).norm()).item()


def roundtrip(tmp_path, base_dir, expert_dir, method, tag="x", **kw):
    archive = compress_expert(base_dir, expert_dir, tmp_path / f"ar-{tag}", method, OPTS)
    return archive, reconstruct(base_dir, archive, tmp_path / f"rec-{tag}", progress=False, **kw)


# Tolerances are the share of the fine-tune's logit shift lost. Measured on these random tiny
# models (whose logits are far more sensitive than a trained model's): 8-bit ~0.01, 4-bit mixed
# ~0.13, 2-bit mixed ~0.45 vs RTN ~0.6.
@pytest.mark.parametrize("arch, dtype", [("llama", torch.float32), ("mistral", torch.bfloat16)])
def test_logits_within_tolerance(tmp_path, arch, dtype):
    base_dir, expert_dir = save_pair(tmp_path, arch, dtype=dtype)
    errors = {}
    for tag, method in {
        "mixed8": make_method("mixed", bits=8),
        "mixed4": make_method("mixed", bits=4),
        "mixed2": make_method("mixed", bits=2),
        "rtn2": make_method("rtn", bits=2),
    }.items():
        _, rec = roundtrip(tmp_path, base_dir, expert_dir, method, tag)
        config = json.loads((rec / "config.json").read_text())
        assert config["model_type"] == arch
        errors[tag] = delta_error(base_dir, expert_dir, rec)
    assert errors["mixed8"] < 0.05, errors
    assert errors["mixed4"] < 0.25, errors
    assert errors["mixed2"] < min(0.6, errors["rtn2"]), errors
    reloaded = model_class(arch).from_pretrained(rec)
    assert next(reloaded.parameters()).dtype == dtype  # the expert's own dtype comes back


def test_mixtral_expert_weights_are_quantized(tmp_path):
    base_dir, expert_dir = save_pair(tmp_path, "mixtral")
    archive, rec = roundtrip(tmp_path, base_dir, expert_dir, make_method("mixed", bits=4))
    entries = open_archive(archive).entries
    assert entries["model.layers.0.block_sparse_moe.experts.3.w2.weight"].kind == "quantized"
    assert entries["model.layers.0.block_sparse_moe.gate.weight"].kind == "exact"  # the router
    # each expert calibrated on the rows routed to it (fused experts in transformers ≥ 5)
    experts = [e for name, e in entries.items() if ".experts." in name]
    assert len(experts) == 2 * 4 * 3 and all(e.meta["calibrated"] for e in experts)
    assert delta_error(base_dir, expert_dir, rec) < 0.25


def test_expert_with_added_tokens(tmp_path):
    torch.manual_seed(0)
    cls = model_class("llama")
    base = cls(tiny_config())
    base.save_pretrained(tmp_path / "base")
    base.resize_token_embeddings(264)  # the fine-tune added 8 tokens
    with torch.no_grad():
        base.model.layers[0].mlp.up_proj.weight.add_(0.01)
    base.save_pretrained(tmp_path / "expert")
    archive, rec = roundtrip(tmp_path, tmp_path / "base", tmp_path / "expert", make_method("rtn"))
    entries = open_archive(archive).entries
    assert entries["model.embed_tokens.weight"].kind == "exact"
    assert entries["model.embed_tokens.weight"].meta["shape"] == [264, 64]
    model = cls.from_pretrained(rec)
    assert model.config.vocab_size == 264
    ids = torch.tensor([[1, 263, 5]])
    assert logits(rec, ids).shape[-1] == 264


def test_sharded_output_loads(tmp_path, llama_pair):
    base_dir, expert_dir = llama_pair
    _, rec = roundtrip(
        tmp_path, base_dir, expert_dir, make_method("rtn", bits=8), max_shard_bytes=100_000
    )
    assert (rec / "model.safetensors.index.json").is_file()
    assert len(list(rec.glob("model-*-of-*.safetensors"))) > 1
    assert delta_error(base_dir, expert_dir, rec) < 0.05


def test_wrong_base_is_refused(tmp_path, llama_pair):
    base_dir, expert_dir = llama_pair
    archive = compress_expert(base_dir, expert_dir, tmp_path / "ar", make_method("rtn"), OPTS)
    with pytest.raises(CompatibilityError, match="different base"):
        reconstruct(expert_dir, archive, tmp_path / "rec", progress=False)
    assert not (tmp_path / "rec").exists()  # nothing half-written


@pytest.fixture
def archive_dir(tmp_path, llama_pair):
    base_dir, expert_dir = llama_pair
    return compress_expert(base_dir, expert_dir, tmp_path / "ar", make_method("mixed"), OPTS)


def test_corrupt_archive_fails_checksum(archive_dir):
    f = archive_dir / "delta.safetensors"
    data = bytearray(f.read_bytes())
    data[-100] ^= 0xFF  # flip bits inside the last part's data
    f.write_bytes(bytes(data))
    with pytest.raises(ArchiveError, match="checksum mismatch.*corrupt"):
        open_archive(archive_dir)


def test_truncated_archive(archive_dir):
    f = archive_dir / "delta.safetensors"
    f.write_bytes(f.read_bytes()[:-10])
    with pytest.raises(ArchiveError, match="truncated"):
        open_archive(archive_dir)


def test_not_an_archive_and_future_version(tmp_path, archive_dir):
    with pytest.raises(ArchiveError, match="does not exist"):
        open_archive(tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ArchiveError, match="not an expert archive"):
        open_archive(tmp_path / "empty")
    mf = archive_dir / "expert.json"
    manifest = json.loads(mf.read_text())
    manifest["format_version"] = 99
    mf.write_text(json.dumps(manifest))
    with pytest.raises(ArchiveError, match="format version 99"):
        open_archive(archive_dir)


def test_existing_output_is_not_overwritten(tmp_path, llama_pair, archive_dir):
    base_dir, expert_dir = llama_pair
    with pytest.raises(ExpertSwitchError, match="exists and is not empty"):
        compress_expert(base_dir, expert_dir, archive_dir, make_method("rtn"), OPTS)
    assert open_archive(archive_dir).manifest["method"]["method"] == "mixed"


def test_cli_compress_inspect_reconstruct(tmp_path, llama_pair, capsys):
    base_dir, expert_dir = llama_pair
    out = tmp_path / "cli-ar"
    rc = main(
        ["compress", "--base", str(base_dir), "--expert", str(expert_dir), "--out", str(out),
         "--bits", "3", "--calib-tokens", "512", "--seq-len", "64", "--device", "cpu", "--quiet",
         "--tokenizer", "bytes"]
    )  # fmt: skip
    assert rc == 0 and "smaller than the fp16 expert" in capsys.readouterr().out
    assert main(["inspect", str(out)]) == 0
    table = capsys.readouterr().out
    assert "bits/param" in table and "model.layers.1.mlp.down_proj.weight" in table
    assert main(["inspect", str(out), "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["method"]["bits"] == 3 and 3 < rep["bits_per_param_quantized"] < 4
    assert rep["ratio_to_fp16"] > 1
    rec = tmp_path / "cli-rec"
    args = ["reconstruct", "--base", str(base_dir), "--delta", str(out), "--out", str(rec)]
    assert main([*args, "--quiet"]) == 0
    assert delta_error(base_dir, expert_dir, rec) < 0.5


def test_cli_errors_are_one_line(tmp_path, llama_pair, capsys):
    base_dir, _ = llama_pair
    rc = main(["compress", "--base", str(base_dir), "--expert", str(tmp_path / "missing"),
               "--out", str(tmp_path / "o"), "--quiet"])  # fmt: skip
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: checkpoint directory") and "Traceback" not in err
    assert main(["inspect", str(tmp_path)]) == 2
    assert "not an expert archive" in capsys.readouterr().err
    # a PEFT LoRA adapter where an archive or a checkpoint is expected: what to do with it
    peft = tmp_path / "adapter"
    peft.mkdir()
    (peft / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 8}')
    assert main(["inspect", str(peft)]) == 2
    assert "is a PEFT adapter" in capsys.readouterr().err
    rc = main(["compress", "--base", str(base_dir), "--expert", str(peft),
               "--out", str(tmp_path / "o"), "--quiet"])  # fmt: skip
    assert rc == 2 and "merge_and_unload" in capsys.readouterr().err
    rc = main(["compress", "--base", str(base_dir), "--expert", str(base_dir),
               "--out", str(tmp_path / "o"), "--bits", "5", "--quiet"])  # fmt: skip
    assert rc == 2 and "bits=5" in capsys.readouterr().err


def test_console_script_runs():
    proc = subprocess.run(
        [sys.executable, "-m", "expertswitch.cli", "--help"], capture_output=True, text=True
    )
    assert proc.returncode == 0
    for command in ("demo", "compress", "inspect", "reconstruct", "zoo", "eval"):
        assert command in proc.stdout


def test_quantized_embeddings(tmp_path):
    """With quantize_embeddings, changed embedding and lm_head deltas are quantized too."""
    torch.manual_seed(0)
    cls = model_class("llama")
    model = cls(tiny_config())
    model.save_pretrained(tmp_path / "base")
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.002 * torch.randn_like(p))
    model.save_pretrained(tmp_path / "expert")
    opts = CompressOptions(calib=OPTS.calib, progress=False, quantize_embeddings=True)
    archive = compress_expert(tmp_path / "base", tmp_path / "expert", tmp_path / "ar",
                              make_method("mixed", bits=4), opts)  # fmt: skip
    entries = open_archive(archive).entries
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        assert entries[name].kind == "quantized"
    assert entries["lm_head.weight"].meta["calibrated"]  # its inputs were recorded
    assert not entries["model.embed_tokens.weight"].meta["calibrated"]  # one-hot inputs
    assert entries["model.norm.weight"].kind == "exact"
    rec = reconstruct(tmp_path / "base", archive, tmp_path / "rec", progress=False)
    assert delta_error(tmp_path / "base", tmp_path / "expert", rec) < 0.25
