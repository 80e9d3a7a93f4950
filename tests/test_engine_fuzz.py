"""Fuzzing the engine's archive loader: a tampered manifest or delta file either loads into
parts a kernel can trust or is refused with an ExpertSwitchError, and the engine fails only that
expert's requests. The manifest's seal refuses any plain edit (tests/test_archive_safety.py);
here edits are resealed, as a consistent rewrite would be, so that the checks behind the seal —
shapes and parameters a kernel would trust — are what is tested."""

import json
import shutil
import tempfile
from pathlib import Path

import pytest
import torch
from conftest import save_pair
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from expertswitch.compress import CompressOptions, compress_expert, make_method
from expertswitch.compress.calibration import CalibOptions
from expertswitch.engine import Engine, SamplingParams
from expertswitch.errors import ExpertSwitchError
from expertswitch.io.archive import sealed
from expertswitch.io.checkpoint import open_checkpoint
from expertswitch.kernels.delta_cpu import packed_matmul
from expertswitch.models.expert_weights import load_expert

FIXTURE_OK = [HealthCheck.function_scoped_fixture]  # the module fixture is read-only
FIELDS = ["shape", "bits", "group_size", "symmetric", "scale_exp", "n_salient", "kind", "parts"]
VALUES = st.one_of(
    st.integers(-5, 5000), st.booleans(), st.none(), st.text(max_size=4),
    st.lists(st.integers(-2, 300), max_size=3),
    st.sampled_from(["exact", "quantized", "qweight.0", [64, 64], [2, 64, 64]]),
)  # fmt: skip


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz")
    base, expert = save_pair(root, "llama")
    opts = CompressOptions(
        calib=CalibOptions(tokenizer="bytes", tokens=256, seq_len=64), progress=False
    )
    arch = compress_expert(base, expert, root / "arch", make_method("mixed", bits=3), opts)
    ckpt = open_checkpoint(base)
    shapes = {n: ckpt.shape(n) for n in ckpt.names()}
    return base, arch, ckpt.fingerprint(), shapes


def _load_or_refuse(path: Path, fingerprint: str, shapes: dict) -> None:
    """Loads into usable parts, or refuses with an ExpertSwitchError: nothing else."""
    try:
        ew = load_expert("x", path, fingerprint, shapes)
    except ExpertSwitchError:
        return
    for d in ew.deltas.values():  # whatever loaded is consistent: the math runs
        packed_matmul(torch.randn(2, d.shape[1]), d)


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=st.data())
def test_tampered_manifest_loads_consistently_or_is_refused(archive, data):
    base, arch, fingerprint, shapes = archive
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "a"
        shutil.copytree(arch, path)
        manifest = json.loads((path / "expert.json").read_text())
        where = data.draw(st.sampled_from(["tensor", "part", "section"]))
        if where == "tensor":  # one field of one tensor's entry
            record = manifest["tensors"][data.draw(st.sampled_from(sorted(manifest["tensors"])))]
            field = data.draw(st.sampled_from(FIELDS))
        elif where == "part":  # one field of one part's record (shape, dtype, checksum)
            record = manifest["parts"][data.draw(st.sampled_from(sorted(manifest["parts"])))]
            field = data.draw(st.sampled_from(["shape", "dtype", "sha256"]))
        else:  # a whole section
            record = manifest
            field = data.draw(st.sampled_from(["tensors", "parts", "base", "delta_file"]))
        if data.draw(st.booleans()):
            record.pop(field, None)
        else:
            record[field] = data.draw(VALUES)
        # resealed: what a consistent edit looks like, so the checks behind the seal run
        (path / "expert.json").write_text(json.dumps(sealed(manifest)))
        _load_or_refuse(path, fingerprint, shapes)


