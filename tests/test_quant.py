import pytest
import torch

from expertswitch.compress.metrics import sqnr_db
from expertswitch.compress.quant import dequantize_groups, quantize_groups


def _deltas(kind: str, shape=(256, 512), seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if kind == "gauss":
        return torch.randn(*shape, generator=g) * 1e-3
    # Student-t with ν = 2.5: the heavy tails fine-tuning deltas show
    torch.manual_seed(seed)
    u = torch.distributions.StudentT(2.5).sample(shape)
    return u * 1e-3


def _roundtrip(w, bits, symmetric, clip_steps, group_size=128, importance=None):
    q = quantize_groups(w, bits, group_size, symmetric, importance, clip_steps)
    return dequantize_groups(q.codes, q.scales, q.zeros, bits, group_size, w.shape[1])


# Measured (seed 0) minus ~0.5 dB margin; 1 bit is symmetric (±s/2), the rest asymmetric.
FLOORS = {
    "gauss": {1: 4.0, 2: 8.2, 3: 14.0, 4: 19.8, 8: 44.0},
    "heavy": {1: 1.0, 2: 6.0, 3: 9.8, 4: 14.7, 8: 38.3},
}


@pytest.mark.parametrize("kind", ["gauss", "heavy"])
@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8])
def test_sqnr_floor(kind, bits):
    torch.manual_seed(0)
    w = _deltas(kind)
    db = sqnr_db(w, _roundtrip(w, bits, bits == 1, clip_steps=16))
    assert db > FLOORS[kind][bits], f"{kind} {bits}-bit SQNR {db:.2f} dB"


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
def test_clip_search_never_worse_than_minmax(bits):
    torch.manual_seed(1)
    w = _deltas("heavy")
    plain = sqnr_db(w, _roundtrip(w, bits, bits == 1, clip_steps=1))
    searched = sqnr_db(w, _roundtrip(w, bits, bits == 1, clip_steps=16))
    assert searched >= plain - 1e-6


def test_more_bits_less_error():
    w = _deltas("gauss")
    dbs = [sqnr_db(w, _roundtrip(w, b, b == 1, 16)) for b in (1, 2, 3, 4, 8)]
    assert dbs == sorted(dbs)
    # each extra bit buys close to the textbook 6 dB from 2 bits on
    assert all(4.5 < b - a < 7.5 for a, b in zip(dbs[1:3], dbs[2:4]))


def test_partial_last_group_and_odd_k():
    w = _deltas("gauss", shape=(7, 200))  # groups of 128: one full, one of 72; K_pad = 224
    q = quantize_groups(w, 4, 128, False, None, 1)
    assert q.codes.shape == (7, 224) and q.scales.shape == (7, 2)
    assert torch.all(q.codes[:, 200:] == 0)
    approx = dequantize_groups(q.codes, q.scales, q.zeros, 4, 128, 200)
    assert approx.shape == w.shape and sqnr_db(w, approx) > 19


def test_symmetric_one_bit_levels_are_plus_minus_half_step():
    w = torch.tensor([[0.3, -0.1, 0.2, -0.5] * 8])
    q = quantize_groups(w, 1, 32, True, None, 1)
    approx = dequantize_groups(q.codes, q.scales, None, 1, 32, 32)
    half = q.scales[0, 0].item() / 2
    assert torch.allclose(approx.abs(), torch.full_like(approx, half))
    assert torch.equal(approx.sign(), w.sign())


def test_zero_delta_stays_zero():
    """Asymmetric grids hold 0 exactly; symmetric ones have no zero level, so an all-zero group
    comes back as ±(smallest step)/2, far below anything fp16 or bf16 weights can express."""
    w = torch.zeros(4, 64)
    for bits in (2, 4):
        assert torch.count_nonzero(_roundtrip(w, bits, False, 16, group_size=32)) == 0
    assert _roundtrip(w, 1, True, 16, group_size=32).abs().max() < 1e-30


def test_importance_moves_error_off_important_channels():
    """Weighted clip search trades error on unimportant channels for the important ones."""
    w = _deltas("heavy", shape=(64, 128))
    imp = torch.ones(128)
    imp[:16] = 100.0
    plain = _roundtrip(w, 2, False, 16)
    weighted = _roundtrip(w, 2, False, 16, importance=imp)
    err = lambda a: ((w - a).square().sum(0) * imp).sum()  # noqa: E731
    assert err(weighted) <= err(plain)
