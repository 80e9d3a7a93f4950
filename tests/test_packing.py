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