@settings(
    max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(offset=st.integers(0, 10**9), value=st.integers(0, 255))
def test_flipped_delta_bytes_are_refused_or_harmless(archive, offset, value):
    """Any byte of delta.safetensors changed: refused, unless the change leaves every tensor
    as it was (e.g. a space in the header's JSON), which must then load identically."""
    base, arch, fingerprint, shapes = archive
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "a"
        shutil.copytree(arch, path)
        f = path / "delta.safetensors"
        data = bytearray(f.read_bytes())
        i = offset % len(data)
        if data[i] == value:
            return
        data[i] = value
        f.write_bytes(bytes(data))
        try:
            got = load_expert("x", path, fingerprint, shapes)
        except ExpertSwitchError:
            return
        want = load_expert("x", arch, fingerprint, shapes)
        assert got.deltas.keys() == want.deltas.keys() and got.exact.keys() == want.exact.keys()
        for a, b in zip(got.tensors(), want.tensors()):
            assert a.dtype == b.dtype and torch.equal(a, b)


def test_engine_serves_the_others_when_a_manifest_lies(archive, tmp_path):
    """A quantized tensor whose manifest claims other planes' shapes (checksums still pass):
    its requests fail with the reason, the base and a good expert are served."""
    base, arch, _, _ = archive
    bad = tmp_path / "bad"
    shutil.copytree(arch, bad)
    manifest = json.loads((bad / "expert.json").read_text())
    name = next(n for n, r in manifest["tensors"].items() if r["kind"] == "quantized")
    manifest["tensors"][name]["bits"] = 4  # planes stored for 3 bits
    (bad / "expert.json").write_text(json.dumps(sealed(manifest)))
    eng = Engine(base, {"good": arch, "bad": bad})
    sp = SamplingParams(temperature=0.0, max_tokens=4)
    outs = eng.generate([[5, 6, 7]] * 3, ["good", "bad", None], sp)
    assert outs[1].finish_reason == "error" and "corrupt" in outs[1].error
    assert len(outs[0].token_ids) == 4 and len(outs[2].token_ids) == 4


def rewrite(src: Path, dst: Path, edit) -> Path:
    """A copy of the archive at `src` whose entries `edit(entries)` changed, with checksums
    and sizes recomputed: tampering that the checksums cannot see."""
    from expertswitch.io.archive import open_archive, write_archive

    a = open_archive(src)
    entries = [(e, a.parts(e.name)) for e in a]
    edit(entries)
    keep = ("created", "method", "base", "expert", "calibration", "summary")
    manifest = {k: v for k, v in a.manifest.items() if k in keep}
    return write_archive(dst, manifest, entries, a.aux_files())


def _engine_refuses(base, path) -> str:
    eng = Engine(base, {"x": path})
    out = eng.generate([5, 6, 7], "x", SamplingParams(temperature=0.0, max_tokens=2))[0]
    assert out.finish_reason == "error", out
    assert not eng.has_unfinished() and eng.blocks.num_free == eng.blocks.num_blocks
    return out.error


def test_consistently_tampered_archives_are_refused(archive, tmp_path):
    """Parts rewritten with valid checksums but meaning nothing a kernel may trust: a group
    size that is no multiple of 32 (scales resized to match), a huge one, an scale_exp past
    fp32, an lm_head grown without its embedding. Each fails its own requests, clearly."""
    from expertswitch.io.archive import ArchiveEntry

    base, arch, _, _ = archive

    def quantized(entries):
        return next(i for i, (e, _) in enumerate(entries) if e.kind == "quantized")

    def group48(entries):
        i = quantized(entries)
        e, parts = entries[i]
        k = e.meta["shape"][1]
        g = -(-k // 48)
        parts["scales"] = parts["scales"][:, :1].repeat(1, g).contiguous()
        parts["zeros"] = parts["zeros"][:, :1].repeat(1, g).contiguous()
        entries[i] = (ArchiveEntry(e.name, e.kind, {**e.meta, "group_size": 48}, e.parts), parts)

    def huge_group(entries):
        i = quantized(entries)
        e, parts = entries[i]
        entries[i] = (ArchiveEntry(e.name, e.kind, {**e.meta, "group_size": 10**12}, e.parts),
                      parts)  # fmt: skip

    def scale_exp(entries):
        i = quantized(entries)
        e, parts = entries[i]
        entries[i] = (ArchiveEntry(e.name, e.kind, {**e.meta, "scale_exp": 130}, e.parts), parts)

    def grown_lm_head(entries):
        t = torch.randn(300, 64)
        meta = {"shape": [300, 64], "dtype": "float32"}
        entries.append((ArchiveEntry("lm_head.weight", "exact", meta, ["value"]), {"value": t}))
        entries[:] = [x for x in entries[:-1] if x[0].name != "lm_head.weight"] + entries[-1:]

    reasons = {}
    for label, edit in [("group48", group48), ("huge_group", huge_group),
                        ("scale_exp", scale_exp), ("lm_head", grown_lm_head)]:  # fmt: skip
        reasons[label] = _engine_refuses(base, rewrite(arch, tmp_path / label, edit))
    assert "out of range" in reasons["group48"] and "out of range" in reasons["huge_group"]
    assert "out of range" in reasons["scale_exp"]
    assert "vocabulary" in reasons["lm_head"]


def test_manifest_vocabulary_is_checked_against_the_stored_embedding(archive, tmp_path):
    """A manifest claiming more embedding rows than stored would let out-of-range tokens
    through the prompt check: the load refuses it, so such a request fails alone."""
    from expertswitch.io.archive import ArchiveEntry

    base, arch, _, _ = archive

    def grown_embedding(entries):
        t = torch.randn(256, 64)
        meta = {"shape": [256, 64], "dtype": "float32"}
        entries[:] = [x for x in entries if x[0].name != "model.embed_tokens.weight"]
        entries.append((ArchiveEntry("model.embed_tokens.weight", "exact", meta, ["value"]),
                        {"value": t}))  # fmt: skip

    path = rewrite(arch, tmp_path / "emb", grown_embedding)
    manifest = json.loads((path / "expert.json").read_text())
    manifest["tensors"]["model.embed_tokens.weight"]["shape"] = [1256, 64]
    (path / "expert.json").write_text(json.dumps(sealed(manifest)))
    eng = Engine(base, {"x": path})
    out = eng.generate([5, 900], "x", SamplingParams(temperature=0.0, max_tokens=2))[0]
    assert out.finish_reason == "error" and "does not fit" in out.error
