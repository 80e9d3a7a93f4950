"""Fuzzing the engine's archive loader: a tampered manifest or delta file either loads into
parts a kernel can trust or is refused with an ExpertSwitchError, and the engine fails only that
expert's requests. (Checksums protect the parts' bytes; nothing but these checks protects the
manifest's shapes and parameters, which a kernel would trust.)"""

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
    opts = CompressOptions(calib=CalibOptions(tokens=256, seq_len=64), progress=False)
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
        (path / "expert.json").write_text(json.dumps(manifest))
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
    (bad / "expert.json").write_text(json.dumps(manifest))
    eng = Engine(base, {"good": arch, "bad": bad})
    sp = SamplingParams(temperature=0.0, max_tokens=4)
    outs = eng.generate([[5, 6, 7]] * 3, ["good", "bad", None], sp)
    assert outs[1].finish_reason == "error" and "corrupt" in outs[1].error
    assert len(outs[0].token_ids) == 4 and len(outs[2].token_ids) == 4
