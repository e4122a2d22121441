"""qqmm / gather_qqmm: activations quantized on the fly, against quantize-dequantize(x) @ dequantize(w).T and MLX."""

import pytest
import torch
from conftest import dequantize_f64, mx, quantize3, to_mx, to_torch

import lowbit


def fake_quant(x, mode, global_scale=None):
    q = quantize3(x.reshape(-1, x.shape[-1]), mode=mode, global_scale=global_scale)
    return dequantize_f64(q, mode=mode, global_scale=global_scale).reshape(x.shape)


@pytest.mark.skipif(mx is None, reason="MLX is the oracle here (the GPU machine has none)")
@pytest.mark.parametrize("mode", ["nvfp4", "mxfp8", "mxfp4"])
@pytest.mark.parametrize("n", [256, 512, 67])
@pytest.mark.parametrize("k", [64, 256])
def test_qqmv_matches_mlx_cpu(mode, n, k, gen):
    """MLX's test_qqmv: x (1, K); MLX's CPU serves exactly this case (M = 1, no global scales)."""
    w = torch.randn(n, k, generator=gen) / k**0.5
    x = torch.randn(1, k, generator=gen)
    w_q, scales = lowbit.quantize(w, mode=mode)
    y = lowbit.qqmm(x, w_q, scales, mode=mode)
    ref = fake_quant(x, mode) @ dequantize_f64((w_q, scales, None), mode=mode).T
    assert (y.double() - ref).abs().max() < 1e-3
    theirs = to_torch(mx.qqmm(to_mx(x), to_mx(w_q), to_mx(scales), mode=mode))
    assert (y - theirs).abs().max() < 1e-3


@pytest.mark.parametrize("mode", ["nvfp4", "mxfp8", "mxfp4"])
@pytest.mark.parametrize("m", [1, 8, 33, 64])
@pytest.mark.parametrize("use_global", [False, True])
def test_qqmm_any_m_and_global_scales(mode, m, use_global, gen):
    """Any M and nvfp4 global scales (MLX's CPU handles only M = 1 and ignores global scales)."""
    if use_global and mode != "nvfp4":
        pytest.skip("global scales are nvfp4 only")
    w = torch.randn(128, 256, generator=gen) / 16 * 50
    x = torch.randn(m, 256, generator=gen) * 0.01
    gw = w.abs().max().reshape(1) if use_global else None
    gx = x.abs().max().reshape(1) if use_global else None
    y = lowbit.qqmm(x, w, mode=mode, global_scale_x=gx, global_scale_w=gw)  # float w: quantized on the fly
    w_hat = dequantize_f64(quantize3(w, mode=mode, global_scale=gw), mode=mode, global_scale=gw)
    ref = fake_quant(x, mode, gx) @ w_hat.T
    assert y.dtype == x.dtype
    assert ((y.double() - ref).abs().max() / ref.abs().max()) < 1e-5


def test_qqmm_global_scales_change_the_result(gen):
    """The global scales are applied: dropping them changes the answer (MLX's CPU silently ignores them)."""
    w = torch.randn(32, 128, generator=gen) * 1e-4
    x = torch.randn(4, 128, generator=gen) * 1e4
    gw, gx = w.abs().max().reshape(1), x.abs().max().reshape(1)
    with_scales = lowbit.qqmm(x, w, global_scale_x=gx, global_scale_w=gw)
    without = lowbit.qqmm(x, w)
    exact = x.double() @ w.double().T
    err_with = ((with_scales.double() - exact).abs().max() / exact.abs().max()).item()
    err_without = ((without.double() - exact).abs().max() / exact.abs().max()).item()
    assert err_with < 0.15 and err_with < err_without


@pytest.mark.parametrize("mode", ["nvfp4", "mxfp8"])
def test_gather_qqmm(mode, gen):
    """gather_qqmm equals per-item qqmm oracle (MLX's CPU has no gather_qqmm)."""
    w = torch.randn(4, 64, 256, generator=gen) / 16
    x = torch.randn(6, 3, 256, generator=gen)
    w_q, scales = lowbit.quantize(w, mode=mode)
    lhs, rhs = torch.tensor([0, 5, 2, 2]), torch.tensor([3, 0, 0, 1])
    out = lowbit.gather_qqmm(x, w_q, scales, lhs, rhs, mode=mode)
    w_hat = dequantize_f64((w_q, scales, None), mode=mode)
    x_hat = fake_quant(x, mode)
    ref = torch.stack([x_hat[i] @ w_hat[j].T for i, j in zip(lhs.tolist(), rhs.tolist())])
    assert (out.double() - ref).abs().max() / ref.abs().max() < 1e-5


def test_qqmm_nan_activation_propagates(gen):
    """A NaN activation gives NaN outputs for that row, never an exception and never a finite number."""
    w = torch.randn(16, 64, generator=gen)
    x = torch.randn(3, 64, generator=gen)
    x[1, 5] = float("nan")
    y = lowbit.qqmm(x, w)
    assert torch.isnan(y[1]).all() and torch.isfinite(y[[0, 2]]).all()
