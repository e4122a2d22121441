"""One regression test per public bug report behind lowbit (../shared/reference/bug-reports, DESIGN.md)."""

import pytest
import torch
from conftest import dequantize_f64, quantize3

import lowbit


def rel_err(got, ref):
    return ((got.double() - ref).abs().max() / ref.abs().max()).item()


@pytest.mark.parametrize("mode", ["mxfp4", "nvfp4", "mxfp8"])
@pytest.mark.parametrize("n", [1, 2, 3, 5, 7])
@pytest.mark.parametrize("m", [1, 3])
def test_report1_fp_matvec_with_fewer_than_8_outputs(mode, n, m, gen):
    """Report 1: fp-mode mat-vec with N < 8 used the raw scale byte (relative error ~200)."""
    w = torch.randn(n, 256, generator=gen) / 16
    x = torch.randn(m, 256, generator=gen)
    q = quantize3(w, mode=mode)
    ref = x.double() @ dequantize_f64(q, mode=mode).T
    assert rel_err(lowbit.quantized_matmul(x, *q, mode=mode), ref) < 1e-3


@pytest.mark.parametrize("mode, gs, bits", [("affine", 64, 4), ("affine", 32, 3), ("mxfp4", 32, 4),
                                            ("mxfp8", 32, 8), ("nvfp4", 16, 4)])
def test_report2_rows_do_not_depend_on_m(mode, gs, bits, gen):
    """Report 2: results changed with M (three kernels, three reduction orders)."""
    w = torch.randn(96, 1024, generator=gen) / 32
    q = quantize3(w, gs, bits, mode)
    x = torch.randn(300, 1024, generator=gen).bfloat16()
    whole = lowbit.quantized_matmul(x, *q, True, gs, bits, mode)
    for length in (1, 2, 3, 4, 5, 8, 9, 15, 16, 17, 31, 32, 33, 63, 64, 65, 127, 128, 129, 255, 256, 257):
        assert torch.equal(lowbit.quantized_matmul(x[-length:], *q, True, gs, bits, mode), whole[-length:]), length


def test_report3_nvfp4_blocks_of_16_and_global_scale_everywhere(gen):
    """Report 3: scale over 32 instead of 16; the tensor scale missing on some paths."""
    w = torch.randn(64, 32, generator=gen)
    w[:, :16] *= 1e-3  # each row: a tiny block then a large block
    g = w.abs().max().reshape(1)
    q = quantize3(w, mode="nvfp4", global_scale=g)
    assert q[1].shape == (64, 2)
    w_hat = dequantize_f64(q, mode="nvfp4", global_scale=g)
    tiny_amax = w[:, :16].abs().amax(-1, keepdim=True).double()
    # within its own block's resolution (a scale shared over 32 would flush the tiny block to zero)
    assert ((w_hat[:, :16] - w[:, :16]).abs() <= tiny_amax / 4).all()  # half a step plus e4m3 scale rounding
    assert (w_hat[:, :16] != 0).float().mean() > 0.8
    x = torch.randn(5, 32, generator=gen)
    ref = x.double() @ w_hat.T
    assert rel_err(lowbit.quantized_matmul(x, *q, mode="nvfp4", global_scale=g), ref) < 1e-3
    experts = tuple(t.expand(3, *t.shape) if t is not None else None for t in q)
    out = lowbit.gather_qmm(x.reshape(5, 1, 32), *experts, rhs_indices=torch.tensor([0, 2, 1, 1, 0]), mode="nvfp4",
                            global_scale=g.expand(3).contiguous())
    assert rel_err(out.reshape(5, 64), ref) < 1e-3
    y = lowbit.qqmm(x, q[0], q[1], mode="nvfp4", global_scale_x=x.abs().max().reshape(1), global_scale_w=g)
    assert rel_err(y, ref) < 0.2  # activations are quantized to 4 bits too


@pytest.mark.parametrize("tensor_scale", [1e-6, 1e-3, 1.0, 1e3, 1e6])
def test_report3_no_float16_overflow(tensor_scale, gen):
    """Report 3: fp16 overflow when a tiny global scale was applied after the matmul instead of before."""
    w = torch.randn(32, 4096, generator=gen) * tensor_scale
    g = w.abs().max().reshape(1)
    q = quantize3(w, mode="nvfp4", global_scale=g)
    x = (torch.randn(4, 4096, generator=gen) / tensor_scale**0.5 / 64).half()
    w_hat = dequantize_f64(q, mode="nvfp4", global_scale=g)
    ref = x.double() @ w_hat.T
    assert ref.abs().max() < 6e4  # the true result fits float16
    y = lowbit.quantized_matmul(x, *q, mode="nvfp4", global_scale=g)
    assert y.dtype == torch.float16 and torch.isfinite(y).all()
    assert rel_err(y, ref) < 2e-3


@pytest.mark.parametrize("mode, gs, bits", [("affine", 64, 8), ("affine", 64, 4), ("mxfp8", 32, 8)])
@pytest.mark.parametrize("length", [1, 2, 3])
def test_report4_gqa_stride0_kv_cache(mode, gs, bits, length, gen):
    """Report 4: stride-0 (expand_dims) batch dims of the weight were ignored by the mat-vec kernel (GQA)."""
    batch, kv_heads, n_rep, seq, dim = 2, 2, 4, 40, 64
    keys = torch.randn(batch, kv_heads, seq, dim, generator=gen)
    k_q = quantize3(keys, gs, bits, mode)
    expanded = tuple(None if t is None else t.unsqueeze(2).expand(batch, kv_heads, n_rep, *t.shape[2:]) for t in k_q)
    assert expanded[0].stride(2) == 0
    queries = torch.randn(batch, kv_heads, n_rep, length, dim, generator=gen)
    scores = lowbit.quantized_matmul(queries, *expanded, True, gs, bits, mode)
    k_hat = dequantize_f64(k_q, gs, bits, mode)  # (B, Hkv, S, D)
    ref = queries.double() @ k_hat.unsqueeze(2).transpose(-1, -2)
    assert scores.shape == (batch, kv_heads, n_rep, length, seq)
    assert rel_err(scores, ref) < 1e-3
    # values: p @ V with transpose=False over the same expanded cache
    probs = torch.softmax(scores, -1)
    out = lowbit.quantized_matmul(probs, *expanded, False, gs, bits, mode)
    assert rel_err(out, probs.double() @ k_hat.unsqueeze(2)) < 1e-3


def test_report5_wrong_bit_width_cannot_decode_silently(gen):
    """Report 5: an 8-bit router inside a 4-bit model decoded with 4-bit parameters picked wrong experts.

    At the op layer the packed shapes disagree with the claimed bits, so lowbit refuses instead of decoding."""
    router = torch.randn(8, 512, generator=gen)
    q8 = lowbit.quantize(router, 64, 8)
    x = torch.randn(3, 512, generator=gen)
    with pytest.raises(ValueError, match=r"\[quantized_matmul\].*bits=4"):
        lowbit.quantized_matmul(x, *q8, True, 64, 4)
    with pytest.raises(ValueError, match=r"\[dequantize\]"):
        lowbit.dequantize(*q8, 64, 4)
    right = lowbit.quantized_matmul(x, *q8, True, 64, 8)
    ref = x.double() @ dequantize_f64(q8, 64, 8).T
    assert torch.equal(right.argmax(-1), ref.argmax(-1))
