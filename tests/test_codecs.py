"""Element and scale codecs against MLX: exhaustive e4m3 and e8m0 decode, to_fp8 / from_fp8, the e2m1 tie table."""

import math

import numpy as np
import pytest
import torch
from conftest import DTYPES, TORCH_TO_MX, mx, to_mx, to_torch

import lowbit
from lowbit.formats import codecs


@pytest.mark.parametrize("dtype", DTYPES)
def test_e4m3_decode_all_bytes(dtype):
    """All 256 e4m3 bytes decode exactly as mx.from_fp8 (0x7F/0xFF are NaN in 0.32.4)."""
    b = torch.arange(256, dtype=torch.uint8)
    ours = lowbit.from_fp8(b, dtype)
    theirs = to_torch(mx.from_fp8(to_mx(b), dtype=TORCH_TO_MX[dtype]))
    assert torch.equal(ours.float().nan_to_num(12345.0), theirs.float().nan_to_num(12345.0))
    assert torch.isnan(ours[0x7F]) and torch.isnan(ours[0xFF])


@pytest.mark.parametrize("dtype", DTYPES)
def test_to_fp8_matches_mlx_on_finite_values(dtype, gen):
    """Round half to even and saturation at 448 agree with mx.to_fp8 for finite inputs of every dtype."""
    x = torch.cat([
        torch.randn(20000, generator=gen) * 100,
        torch.randn(20000, generator=gen) * 1e-2,
        torch.linspace(-600, 600, 24001),
        torch.tensor([2.0**-10, -(2.0**-10), 3 * 2.0**-11, 0.0, -0.0, 448.0, 464.0, 480.0, 6e4]),
    ]).to(dtype)
    assert torch.equal(lowbit.to_fp8(x), to_torch(mx.to_fp8(to_mx(x))))


def test_to_fp8_roundtrip_exact_values():
    """MLX's test_to_from_fp8: representable values round-trip exactly, negatives included."""
    values = torch.tensor([448, 256, 192, 128, 96, 64, 48, 32, 24, 16, 12, 8, 6, 4, 3, 2, 0.015625], dtype=torch.float32)
    values = torch.cat([values, -values])
    assert torch.equal(lowbit.from_fp8(lowbit.to_fp8(values), torch.float32), values)


def test_to_fp8_nonfinite_stays_nonfinite():
    """NaN and +-inf become the e4m3 NaN, sign kept (MLX gives +-448: a documented deviation)."""
    codes = lowbit.to_fp8(torch.tensor([float("nan"), float("inf"), -float("inf")]))
    assert codes.tolist() == [0x7F, 0x7F, 0xFF]
    assert torch.isnan(lowbit.from_fp8(codes, torch.float32)).all()


@pytest.mark.parametrize("dtype", DTYPES)
def test_e8m0_decode_all_bytes(dtype):
    """All 256 e8m0 bytes decode like MLX's mxfp8 dequantize of the element 1.0 (byte 0 = 2^-127, 255 = inf)."""
    scales = torch.arange(256, dtype=torch.uint8).reshape(256, 1)
    w = torch.full((256, 8), 0x38383838, dtype=torch.int64).to(torch.int32).view(torch.uint32)  # e4m3 1.0 x 4
    theirs = to_torch(mx.dequantize(to_mx(w), to_mx(scales), mode="mxfp8", dtype=TORCH_TO_MX[dtype]))
    ours = lowbit.dequantize(w, scales, mode="mxfp8", dtype=dtype)
    assert torch.equal(ours, theirs)
    assert codecs.e8m0_decode(torch.tensor([0]), torch.float32).item() == 2.0**-127
    assert math.isinf(codecs.e8m0_decode(torch.tensor([255]), torch.float32).item())


def test_e2m1_table_and_ties():
    """Every e2m1 value encodes to itself; exact ties round half to even; tiny negatives give +0; saturation at 6."""
    lut = torch.tensor(codecs.E2M1_VALUES)
    assert torch.equal(codecs.e2m1_decode(codecs.e2m1_encode(lut), torch.float32), lut.abs() * torch.sign(lut)
                       + 0.0 * lut)
    ties = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0])
    even = codecs.e2m1_decode(codecs.e2m1_encode(ties), torch.float32)
    assert even.tolist() == [0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0]
    toward_zero = codecs.e2m1_decode(codecs.e2m1_encode(ties, ties_to_even=False), torch.float32)
    assert toward_zero.tolist() == [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0]  # MLX 0.32.4 CPU
    assert codecs.e2m1_encode(torch.tensor([-0.1, -0.25, 7.0, -100.0])).tolist() == [0, 0, 7, 15]


def test_e2m1_encode_mlx_cpu_rule_matches_argmin(gen):
    """ties_to_even=False is exactly MLX's CPU rule: argmin |q - LUT| with the first index winning."""
    q = torch.cat([torch.randn(5000, generator=gen) * 3, torch.arange(-28, 29) * 0.25])
    lut = torch.tensor(codecs.E2M1_VALUES)
    argmin = (q[:, None] - lut).abs().argmin(-1)
    assert torch.equal(codecs.e2m1_encode(q, ties_to_even=False).long(), argmin)


def test_mxfp4_tie_example_documented_deviation():
    """mlx-semantics 1.4: MLX CPU gives word0 0x531 for [0.75,1.75,3.5,-0.1,...,6]; lowbit's RNE gives 0x642."""
    w = torch.zeros(1, 32)
    w[0, :4] = torch.tensor([0.75, 1.75, 3.5, -0.1])
    w[0, -1] = 6.0
    w_q, scales = lowbit.quantize(w, mode="mxfp4")
    assert scales.item() == 127
    assert int(w_q[0, 0].view(torch.int32)) & 0xFFFF == 0x0642
    theirs = mx.quantize(to_mx(w), mode="mxfp4")
    assert np.array(theirs[0])[0, 0] & 0xFFFF == 0x0531
