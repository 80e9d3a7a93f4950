import pytest
import torch

from expertswitch.compress.calibration import LayerCalib
from expertswitch.compress.methods import bitdelta_alpha, compress_delta, make_method
from expertswitch.compress.metrics import output_sqnr_db, sqnr_db
from expertswitch.compress.packed import PackedDelta
from expertswitch.errors import ConfigError


def outlier_layer(n=256, k=512, rows=1024, seed=0):
    """Delta with heavy tails and activations with a few large input channels (as LLM
    activations have), split into calibration and held-out inputs."""
    torch.manual_seed(seed)  # StudentT samples from the global generator
    g = torch.Generator().manual_seed(seed)
    delta = torch.distributions.StudentT(3.0).sample((n, k)) * 1e-4
    x = torch.randn(rows, k, generator=g)
    outliers = torch.randperm(k, generator=g)[:6]
    x[:, outliers] *= 40.0
    half = rows // 2
    calib = LayerCalib(mean_sq=x[:half].square().mean(0), sample=x[:half])
    return delta, calib, x[half:], outliers


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
def test_mixed_beats_rtn_in_output_error(bits):
    delta, calib, held_out, _ = outlier_layer(seed=bits)
    mixed = compress_delta(delta, calib, make_method("mixed", bits=bits)).dequantize()
    rtn = compress_delta(delta, calib, make_method("rtn", bits=bits)).dequantize()
    db_mixed = output_sqnr_db(held_out, delta, mixed)
    db_rtn = output_sqnr_db(held_out, delta, rtn)
    assert db_mixed > db_rtn + 3.0, f"{bits} bits: mixed {db_mixed:.2f} dB, rtn {db_rtn:.2f} dB"


def test_salient_channels_are_the_activation_outliers():
    delta, calib, _, outliers = outlier_layer()
    packed = compress_delta(delta, calib, make_method("mixed", bits=2, salient=6))
    assert set(packed.salient_idx.tolist()) == set(outliers.tolist())


def test_salient_columns_reconstruct_exactly():
    delta, calib, _, _ = outlier_layer()
    packed = compress_delta(delta, calib, make_method("mixed", bits=1, salient=0.02))
    idx = packed.salient_idx.long()
    approx = packed.dequantize()
    # only fp16 rounding of the residual remains: relative error ~ 2^-11
    assert sqnr_db(delta[:, idx], approx[:, idx]) > 60


def test_salient_fraction_and_count():
    delta, calib, _, _ = outlier_layer(k=512)
    assert compress_delta(delta, calib, make_method("mixed", salient=0.01)).n_salient == 5
    assert compress_delta(delta, calib, make_method("mixed", salient=7)).n_salient == 7
    assert compress_delta(delta, calib, make_method("mixed", salient=0)).salient_idx is None


def test_bitdelta_matches_definition_without_distillation():
    delta, _, _, _ = outlier_layer()
    cfg = make_method("bitdelta", distill=False)
    packed = compress_delta(delta, None, cfg)
    alpha = delta.abs().mean()
    expected = alpha * torch.where(delta > 0, 1.0, -1.0)
    assert packed.bits == 1 and packed.scales.shape == (delta.shape[0], 1)
    assert torch.allclose(packed.dequantize(), expected, rtol=2e-3)  # α held in fp16


def test_bitdelta_distillation_minimises_layer_output_error():
    delta, calib, _, _ = outlier_layer()
    plain = compress_delta(delta, calib, make_method("bitdelta", distill=False)).dequantize()
    distilled = compress_delta(delta, calib, make_method("bitdelta")).dequantize()
    alpha = bitdelta_alpha(delta, calib.sample)
    assert torch.allclose(distilled.abs().mean(), alpha, rtol=2e-3)
    # α* is the least-squares optimum on the calibration inputs: perturbing it only hurts
    sign = torch.where(delta > 0, 1.0, -1.0)
    for f in (0.9, 1.1):
        assert output_sqnr_db(calib.sample, delta, alpha * sign) > output_sqnr_db(
            calib.sample, delta, f * alpha * sign
        )
    assert output_sqnr_db(calib.sample, delta, distilled) >= output_sqnr_db(
        calib.sample, delta, plain
    )


