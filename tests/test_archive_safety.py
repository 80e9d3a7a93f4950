"""An archive is exactly what was written for exactly this base, or it does not open; no flag
can destroy the user's checkpoints; a flag that would do nothing is refused. Each case was a
reproduced failure before the fix (the CLI ran it with exit 0 or a wrong model)."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import pytest
import torch
from conftest import save_pair
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

from expertswitch.cli import main
from expertswitch.compress import CompressOptions, compress_expert, make_method, reconstruct
from expertswitch.compress.calibration import CalibOptions
from expertswitch.errors import ArchiveError, ConfigError, ExpertSwitchError
from expertswitch.io.archive import open_archive

OPTS = CompressOptions(
    calib=CalibOptions(tokenizer="bytes", tokens=256, seq_len=64), progress=False
)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    return save_pair(tmp_path_factory.mktemp("safety"), "llama")


@pytest.fixture(scope="module")
def archive(pair, tmp_path_factory):
    base, expert = pair
    return compress_expert(base, expert, tmp_path_factory.mktemp("a") / "ar",
                           make_method("mixed", bits=3), OPTS)  # fmt: skip


@pytest.fixture(scope="module")
def rebuilt(pair, archive, tmp_path_factory):
    """The reference reconstruction: what every archive that opens must give."""
    out = reconstruct(pair[0], archive, tmp_path_factory.mktemp("r") / "rec", progress=False)
    return load_file(str(out / "model.safetensors")), _aux(out)


def _aux(path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in path.iterdir() if p.suffix != ".safetensors"
            and p.name != "expertswitch-reconstruction.json"}  # fmt: skip


def _copy(src: Path, tmp: Path) -> Path:
    dst = tmp / "copy"
    shutil.copytree(src, dst)
    return dst


# 1. data loss ----------------------------------------------------------------------------------


@pytest.mark.parametrize("target", ["expert", "base", "parent"])
def test_out_never_replaces_an_input(pair, tmp_path, target):
    base, expert = pair
    work = tmp_path / "work"
    shutil.copytree(expert.parent, work)
    b, e = work / base.name, work / expert.name
    out = {"expert": e, "base": b, "parent": work}[target]
    before = {p: p.read_bytes() for p in work.rglob("*") if p.is_file()}
    rc = main(["compress", "--base", str(b), "--expert", str(e), "--out", str(out),
               "--overwrite", "--quiet", "--device", "cpu"])  # fmt: skip
    assert rc == 2
    assert {p: p.read_bytes() for p in work.rglob("*") if p.is_file()} == before
    with pytest.raises(ConfigError, match="would destroy|not a reconstruction"):
        reconstruct(b, work / "none", out, overwrite=True, progress=False)
    assert {p: p.read_bytes() for p in work.rglob("*") if p.is_file()} == before


def test_overwrite_replaces_only_our_own_outputs(pair, archive, tmp_path, capsys):
    base, expert = pair
    mine = tmp_path / "notes"
    mine.mkdir()
    (mine / "thesis.txt").write_text("years of work")
    for cmd in (["compress", "--base", str(base), "--expert", str(expert)],
                ["reconstruct", "--base", str(base), "--delta", str(archive)]):  # fmt: skip
        assert main([*cmd, "--out", str(mine), "--overwrite", "--quiet"]) == 2
        assert "not a" in capsys.readouterr().err
        assert (mine / "thesis.txt").read_text() == "years of work"
    # an archive is replaced by an archive, atomically; a reconstruction by a reconstruction
    out = tmp_path / "ar"
    compress_expert(base, expert, out, make_method("rtn", bits=4), OPTS)
    compress_expert(base, expert, out, make_method("rtn", bits=2),
                    CompressOptions(calib=OPTS.calib, progress=False, overwrite=True))  # fmt: skip
    assert open_archive(out).manifest["method"]["bits"] == 2
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".ar.")]  # nothing left over
    rec = reconstruct(base, out, tmp_path / "rec", progress=False)
    reconstruct(base, archive, rec, progress=False, overwrite=True)


def test_out_that_is_a_file_and_bad_calibration_flags_are_one_line_errors(pair, tmp_path, capsys):
    base, expert = pair
    f = tmp_path / "file"
    f.write_text("x")
    common = ["compress", "--base", str(base), "--expert", str(expert), "--quiet",
              "--device", "cpu", "--tokenizer", "bytes"]  # fmt: skip
    for extra, needle in ((["--out", str(f)], "is a file"),
                          (["--out", str(tmp_path / "o"), "--seq-len", "0"], "--seq-len"),
                          (["--out", str(tmp_path / "o"), "--calib-tokens", "-4"],
                           "--calib-tokens")):  # fmt: skip
        assert main([*common, *extra]) == 2
        err = capsys.readouterr().err
        assert needle in err and "Traceback" not in err and err.count("\n") == 1


def test_calibration_windows_fit_the_models_positions(tmp_path):
    """The default 512-token windows on a model with 64 positions: cut, not a crash."""
    from conftest import model_class, tiny_config

    cfg = tiny_config("llama")
    cfg.max_position_embeddings = 64
    torch.manual_seed(0)
    model = model_class("llama")(cfg)
    model.save_pretrained(tmp_path / "base")
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight.add_(0.01)
    model.save_pretrained(tmp_path / "expert")
    opts = CompressOptions(
        calib=CalibOptions(tokenizer="bytes", tokens=1024), progress=False
    )  # seq_len 512
    out = compress_expert(tmp_path / "base", tmp_path / "expert", tmp_path / "ar",
                          make_method("mixed", bits=2), opts)  # fmt: skip
    assert open_archive(out).manifest["summary"]["uncalibrated_tensors"] == 0


# 2. the manifest and the files -------------------------------------------------------------------


def test_one_byte_of_the_manifest_changed_is_refused(pair, archive, tmp_path, capsys):
    a = _copy(archive, tmp_path)
    text = (a / "expert.json").read_text()
    i = text.index('"scale_exp": ') + len('"scale_exp": ')
    digit = text[i]
    (a / "expert.json").write_text(text[:i] + ("1" if digit != "1" else "2") + text[i + 1 :])
    with pytest.raises(ArchiveError, match="does not match its own checksum"):
        open_archive(a)
    assert main(["inspect", str(a)]) == 2
    rc = main(["reconstruct", "--base", str(pair[0]), "--delta", str(a),
               "--out", str(tmp_path / "r"), "--quiet"])  # fmt: skip
    assert rc == 2 and "checksum" in capsys.readouterr().err


def test_a_removed_tensor_entry_is_refused(archive, tmp_path):
    a = _copy(archive, tmp_path)
    m = json.loads((a / "expert.json").read_text())
    del m["tensors"][next(iter(m["tensors"]))]
    (a / "expert.json").write_text(json.dumps(m))
    with pytest.raises(ArchiveError):
        open_archive(a)


def test_copied_files_are_checked_and_strays_are_not_copied(pair, archive, tmp_path):
    a = _copy(archive, tmp_path)
    (a / "model.safetensors").write_bytes(b"a stray file, not the archive's")
    (a / "tokenizer.json").write_text("{}")  # not a file this archive owns
    rec = reconstruct(pair[0], a, tmp_path / "rec", progress=False)
    assert load_file(str(rec / "model.safetensors"))  # the weights, not the stray
    assert not (rec / "tokenizer.json").exists()
    cfg = json.loads((a / "config.json").read_text())
    cfg["num_hidden_layers"] = 1
    (a / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ArchiveError, match="config.json"):
        reconstruct(pair[0], a, tmp_path / "rec2", progress=False)


def test_file_names_cannot_leave_the_archive(archive, tmp_path):
    from expertswitch.io.archive import sealed

    a = _copy(archive, tmp_path)
    m = json.loads((a / "expert.json").read_text())
    m["files"]["../outside.json"] = {"bytes": 2, "sha256": "0" * 64}
    (a / "expert.json").write_text(json.dumps(sealed(m)))
    with pytest.raises(ArchiveError, match="cannot name a file"):
        open_archive(a)


# 3. the base -------------------------------------------------------------------------------------


def test_a_base_differing_only_in_its_norms_is_refused(pair, archive, tmp_path):
    from safetensors.torch import save_file

    base, _ = pair
    state = load_file(str(base / "model.safetensors"))
    state["model.norm.weight"][9] += 0.05
    other = tmp_path / "other-base"
    other.mkdir()
    save_file(state, str(other / "model.safetensors"))
    shutil.copyfile(base / "config.json", other / "config.json")
    with pytest.raises(ExpertSwitchError, match="different base"):
        reconstruct(other, archive, tmp_path / "rec", progress=False)


# 5. flags that would do nothing ----------------------------------------------------------------


@pytest.mark.parametrize("flags, needle", [
    (["--method", "bitdelta", "--bits", "4"], "1 bit"),
    (["--method", "bitdelta", "--tune-steps", "50"], "--tune-steps"),
    (["--method", "rtn", "--salient", "0.02"], "--salient"),
    (["--method", "rtn", "--tune-steps", "10"], "--tune-steps"),
    (["--method", "rtn", "--clip-floor", "0.5"], "--clip-floor"),
    (["--method", "bitdelta", "--group-size", "64"], "--group-size"),
])  # fmt: skip
def test_flags_the_method_does_not_use_are_refused(pair, tmp_path, capsys, flags, needle):
    base, expert = pair
    rc = main(["compress", "--base", str(base), "--expert", str(expert),
               "--out", str(tmp_path / "o"), "--quiet", *flags])  # fmt: skip
    assert rc == 2 and needle in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_help_shows_the_defaults(capsys):
    with pytest.raises(SystemExit):
        main(["compress", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for default in ("default: mixed", "default 2", "default 0.01", "default 128",
                    "default 8192", "default 512)", "default 0 = off"):  # fmt: skip
        assert default in text, default


# the fuzz: every file of an archive, flipped, truncated, deleted ------------------------------


@settings(max_examples=300, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])  # fmt: skip
@given(data=st.data())
def test_damaged_archives_open_exactly_or_not_at_all(pair, archive, rebuilt, data):
    """Any byte of any file flipped, any file cut short, deleted or emptied, an extra file:
    the archive is refused with an ExpertSwitchError, or it rebuilds exactly the reference
    model (weights and copied files) — never a traceback, never a wrong model."""
    weights, aux = rebuilt
    with tempfile.TemporaryDirectory() as tmp:
        a = _copy(archive, Path(tmp))
        files = sorted(p.name for p in a.iterdir())
        target = a / data.draw(st.sampled_from(files))
        how = data.draw(st.sampled_from(["flip", "truncate", "delete", "empty", "append"]))
        raw = target.read_bytes()
        if how == "flip" and raw:
            i = data.draw(st.integers(0, len(raw) - 1))
            raw = raw[:i] + bytes([raw[i] ^ data.draw(st.integers(1, 255))]) + raw[i + 1 :]
            target.write_bytes(raw)
        elif how == "truncate":
            target.write_bytes(raw[: data.draw(st.integers(0, max(0, len(raw) - 1)))])
        elif how == "delete":
            target.unlink()
        elif how == "empty":
            target.write_bytes(b"")
        else:
            target.write_bytes(raw + data.draw(st.binary(min_size=1, max_size=16)))
        try:
            out = reconstruct(pair[0], a, Path(tmp) / "rec", progress=False)
        except ExpertSwitchError:
            return
        got = load_file(str(out / "model.safetensors"))
        assert got.keys() == weights.keys()
        assert all(torch.equal(got[k], weights[k]) for k in weights)
        assert _aux(out) == aux


# 4. any architecture -----------------------------------------------------------------------------


def _arch(kind: str):
    from transformers import (
        GPT2Config,
        GPT2LMHeadModel,
        OPTConfig,
        OPTForCausalLM,
        Qwen2MoeConfig,  # fmt: skip
        Qwen2MoeForCausalLM,
    )

    if kind == "gpt2":
        return GPT2LMHeadModel(
            GPT2Config(
                n_embd=64,
                n_layer=2,
                n_head=4,
                vocab_size=256,
                n_positions=128,
                bos_token_id=1,
                eos_token_id=2,
            )
        )
    if kind == "opt":
        return OPTForCausalLM(
            OPTConfig(
                hidden_size=64,
                num_hidden_layers=2,
                num_attention_heads=4,
                ffn_dim=128,
                vocab_size=256,
                max_position_embeddings=128,
                word_embed_proj_dim=64,
            )
        )
    if kind == "llama4":  # fused experts stored [E, in, out]
        from transformers import Llama4ForCausalLM, Llama4TextConfig

        return Llama4ForCausalLM(Llama4TextConfig(
            hidden_size=64, intermediate_size=128, intermediate_size_mlp=128,
            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            num_local_experts=4, num_experts_per_tok=1, vocab_size=256,
            max_position_embeddings=128, head_dim=16))  # fmt: skip
    return Qwen2MoeForCausalLM(Qwen2MoeConfig(
        hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
        shared_expert_intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_experts=4, num_experts_per_tok=2, vocab_size=256,
        max_position_embeddings=128))  # fmt: skip


@pytest.mark.parametrize("kind", ["gpt2", "opt", "qwen2moe", "llama4"])
def test_every_linear_weight_of_other_architectures_is_quantized(tmp_path, kind):
    """GPT-2 (Conv1D, weights [in, out]), OPT (out_proj) and Qwen2-MoE (fused experts, shared
    expert, routers): every linear weight's delta is quantized — found from the modules, not
    by name — and the rebuilt model loads in transformers and matches the expert (8 bits)."""
    from transformers import AutoModelForCausalLM
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    model = _arch(kind)
    model.save_pretrained(tmp_path / "base")
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * p.std() * torch.randn(p.shape, generator=g))
    model.save_pretrained(tmp_path / "expert")
    out = compress_expert(tmp_path / "base", tmp_path / "expert", tmp_path / "ar",
                          make_method("mixed", bits=8), OPTS)  # fmt: skip
    entries = open_archive(out).entries
    # what must be quantized: every matrix of the checkpoint (as saved: transformers 5 writes
    # Qwen2-MoE's fused experts back as per-expert matrices) but embeddings and routers
    from expertswitch.io.checkpoint import open_checkpoint

    ckpt = open_checkpoint(tmp_path / "base")
    embeddings = {
        f"{n}.weight"
        for n, m in model.named_modules()
        if isinstance(m, torch.nn.Embedding) or m is model.get_output_embeddings()
    }
    matrices = {n for n in ckpt.names() if len(ckpt.shape(n)) >= 2} - embeddings
    routers = {n for n in matrices
               if n.rsplit(".", 2)[-2] in ("gate", "shared_expert_gate", "router")}  # fmt: skip
    quantized = {n for n, e in entries.items() if e.kind == "quantized"}
    assert matrices - routers and quantized == matrices - routers, kind
    assert all(entries[n].meta["calibrated"] for n in quantized), kind
    exact = {n: e.meta["exact_because"] for n, e in entries.items() if e.kind == "exact"}
    assert "not a linear layer" not in exact.values()
    assert all(exact[n] == "MoE router" for n in routers)
    if kind == "gpt2":
        conv = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, Conv1D)}
        assert conv and all(entries[n].meta.get("transposed") for n in conv)
    if kind == "llama4":  # [E, in, out]: quantized with input channels last
        fused = {n for n in quantized if n.endswith(("gate_up_proj", "down_proj"))
                 and len(ckpt.shape(n)) == 3}  # fmt: skip
        assert fused and all(entries[n].meta.get("transposed") for n in fused)
    rec = reconstruct(tmp_path / "base", out, tmp_path / "rec", progress=False)
    got = AutoModelForCausalLM.from_pretrained(rec, dtype=torch.float32).state_dict()
    want = AutoModelForCausalLM.from_pretrained(tmp_path / "expert", dtype=torch.float32)
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "base", dtype=torch.float32)
    for name, w in want.state_dict().items():
        d = w - base.state_dict()[name]
        if d.norm() > 0:  # 8 bits: the delta comes back to within a few percent
            assert (got[name] - w).norm() < 0.05 * d.norm(), name


# 7. memory: parts written as they are produced ---------------------------------------------------


def test_streamed_safetensors_equal_what_safetensors_writes(tmp_path):
    """The streaming writer (one tensor held at a time) against safetensors' own save_file:
    every dtype, an empty tensor, a 0-d one, odd sizes; both read back identically."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from expertswitch.io.stream_writer import StreamingSafetensorsWriter

    g = torch.Generator().manual_seed(0)
    tensors = {
        "a::f32": torch.randn(3, 5, generator=g),
        "b::bf16": torch.randn(7, generator=g).bfloat16(),
        "c::f16": torch.randn(2, 3, 1, generator=g).half(),
        "d::i64": torch.arange(5),
        "e::u8": torch.randint(0, 255, (9,), generator=g, dtype=torch.uint8),
        "f::bool": torch.tensor([True, False, True]),
        "g::empty": torch.zeros(0, 4),
        "h::scalar": torch.tensor(3.5),
        "i::i32": torch.tensor([[1, -2], [3, 4]], dtype=torch.int32).T,  # not contiguous
    }
    w = StreamingSafetensorsWriter(tmp_path / "s.safetensors")
    for k, t in tensors.items():
        w.add(k, t)
    w.finish({"format": "x"})
    save_file({k: t.contiguous() for k, t in tensors.items()}, str(tmp_path / "ref.safetensors"),
              metadata={"format": "x"})  # fmt: skip
    assert not list(tmp_path.glob("*.spool"))
    with safe_open(str(tmp_path / "s.safetensors"), "pt") as a, \
            safe_open(str(tmp_path / "ref.safetensors"), "pt") as b:  # fmt: skip
        assert a.metadata() == b.metadata() == {"format": "x"}
        assert sorted(a.keys()) == sorted(b.keys()) == sorted(tensors)
        for k in tensors:
            x, y = a.get_tensor(k), b.get_tensor(k)
            assert x.dtype == y.dtype and x.shape == y.shape and torch.equal(x, y), k
    with pytest.raises(ValueError, match="twice"):
        w2 = StreamingSafetensorsWriter(tmp_path / "t.safetensors")
        w2.add("x", torch.ones(1))
        w2.add("x", torch.ones(1))
    w2.abort()
    assert not list(tmp_path.glob("*.spool"))


