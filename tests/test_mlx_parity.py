"""Golden parity with MLX 0.32.4 itself: packed bytes of quantize and values of dequantize, every format and dtype.

quantize is byte-identical to MLX for affine in every dtype and for the fp modes on float32. On float16/bfloat16
the fp4 modes differ only at exact ties (MLX's CPU rounds them toward zero, lowbit to even): proven by re-running
lowbit with MLX's tie rule, which must then be byte-identical too.
"""

import pytest
import torch
from conftest import ALL_CONFIGS, DTYPES, TORCH_TO_MX, mx, same_bits, to_mx, to_torch

import lowbit
from lowbit.formats.mx import quantize_mx
from lowbit.formats.nvfp4 import quantize_nvfp4


def weights(dtype, gs, gen, rows=48, groups=8):
    """Gaussian rows with per-row magnitudes over 2^-8..2^8, plus zero, constant and all-negative groups."""
    w = torch.randn(rows, groups * gs, generator=gen) * torch.exp2(torch.randint(-8, 9, (rows, 1), generator=gen).float())
    w[0, :gs] = 0
    w[1, :gs] = 2.5
    w[2, :gs] = -torch.rand(gs, generator=gen)
    w[3, :gs] = -1.25
    w[4, gs : 2 * gs] = torch.linspace(-1, 3, gs)
    return w.to(dtype)


def mlx_quantize(w, gs, bits, mode, global_scale=None):
    kw = {} if global_scale is None else {"global_scale": to_mx(global_scale)}
    return tuple(to_torch(a) for a in mx.quantize(to_mx(w), gs, bits, mode=mode, **kw))


@pytest.mark.parametrize("mode, gs, bits", ALL_CONFIGS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_quantize_bytes_and_dequantize_values(mode, gs, bits, dtype, gen):
    w = weights(dtype, gs, gen)
    ours = lowbit.quantize(w, gs, bits, mode)
    theirs = mlx_quantize(w, gs, bits, mode)
    fp4 = mode in ("mxfp4", "nvfp4")
    if dtype == torch.float32 or not fp4:
        for a, b in zip(ours, theirs):
            assert same_bits(a, b)
    else:
        assert same_bits(ours[1], theirs[1])  # scales never depend on the tie rule
        mlx_rule = quantize_mx(w, mode, ties_to_even=False) if mode == "mxfp4" else quantize_nvfp4(w, ties_to_even=False)
        assert same_bits(mlx_rule[0], theirs[0]) and same_bits(mlx_rule[1], theirs[1])
    # dequantize MLX's own bytes: bit-exact, default dtype and every explicit dtype
    biases = theirs[2] if mode == "affine" else None
    for out_dtype in (None, *DTYPES):
        kw = {} if out_dtype is None else {"dtype": TORCH_TO_MX[out_dtype]}
        expected = to_torch(mx.dequantize(to_mx(theirs[0]), to_mx(theirs[1]), to_mx(biases), gs, bits, mode=mode, **kw))
        got = lowbit.dequantize(theirs[0], theirs[1], biases, gs, bits, mode, dtype=out_dtype)
        assert same_bits(got, expected), (out_dtype, (got.float() - expected.float()).abs().max())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("scale", ["amax", 1000.0, 7.0, 1e-3, 42.0])
def test_nvfp4_global_scale_parity(dtype, scale, gen):
    """nvfp4 with a tensor scale: block scale bytes identical, codes identical up to ties, dequantize exact."""
    w = weights(dtype, 16, gen, rows=32, groups=16)
    g = w.abs().max().float().reshape(1) if scale == "amax" else torch.tensor([scale])
    ours = lowbit.quantize(w, mode="nvfp4", global_scale=g)
    theirs = mlx_quantize(w, 16, 4, "nvfp4", g)
    assert same_bits(ours[1], theirs[1])
    mlx_rule = quantize_nvfp4(w, g, ties_to_even=False)
    assert same_bits(mlx_rule[0], theirs[0])
    if dtype == torch.float32:
        assert same_bits(ours[0], theirs[0])
    # MLX's CPU returns float32 here whatever dtype is asked; lowbit returns the asked dtype, the same value rounded
    expected = to_torch(mx.dequantize(to_mx(theirs[0]), to_mx(theirs[1]), mode="nvfp4", global_scale=to_mx(g),
                                      dtype=mx.float32))
    got32 = lowbit.dequantize(theirs[0], theirs[1], mode="nvfp4", global_scale=g, dtype=torch.float32)
    assert same_bits(got32, expected)
    assert same_bits(lowbit.dequantize(theirs[0], theirs[1], mode="nvfp4", global_scale=g), expected.bfloat16())


@pytest.mark.parametrize("mode, gs, bits", [c for c in ALL_CONFIGS if c[0] != "affine"] + [("affine", 64, 4)])
def test_dequantize_random_bytes(mode, gs, bits, gen):
    """Any bytes a checkpoint may hold (random codes, every scale byte) dequantize exactly as MLX."""
    rows, k = 64, 256
    w_q = torch.randint(-(2**31), 2**31 - 1, (rows, k * bits // 32), generator=gen, dtype=torch.int64)
    w_q = w_q.to(torch.int32).view(torch.uint32)
    if mode == "affine":
        scales = torch.randn(rows, k // gs, generator=gen).bfloat16()
        biases = torch.randn(rows, k // gs, generator=gen).bfloat16()
    else:
        scales = torch.randint(0, 256, (rows, k // gs), generator=gen, dtype=torch.uint8)
        biases = None
    for dtype in DTYPES:
        expected = to_torch(mx.dequantize(to_mx(w_q), to_mx(scales), to_mx(biases), gs, bits, mode=mode,
                                          dtype=TORCH_TO_MX[dtype]))
        got = lowbit.dequantize(w_q, scales, biases, gs, bits, mode, dtype=dtype)
        assert torch.equal(got.float().nan_to_num(7.0, 8.0, 9.0), expected.float().nan_to_num(7.0, 8.0, 9.0))
        assert torch.equal(torch.isnan(got), torch.isnan(expected))


def test_quantized_matmul_matches_mlx(gen):
    """lowbit's CPU matmul agrees with MLX's CPU matmul on the same packed weights (MLX's 1e-3 tolerance)."""
    for mode, gs, bits in [("affine", 64, 4), ("affine", 32, 3), ("mxfp4", 32, 4), ("nvfp4", 16, 4), ("mxfp8", 32, 8)]:
        w = torch.randn(96, 512, generator=gen) / 512**0.5
        x = torch.randn(7, 512, generator=gen)
        q = mlx_quantize(w, gs, bits, mode)
        biases = q[2] if mode == "affine" else None
        expected = to_torch(mx.quantized_matmul(to_mx(x), to_mx(q[0]), to_mx(q[1]), to_mx(biases), True, gs, bits, mode))
        got = lowbit.quantized_matmul(x, q[0], q[1], biases, True, gs, bits, mode)
        assert (got - expected).abs().max() < 1e-3


def test_one_bit_bias_sign_of_zero_matches_mlx():
    """A 1-bit group whose minimum is zero stores the sign of its first zero as its bias, as MLX's sequential min."""
    rows = torch.zeros(4, 32, dtype=torch.float16)
    rows[0, 2:4] = -0.0
    rows[1, 0] = -0.0
    rows[2, 1:] = -0.0
    rows[3] = -0.0
    ours = lowbit.quantize(rows, 32, 1)
    theirs = [to_torch(t) for t in mx.quantize(to_mx(rows), 32, 1)]
    for a, b in zip(ours, theirs):
        assert same_bits(a, b)