def test_step_size_tuning_never_worse_on_calibration():
    delta, calib, _, _ = outlier_layer(n=64, k=256)
    plain = compress_delta(delta, calib, make_method("mixed", bits=2, clip_steps=1)).dequantize()
    tuned = compress_delta(
        delta, calib, make_method("mixed", bits=2, clip_steps=1, tune_steps=60)
    ).dequantize()
    before = output_sqnr_db(calib.sample, delta, plain)
    after = output_sqnr_db(calib.sample, delta, tuned)
    assert after >= before - 1e-3
    assert after > before + 0.3, f"tuning from min/max steps should help: {before} → {after}"


def test_stacked_experts_match_per_expert():
    deltas = torch.randn(3, 32, 64) * 1e-3
    deltas[1] *= 50  # experts of very different magnitude share one exponent
    cfg = make_method("mixed", bits=3, salient=2)
    stacked = compress_delta(deltas, None, cfg)
    assert stacked.shape == (3, 32, 64) and stacked.salient_idx.shape == (3, 2)
    dense = stacked.dequantize()
    for e in range(3):
        single = compress_delta(deltas[e], None, cfg).dequantize()
        assert torch.allclose(dense[e], single, rtol=1e-3, atol=1e-3 * single.abs().max())


def test_tiny_deltas_keep_precision():
    """|Δ| ~ 1e-7 would be fp16 subnormals; the per-tensor exponent keeps them exact-ish."""
    delta, calib, _, _ = outlier_layer(n=64, k=128)
    cfg = make_method("mixed", bits=4)
    big = compress_delta(delta, calib, cfg)
    small = compress_delta(delta * 1e-3, calib, cfg)
    assert small.scale_exp < big.scale_exp
    assert abs(sqnr_db(delta * 1e-3, small.dequantize()) - sqnr_db(delta, big.dequantize())) < 0.05


def test_parts_round_trip():
    delta, calib, _, _ = outlier_layer(n=32, k=96)
    packed = compress_delta(delta, calib, make_method("mixed", bits=3, salient=3))
    again = PackedDelta.from_parts(packed.meta(), packed.parts())
    assert torch.equal(again.dequantize(), packed.dequantize())


@pytest.mark.parametrize(
    "name, kwargs, match",
    [
        ("mixed", {"bits": 5}, "bits=5"),
        ("mixed", {"group_size": 100}, "multiple of 32"),
        ("mixed", {"salient": -1}, "salient"),
        ("rtn", {"bits": 0}, "bits=0"),
        ("gptq", {}, "unknown method"),
    ],
)
def test_config_errors(name, kwargs, match):
    with pytest.raises(ConfigError, match=match):
        make_method(name, **kwargs)


def test_one_bit_defaults_to_symmetric():
    assert make_method("mixed", bits=1).symmetric is True
    assert make_method("mixed", bits=2).symmetric is False
    assert make_method("rtn", bits=1, symmetric=False).symmetric is False


_PLANE_WIDTHS = {1: [1], 2: [2], 3: [2, 1], 4: [4], 8: [8]}  # docs/archive.md, written out


