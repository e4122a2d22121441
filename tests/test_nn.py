"""lowbit.nn: QuantizedLinear, QQLinear, QuantizedEmbedding, the MoE layers and quantize_model.

Oracles, none of which share code with the module under test beyond lowbit.quantize / lowbit.dequantize (bit-exact
with MLX, tested elsewhere):
- float64 `x @ dequantize(w).T (+ bias)` and explicit per-token loops over experts;
- MLX's own modules (mlx.nn.QuantizedLinear / QuantizedEmbedding / QQLinear, mlx_lm's SwitchGLU and
  QuantizedSwitchLinear): their quantized buffers are compared byte for byte with lowbit's, then copied into an empty
  lowbit module through to_torch and the outputs compared;
- the original transformers modules (Qwen3MoeExperts, tiny Llama / Qwen3-MoE models) with the dequantized weights
  put back.
"""

from __future__ import annotations

import copy
import io
import itertools
import warnings

import pytest
import torch
import torch.nn.functional as F
from conftest import dequantize_f64, mx, quantize3, same_bits, to_mx, to_torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import lowbit
from lowbit.nn import (
    ROUTER_PARAMS,
    QQLinear,
    QuantizedEmbedding,
    QuantizedExperts,
    QuantizedLinear,
    QuantizedRouter,
    QuantizedSwitchLinear,
    QuantizedWeight,
    SwitchGLU,
    SwitchLinear,
    TiedHead,
    model_bits_per_weight,
    quantize_model,
)

needs_mlx = pytest.mark.skipif(mx is None, reason="MLX is the oracle here")

AFFINE = [("affine", 32, 2), ("affine", 128, 3), ("affine", 64, 4), ("affine", 32, 8), ("affine", 128, 8)]
FP = [("mxfp4", 32, 4), ("mxfp8", 32, 8), ("nvfp4", 16, 4)]
FORMATS = AFFINE + FP
FMT_IDS = [f"{m}-g{g}-b{b}" for m, g, b in FORMATS]
K, N = 256, 48  # K a multiple of every group size


# ----------------------------------------------------------------------------------------------------------- helpers


def make_gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def randn(gen, *shape, scale=1.0, dtype=torch.float32):
    return (torch.randn(*shape, generator=gen) * scale).to(dtype)


def float_linear(gen, k=K, n=N, bias=True, dtype=torch.float32) -> nn.Linear:
    lin = nn.Linear(k, n, bias=bias)
    with torch.no_grad():
        lin.weight.copy_(randn(gen, n, k, scale=k**-0.5))
        if bias:
            lin.bias.copy_(randn(gen, n))
    return lin.to(dtype)


def w_hat(module: QuantizedWeight) -> torch.Tensor:
    """The module's weight dequantized by lowbit.dequantize (float32 -> float64), from its own buffers; a stack of
    experts with one tensor scale each (nvfp4) one expert at a time."""
    g = module.global_scale
    if g is not None and g.numel() > 1:
        return torch.stack([dequantize_f64((module.weight[e], module.scales[e], None), module.group_size,
                                           module.bits, module.mode, g[e]) for e in range(g.numel())])
    q = (module.weight, module.scales, module.biases)
    return dequantize_f64(q, module.group_size, module.bits, module.mode, g)


def linear_oracle(x, w, bias=None):
    y = x.double() @ w.double().T
    return y if bias is None else y + bias.double()


def assert_close(out, ref, atol, rtol=1e-5, what=""):
    assert tuple(out.shape) == tuple(ref.shape), f"{what}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    assert torch.isfinite(out).all(), f"{what}: non-finite output"
    err = (out.double() - ref.double()).abs()
    bound = atol + rtol * ref.double().abs()
    assert (err <= bound).all(), f"{what}: max error {err.max().item():.3g} (atol {atol}, rtol {rtol})"


def buffers(module: QuantizedWeight) -> dict:
    return {k: v for k, v in (("weight", module.weight), ("scales", module.scales), ("biases", module.biases),
                              ("global_scale", module.global_scale)) if v is not None}


def mlx_buffers(mod, names=("weight", "scales", "biases", "global_scale", "bias")) -> dict:
    """An MLX module's arrays as torch tensors (same bits)."""
    return {name: to_torch(mod[name]) for name in names if mod.get(name) is not None}


def mx_index(idx: torch.Tensor):
    return mx.array(idx.numpy()).astype(mx.uint32)


# ------------------------------------------------------------------------------------------------- QuantizedLinear


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("fmt", FORMATS, ids=FMT_IDS)
def test_linear_from_linear_matches_oracle(fmt, bias):
    mode, gs, bits = fmt
    gen = make_gen(1)
    lin = float_linear(gen, bias=bias)
    q = QuantizedLinear.from_linear(lin, gs, bits, mode)
    assert (q.group_size, q.bits, q.mode) == (gs, bits, mode)
    assert (q.input_dims, q.output_dims) == (K, N)
    assert q.quantization() == {"group_size": gs, "bits": bits, "mode": mode}
    expected = quantize3(lin.weight.detach(), gs, bits, mode)
    assert same_bits(q.weight, expected[0]) and same_bits(q.scales, expected[1])
    assert (q.biases is None) == (mode != "affine")
    if mode == "affine":
        assert same_bits(q.biases, expected[2])
    assert q.global_scale is None
    assert (q.bias is None) != bias
    if bias:
        assert torch.equal(q.bias, lin.bias) and q.bias.data_ptr() != lin.bias.data_ptr()
    for shape in [(5, K), (2, 3, K), (K,), (1, K)]:
        x = randn(gen, *shape)
        with torch.no_grad():
            y = q(x)
        assert y.dtype == torch.float32
        ref = linear_oracle(x, w_hat(q), lin.bias if bias else None)
        assert_close(y, ref, atol=2e-5, what=f"x{shape}")


@needs_mlx
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("fmt", FORMATS, ids=FMT_IDS)
def test_linear_matches_mlx_quantized_linear(fmt, bias):
    """mlx.nn.QuantizedLinear.from_linear: same buffers byte for byte; its buffers loaded into an empty lowbit
    module give MLX's outputs."""
    import mlx.nn as mnn

    mode, gs, bits = fmt
    gen = make_gen(2)
    lin = float_linear(gen, bias=bias)
    ml = mnn.Linear(K, N, bias=bias)
    ml.weight = to_mx(lin.weight)
    if bias:
        ml.bias = to_mx(lin.bias)
    mq = mnn.QuantizedLinear.from_linear(ml, gs, bits, mode)
    theirs = mlx_buffers(mq)
    ours = QuantizedLinear.from_linear(lin, gs, bits, mode)
    assert set(theirs) == set(ours.state_dict())
    for name, tensor in ours.state_dict().items():
        assert same_bits(tensor, theirs[name]), name
    mx_q = mx.quantize(to_mx(lin.weight), gs, bits, mode=mode)
    for name, arr in zip(("weight", "scales", "biases"), mx_q):
        assert same_bits(getattr(ours, name), to_torch(arr)), name

    empty = QuantizedLinear(K, N, bias, gs, bits, mode)
    empty.load_state_dict(theirs)
    x = randn(gen, 7, K)
    with torch.no_grad():
        y = empty(x)
    assert_close(y, to_torch(mq(to_mx(x))), atol=2e-5, what="vs MLX")
    assert torch.equal(y, ours(x).detach())


@pytest.mark.parametrize("fmt", FORMATS, ids=FMT_IDS)
def test_linear_dequantize_round_trip(fmt):
    mode, gs, bits = fmt
    gen = make_gen(3)
    q = QuantizedLinear.from_linear(float_linear(gen), gs, bits, mode)
    d = q.dequantize()
    assert type(d) is nn.Linear
    expected_dtype = torch.float32 if mode == "affine" else torch.bfloat16  # MLX's dequantize default
    assert d.weight.dtype == expected_dtype
    assert same_bits(d.weight.detach(), q.dequantized_weight())
    assert torch.equal(d.weight.detach().double(), w_hat(q))  # exact: nothing rounded on the way out
    assert torch.equal(d.bias.detach(), q.bias.detach().to(expected_dtype))
    # the float weight computes the quantized module's function (up to float32 accumulation order)
    x = randn(gen, 4, K)
    with torch.no_grad():
        assert_close(q(x) - q.bias, F.linear(x, d.weight.float()), atol=2e-5)