# second review: what a one-byte header edit, a stray manifest or a kept mtime could do -----------


def test_a_parts_dtype_changed_in_the_header_is_refused(archive, tmp_path):
    """ "F16" → "I16" in delta.safetensors' header: same bytes, same size, same checksum — and
    another tensor. The header must agree with the manifest's dtype and shape."""
    a = _copy(archive, tmp_path)
    f = a / "delta.safetensors"
    raw = f.read_bytes()
    i = raw.index(b'"F16"')
    f.write_bytes(raw[:i] + b'"I16"' + raw[i + 5 :])
    with pytest.raises(ArchiveError, match="stored as"):
        open_archive(a)


def test_overwrite_refuses_a_directory_that_only_looks_like_an_archive(pair, tmp_path):
    base, expert = pair
    mine = tmp_path / "proj"
    (mine / "data").mkdir(parents=True)
    (mine / "expert.json").write_text("{}")
    (mine / "data" / "thesis.tex").write_text("years of work")
    opts = CompressOptions(calib=OPTS.calib, progress=False, overwrite=True)
    with pytest.raises(ConfigError, match="not a"):
        compress_expert(base, expert, mine, make_method("rtn"), opts)
    assert (mine / "data" / "thesis.tex").read_text() == "years of work"


def test_zoo_build_never_replaces_a_directory_that_is_not_a_family(tmp_path):
    from expertswitch.zoo.build import build_family

    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "thesis.tex").write_text("years of work")
    with pytest.raises(ConfigError, match="not a"):
        build_family("micro", root=victim, progress=False, log=lambda *_: None)
    assert (victim / "thesis.tex").read_text() == "years of work"


