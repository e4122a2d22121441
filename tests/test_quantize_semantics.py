"""MLX's quantize/dequantize tests (python/tests/test_quantized.py) ported to lowbit, plus the edge cases of
mlx-semantics.md section 1."""

import pytest
import torch
from conftest import DTYPES, mx, same_bits, to_mx, to_torch

import lowbit
from lowbit.formats import codecs


@pytest.mark.parametrize("gs", [32, 64, 128])
@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 6, 8])
def test_quantize_dequantize(gs, bits, gen):
    """Per-element error is at most one step (|scale|); an all-zero matrix dequantizes to exact zeros."""
    w = torch.randn(128, 512, generator=gen)
    w_q, scales, biases = lowbit.quantize(w, gs, bits)
    w_hat = lowbit.dequantize(w_q, scales, biases, gs, bits)
    err = (w - w_hat).abs().reshape(128, -1, gs)
    assert (err <= scales.abs()[..., None] + 1e-6).all()
    zeros = torch.zeros(256, 512)
    assert torch.equal(lowbit.dequantize(*lowbit.quantize(zeros, gs, bits), gs, bits), zeros)


@pytest.mark.parametrize("gs", [32, 64, 128])
def test_1bit_binary_weights(gs, gen):
    """1-bit (MLX 0.32.4): two-valued groups round-trip; dequant values are min and max of the group."""
    for lo, hi in [(-0.5, 0.5), (0.1, 0.9)]:
        pick = torch.rand(16, 256, generator=gen) > 0.5
        w = torch.where(pick, torch.tensor(hi), torch.tensor(lo))
        w[:, ::gs] = lo
        w[:, 1::gs] = hi
        q = lowbit.quantize(w, gs, 1)
        assert (lowbit.dequantize(*q, gs, 1) - w).abs().max() < 1e-5
        x = torch.randn(3, 256, generator=gen)
        assert (lowbit.quantized_matmul(x, *q, True, gs, 1) - x @ w.T).abs().max() < 1e-4


def test_mxfp4_quantize_dequantize():
    """e2m1 grid values with a 6 per row round-trip exactly; zeros stay zeros."""
    lut = torch.tensor(codecs.E2M1_VALUES)
    w = lut[torch.randint(0, 16, (128, 32), generator=torch.Generator().manual_seed(0))]
    w[:, 0] = 6
    w = (w + 3e-6).bfloat16()
    q = lowbit.quantize(w, mode="mxfp4")
    assert torch.allclose(lowbit.dequantize(*q, mode="mxfp4"), w, atol=1e-5)
    z = torch.zeros(4, 64, dtype=torch.bfloat16)
    assert torch.equal(lowbit.dequantize(*lowbit.quantize(z, mode="mxfp4"), mode="mxfp4"), z)


def test_mxfp8_quantize_dequantize(gen):
    w = (torch.rand(512, 32, generator=gen) * 2 - 1).bfloat16()
    q = lowbit.quantize(w, mode="mxfp8")
    assert torch.allclose(lowbit.dequantize(*q, mode="mxfp8"), w, atol=1e-1)


def test_mxfp8_block_scale_does_not_saturate(gen):
    """mlx#4353: the e8m0 scale rounds up, so the block max never saturates (relative error < 0.0626)."""
    w = torch.randn(512, 32, generator=gen) * torch.exp2(torch.arange(512) / 512.0)[:, None]
    w_hat = lowbit.dequantize(*lowbit.quantize(w, mode="mxfp8"), mode="mxfp8", dtype=torch.float32)
    i = w.abs().argmax(-1, keepdim=True)
    rel = ((w_hat.gather(1, i) - w.gather(1, i)).abs() / w.gather(1, i).abs())
    assert rel.max() < 0.0626


def test_nvfp4_block_scale_covers_16_not_32():
    """Rows alternating tiny and large 16-blocks round-trip: each 16 elements have their own scale (mlx#3934)."""
    w = torch.zeros(64, 16)
    w[0::2] = 6 * 2.0**-9
    w[1::2] = 6.0
    w = w.reshape(32, 32)  # each row: one tiny 16-block and one large 16-block
    q = lowbit.quantize(w, mode="nvfp4")
    assert q[1].shape == (32, 2)
    assert torch.equal(lowbit.dequantize(*q, mode="nvfp4", dtype=torch.float32), w)


def test_nvfp4_global_scale_roundtrip(gen):
    """With global_scale = max|w| a grid-valued tensor round-trips; the three tensor-scale conventions agree."""
    lut = torch.tensor(codecs.E2M1_VALUES)
    w = lut[torch.randint(0, 16, (64, 64), generator=gen)] * 1000.0
    w[:, ::16] = 6000.0  # every block holds the tensor amax
    g = w.abs().max().reshape(1)
    q = lowbit.quantize(w, mode="nvfp4", global_scale=g)
    assert torch.allclose(lowbit.dequantize(*q, mode="nvfp4", global_scale=g, dtype=torch.float32), w, rtol=1e-5)
    modelopt = lowbit.global_scale_to_modelopt(g)  # amax / 2688
    assert torch.allclose(modelopt, g / 2688)
    assert torch.allclose(lowbit.global_scale_from_modelopt(modelopt), g.reshape(()))
    assert torch.allclose(lowbit.global_scale_from_compressed_tensors(1 / modelopt), g.reshape(()))


