"""Bit packing: MLX's little-endian, LSB-first stream, checked against explicit golden words and MLX itself."""

import pytest
import torch
from conftest import mx, same_bits, to_mx, to_torch

import lowbit
from lowbit.formats import pack_bits, unpack_bits


def words(t: torch.Tensor) -> list[int]:
    return [int(v) & 0xFFFFFFFF for v in t.view(torch.int32).reshape(-1).tolist()]


@pytest.mark.parametrize(
    "bits, codes, expected",
    [
        (4, list(range(16)) * 2, [0x76543210, 0xFEDCBA98, 0x76543210, 0xFEDCBA98]),
        (3, list(range(8)) * 4, [0x88FAC688, 0xC688FAC6, 0xFAC688FA]),
        (2, [0, 1, 2, 3] * 8, [0xE4E4E4E4, 0xE4E4E4E4]),
        (1, [0, 1] * 16, [0xAAAAAAAA]),
        (8, [1, 2, 3, 4], [0x04030201]),
        (6, [63, 0, 0, 0, 0, 63] + [0] * 26, [0xC000003F, 0x0000000F, 0, 0, 0, 0]),  # code 5: bits 30..35
        (5, [31] + [0] * 5 + [31] + [0] * 25, [0xC000001F, 0x00000007, 0, 0, 0]),  # code 6: bits 30..34
    ],
)
def test_golden_words(bits, codes, expected):
    """Packed words for hand-checked streams (the 3-, 5- and 6-bit ones straddle word boundaries)."""
    assert words(pack_bits(torch.tensor(codes), bits)) == expected


def test_straddling_code():
    """3-bit code 10 occupies stream bits 30..32: word0 bits 31:30 and word1 bit 0."""
    codes = torch.zeros(32, dtype=torch.int64)
    codes[10] = 0b111
    assert words(pack_bits(codes, 3))[:2] == [0xC0000000, 0x00000001]


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 6, 8])
def test_roundtrip_and_mlx_layout(bits, gen):
    """Codes survive pack/unpack, and MLX reads our words as the same codes (via its own dequantize)."""
    codes = torch.randint(0, 2**bits, (6, 128), generator=gen)
    packed = pack_bits(codes, bits)
    assert torch.equal(unpack_bits(packed, bits).long(), codes)
    # MLX decodes code*1+0 with unit scales and zero biases: the codes themselves.
    scales = mx.ones((6, 4))
    biases = mx.zeros((6, 4))
    decoded = to_torch(mx.dequantize(to_mx(packed), scales, biases, 32, bits))
    assert torch.equal(decoded.long(), codes)


def test_mlx_golden_affine_example():
    """mlx-semantics 1.2: affine b4 gs32 on [0..15, 0..15] -> words 0x89abcdef 0x01234567, scale -1, bias 15."""
    w = torch.arange(16, dtype=torch.float32).repeat(2).reshape(1, 32)
    w_q, scales, biases = lowbit.quantize(w, 32, 4)
    assert words(w_q)[:2] == [0x89ABCDEF, 0x01234567]
    assert scales.item() == -1.0 and biases.item() == 15.0


def test_unpack_noncontiguous_words(gen):
    """Unpacking a strided view gives the same codes as its contiguous copy."""
    codes = torch.randint(0, 8, (8, 64), generator=gen)
    packed = pack_bits(codes, 3)
    view = packed[::2]
    assert same_bits(unpack_bits(view, 3), unpack_bits(view.contiguous(), 3))
