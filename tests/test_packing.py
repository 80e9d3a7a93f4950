import pytest
import torch

from expertswitch.compress.packing import (
    SUPPORTED_BITS,
    pack_codes,
    padded_k,
    plane_widths,
    unpack_codes,
)
from expertswitch.errors import ConfigError


@pytest.mark.parametrize("bits", SUPPORTED_BITS)
@pytest.mark.parametrize("shape", [(1, 32), (3, 64), (7, 96), (5, 128), (2, 4, 160), (1, 1024)])
def test_pack_unpack_bit_exact(bits, shape):
    g = torch.Generator().manual_seed(bits * 1000 + sum(shape))
    codes = torch.randint(0, 1 << bits, shape, generator=g, dtype=torch.int64).to(torch.uint8)
    planes = pack_codes(codes, bits)
    assert all(p.dtype == torch.int32 for p in planes)
    assert torch.equal(unpack_codes(planes, bits), codes)
    # exactly `bits` bits per code: 3-bit costs 3 bits, not 3.2
    assert sum(p.numel() for p in planes) * 32 == codes.numel() * bits


@pytest.mark.parametrize("bits", SUPPORTED_BITS)
def test_extreme_codes_survive_sign_bit(bits):
    """All-ones codes set bit 31 of every word: the int32 wrap must round-trip."""
    codes = torch.full((2, 64), (1 << bits) - 1, dtype=torch.uint8)
    assert torch.equal(unpack_codes(pack_codes(codes, bits), bits), codes)
    zeros = torch.zeros((2, 64), dtype=torch.uint8)
    assert torch.equal(unpack_codes(pack_codes(zeros, bits), bits), zeros)


def test_plane_layout_is_documented_one():
    """Code of channel i sits at bits [i·w, (i+1)·w) of word i // (32/w); 3 bits = planes 2+1."""
    codes = torch.zeros(1, 32, dtype=torch.uint8)
    codes[0, 1] = 0b101  # channel 1
    low, high = pack_codes(codes, 3)
    assert plane_widths(3) == (2, 1)
    assert low.shape == (1, 2) and high.shape == (1, 1)
    assert low[0, 0].item() == 0b01 << 2  # low two bits of channel 1 at bits [2, 4)
    assert high[0, 0].item() == 1 << 1  # high bit of channel 1 at bit 1


def test_odd_k_pads_to_word():
    assert padded_k(1) == 32 and padded_k(32) == 32 and padded_k(33) == 64


def test_bad_inputs():
    with pytest.raises(ConfigError, match="bits=5"):
        plane_widths(5)
    with pytest.raises(ValueError, match="multiple of 32"):
        pack_codes(torch.zeros(1, 33, dtype=torch.uint8), 2)
    with pytest.raises(ValueError, match="out of range"):
        pack_codes(torch.full((1, 32), 4, dtype=torch.uint8), 2)


@pytest.mark.parametrize("method,bits", [(m, b) for m in ("mixed", "rtn") for b in SUPPORTED_BITS]
                         + [("bitdelta", 1)])  # fmt: skip
def test_slices_of_a_packed_delta_are_the_slices_of_its_matrix(bits, method):
    """Tensor parallelism keeps each rank's rows (column-parallel layers) or input channels
    (row-parallel layers) of an expert's packed delta: the slice dequantizes to the same slice
    of the whole Δ̂ (salient channels inside it renumbered, those outside dropped), and its
    matmul_reference equals the dense slice's product. The reference is the dense matrix."""
    from expertswitch.compress.methods import compress_delta, make_method

    g = torch.Generator().manual_seed(bits)
    n, k = 24, 200  # K not a multiple of 32 nor of the group: the last slice ends padded
    delta = torch.randn(n, k, generator=g) * 1e-3
    cfg = make_method(method, bits=bits, group_size=64, salient=9, symmetric=bits == 1,
                      distill=False)  # fmt: skip
    d = compress_delta(delta, None, cfg)
    whole = d.dequantize()
    assert method != "mixed" or d.n_salient == 9
    x = torch.randn(5, k, generator=g)
    step = 32 if method == "bitdelta" else 64
    for lo, hi in [(0, step), (step, 2 * step), (2 * step, k), (0, k)]:
        part = d.cols(lo, hi)
        assert part.shape == (n, hi - lo)
        torch.testing.assert_close(part.dequantize(), whole[:, lo:hi], rtol=0, atol=0)
        torch.testing.assert_close(
            part.matmul_reference(x[:, lo:hi]),
            x[:, lo:hi] @ whole[:, lo:hi].T,
            rtol=1e-5,
            atol=1e-7,
        )
        if method == "mixed":
            inside = ((d.salient_idx >= lo) & (d.salient_idx < hi)).sum().item()
            assert part.n_salient == inside
    for lo, hi in [(0, 8), (8, 24), (5, 6)]:
        torch.testing.assert_close(d.rows(lo, hi).dequantize(), whole[lo:hi], rtol=0, atol=0)
    bad = (0, 16) if method == "bitdelta" else (32, 96)  # not whole words / groups
    with pytest.raises(ConfigError, match=f"multiples of {step}"):
        d.cols(*bad)