@pytest.mark.parametrize("fmt", FORMATS, ids=FMT_IDS)
def test_linear_state_dict_round_trip(fmt):
    mode, gs, bits = fmt
    gen = make_gen(4)
    q = QuantizedLinear.from_linear(float_linear(gen), gs, bits, mode)
    sd = q.state_dict()
    scale_dtype = torch.float32 if mode == "affine" else torch.uint8
    expected = {"weight": (torch.uint32, (N, K * bits // 32)), "scales": (scale_dtype, (N, K // gs)),
                "bias": (torch.float32, (N,))}
    if mode == "affine":
        expected["biases"] = (torch.float32, (N, K // gs))
    assert {k: (v.dtype, tuple(v.shape)) for k, v in sd.items()} == expected

    fresh = QuantizedLinear(K, N, True, gs, bits, mode)
    assert {k: (v.dtype, tuple(v.shape)) for k, v in fresh.state_dict().items()} == expected
    fresh.load_state_dict(sd)
    x = randn(gen, 3, K)
    assert same_bits(fresh(x).detach(), q(x).detach())

    buf = io.BytesIO()
    torch.save(q.state_dict(), buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=True)
    for name in expected:
        assert same_bits(loaded[name], sd[name]), name
    again = QuantizedLinear(K, N, True, gs, bits, mode)
    again.load_state_dict(loaded)
    assert same_bits(again(x).detach(), q(x).detach())

    buf = io.BytesIO()  # the whole module pickles too
    torch.save(q, buf)
    buf.seek(0)
    whole = torch.load(buf, weights_only=False)
    assert same_bits(whole(x).detach(), q(x).detach())
    assert same_bits(copy.deepcopy(q)(x).detach(), q(x).detach())


@pytest.mark.parametrize("fmt", FORMATS, ids=FMT_IDS)
def test_linear_forward_reads_buffers_assigned_after_a_call(fmt):
    """forward reads the buffer table directly (QuantizedWeight.quantized_tensors): tensors assigned by attribute
    after earlier calls are the ones it multiplies by, as nn.Module's attribute lookup would give."""
    mode, gs, bits = fmt
    gen = make_gen(5)
    q = QuantizedLinear.from_linear(float_linear(gen), gs, bits, mode)
    other = QuantizedLinear.from_linear(float_linear(gen), gs, bits, mode)
    x = randn(gen, 2, K)
    with torch.no_grad():
        before = q(x)
        q.weight, q.scales, q.biases, q.bias = other.weight, other.scales, other.biases, other.bias
        assert same_bits(q(x), other(x))
        assert not same_bits(q(x), before)


def test_linear_nvfp4_global_scale():
    gen = make_gen(5)
    lin = float_linear(gen)
    with torch.no_grad():
        lin.weight.mul_(1e-3)  # small weights: the tensor scale is what keeps the e4m3 block scales in range
    q = QuantizedLinear.from_linear(lin, mode="nvfp4", global_scale=True)
    amax = lin.weight.detach().abs().amax()
    assert q.global_scale.dtype == torch.float32 and q.global_scale.shape == () and q.global_scale == amax
    expected = lowbit.quantize(lin.weight.detach(), mode="nvfp4", global_scale=amax)
    assert same_bits(q.weight, expected[0]) and same_bits(q.scales, expected[1])
    x = randn(gen, 5, K)
    with torch.no_grad():
        assert_close(q(x), linear_oracle(x, w_hat(q), lin.bias), atol=2e-5)
    sd = q.state_dict()
    assert sd["global_scale"].dtype == torch.float32 and sd["global_scale"].shape == ()
    fresh = QuantizedLinear(K, N, True, mode="nvfp4", global_scale=True)
    fresh.load_state_dict(sd)
    assert same_bits(fresh(x).detach(), q(x).detach())
    plain = QuantizedLinear.from_linear(lin, mode="nvfp4")
    err_global = (q(x) - linear_oracle(x, lin.weight, lin.bias)).abs().max()
    err_plain = (plain(x) - linear_oracle(x, lin.weight, lin.bias)).abs().max()
    assert err_global < err_plain  # the tensor scale is applied, not just stored
    if mx is not None:
        theirs = mx.quantize(to_mx(lin.weight), mode="nvfp4", global_scale=to_mx(amax.float()))
        assert same_bits(q.weight, to_torch(theirs[0])) and same_bits(q.scales, to_torch(theirs[1]))


@pytest.mark.parametrize("cast", ["to_bf16", "half"])
@pytest.mark.parametrize("fmt", [("affine", 64, 4), ("nvfp4", 16, 4), ("mxfp8", 32, 8)], ids=lambda f: f[0])
def test_linear_cast_keeps_global_scale_float32(fmt, cast):
    mode, gs, bits = fmt
    gen = make_gen(6)
    q = QuantizedLinear.from_linear(float_linear(gen), gs, bits, mode, global_scale=mode == "nvfp4")
    codes, scales = q.weight.clone(), q.scales.clone()
    dtype = torch.bfloat16 if cast == "to_bf16" else torch.float16
    out = q.to(torch.bfloat16) if cast == "to_bf16" else q.half()
    assert out is q
    assert q.weight.dtype == torch.uint32 and torch.equal(q.weight, codes)
    assert q.bias.dtype == dtype
    if mode == "affine":
        assert q.scales.dtype == dtype and q.biases.dtype == dtype
        assert torch.equal(q.scales, scales.to(dtype))
    else:
        assert q.scales.dtype == torch.uint8 and torch.equal(q.scales, scales)
    if mode == "nvfp4":
        assert q.global_scale.dtype == torch.float32
        assert q.state_dict()["global_scale"].dtype == torch.float32  # still a registered buffer
    x = randn(gen, 3, K, dtype=dtype)
    with torch.no_grad():
        y = q(x)
    assert y.dtype == dtype
    assert_close(y, linear_oracle(x, w_hat(q), q.bias), atol=0.05, rtol=2e-2)
    q.float()
    assert q.bias.dtype == torch.float32 and q.weight.dtype == torch.uint32
    if mode == "nvfp4":
        assert q.global_scale.dtype == torch.float32


def test_linear_double_cast_is_refused_clearly():
    """The ops run float16 / bfloat16 / float32: .double() says so at the cast instead of breaking the module."""
    q = QuantizedLinear.from_linear(float_linear(make_gen(7)))
    with pytest.raises(ValueError, match=r"\[QuantizedLinear\] Quantized layers keep their scales .* torch.float64"):
        q.double()
    assert q.scales.dtype == torch.float32  # nothing was cast


def test_linear_gradient_flows_to_input():
    """Frozen quantized weight, trainable input and bias: d(sum y)/dx = 1 @ W_hat."""
    gen = make_gen(8)
    q = QuantizedLinear.from_linear(float_linear(gen))
    x = randn(gen, 3, K).requires_grad_(True)
    q(x).sum().backward()
    assert_close(x.grad, torch.ones(3, N, dtype=torch.float64) @ w_hat(q), atol=1e-5)
    assert torch.equal(q.bias.grad, torch.full((N,), 3.0))


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(FORMATS), st.integers(1, 40), st.data())
def test_linear_batch_invariant(fmt, m, data):
    """A row's output is bit-identical whether it is computed alone or with any number of others."""
    mode, gs, bits = fmt
    gen = make_gen(9)
    q = QuantizedLinear.from_linear(float_linear(gen, k=128, n=24), gs, bits, mode)
    x = randn(make_gen(data.draw(st.integers(0, 2**16), label="seed")), m, 128)
    row = data.draw(st.integers(0, m - 1), label="row")
    with torch.no_grad():
        assert same_bits(q(x)[row], q(x[row : row + 1])[0])
        assert same_bits(q(x)[row], q(x[row]))


def test_linear_rejects_bad_shapes():
    with pytest.raises(ValueError, match=r"\[QuantizedLinear\].*multiple of the group size"):
        QuantizedLinear(48, 8, group_size=32)
    with pytest.raises(ValueError, match=r"\[QuantizedLinear\]"):
        QuantizedLinear(64, 8, mode="int4")
    with pytest.raises(ValueError, match=r"\[QuantizedLinear\]"):
        QuantizedLinear(64, 8, mode="nvfp4", group_size=32)


# ------------------------------------------------------------------------------------------------------- QQLinear


def fake_quant_f64(x, mode):
    q = quantize3(x.reshape(-1, x.shape[-1]), mode=mode)
    return dequantize_f64(q, mode=mode).reshape(x.shape)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("mode", ["nvfp4", "mxfp8", "mxfp4"])
def test_qqlinear_matches_qqmm_and_oracle(mode, bias):
    gen = make_gen(10)
    lin = float_linear(gen, bias=bias)
    q = QQLinear.from_linear(lin, mode=mode)
    w_q = lowbit.quantize(lin.weight.detach(), mode=mode)
    assert same_bits(q.weight, w_q[0]) and same_bits(q.scales, w_q[1])
    assert q.biases is None and q.global_scale is None
    keys = {"weight", "scales"} | ({"bias"} if bias else set())
    assert set(q.state_dict()) == keys
    for shape in [(1, K), (6, K), (2, 3, K)]:
        x = randn(gen, *shape)
        with torch.no_grad():
            y = q(x)
        direct = lowbit.qqmm(x, q.weight, q.scales, mode=mode)
        assert same_bits(y, direct + lin.bias if bias else direct)
        ref = linear_oracle(fake_quant_f64(x, mode), w_hat(q), lin.bias if bias else None)
        assert_close(y, ref, atol=2e-5, what=f"x{shape}")
    fresh = QQLinear(K, N, mode=mode, bias=bias)
    fresh.load_state_dict(q.state_dict())
    x = randn(gen, 4, K)
    assert same_bits(fresh(x).detach(), q(x).detach())
    d = q.dequantize()
    assert type(d) is nn.Linear and same_bits(d.weight.detach(), q.dequantized_weight())


@needs_mlx
@pytest.mark.parametrize("mode", ["nvfp4", "mxfp8"])
def test_qqlinear_matches_mlx(mode):
    """mlx.nn.QQLinear in eval mode (weights quantized): same buffers, same outputs (MLX's CPU qqmm: M = 1)."""
    import mlx.nn as mnn

    gen = make_gen(11)
    lin = float_linear(gen, bias=False)
    ml = mnn.Linear(K, N, bias=False)
    ml.weight = to_mx(lin.weight)
    mq = mnn.QQLinear.from_linear(ml, mode=mode)
    mq.eval()
    ours = QQLinear.from_linear(lin, mode=mode)
    theirs = mlx_buffers(mq, ("weight", "scales"))
    assert same_bits(ours.weight, theirs["weight"]) and same_bits(ours.scales, theirs["scales"])
    empty = QQLinear(K, N, mode=mode)
    empty.load_state_dict(theirs)
    for seed in range(3):
        x = randn(make_gen(100 + seed), 1, K)
        with torch.no_grad():
            y = empty(x)
        assert_close(y, to_torch(mq(to_mx(x))), atol=2e-5, what="vs MLX")


@pytest.mark.parametrize("mode", ["nvfp4", "mxfp8", "mxfp4"])
def test_qqlinear_train_mode_keeps_a_float_weight_with_straight_through_gradients(mode, tmp_path):
    """train(): the weight becomes a float parameter (the dequantized values, MLX's dtype), quantized on the fly
    by the forward; gradients are the straight-through ones, g @ qdq(w) for x and g^T @ qdq(x) for the weight;
    a few steps of training lower the loss; eval() quantizes the trained weight; a model in training mode is not
    saved as a checkpoint."""
    from lowbit.models import save_quantized

    gen = make_gen(13)
    lin = float_linear(gen, bias=True)
    q = QQLinear.from_linear(lin, mode=mode)
    assert not q.training and q.weight.dtype == torch.uint32
    x = randn(gen, 6, K)
    eval_out = q(x).detach()
    q.train()
    assert isinstance(q.weight, nn.Parameter) and q.scales is None and "scales" not in q.state_dict()
    codes = lowbit.quantize(lin.weight.detach(), mode=mode)
    assert same_bits(q.weight.detach(), lowbit.dequantize(*codes, mode=mode)) and q.input_dims == K
    x.requires_grad_(True)
    y = q(x)
    assert same_bits(y.detach(), eval_out)  # the float weight requantizes to the codes it came from
    g = randn(gen, 6, N)
    (y * g).sum().backward()
    w_hat = fake_quant_f64(q.weight.detach().float(), mode)
    assert_close(x.grad, g.double() @ w_hat, atol=1e-5, what="grad x")
    grad_w = g.double().T @ fake_quant_f64(x.detach(), mode)  # (the weight, and so its gradient, is bfloat16)
    assert_close(q.weight.grad, grad_w, atol=1e-3, rtol=2 ** -8, what="grad w")
    with pytest.raises(ValueError, match=r"\[save_quantized\].*QQLinear in training mode.*model\.eval\(\)"):
        save_quantized(nn.Sequential(q), tmp_path / "ckpt", {})

    q.weight.data = q.weight.data.float()
    optimizer = torch.optim.SGD(q.parameters(), lr=0.05)
    target = randn(gen, 6, N)
    losses = []
    for _ in range(30):
        optimizer.zero_grad()
        loss = ((q(x.detach()) - target) ** 2).mean()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0]
    q.eval()
    assert q.weight.dtype == torch.uint32 and not [n for n, _ in q.named_parameters() if n == "weight"]
    with torch.no_grad():
        assert ((q(x.detach()) - target) ** 2).mean().item() < losses[0]


def test_qqlinear_rejects_affine():
    with pytest.raises(ValueError, match=r"\[QQLinear\]"):
        QQLinear(K, N, mode="affine")
    with pytest.raises(ValueError, match=r"\[QQLinear\]"):
        QQLinear.from_linear(float_linear(make_gen(12)), mode="affine")


# ---------------------------------------------------------------------------------------------- QuantizedEmbedding


def float_embedding(gen, num=40, dims=K, dtype=torch.float32) -> nn.Embedding:
    emb = nn.Embedding(num, dims)
    with torch.no_grad():
        emb.weight.copy_(randn(gen, num, dims))
    return emb.to(dtype)


@pytest.mark.parametrize("fmt", FORMATS, ids=FMT_IDS)
def test_embedding_lookup_and_as_linear(fmt):
    mode, gs, bits = fmt
    gen = make_gen(13)
    emb = float_embedding(gen)
    q = QuantizedEmbedding.from_embedding(emb, gs, bits, mode)
    assert q.num_embeddings == 40 and q.input_dims == K
    expected = quantize3(emb.weight.detach(), gs, bits, mode)
    assert same_bits(q.weight, expected[0]) and same_bits(q.scales, expected[1])
    table = lowbit.dequantize(q.weight, q.scales, q.biases, gs, bits, mode, dtype=torch.float32)
    for idx in [torch.tensor([3, 0, 39, 3]), torch.tensor([[1, 2, 5], [39, 0, 0]]), torch.tensor([7]),
                torch.randint(0, 40, (2, 3, 4), generator=gen)]:
        rows = q(idx)
        assert rows.dtype == torch.float32 and rows.shape == (*idx.shape, K)
        assert same_bits(rows, table[idx])
    x = randn(gen, 5, K)
    with torch.no_grad():
        y = q.as_linear(x)
    assert same_bits(y, lowbit.quantized_matmul(x, q.weight, q.scales, q.biases, True, gs, bits, mode))
    assert_close(y, linear_oracle(x, table), atol=5e-4)
    d = q.dequantize()
    assert type(d) is nn.Embedding and same_bits(d.weight.detach(), table)
    sd = q.state_dict()
    assert set(sd) == ({"weight", "scales", "biases"} if mode == "affine" else {"weight", "scales"})
    fresh = QuantizedEmbedding(40, K, gs, bits, mode, dtype=torch.float32)
    fresh.load_state_dict(sd)
    idx = torch.tensor([[4, 5], [6, 38]])
    assert same_bits(fresh(idx), q(idx))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("mode", ["affine", "mxfp4", "mxfp8", "nvfp4"])
def test_embedding_keeps_source_dtype(mode, dtype):
    gen = make_gen(14)
    q = QuantizedEmbedding.from_embedding(float_embedding(gen, num=8, dims=64, dtype=dtype), mode=mode)
    idx = torch.tensor([0, 7, 2])
    rows = q(idx)
    assert rows.dtype == dtype
    table = lowbit.dequantize(q.weight, q.scales, q.biases, q.group_size, q.bits, mode, dtype=dtype)
    assert same_bits(rows, table[idx])
    assert q.dequantize().weight.dtype == dtype


@pytest.mark.parametrize("mode", ["affine", "nvfp4"])
def test_embedding_follows_module_dtype_cast(mode):
    q = QuantizedEmbedding.from_embedding(float_embedding(make_gen(16), num=8, dims=64), mode=mode)
    q.to(torch.bfloat16)
    assert q(torch.tensor([1, 2])).dtype == torch.bfloat16  # as nn.Embedding(...).to(torch.bfloat16) does
    assert q.dequantize().weight.dtype == torch.bfloat16


@needs_mlx
@pytest.mark.parametrize("fmt", FORMATS, ids=FMT_IDS)
def test_embedding_matches_mlx(fmt):
    """mlx.nn.QuantizedEmbedding: same buffers; an empty lowbit module with MLX's default dtype (dtype=None) loaded
    with MLX's buffers returns MLX's rows bit for bit, and as_linear within tolerance."""
    import mlx.nn as mnn

    mode, gs, bits = fmt
    gen = make_gen(15)
    emb = float_embedding(gen)
    me = mnn.Embedding(40, K)
    me.weight = to_mx(emb.weight)
    mq = mnn.QuantizedEmbedding.from_embedding(me, gs, bits, mode)
    theirs = mlx_buffers(mq, ("weight", "scales", "biases"))
    ours = QuantizedEmbedding.from_embedding(emb, gs, bits, mode)
    assert set(theirs) == set(ours.state_dict())
    for name, tensor in ours.state_dict().items():
        assert same_bits(tensor, theirs[name]), name
    empty = QuantizedEmbedding(40, K, gs, bits, mode)
    empty.load_state_dict(theirs)
    idx = torch.tensor([[0, 39, 12], [12, 3, 3]])
    assert same_bits(empty(idx), to_torch(mq(mx.array(idx.numpy()))))
    x = randn(gen, 3, K)
    assert_close(empty.as_linear(x), to_torch(mq.as_linear(to_mx(x))), atol=5e-4, what="as_linear vs MLX")


# ------------------------------------------------------------------------------------------------ MoE: the oracles


D, H, E, TOP_K = 64, 128, 8, 2  # model dims, expert hidden dims, experts, experts per token


def stacked(gen, e, n, k):
    return randn(gen, e, n, k, scale=k**-0.5)


def routing(gen, tokens, e=E, k=TOP_K):
    """Distinct experts per token (as a top-k router picks them)."""
    return torch.stack([torch.randperm(e, generator=gen)[:k] for _ in range(tokens)])


def switch_oracle(x, idx, w, bias=None):
    """out[t, j] = x[t] @ w[idx[t, j]].T (+ bias[idx[t, j]]), float64, one token and slot at a time."""
    t_count, k = idx.shape
    out = torch.empty(t_count, k, w.shape[-2], dtype=torch.float64)
    for t, j in itertools.product(range(t_count), range(k)):
        e = int(idx[t, j])
        out[t, j] = x[t].double() @ w[e].double().T + (0 if bias is None else bias[e].double())
    return out


def glu_oracle(x, idx, wg, wu, wd):
    """SwitchGLU per token and slot: down(silu(gate(x)) * up(x)), float64."""
    t_count, k = idx.shape
    out = torch.empty(t_count, k, wd.shape[-2], dtype=torch.float64)
    for t, j in itertools.product(range(t_count), range(k)):
        e = int(idx[t, j])
        xt = x[t].double()
        out[t, j] = (F.silu(xt @ wg[e].T) * (xt @ wu[e].T)) @ wd[e].T
    return out


def quantized_glu(gen, fmt, global_scale=False):
    mode, gs, bits = fmt
    glu = SwitchGLU(D, H, E)
    with torch.no_grad():
        for proj in (glu.gate_proj, glu.up_proj, glu.down_proj):
            proj.weight.copy_(stacked(gen, *proj.weight.shape))
    floats = {name: getattr(glu, name).weight.detach().clone() for name in ("gate_proj", "up_proj", "down_proj")}
    for name in floats:
        setattr(glu, name, getattr(glu, name).to_quantized(gs, bits, mode, global_scale))
    return glu, floats


MOE_FORMATS = [("affine", 64, 4), ("affine", 32, 8), ("mxfp4", 32, 4), ("mxfp8", 32, 8), ("nvfp4", 16, 4)]
MOE_IDS = [f"{m}-g{g}-b{b}" for m, g, b in MOE_FORMATS]


# ------------------------------------------------------------------------------------- QuantizedSwitchLinear / GLU


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("fmt", MOE_FORMATS, ids=MOE_IDS)
def test_switch_linear_matches_loop(fmt, bias):
    mode, gs, bits = fmt
    gen = make_gen(20)
    sl = SwitchLinear(D, 32, E, bias=bias)
    with torch.no_grad():
        sl.weight.copy_(stacked(gen, E, 32, D))
        if bias:
            sl.bias.copy_(randn(gen, E, 32))
    q = sl.to_quantized(gs, bits, mode)
    assert isinstance(q, QuantizedSwitchLinear) and q.num_experts == E
    assert (q.input_dims, q.output_dims) == (D, 32)
    expected = quantize3(sl.weight.detach(), gs, bits, mode)
    assert same_bits(q.weight, expected[0]) and same_bits(q.scales, expected[1])
    x = randn(gen, 5, D)
    idx = routing(gen, 5)
    with torch.no_grad():
        y = q(x.unsqueeze(-2).unsqueeze(-2), idx)
        y_float = sl(x.unsqueeze(-2).unsqueeze(-2), idx)
    assert y.shape == (5, TOP_K, 1, 32)
    ref = switch_oracle(x, idx, w_hat(q), sl.bias if bias else None)
    assert_close(y.squeeze(-2), ref, atol=2e-5)
    assert_close(y_float.squeeze(-2), switch_oracle(x, idx, sl.weight, sl.bias if bias else None), atol=2e-5)
    d = q.dequantize()
    assert type(d) is SwitchLinear and same_bits(d.weight.detach(), q.dequantized_weight())
    with torch.no_grad():
        assert_close(d(x.unsqueeze(-2).unsqueeze(-2).to(d.weight.dtype), idx).squeeze(-2).float(), ref,
                     atol=0.05, rtol=1e-2)
    fresh = QuantizedSwitchLinear(D, 32, E, bias, gs, bits, mode)
    fresh.load_state_dict(q.state_dict())
    assert same_bits(fresh(x.unsqueeze(-2).unsqueeze(-2), idx), y)


@pytest.mark.parametrize("fmt", MOE_FORMATS, ids=MOE_IDS)
def test_switch_glu_matches_loop_and_sorted_path(fmt):
    gen = make_gen(21)
    glu, _ = quantized_glu(gen, fmt)
    wg, wu, wd = (w_hat(getattr(glu, n)) for n in ("gate_proj", "up_proj", "down_proj"))
    tokens = 40  # 80 routed rows: the sorted path
    x = randn(gen, tokens, D)
    idx = routing(gen, tokens)
    with torch.no_grad():
        y = glu(x, idx)
        assert y.shape == (tokens, TOP_K, D)
        assert_close(y, glu_oracle(x, idx, wg, wu, wd), atol=5e-5, rtol=1e-4)
        # the sorted path (>= 64 rows) equals the unsorted one (each token alone: 2 rows) bit for bit
        alone = torch.cat([glu(x[t : t + 1], idx[t : t + 1]) for t in range(tokens)])
        assert same_bits(y, alone)
        # and a small batch (unsorted, 2 .. 62 rows) gives the same rows too
        assert same_bits(glu(x[:31], idx[:31]), y[:31])
        # batch dims: (B, L, D) with (B, L, k) routing
        y3 = glu(x.reshape(4, 10, D), idx.reshape(4, 10, TOP_K))
        assert same_bits(y3.reshape(tokens, TOP_K, D), y)


def test_switch_glu_checks_its_routing_once(monkeypatch):
    """The three expert products of a quantized SwitchGLU route by one index tensor: its range is read on the host
    once per forward (one sync), not once per product; indices out of range still raise gather_qmm's ValueError; a
    gather_qmm call after the block checks again, and int32 routing (made int64 per call) is checked per call."""
    gen = make_gen(24)
    glu, _ = quantized_glu(gen, ("affine", 64, 4))
    x = randn(gen, 3, D)
    idx = routing(gen, 3)
    reads = []  # (the range check reads each index tensor's torch.aminmax on the host)
    aminmax = torch.aminmax
    monkeypatch.setattr(torch, "aminmax", lambda t: reads.append(1) or aminmax(t))
    with torch.no_grad():
        y = glu(x, idx)
        assert len(reads) == 1
        reads.clear()
        assert same_bits(glu(x, idx.int()), y) and len(reads) == 3
        reads.clear()
        lowbit.gather_qmm(x.unsqueeze(-2).unsqueeze(-2), glu.up_proj.weight, glu.up_proj.scales, glu.up_proj.biases,
                          rhs_indices=idx, group_size=64, bits=4)
        assert len(reads) == 1
        bad = idx.clone()
        bad[1, 0] = E
        with pytest.raises(ValueError, match=rf"\[gather_qmm\] rhs_indices holds index {E}, out of range for the {E} "):
            glu(x, bad)


@pytest.mark.parametrize("fmt", [("affine", 64, 4), ("nvfp4", 16, 4)], ids=["affine", "nvfp4"])
def test_switch_linear_sorted_flag_is_only_a_hint(fmt):
    gen = make_gen(22)
    mode, gs, bits = fmt
    q = QuantizedSwitchLinear.from_weights(stacked(gen, E, 32, D), None, gs, bits, mode)
    idx = torch.sort(torch.randint(0, E, (70,), generator=gen)).values
    x = randn(gen, 70, 1, D)
    with torch.no_grad():
        assert same_bits(q(x, idx, sorted_indices=True), q(x, idx, sorted_indices=False))


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(MOE_FORMATS), st.integers(1, 50), st.integers(0, 2**16))
def test_switch_glu_batch_invariant(fmt, tokens, seed):
    """A token's SwitchGLU output does not depend on the other tokens of the batch (sorted or not)."""
    glu, _ = quantized_glu(make_gen(23), fmt)
    gen = make_gen(seed)
    x = randn(gen, tokens, D)
    idx = routing(gen, tokens)
    t = int(torch.randint(0, tokens, (1,), generator=gen))
    with torch.no_grad():
        assert same_bits(glu(x, idx)[t], glu(x[t : t + 1], idx[t : t + 1])[0])


def test_switch_nvfp4_global_scale_per_expert():
    gen = make_gen(24)
    w = stacked(gen, E, 32, D) * torch.logspace(-4, 1, E).reshape(E, 1, 1)  # experts of very different ranges
    q = QuantizedSwitchLinear.from_weights(w, None, mode="nvfp4", global_scale=True)
    amax = w.abs().amax(dim=(-2, -1))
    assert q.global_scale.dtype == torch.float32 and torch.equal(q.global_scale, amax)
    for e in range(E):
        w_q, scales = lowbit.quantize(w[e], mode="nvfp4", global_scale=amax[e])
        assert same_bits(q.weight[e], w_q) and same_bits(q.scales[e], scales)
    assert q.quantization() == {"group_size": 16, "bits": 4, "mode": "nvfp4", "global_scale": True}
    per_expert = torch.stack([lowbit.dequantize(q.weight[e], q.scales[e], None, 16, 4, "nvfp4", amax[e],
                                                torch.float32) for e in range(E)]).double()
    x = randn(gen, 6, D)
    idx = routing(gen, 6)
    with torch.no_grad():
        y = q(x.unsqueeze(-2).unsqueeze(-2), idx).squeeze(-2)
    assert_close(y, switch_oracle(x, idx, per_expert), atol=1e-6, rtol=1e-5)
    rel = (y.double() - switch_oracle(x, idx, w)).abs().amax(-1) / switch_oracle(x, idx, w).abs().amax(-1)
    assert rel.max() < 0.3  # every expert keeps its precision, the smallest included
    fresh = QuantizedSwitchLinear(D, 32, E, False, mode="nvfp4", global_scale=True)
    fresh.load_state_dict(q.state_dict())
    with torch.no_grad():
        assert same_bits(fresh(x.unsqueeze(-2).unsqueeze(-2), idx).squeeze(-2), y)
    q.to(torch.bfloat16)
    assert q.global_scale.dtype == torch.float32
    with pytest.raises(ValueError, match="nvfp4"):
        QuantizedSwitchLinear.from_weights(w, None, mode="mxfp4", global_scale=True)


def test_switch_nvfp4_global_scale_dequantize():
    gen = make_gen(27)
    q = QuantizedSwitchLinear.from_weights(stacked(gen, 4, 32, D), None, mode="nvfp4", global_scale=True)
    d = q.dequantize()  # MLX's default dtype for fp modes: bfloat16, each expert with its own tensor scale
    per_expert = torch.stack([lowbit.dequantize(q.weight[e], q.scales[e], mode="nvfp4", global_scale=q.global_scale[e])
                              for e in range(4)])
    assert same_bits(d.weight.detach(), per_expert)
    assert_close(d.weight.detach().double(), w_hat(q), atol=0, rtol=2 ** -8)


@needs_mlx
@pytest.mark.parametrize("fmt", MOE_FORMATS, ids=MOE_IDS)
def test_switch_glu_matches_mlx_lm(fmt):
    """mlx_lm SwitchGLU quantized with nn.quantize: same buffers; its buffers in lowbit modules give its outputs
    (sorted path included)."""
    import mlx.nn as mnn

    switch_layers = pytest.importorskip("mlx_lm.models.switch_layers")
    mode, gs, bits = fmt
    gen = make_gen(25)
    ours, floats = quantized_glu(gen, fmt)
    mg = switch_layers.SwitchGLU(D, H, E)
    for name, w in floats.items():
        getattr(mg, name).weight = to_mx(w)
    mnn.quantize(mg, gs, bits, mode=mode)
    loaded = SwitchGLU(D, H, E)
    for name in floats:
        theirs = mlx_buffers(getattr(mg, name))
        assert isinstance(getattr(mg, name), switch_layers.QuantizedSwitchLinear)
        mine = getattr(ours, name).state_dict()
        assert set(theirs) == set(mine), name
        for key in mine:
            assert same_bits(mine[key], theirs[key]), f"{name}.{key}"
        empty = QuantizedSwitchLinear(*reversed(floats[name].shape[1:]), E, False, gs, bits, mode)
        empty.load_state_dict(theirs)
        setattr(loaded, name, empty)
    for tokens in (3, 40):
        x = randn(gen, tokens, D)
        idx = routing(gen, tokens)
        with torch.no_grad():
            y = loaded(x, idx)
        assert_close(y, to_torch(mg(to_mx(x), mx_index(idx))), atol=5e-5, rtol=1e-4, what=f"{tokens} tokens")


@needs_mlx
def test_switch_nvfp4_global_scale_matches_mlx_lm():
    switch_layers = pytest.importorskip("mlx_lm.models.switch_layers")
    gen = make_gen(26)
    w = stacked(gen, E, 32, D) * torch.logspace(-3, 1, E).reshape(E, 1, 1)
    ml = switch_layers.SwitchLinear(D, 32, E, bias=False)
    ml.weight = to_mx(w)
    mq = ml.to_quantized(group_size=16, bits=4, mode="nvfp4", global_scale=True)
    theirs = mlx_buffers(mq)
    ours = QuantizedSwitchLinear.from_weights(w, None, mode="nvfp4", global_scale=True)
    assert set(theirs) == set(ours.state_dict()) == {"weight", "scales", "global_scale"}
    for key, tensor in ours.state_dict().items():
        assert same_bits(tensor, theirs[key]), key
    # MLX's CPU gather_qmm has no global scale ("only supported on the GPU"): the loaded module against the loop
    empty = QuantizedSwitchLinear(D, 32, E, False, mode="nvfp4", global_scale=True)
    empty.load_state_dict(theirs)
    x = randn(gen, 5, D)
    idx = routing(gen, 5)
    with torch.no_grad():
        y = empty(x.unsqueeze(-2).unsqueeze(-2), idx).squeeze(-2)
    assert_close(y, switch_oracle(x, idx, w_hat(empty)), atol=1e-6, rtol=1e-5)


# -------------------------------------------------------------------------------- QuantizedExperts (transformers)


def qwen3_moe_config(**kw):
    transformers = pytest.importorskip("transformers")
    base = dict(hidden_size=64, intermediate_size=128, moe_intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_experts=8, num_experts_per_tok=2,
                vocab_size=128, max_position_embeddings=64)
    return transformers.Qwen3MoeConfig(**{**base, **kw})


def randomize(model: nn.Module, seed: int, scale: float = 0.08) -> nn.Module:
    gen = make_gen(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim >= 2:
                p.copy_(randn(gen, *p.shape, scale=scale))
    return model.eval()


def put_back_dequantized(float_model: nn.Module, quantized: nn.Module) -> None:
    """Copy every quantized module's dequantized weight (float32) into the float model at the same path."""
    with torch.no_grad():
        for path, module in quantized.named_modules():
            if isinstance(module, QuantizedExperts):
                target = float_model.get_submodule(path)
                target.gate_up_proj.copy_(w_hat(module.gate_up_proj))
                target.down_proj.copy_(w_hat(module.down_proj))
            elif isinstance(module, (QuantizedLinear, QuantizedEmbedding, QuantizedRouter)):
                float_model.get_submodule(path).weight.copy_(w_hat(module))


@pytest.mark.parametrize("fmt", [("affine", 64, 4), ("mxfp4", 32, 4), ("nvfp4", 16, 4)], ids=lambda f: f[0])
def test_quantized_experts_match_qwen3_moe_experts(fmt):
    moe = pytest.importorskip("transformers.models.qwen3_moe.modeling_qwen3_moe")
    mode, gs, bits = fmt
    config = qwen3_moe_config()
    block = randomize(moe.Qwen3MoeSparseMoeBlock(config), 30)
    reference = copy.deepcopy(block)
    result = quantize_model(block, gs, bits, mode)
    assert isinstance(block.experts, QuantizedExperts)
    assert isinstance(block.gate, QuantizedRouter) and isinstance(block.gate.router, moe.Qwen3MoeTopKRouter)
    assert result == {"group_size": gs, "bits": bits, "mode": mode, "gate": ROUTER_PARAMS}
    qe = block.experts
    assert qe.gate_up_proj.weight.shape == (8, 128, 64 * bits // 32)
    assert same_bits(qe.gate_up_proj.weight, quantize3(reference.experts.gate_up_proj.detach(), gs, bits, mode)[0])
    put_back_dequantized(reference, block)
    gen = make_gen(31)
    for tokens in (5, 40):  # 10 routed rows (unsorted) and 80 (sorted)
        hidden = randn(gen, 1, tokens, 64)
        with torch.no_grad():
            out, ref = block(hidden), reference(hidden)
        assert_close(out, ref, atol=1e-5, rtol=1e-4, what=f"{tokens} tokens")
        # the experts alone, with the router's choice, token by token: bit-identical to the batch
        flat = hidden.reshape(-1, 64)
        with torch.no_grad():
            _, weights, index = block.gate(flat)
            together = qe(flat, index, weights)
            alone = torch.cat([qe(flat[t : t + 1], index[t : t + 1], weights[t : t + 1]) for t in range(tokens)])
        assert same_bits(together, alone)


def test_quantized_experts_global_scale_and_dtype():
    moe = pytest.importorskip("transformers.models.qwen3_moe.modeling_qwen3_moe")
    block = randomize(moe.Qwen3MoeSparseMoeBlock(qwen3_moe_config()), 32)
    reference = copy.deepcopy(block)
    result = quantize_model(block, mode="nvfp4", global_scale=True)
    qe = block.experts
    assert qe.gate_up_proj.global_scale.shape == (8,) and qe.down_proj.global_scale.shape == (8,)
    assert torch.equal(qe.gate_up_proj.global_scale, reference.experts.gate_up_proj.detach().abs().amax(dim=(1, 2)))
    assert result["experts"] == {"group_size": 16, "bits": 4, "mode": "nvfp4", "global_scale": True}
    put_back_dequantized(reference, block)
    hidden = randn(make_gen(33), 1, 9, 64)
    with torch.no_grad():
        assert_close(block(hidden), reference(hidden), atol=1e-5, rtol=1e-4)
        block.to(torch.bfloat16)
        out = block(hidden.bfloat16())
    assert out.dtype == torch.bfloat16 and qe.gate_up_proj.global_scale.dtype == torch.float32
    assert torch.isfinite(out).all()


def test_qwen3_moe_causal_lm():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = qwen3_moe_config()
    model = randomize(transformers.Qwen3MoeForCausalLM(config), 34)
    reference = copy.deepcopy(model)
    float_model = copy.deepcopy(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every size here is a multiple of the group size: nothing kept float
        result = quantize_model(model, bits=8)
    assert result == {"group_size": 64, "bits": 8, "mode": "affine"}
    for i in range(2):
        assert isinstance(model.model.layers[i].mlp.experts, QuantizedExperts)
        assert isinstance(model.model.layers[i].self_attn.q_proj, QuantizedLinear)
    assert isinstance(model.model.embed_tokens, QuantizedEmbedding)
    assert isinstance(model.lm_head, QuantizedLinear)
    put_back_dequantized(reference, model)
    ids = torch.randint(0, 128, (2, 12), generator=make_gen(35))
    with torch.no_grad():
        logits = model(ids).logits
        ref = reference(ids).logits
        exact = float_model(ids).logits
    assert_close(logits, ref, atol=1e-4, rtol=1e-4)
    assert F.cosine_similarity(logits.flatten(), exact.flatten(), dim=0) > 0.99


def qwen3_router(seed: int, **kw):
    moe = pytest.importorskip("transformers.models.qwen3_moe.modeling_qwen3_moe")
    return randomize(moe.Qwen3MoeTopKRouter(qwen3_moe_config(**kw)), seed, scale=0.3)


def test_quantized_router_keeps_the_transformers_forward():
    """Qwen3-MoE's router quantized at 8 bits: its logits are lowbit.quantized_matmul's (bit for bit), i.e.
    x @ dequantize(w).T; softmax, top-k and normalization are the router's own (equal to the float router holding
    the dequantized weight), and it picks the float router's experts wherever the float choice is not near a tie."""
    float_router = qwen3_router(50)
    dequantized = copy.deepcopy(float_router)
    router = QuantizedRouter.from_router(copy.deepcopy(float_router), 64, 8)
    assert (router.group_size, router.bits, router.mode) == (64, 8, "affine") and router.quantization() == ROUTER_PARAMS
    x = randn(make_gen(51), 2, 40, 64)
    with torch.no_grad():
        dequantized.weight.copy_(w_hat(router))
        logits, scores, index = router(x)
        ref_logits, ref_scores, ref_index = dequantized(x)
        float_logits, _, float_index = float_router(x)
    assert same_bits(logits, lowbit.quantized_matmul(x.reshape(-1, 64), router.weight, router.scales, router.biases,
                                                     group_size=64, bits=8))
    assert_close(logits, linear_oracle(x.reshape(-1, 64), w_hat(router)), atol=1e-5)
    assert torch.equal(index, ref_index)
    assert_close(scores, ref_scores, atol=1e-6)
    assert (logits - float_logits).abs().max() < 1e-2 * float_logits.abs().max()  # (8-bit weights)
    top = torch.softmax(float_logits, -1).sort(-1, descending=True).values
    clear = top[:, 1] - top[:, 2] > 1e-2  # the float router's 2nd and 3rd experts are apart
    assert clear.sum() >= 60  # (of 80 tokens: the comparison below is not vacuous)
    assert torch.equal(index[clear].sort(-1).values, float_index[clear].sort(-1).values)


def test_quantized_router_buffers_state_dict_and_copies():
    router = QuantizedRouter.from_router(qwen3_router(52), 64, 8)
    assert {k: v.dtype for k, v in router.state_dict().items()} == {
        "weight": torch.uint32, "scales": torch.float32, "biases": torch.float32}
    x = randn(make_gen(53), 7, 64)
    with torch.no_grad():
        out = router(x)
        # an empty router of the same shapes takes the state_dict (as a checkpoint fills it), through torch.save
        blob = io.BytesIO()
        torch.save(router.state_dict(), blob)
        blob.seek(0)
        fresh = QuantizedRouter(qwen3_router(54), 64, 8)
        fresh.load_state_dict(torch.load(blob))
        twin = copy.deepcopy(router)
        for other in (fresh, twin):
            assert all(torch.equal(a, b) for a, b in zip(other(x), out))
        float_router = router.dequantize()
        assert type(float_router) is type(router.router) and torch.equal(float_router.weight, w_hat(router).float())
        assert all(torch.equal(a, b) for a, b in zip(router(x), out))  # (unchanged by dequantize)
        router.to(torch.bfloat16)
        logits, scores, _ = router(x.bfloat16())
    assert router.scales.dtype == torch.bfloat16 and router.weight.dtype == torch.uint32
    assert logits.dtype == torch.bfloat16 and torch.isfinite(scores).all()


class CastingRouter(nn.Module):
    """A router projecting in float32 as DeepSeek-V2's and Ernie-4.5's do in transformers."""

    def __init__(self, weight):
        super().__init__()
        self.weight = nn.Parameter(weight)

    def forward(self, x):
        return F.linear(x.type(torch.float32), self.weight.type(torch.float32)).softmax(-1)


class MatmulRouter(CastingRouter):
    def forward(self, x):
        return torch.matmul(x, self.weight)


def test_quantized_router_serves_float_casts_and_refuses_other_uses():
    gen = make_gen(55)
    w, x = randn(gen, 8, 64, dtype=torch.bfloat16), randn(gen, 5, 64, dtype=torch.bfloat16)
    router = QuantizedRouter.from_router(CastingRouter(w.clone()), 64, 8)
    with torch.no_grad():
        probs = router(x)
    assert probs.dtype == torch.float32
    expected = lowbit.quantized_matmul(x.float(), router.weight, router.scales, router.biases, group_size=64, bits=8)
    assert same_bits(probs, expected.softmax(-1))
    with pytest.raises(ValueError, match=r"\[QuantizedRouter\].*matmul.*only F\.linear"):
        QuantizedRouter.from_router(MatmulRouter(w.clone()), 64, 8)(x)
    with pytest.raises(ValueError, match=r"\[QuantizedRouter\].*2-D float weight.*Linear"):
        QuantizedRouter(nn.Linear(64, 8, bias=False))


class RouterWithState(CastingRouter):
    """A router holding more than its weight (DeepSeek-V3's e_score_correction_bias): not converted."""

    def __init__(self, weight):
        super().__init__(weight)
        self.register_buffer("e_score_correction_bias", torch.zeros(weight.shape[0]))


def test_quantize_model_bare_routers_follow_router_config_and_predicate():
    """Bare-weight routers are decided exactly as linear routers: ROUTER_PARAMS by default, the global parameters
    with router=None, config and predicate first; quantize_input is refused for them; a router holding more than
    its weight, or a bare weight at another path, stays as it is."""
    moe = pytest.importorskip("transformers.models.qwen3_moe.modeling_qwen3_moe")

    def block():
        b = randomize(moe.Qwen3MoeSparseMoeBlock(qwen3_moe_config()), 56)
        b.shared_expert_gate = RouterWithState(torch.randn(1, 64))
        b.mixer = CastingRouter(torch.randn(8, 64))  # no router path
        return b

    eight = (64, 8, "affine")  # ROUTER_PARAMS
    cases = [  # (quantize_model's arguments, the gate's (group_size, bits, mode) or None: float, its entry)
        ({}, eight, ROUTER_PARAMS),
        ({"router": None}, (64, 4, "affine"), None),
        ({"router": {"group_size": 32, "bits": 6}}, (32, 6, "affine"), {"group_size": 32, "bits": 6, "mode": "affine"}),
        ({"mode": "nvfp4", "global_scale": True}, eight, ROUTER_PARAMS),
        ({"router": None, "mode": "nvfp4", "global_scale": True}, (16, 4, "nvfp4"), None),  # (no tensor scale)
        ({"config": {"gate": {"bits": 3}}}, (64, 3, "affine"), {"group_size": 64, "bits": 3, "mode": "affine"}),
        ({"config": {"re:ga.*": False}}, None, False),
        ({"predicate": lambda path, m: path != "gate"}, None, False),
    ]
    for kwargs, params, entry in cases:
        b = block()
        result = quantize_model(b, **kwargs)
        assert result.get("gate") == entry and "shared_expert_gate" not in result and "mixer" not in result, kwargs
        assert type(b.shared_expert_gate) is RouterWithState and type(b.mixer) is CastingRouter
        if params is None:
            assert isinstance(b.gate, moe.Qwen3MoeTopKRouter) and isinstance(b.gate.weight, nn.Parameter)
        else:
            assert isinstance(b.gate, QuantizedRouter) and params_of(b.gate)[1:] == params, kwargs
            assert b.gate.global_scale is None
    b = block()
    with pytest.raises(ValueError, match=r"\[quantize_model\] 'gate': quantize_input applies to linears"):
        quantize_model(b, config={"gate": {"mode": "nvfp4", "quantize_input": True}})
    assert isinstance(b.gate, moe.Qwen3MoeTopKRouter) and isinstance(b.experts, moe.Qwen3MoeExperts)


# -------------------------------------------------------------------------------------------------- quantize_model


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.q_proj = nn.Linear(64, 64)
        self.gate = nn.Linear(64, 8, bias=False)  # a router: 8-bit by default
        self.gate_proj = nn.Linear(64, 128, bias=False)  # not a router
        self.down_proj = nn.Linear(128, 64, bias=False)
        self.odd = nn.Linear(48, 16)  # 48: not a multiple of 32 or 64 (a multiple of 16)


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(32, 64)
        self.layers = nn.ModuleList([Block(), Block()])
        self.head = nn.Linear(64, 32)
        randomize(self, 40)

    def forward(self, ids):
        h = self.embed(ids)
        for b in self.layers:
            h = h + b.q_proj(h) + b.down_proj(F.silu(b.gate_proj(h))) + 0 * b.gate(h).sum(-1, keepdim=True)
            h = h + 0 * b.odd(h[..., :48]).sum(-1, keepdim=True)
        return self.head(h)


def params_of(module) -> tuple:
    return (type(module).__name__, module.group_size, module.bits, module.mode)


def quiet_quantize(model, *args, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return quantize_model(model, *args, **kw)


def test_quantize_model_defaults_routers_and_odd_sizes():
    model = Toy()
    reference = copy.deepcopy(model)
    with pytest.warns(UserWarning, match=r"\[quantize_model\].*layers\.0\.odd.*layers\.1\.odd"):
        result = quantize_model(model)
    router = {"group_size": 64, "bits": 8, "mode": "affine"}
    assert result == {"group_size": 64, "bits": 4, "mode": "affine", "layers.0.gate": router,
                      "layers.1.gate": router, "layers.0.odd": False, "layers.1.odd": False}
    assert params_of(model.embed) == ("QuantizedEmbedding", 64, 4, "affine")
    assert params_of(model.head) == ("QuantizedLinear", 64, 4, "affine")
    for b in model.layers:
        assert params_of(b.q_proj) == ("QuantizedLinear", 64, 4, "affine")
        assert params_of(b.gate) == ("QuantizedLinear", 64, 8, "affine")
        assert params_of(b.gate_proj) == ("QuantizedLinear", 64, 4, "affine")
        assert params_of(b.down_proj) == ("QuantizedLinear", 64, 4, "affine")
        assert type(b.odd) is nn.Linear
    # converted layers hold exactly lowbit.quantize of the float weights
    assert same_bits(model.head.weight, lowbit.quantize(reference.head.weight.detach())[0])
    assert same_bits(model.layers[1].gate.scales, lowbit.quantize(reference.layers[1].gate.weight.detach(), 64, 8)[1])
    # and a second call finds nothing left to quantize
    assert quiet_quantize(model, bits=2) == {"group_size": 64, "bits": 2, "mode": "affine", "layers.0.odd": False,
                                             "layers.1.odd": False}
    assert model.head.bits == 4
    put_back_dequantized(reference, model)
    ids = torch.randint(0, 32, (2, 5), generator=make_gen(41))
    with torch.no_grad():
        assert_close(model(ids), reference(ids), atol=1e-4, rtol=1e-4)


def test_quantize_model_router_names():
    model = nn.Module()
    for name in ("gate", "router", "shared_expert_gate", "gate_proj", "up_gate", "gatex"):
        setattr(model, name, nn.Linear(64, 64))
    model.mlp = nn.Module()
    model.mlp.router = nn.Module()
    model.mlp.router.proj = nn.Linear(64, 64)
    result = quantize_model(model, mode="mxfp4")
    for name in ("gate", "router", "shared_expert_gate", "mlp.router.proj"):
        assert params_of(model.get_submodule(name)) == ("QuantizedLinear", 64, 8, "affine"), name
        assert result[name] == {"group_size": 64, "bits": 8, "mode": "affine"}
    for name in ("gate_proj", "up_gate", "gatex"):
        assert params_of(getattr(model, name)) == ("QuantizedLinear", 32, 4, "mxfp4"), name
        assert name not in result
    model = nn.Sequential()
    model.gate = nn.Linear(64, 64)
    assert quantize_model(model, router=None) == {"group_size": 64, "bits": 4, "mode": "affine"}
    assert model.gate.bits == 4
    model = nn.Sequential()
    model.gate = nn.Linear(64, 64)
    custom = {"group_size": 32, "bits": 6, "mode": "affine"}
    assert quantize_model(model, router=custom)["gate"] == custom and model.gate.bits == 6


def test_quantize_model_config_paths_and_regex():
    model = Toy()
    config = {
        "head": {"bits": 8},  # no mode: affine; missing group size: the mode's default
        "re:layers\\.\\d+\\.q_proj": {"mode": "mxfp8"},
        "re:gate_proj": False,  # full match only: matches no path
        "layers.1.down_proj": False,
        "layers.0.odd": {"mode": "nvfp4"},  # 48 is a multiple of 16
        "re:layers\\.1\\..*": {"bits": 2, "group_size": 32},
    }
    result = quiet_quantize(model, config=config)
    assert params_of(model.head) == ("QuantizedLinear", 64, 8, "affine")
    assert params_of(model.layers[0].q_proj) == ("QuantizedLinear", 32, 8, "mxfp8")
    assert params_of(model.layers[1].q_proj) == ("QuantizedLinear", 32, 8, "mxfp8")  # first pattern wins
    assert params_of(model.layers[0].gate_proj) == ("QuantizedLinear", 64, 4, "affine")
    assert type(model.layers[1].down_proj) is nn.Linear
    assert params_of(model.layers[0].odd) == ("QuantizedLinear", 16, 4, "nvfp4")
    assert params_of(model.layers[1].gate) == ("QuantizedLinear", 32, 2, "affine")  # config beats the router
    assert params_of(model.layers[1].gate_proj) == ("QuantizedLinear", 32, 2, "affine")
    assert type(model.layers[1].odd) is nn.Linear  # 48 % 32: kept float despite the config
    assert result == {
        "group_size": 64, "bits": 4, "mode": "affine",
        "head": {"group_size": 64, "bits": 8, "mode": "affine"},
        "layers.0.q_proj": {"group_size": 32, "bits": 8, "mode": "mxfp8"},
        "layers.1.q_proj": {"group_size": 32, "bits": 8, "mode": "mxfp8"},
        "layers.1.down_proj": False,
        "layers.0.odd": {"group_size": 16, "bits": 4, "mode": "nvfp4"},
        "layers.0.gate": {"group_size": 64, "bits": 8, "mode": "affine"},
        "layers.1.gate": {"group_size": 32, "bits": 2, "mode": "affine"},
        "layers.1.gate_proj": {"group_size": 32, "bits": 2, "mode": "affine"},
        "layers.1.odd": False,
    }


def test_quantize_model_predicate_and_precedence():
    seen = []

    def predicate(path, module):
        seen.append(path)
        if path == "embed":
            return False
        if path.endswith("gate"):
            return True  # the predicate beats the router default: global parameters
        if path.endswith("down_proj"):
            return {"mode": "nvfp4"}
        return path != "head"

    model = Toy()
    result = quiet_quantize(model, 64, 8, "affine", predicate=predicate, config={"layers.0.down_proj": {"bits": 3}})
    assert "layers.0.down_proj" not in seen  # config decided first
    assert set(seen) == {"embed", "head", "layers.1.down_proj", "layers.0.odd", "layers.1.odd"} | {
        f"layers.{i}.{n}" for i in range(2) for n in ("q_proj", "gate", "gate_proj")}
    assert type(model.embed) is nn.Embedding and type(model.head) is nn.Linear
    assert params_of(model.layers[0].gate) == ("QuantizedLinear", 64, 8, "affine")
    assert params_of(model.layers[0].down_proj) == ("QuantizedLinear", 64, 3, "affine")
    assert params_of(model.layers[1].down_proj) == ("QuantizedLinear", 16, 4, "nvfp4")
    assert result == {
        "group_size": 64, "bits": 8, "mode": "affine", "embed": False, "head": False,
        "layers.0.down_proj": {"group_size": 64, "bits": 3, "mode": "affine"},
        "layers.1.down_proj": {"group_size": 16, "bits": 4, "mode": "nvfp4"},
        "layers.0.odd": False, "layers.1.odd": False,
    }


def test_quantize_model_quantize_input():
    model = Toy()
    reference = copy.deepcopy(model)
    result = quiet_quantize(model, mode="nvfp4", quantize_input=True, router=None)
    assert result["group_size"] == 16 and result["mode"] == "nvfp4"
    for b in model.layers:
        for name in ("q_proj", "gate", "gate_proj", "down_proj", "odd"):
            assert type(getattr(b, name)) is QQLinear, name
    assert type(model.head) is QQLinear and type(model.embed) is QuantizedEmbedding
    x = randn(make_gen(42), 3, 64)
    with torch.no_grad():
        direct = lowbit.qqmm(x, model.head.weight, model.head.scales, mode="nvfp4") + reference.head.bias
        assert same_bits(model.head(x), direct)
    model = Toy()
    result = quiet_quantize(model, predicate=lambda p, m: {"mode": "mxfp8", "quantize_input": p == "head"})
    assert type(model.head) is QQLinear and model.head.mode == "mxfp8"
    assert type(model.layers[0].q_proj) is QuantizedLinear
    assert result["head"] == {"group_size": 32, "bits": 8, "mode": "mxfp8", "quantize_input": True}
    assert result["layers.0.q_proj"] == {"group_size": 32, "bits": 8, "mode": "mxfp8"}


def test_quantize_model_records_global_quantize_input():
    model = nn.Sequential(nn.Linear(64, 64))
    result = quantize_model(model, mode="nvfp4", quantize_input=True)
    assert type(model[0]) is QQLinear
    assert result.get("quantize_input") is True or result.get("0", {}).get("quantize_input") is True


def test_quantize_model_switch_and_global_scale():
    model = nn.Module()
    model.mlp = nn.Module()
    model.mlp.switch_mlp = SwitchGLU(64, 128, 4)
    model.mlp.gate = nn.Linear(64, 4, bias=False)
    model.proj = nn.Linear(64, 64)
    randomize(model, 43)
    reference = copy.deepcopy(model)
    result = quantize_model(model, mode="nvfp4", global_scale=True)
    entry = {"group_size": 16, "bits": 4, "mode": "nvfp4", "global_scale": True}
    for name in ("gate_proj", "up_proj", "down_proj"):
        q = getattr(model.mlp.switch_mlp, name)
        assert type(q) is QuantizedSwitchLinear and q.global_scale.shape == (4,)
        assert torch.equal(q.global_scale, getattr(reference.mlp.switch_mlp, name).weight.abs().amax(dim=(1, 2)))
        assert result[f"mlp.switch_mlp.{name}"] == entry
    assert model.proj.global_scale is None and "proj" not in result  # linears: no tensor scale (as mlx-lm)
    assert params_of(model.mlp.gate) == ("QuantizedLinear", 64, 8, "affine")
    x = randn(make_gen(44), 70, 64)  # 140 routed rows: sorted
    idx = routing(make_gen(45), 70, e=4)
    wg, wu, wd = (w_hat(getattr(model.mlp.switch_mlp, n)) for n in ("gate_proj", "up_proj", "down_proj"))
    with torch.no_grad():
        assert_close(model.mlp.switch_mlp(x, idx), glu_oracle(x, idx, wg, wu, wd), atol=5e-5, rtol=1e-4)


def test_quantize_model_model_bits_per_weight():
    model = nn.Sequential(nn.Linear(256, 64, bias=False))
    quantize_model(model, 64, 4)
    assert model_bits_per_weight(model) == 4 + 2 * 32 / 64  # float32 scale and bias per group of 64
    model.to(torch.bfloat16)
    assert model_bits_per_weight(model) == 4.5  # mlx-lm's number for a bfloat16 model


@pytest.mark.parametrize("call, match", [
    (lambda m: quantize_model({"weight": torch.ones(2, 2)}), "model must be a torch.nn.Module"),
    (lambda m: quantize_model(m, mode="int4"), "Invalid quantization mode"),
    (lambda m: quantize_model(m, group_size=48), "group size"),
    (lambda m: quantize_model(m, mode="nvfp4", bits=8), "bits"),
    (lambda m: quantize_model(m, config={"head": {"bitz": 4}}), "unknown keys"),
    (lambda m: quantize_model(m, config={"head": {"mode": "fp4"}}), "Invalid quantization mode"),
    (lambda m: quantize_model(m, config={"head": {"mode": "mxfp4", "group_size": 64}}), "group size"),
    (lambda m: quantize_model(m, predicate=lambda p, mod: "yes"), "must be True, False or a dict"),
    (lambda m: quantize_model(m, mode="affine", global_scale=True), "global_scale needs mode 'nvfp4'"),
    (lambda m: quantize_model(m, mode="mxfp4", global_scale=True), "global_scale needs mode 'nvfp4'"),
], ids=["non-module", "mode", "group-size", "bits", "dict-keys", "layer-mode", "layer-group-size", "predicate",
        "global-scale-affine", "global-scale-mxfp4"])
def test_quantize_model_rejects_bad_inputs(call, match):
    model = Toy()
    with pytest.raises(ValueError, match=r"\[quantize_model\].*" + match):
        quiet_quantize_call(call, model)


def quiet_quantize_call(call, model):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return call(model)


@pytest.mark.parametrize("kwargs, match", [
    (dict(quantize_input=True), "quantize_input"),
    (dict(config={"1": {"bitz": 4}}), "unknown keys"),
    (dict(predicate=lambda p, m: True if p == "0" else "yes"), "True, False or a dict"),
], ids=["quantize_input-affine", "config-keys", "predicate"])
def test_quantize_model_fails_before_touching_the_model(kwargs, match):
    model = nn.Sequential(nn.Embedding(10, 64), nn.Linear(64, 64))
    with pytest.raises(ValueError, match=r"\[quantize_model\].*" + match):
        quantize_model(model, **kwargs)
    assert type(model[0]) is nn.Embedding  # a failed call leaves the model as it was


def test_quantize_model_per_layer_global_scale_is_applied_or_rejected():
    model = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 64))
    try:
        result = quantize_model(model, config={"0": {"mode": "nvfp4", "global_scale": True},
                                               "1": {"mode": "affine", "global_scale": True}})
    except ValueError as err:
        assert "[quantize_model]" in str(err) and type(model[0]) is nn.Linear
        return
    for i in ("0", "1"):
        assert bool(result[i].get("global_scale")) == (model[int(i)].global_scale is not None), i


# ------------------------------------------------------------------------------------------- transformers models


def tiny_llama(tie=False):
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=128,
                                      max_position_embeddings=64, tie_word_embeddings=tie)
    torch.manual_seed(0)
    return randomize(transformers.LlamaForCausalLM(config), 50)


@pytest.mark.parametrize("fmt, min_cos", [(("affine", 64, 8), 0.99), (("affine", 32, 4), 0.95),
                                          (("mxfp8", 32, 8), 0.99), (("nvfp4", 16, 4), 0.9)],
                         ids=["affine8", "affine4-g32", "mxfp8", "nvfp4"])
def test_llama_quantize_model(fmt, min_cos):
    mode, gs, bits = fmt
    model = tiny_llama()
    float_model = copy.deepcopy(model)
    reference = copy.deepcopy(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = quantize_model(model, gs, bits, mode)
    assert result == {"group_size": gs, "bits": bits, "mode": mode}
    quantized = {p for p, m in model.named_modules() if isinstance(m, QuantizedWeight)}
    linears = {p for p, m in float_model.named_modules() if isinstance(m, (nn.Linear, nn.Embedding))}
    assert quantized == linears and "lm_head" in quantized and "model.embed_tokens" in quantized
    ids = torch.randint(0, 128, (2, 10), generator=make_gen(51))
    with torch.no_grad():
        logits = model(ids).logits
        exact = float_model(ids).logits
    assert logits.shape == (2, 10, 128)
    assert F.cosine_similarity(logits.flatten(), exact.flatten(), dim=0) > min_cos
    put_back_dequantized(reference, model)
    with torch.no_grad():
        assert_close(logits, reference(ids).logits, atol=1e-4, rtol=1e-4)


def test_llama_tied_embeddings_and_bf16():
    model = tiny_llama(tie=True)
    float_model = copy.deepcopy(model)
    quantization = quantize_model(model, bits=8)
    assert isinstance(model.lm_head, TiedHead) and isinstance(model.model.embed_tokens, QuantizedEmbedding)
    assert model.lm_head.embedding is model.model.embed_tokens and "lm_head" not in quantization
    assert not [name for name in model.state_dict() if name.startswith("lm_head")]  # one table, as in mlx-lm
    ids = torch.randint(0, 128, (1, 8), generator=make_gen(52))
    with torch.no_grad():
        exact = float_model(ids).logits
        logits = model(ids).logits
        assert F.cosine_similarity(logits.flatten(), exact.flatten(), dim=0) > 0.99
        model.to(torch.bfloat16)
        head = model.lm_head.embedding
        assert head.scales.dtype == torch.bfloat16 and head.weight.dtype == torch.uint32
        logits = model(ids).logits  # (float32 today: see test_embedding_follows_module_dtype_cast)
    assert F.cosine_similarity(logits.float().flatten(), exact.flatten(), dim=0) > 0.99


def test_quantize_model_refuses_a_bare_layer():
    """The root module cannot be swapped in place: say so instead of returning a dict for a layer left float."""
    layer = nn.Linear(64, 8)
    with pytest.raises(ValueError, match=r"\[quantize_model\] model is itself a Linear"):
        quantize_model(layer, 64, 4)
    assert list(layer._modules) == []