def test_fingerprint_cache_is_not_fooled_by_a_kept_mtime(pair, tmp_path, monkeypatch):
    import os

    from safetensors.torch import save_file

    import expertswitch.io.checkpoint as ckpt

    monkeypatch.setenv("EXPERTSWITCH_CACHE", str(tmp_path / "cache"))
    base, _ = pair
    copy = tmp_path / "b"
    shutil.copytree(base, copy)
    first = ckpt.open_checkpoint(copy).fingerprint()
    f = copy / "model.safetensors"
    st = f.stat()
    state = load_file(str(f))
    state["model.norm.weight"][5] += 1.0  # same size
    save_file(state, str(f))
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))  # as cp -p, rsync -t, tar would
    ckpt._FINGERPRINTS.clear()
    assert ckpt.open_checkpoint(copy).fingerprint() != first


def test_the_engine_reads_only_the_archives_verified_files(pair, archive, tmp_path):
    from expertswitch.engine import Engine

    a = _copy(archive, tmp_path)
    cfg = json.loads((a / "generation_config.json").read_text())
    cfg["eos_token_id"] = 7
    (a / "generation_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ArchiveError, match="generation_config.json"):
        Engine(pair[0], {"x": a})


def test_distillation_that_cannot_run_is_refused_before_any_work(tmp_path, capsys):
    from conftest import save_pair as pair_of

    base, expert = pair_of(tmp_path / "mix", "mixtral")
    rc = main(["compress", "--base", str(base), "--expert", str(expert), "--out",
               str(tmp_path / "o"), "--distill-steps", "5", "--tokenizer", "bytes",
               "--quiet", "--device", "cpu"])  # fmt: skip
    err = capsys.readouterr().err
    assert rc == 2 and "--distill-steps" in err and "Traceback" not in err
    b2, e2 = save_pair(tmp_path / "llama", "llama")
    rc = main(["compress", "--base", str(b2), "--expert", str(e2), "--out",
               str(tmp_path / "o2"), "--distill-steps", "5", "--tokenizer", "bytes",
               "--calib-tokens", "100", "--quiet", "--device", "cpu"])  # fmt: skip
    assert rc == 2 and "at least 2 calibration windows" in capsys.readouterr().err


def test_router_train_never_writes_into_a_stranger_directory(tmp_path, capsys):
    d = tmp_path / "notes"
    d.mkdir()
    (d / "router.json").write_text("my own notes")
    (d / "todo.txt").write_text("x")
    assert main(["router", "train", "--out", str(d), "--backbone", "ngram"]) == 2
    assert "not a router" in capsys.readouterr().err
    assert (d / "router.json").read_text() == "my own notes"


def test_mixtral_routers_by_checkpoint_name_are_reported_as_routers(tmp_path):
    from expertswitch.compress.layout import linear_layout

    base, _ = save_pair(tmp_path, "mixtral")
    layout = linear_layout(base)
    name = "model.layers.0.block_sparse_moe.gate.weight"
    assert layout.orientation(name, (4, 64), False) is None
    assert layout.why_exact(name, (4, 64)) == "MoE router"
    assert layout.orientation("model.layers.0.mlp.gate_proj.weight", (160, 64), False)


def test_write_archive_holds_one_tensors_parts_at_a_time(tmp_path):
    """Case 7: parts are written as they are produced. Each tensor handed to write_archive is
    gone (freed) by the time the next one is asked for — the archive is never held whole."""
    import gc
    import weakref

    from expertswitch.io.archive import ArchiveEntry, write_archive

    alive = []

    def produced():
        for i in range(5):
            gc.collect()
            assert all(r() is None for r in alive), "an earlier tensor is still held"
            t = torch.randn(64, 64)
            alive.append(weakref.ref(t))
            meta = {"shape": [64, 64], "dtype": "float32"}
            yield ArchiveEntry(f"t{i}", "exact", meta, ["value"]), {"value": t}
            del t

    out = write_archive(tmp_path / "a", {"base": {"fingerprint": "x"}}, produced(), {})
    assert sorted(open_archive(out).entries) == [f"t{i}" for i in range(5)]