def spec_dequantize(p) -> torch.Tensor:
    """Δ̂ element by element, straight from docs/archive.md's layout (bit planes, low bits
    first; step = scale·2^e; zero point or the symmetric centre; salient residuals) — none of
    the package's unpack or dequantize code."""
    n, k = p.shape
    e = 2.0**p.scale_exp
    out = torch.zeros(n, k, dtype=torch.float64)
    for row in range(n):
        for c in range(k):
            q, off = 0, 0
            for plane, w in zip(p.planes, _PLANE_WIDTHS[p.bits]):
                per = 32 // w
                word = int(plane[row, c // per]) & 0xFFFFFFFF
                q |= ((word >> ((c % per) * w)) & ((1 << w) - 1)) << off
                off += w
            j = c // p.group_size
            step = float(p.scales[row, j]) * e
            centre = (2**p.bits - 1) / 2 if p.symmetric else int(p.zeros[row, j])
            out[row, c] = (q - centre) * step
    if p.salient_idx is not None:
        for i, c in enumerate(p.salient_idx.tolist()):
            out[:, c] += p.salient_cols[:, i].double() * e
    return out


@pytest.mark.parametrize("method, bits, symmetric", [
    ("mixed", 1, None), ("mixed", 2, None), ("mixed", 3, None), ("mixed", 4, True),
    ("mixed", 8, None), ("rtn", 2, None), ("rtn", 3, True), ("bitdelta", None, None),
])  # fmt: skip
def test_serving_formula_and_dequantize_equal_the_spec(method, bits, symmetric):
    """matmul_reference (y = 2^e·(x·codesᵀ + x[:, idx]·colsᵀ), the serving formula) and
    dequantize() against Δ̂ decoded element by element from the documented layout."""
    delta, calib, held_out, _ = outlier_layer(n=6, k=96)
    kw = {} if method == "bitdelta" else {"bits": bits, "group_size": 32}
    if symmetric is not None:
        kw["symmetric"] = symmetric
    packed = compress_delta(delta, calib, make_method(method, **kw))
    want = spec_dequantize(packed)
    assert torch.allclose(packed.dequantize().double(), want, rtol=1e-5, atol=1e-9)
    x = held_out[:5].double()
    got = packed.matmul_reference(held_out[:5]).double()
    ref = x @ want.T
    assert torch.allclose(got, ref, rtol=1e-4, atol=1e-4 * ref.abs().max())


def test_clip_floor_keeps_more_of_the_largest_entries():
    """A higher clip floor searches only mild clipping: the largest delta entries survive
    closer to their size, at some cost in importance-weighted error."""
    torch.manual_seed(0)
    delta = torch.distributions.StudentT(2.5).sample((64, 256)) * 0.01
    top = delta.abs().flatten().topk(64).indices
    kept = {}
    for floor in (None, 0.5):
        packed = compress_delta(delta, None, make_method("mixed", bits=2, salient=0,
                                                         clip_floor=floor))  # fmt: skip
        approx = packed.dequantize("cpu").flatten()
        kept[floor] = (approx[top].abs().sum() / delta.flatten()[top].abs().sum()).item()
    assert kept[0.5] > kept[None]
    with pytest.raises(ConfigError, match="clip_floor"):
        make_method("mixed", clip_floor=1.5)


def test_distillation_student_is_the_archive_formula_and_keeps_salient_channels():
    """The student's weight is W + Δ̂ exactly as dequantize() computes it; after its steps
    change, the written PackedDelta holds the new steps and the salient channels unchanged."""
    from expertswitch.compress.distill import _Student

    delta, calib, _, _ = outlier_layer(n=16, k=128)
    p = compress_delta(delta, calib, make_method("mixed", bits=2, group_size=32, salient=4))
    w = torch.randn(16, 128)
    s = _Student(w, p, "cpu")
    assert torch.allclose(s.weight(), w + p.dequantize(), atol=1e-7)
    assert torch.allclose(s.packed().dequantize(), p.dequantize(), rtol=1e-3, atol=1e-7)
    with torch.no_grad():
        s.log_s.add_(0.3)  # every step size × e^0.3
    q = s.packed()
    idx = p.salient_idx.long()
    assert torch.allclose(q.dequantize()[:, idx], p.dequantize()[:, idx], rtol=2e-3, atol=1e-8)
    body = [c for c in range(128) if c not in set(idx.tolist())]
    ratio = q.dequantize()[:, body] / p.dequantize()[:, body]
    finite = p.dequantize()[:, body].abs() > 1e-9
    assert torch.allclose(ratio[finite], torch.full_like(ratio[finite], 1.3499), rtol=2e-3)
    assert torch.equal(torch.stack(q.planes), torch.stack(p.planes))  # codes untouched


def test_model_level_distillation_lowers_held_apart_kl(tmp_path):
    from conftest import save_pair

    from expertswitch.compress import CompressOptions, compress_expert, reconstruct
    from expertswitch.compress.calibration import CalibOptions
    from expertswitch.io.archive import open_archive

    base, expert = save_pair(tmp_path, "llama")
    opts = CompressOptions(calib=CalibOptions(tokenizer="bytes", tokens=2048, seq_len=64),
                           progress=False)  # fmt: skip
    out = compress_expert(base, expert, tmp_path / "ar",
                          make_method("mixed", bits=2, distill_steps=40), opts)  # fmt: skip
    a = open_archive(out)
    rep = a.manifest["distillation"]
    assert rep["tensors"] == 14 and rep["val_kl_after"] < rep["val_kl_before"]
    assert all(e.meta.get("distilled") for e in a if e.kind == "quantized")
    reconstruct(base, out, tmp_path / "rec", progress=False)