def test_nvfp4_without_global_scale_saturates_large_groups():
    """Without a tensor scale, block scales live in e4m3: a group with amax > 2688 saturates (MLX's behaviour)."""
    w = torch.full((1, 16), 6000.0)
    back = lowbit.dequantize(*lowbit.quantize(w, mode="nvfp4"), mode="nvfp4", dtype=torch.float32)
    assert back.max() == 2688.0
    g = torch.tensor([6000.0])
    back = lowbit.dequantize(*lowbit.quantize(w, mode="nvfp4", global_scale=g), mode="nvfp4", global_scale=g,
                             dtype=torch.float32)
    assert torch.equal(back, w)


@pytest.mark.parametrize("shape", [(1, 16), (3, 16), (3, 48)])
def test_nvfp4_any_element_count(shape, gen):
    """MLX's CPU needs element counts divisible by 32 for nvfp4 (it raises here); lowbit handles any count."""
    w = torch.randn(*shape, generator=gen)
    q = lowbit.quantize(w, mode="nvfp4")
    big = torch.cat([w, w]).reshape(-1, shape[-1]) if (2 * w.numel()) % 32 == 0 else None
    with pytest.raises(ValueError):
        mx.eval(mx.quantize(to_mx(w), mode="nvfp4"))
    if big is not None:  # the same rows inside a shape MLX accepts give the same bytes
        theirs = mx.quantize(to_mx(big), mode="nvfp4")
        assert same_bits(to_torch(theirs[1])[: shape[0]], q[1])
    back = lowbit.dequantize(*q, mode="nvfp4", dtype=torch.float32)
    assert back.shape == w.shape


@pytest.mark.parametrize("dtype", DTYPES)
def test_affine_edge_groups(dtype):
    """Zero group -> scale -1e-7 (cast), bias 0, exact zeros; constant group c -> bias c, exact c; linspace example."""
    w = torch.zeros(3, 32, dtype=dtype)
    w[1] = 0.75
    w[2] = -3.5
    w_q, s, b = lowbit.quantize(w, 32, 4)
    assert s[0].item() == torch.tensor(-1e-7, dtype=dtype).item() and b[0].item() == 0
    assert torch.equal(lowbit.dequantize(w_q, s, b, 32, 4), w)
    lin = torch.linspace(-1, 3, 32).reshape(1, 32)
    w_q, s, b = lowbit.quantize(lin, 32, 4)
    assert abs(s.item() - 3 / -11) < 1e-6 and b.item() == 3.0
    assert abs(lowbit.dequantize(w_q, s, b, 32, 4)[0, 0].item() + 1.0909) < 1e-4


def test_all_negative_group_uses_true_range():
    """The CPU rule takes the group's true [min, max] (MLX's GPU kernels clamp max at 0 and get a coarser step)."""
    w = -torch.linspace(1.0, 2.0, 64).reshape(1, 64)
    _, s, b = lowbit.quantize(w, 64, 4)
    assert abs(abs(s.item()) - 1.0 / 15) < 1e-6
    assert b.item() == -2.0


def test_dequantize_broadcast_scales():
    """MLX's quantize_strided: stride-0 (broadcast) scales dequantize like their contiguous copy."""
    w = torch.randn(1, 128)
    w_q, scales = lowbit.quantize(w, mode="nvfp4")
    w_q, scales = w_q.expand(8, -1), scales.expand(8, -1)
    a = lowbit.dequantize(w_q, scales, mode="nvfp4")
    b = lowbit.dequantize(w_q.contiguous(), scales.contiguous(), mode="nvfp4")
    assert same_bits(a, b)


def test_dequantize_noncontiguous_slice(gen):
    """mlx#4370: dequantize of a slice along a non-last axis (a ring-buffer KV cache) equals the contiguous copy."""
    w = torch.randn(4, 8, 64, 128, generator=gen)
    q = lowbit.quantize(w, 64, 4)
    sliced = tuple(t[:, :, 5:37] for t in q)
    assert same_bits(lowbit.dequantize(*sliced, 64, 4), lowbit.dequantize(*(t.contiguous() for t in sliced), 64, 4))


@pytest.mark.parametrize("mode", ["affine", "mxfp4", "mxfp8", "nvfp4"])
def test_quantize_large_weight_in_chunks(mode, gen):
    """A weight larger than one CPU slab is quantized chunk by chunk with the same bytes as row by row."""
    w = torch.randn(4200, 1024, generator=gen)  # > 4M elements: several chunks
    q = lowbit.quantize(w, mode=mode)
    head = lowbit.quantize(w[:3], mode=mode)
    tail = lowbit.quantize(w[-3:], mode=mode)
    for full, a, b in zip(q, head, tail):
        assert same_bits(full[:3], a) and same_bits(full[-3:], b)
