"""quantized_matmul: port of the matmul tests of MLX's python/tests/test_quantized.py, plus lowbit's documented
extensions (2-D x with a batched w broadcasts, stride-0 expanded weights, non-contiguous views).

Oracle: float64 `x @ dequantize(w)(.T)` with lowbit.dequantize (bit-exact with MLX, tested elsewhere) evaluated in
float32 and widened to float64. Tolerance: max error <= 1e-3 (float32 x) / 1e-2 (bf16/f16) times max |oracle|, with
inputs scaled like MLX (x, w ~ N(0,1)/sqrt(K)). A representative subset is also compared with MLX's own
`mx.quantized_matmul` on the very same packed tensors (float32 inputs, atol 1e-3).
"""

from __future__ import annotations

import itertools

import pytest
import torch
from conftest import ALL_CONFIGS, DTYPES, dequantize_f64, quantize3, to_mx, to_torch

import lowbit

mx = pytest.importorskip("mlx.core")

FP_MODES = {"mxfp4": (32, 4), "mxfp8": (32, 8), "nvfp4": (16, 4)}
AFFINE_GS = (128, 64, 32)
AFFINE_BITS = (1, 2, 3, 4, 5, 6, 8)


# ----------------------------------------------------------------------------------------------------------- helpers


def make_gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def normal(gen, shape, scale=1.0, dtype=torch.float32):
    return (torch.randn(shape, generator=gen) * scale).to(dtype)


def qmm(x, q, transpose=True, gs=None, bits=None, mode="affine", **kw):
    return lowbit.quantized_matmul(x, q[0], q[1], q[2], transpose, gs, bits, mode, **kw)


def oracle(x, q, transpose=True, gs=None, bits=None, mode="affine", global_scale=None):
    """float64 x @ dequantize(w)(.T), torch.matmul broadcasting (each weight batch uses its own matrix)."""
    w = dequantize_f64(tuple(None if t is None else t.contiguous() for t in q), gs, bits, mode, global_scale)
    return x.double() @ (w.transpose(-1, -2) if transpose else w)


def tol_for(dtype) -> float:
    return 1e-3 if dtype == torch.float32 else 1e-2


def assert_matches(out, ref, rel, what=""):
    """max |out - ref| <= rel * max |ref| (and same shape, all finite)."""
    assert tuple(out.shape) == tuple(ref.shape), f"{what}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    assert torch.isfinite(out).all(), f"{what}: non-finite output"
    err = (out.double() - ref).abs().max().item()
    bound = rel * max(ref.abs().max().item(), 1e-30)
    assert err <= bound, f"{what}: max error {err:.3g} > {bound:.3g}"


def mlx_qmm(x, q, transpose=True, gs=None, bits=None, mode="affine"):
    out = mx.quantized_matmul(to_mx(x), to_mx(q[0]), to_mx(q[1]), to_mx(q[2]), transpose, gs, bits, mode)
    return to_torch(out)


def assert_matches_mlx(out, x, q, transpose=True, gs=None, bits=None, mode="affine", atol=1e-3, what=""):
    """lowbit's result vs mx.quantized_matmul on the same packed tensors (float32 inputs)."""
    ref = mlx_qmm(x, q, transpose, gs, bits, mode)
    assert tuple(out.shape) == tuple(ref.shape), f"{what}: shape {tuple(out.shape)} != MLX {tuple(ref.shape)}"
    assert out.dtype == ref.dtype, f"{what}: dtype {out.dtype} != MLX {ref.dtype}"
    err = (out.double() - ref.double()).abs().max().item()
    assert err <= atol, f"{what}: differs from MLX by {err:.3g} > {atol}"


def check(x, q, transpose=True, gs=None, bits=None, mode="affine", compare_mlx=False, what=""):
    """Run lowbit, compare with the float64 oracle and optionally with MLX; return the result."""
    out = qmm(x, q, transpose, gs, bits, mode)
    assert_matches(out, oracle(x, q, transpose, gs, bits, mode), tol_for(x.dtype), what)
    if compare_mlx:
        assert_matches_mlx(out, x, q, transpose, gs, bits, mode, what=what)
    return out


# ------------------------------------------------------------------------------------------------ MLX's sweeps


@pytest.mark.parametrize("transpose", [True, False])
@pytest.mark.parametrize("bits", AFFINE_BITS)
@pytest.mark.parametrize("gs", AFFINE_GS)
def test_qmm(gs, bits, transpose):
    """MLX test_qmm: affine qmm over M{8,32,33,64} x N,K{128,256}, both layouts (bits 3/5/6 added)."""
    gen = make_gen(0)
    for m, n, k in itertools.product([8, 32, 33, 64], [128, 256], [128, 256]):
        x = normal(gen, (m, k), k**-0.5)
        w = normal(gen, (n, k) if transpose else (k, n), k**-0.5)
        q = quantize3(w, gs, bits)
        check(x, q, transpose, gs, bits, compare_mlx=m in (8, 33), what=f"M={m} N={n} K={k}")


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 8])
@pytest.mark.parametrize("gs", AFFINE_GS)
def test_qmv(gs, bits):
    """MLX test_qmv: x (B,1,K) times w (B,N,K) (B=0: x (3,1,K), 2-D w); each batch uses its own w[b]."""
    gen = make_gen(1)
    # MLX naming: M = output rows of w, N = the reduction length.
    for m, n, b in itertools.product([256, 67], [64, 256], [0, 1, 3]):
        if gs > n:
            continue
        x = normal(gen, (3, 1, n) if b == 0 else (b, 1, n), n**-0.5)
        w = normal(gen, (m, n) if b == 0 else (b, m, n), n**-0.5)
        q = quantize3(w, gs, bits)
        check(x, q, True, gs, bits, compare_mlx=m == 67, what=f"B={b} M={m} N={n}")


@pytest.mark.parametrize("mode", list(FP_MODES))
def test_fp_qmv(mode):
    """MLX test_fp_qmv: mxfp4/mxfp8/nvfp4 qmv incl. output sizes 5, 7 (< 8, mlx#3762), batched weights."""
    gen = make_gen(2)
    for m, n, b in itertools.product([256, 67, 5, 7], [64, 256], [0, 1, 3]):
        x = normal(gen, (3, 1, n) if b == 0 else (b, 1, n), n**-0.5)
        w = normal(gen, (m, n) if b == 0 else (b, m, n), n**-0.5)
        q = quantize3(w, mode=mode)
        check(x, q, True, mode=mode, compare_mlx=True, what=f"B={b} M={m} N={n}")


@pytest.mark.parametrize("transpose", [True, False])
def test_fp_qmv_nvfp4_k48(transpose):
    """MLX test_fp_qmv tail: nvfp4 with a group axis of 48 (a multiple of 16 but not of 32)."""
    gen = make_gen(3)
    if transpose:  # reduction over 48
        x, w = normal(gen, (1, 48), 48**-0.5), normal(gen, (128, 48), 48**-0.5)
    else:  # 48 outputs, reduction over 128
        x, w = normal(gen, (3, 1, 128), 128**-0.5), normal(gen, (128, 48), 128**-0.5)
    q = quantize3(w, mode="nvfp4")
    check(x, q, transpose, mode="nvfp4", compare_mlx=True)


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 8])
@pytest.mark.parametrize("gs", AFFINE_GS)
def test_qvm(gs, bits):
    """MLX test_qvm: transpose=False, x (B,1,N) times w (B,N,M) grouped along M; N=67 is a ragged reduction."""
    gen = make_gen(4)
    for m, n, b in itertools.product([32, 128, 256], [128, 256, 67], [0, 1, 3]):
        if m < gs:
            continue
        x = normal(gen, (1, n) if b == 0 else (b, 1, n), n**-0.5)
        w = normal(gen, (n, m) if b == 0 else (b, n, m), n**-0.5)
        q = quantize3(w, gs, bits)
        check(x, q, False, gs, bits, compare_mlx=n == 67, what=f"B={b} M={m} N={n}")


@pytest.mark.parametrize("mode", list(FP_MODES))
def test_fp_qvm(mode):
    """MLX test_fp_qvm: transpose=False for the fp modes, plus the split-k shape (N=16384 reduction)."""
    gen = make_gen(5)
    cases = list(itertools.product([32, 128, 256], [128, 256, 67], [0, 1, 3])) + [(128, 16384, 0)]
    for m, n, b in cases:
        x = normal(gen, (1, n) if b == 0 else (b, 1, n), n**-0.5)
        w = normal(gen, (n, m) if b == 0 else (b, n, m), n**-0.5)
        q = quantize3(w, mode=mode)
        check(x, q, False, mode=mode, compare_mlx=n in (67, 16384), what=f"B={b} M={m} N={n}")


@pytest.mark.parametrize("mode,gs,bits", ALL_CONFIGS)
def test_qmv_wide(mode, gs, bits):
    """MLX test_qmv_wide: few rows (M 2..9), ragged N=67, batched weights, K 128/512, every format."""
    gen = make_gen(6)
    for m, n, b, k in itertools.product([2, 3, 7, 9], [256, 67], [1, 3], [128, 512]):
        x = normal(gen, (m, k) if b == 1 else (b, m, k), k**-0.5)
        w = normal(gen, (n, k) if b == 1 else (b, n, k), k**-0.5)
        q = quantize3(w, gs, bits, mode)
        check(x, q, True, gs, bits, mode, compare_mlx=(m == 7 and b == 3), what=f"M={m} N={n} B={b} K={k}")


TINY_SHAPES = [(2, 32, 10), (4, 32, 7), (3, 64, 5), (5, 64, 3), (1, 32, 3), (1, 32, 5)]
TINY_SETTINGS = [(4, 32, "affine"), (6, 32, "affine"), (4, 16, "nvfp4")]


@pytest.mark.parametrize("bits,gs,mode", TINY_SETTINGS)
@pytest.mark.parametrize("m,k,n", TINY_SHAPES)
def test_qmv_small_non_multiples(m, k, n, bits, gs, mode):
    """MLX test_qmv_wide tiny shapes / test_qmv_small_non_multiples: K of one or two groups, N < 8 and ragged."""
    gen = make_gen(7)
    x = normal(gen, (m, k), k**-0.5)
    q = quantize3(normal(gen, (n, k), k**-0.5), gs, bits, mode)
    check(x, q, True, gs, bits, mode, compare_mlx=True, what="2-D w")
    # batched variant: two distinct weights, x batch broadcast against them
    xb = normal(gen, (2, m, k), k**-0.5)
    qb = quantize3(normal(gen, (2, n, k), k**-0.5), gs, bits, mode)
    check(xb, qb, True, gs, bits, mode, compare_mlx=True, what="batched w")


@pytest.mark.parametrize("n", [33, 3, 99])
def test_non_multiples(n):
    """MLX test_non_multiples (mlx#665): w with 33, 3 (< 8) or 99 rows, all four kernels, and M=129 rows."""
    gen = make_gen(8)
    q = quantize3(normal(gen, (n, 256), 256**-0.5))  # defaults: gs 64, 4 bits
    for rows in (1, 10, 129):
        check(normal(gen, (rows, 256), 256**-0.5), q, True, compare_mlx=True, what=f"transpose, M={rows}")
        check(normal(gen, (rows, n), n**-0.5), q, False, compare_mlx=True, what=f"no transpose, M={rows}")


@pytest.mark.parametrize("w_shape", [(8, 256), (1, 8, 256), (3, 8, 256)])
def test_small_matrix(w_shape):
    """MLX test_small_matrix: 8-row weights (plain, batch of 1, batch of 3) against batched x, both layouts."""
    gen = make_gen(9)
    q = quantize3(normal(gen, w_shape, 256**-0.5))
    for x_shape in [(3, 1, 256), (3, 4, 256), (3, 10, 256)]:
        check(normal(gen, x_shape, 256**-0.5), q, True, compare_mlx=True, what=f"x {x_shape}")
    for x_shape in [(3, 1, 8), (3, 10, 8)]:
        check(normal(gen, x_shape, 8**-0.5), q, False, compare_mlx=True, what=f"x {x_shape} no transpose")


@pytest.mark.parametrize("x_shape", [(3, 256), (2, 1, 7, 256)])
@pytest.mark.parametrize("transpose", [True, False])
def test_qmm_shapes(transpose, x_shape):
    """MLX test_qmm_shapes: 2-D and 4-D x against a 2-D w; output shape x.shape[:-1] + (N,)."""
    gen = make_gen(10)
    w = normal(gen, (32, 256) if transpose else (256, 256), 256**-0.5)
    q = quantize3(w, 64, 4)
    out = check(normal(gen, x_shape, 256**-0.5), q, transpose, 64, 4, compare_mlx=True)
    assert out.shape == (*x_shape[:-1], 32 if transpose else 256)


@pytest.mark.parametrize("w_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("x_dtype", DTYPES)
@pytest.mark.parametrize("mode", list(FP_MODES))
def test_qmm_fp_type(mode, x_dtype, w_dtype):
    """MLX test_qmm_fp_type: fp-mode quantized_matmul and gather_qmm return x's dtype (and the right values)."""
    gen = make_gen(11)
    x = normal(gen, (32, 256), 256**-0.5, x_dtype)
    q = quantize3(normal(gen, (32, 256), 256**-0.5, w_dtype), mode=mode)
    out = check(x, q, True, mode=mode)
    assert out.dtype == x_dtype

    w3 = quantize3(normal(gen, (4, 32, 256), 256**-0.5, w_dtype), mode=mode)
    idx = torch.tensor([[2], [0], [1]])
    out = lowbit.gather_qmm(x, w3[0], w3[1], rhs_indices=idx, mode=mode)
    assert out.dtype == x_dtype
    assert out.shape == (3, 1, 32, 32)
    assert_matches(out, oracle(x, w3, mode=mode)[idx], tol_for(x_dtype))


@pytest.mark.parametrize("s_dtype", DTYPES)
@pytest.mark.parametrize("x_dtype", DTYPES)
def test_qmm_affine_out_dtype(x_dtype, s_dtype):
    """Affine output dtype is promote(x, scales, biases), for all 9 x/scales dtype pairs, both layouts.

    Values: 1e-3 when everything is float32, 1e-2 as soon as x or the weights are half precision (where the weight
    is rounded is pinned by test_qmm_affine_f32_x_half_weights_like_mlx).
    """
    gen = make_gen(12)
    out_dtype = torch.promote_types(x_dtype, s_dtype)
    rel = 1e-3 if x_dtype == s_dtype == torch.float32 else 1e-2
    for transpose in (True, False):
        x = normal(gen, (5, 128 if transpose else 64), 128**-0.5, x_dtype)
        q = quantize3(normal(gen, (64, 128), 128**-0.5, s_dtype), 32, 4)
        out = qmm(x, q, transpose, 32, 4)
        assert out.dtype == out_dtype
        assert_matches(out, oracle(x, q, transpose, 32, 4), rel, f"transpose={transpose}")
        if x_dtype == s_dtype == torch.float32:
            assert_matches_mlx(out, x, q, transpose, 32, 4)


@pytest.mark.parametrize(
    "x_dtype,s_dtype,b_dtype",
    [(torch.float16, torch.bfloat16, torch.float16), (torch.bfloat16, torch.bfloat16, torch.float16),
     (torch.float16, torch.float16, torch.float32), (torch.bfloat16, torch.float32, torch.bfloat16)],
)
def test_qmm_affine_out_dtype_three_way(x_dtype, s_dtype, b_dtype):
    """Affine promotion includes the biases' dtype (scales and biases of different dtypes)."""
    gen = make_gen(13)
    w_q, scales, biases = quantize3(normal(gen, (48, 128), 128**-0.5), 64, 4)
    q = (w_q, scales.to(s_dtype), biases.to(b_dtype))
    x = normal(gen, (4, 128), 128**-0.5, x_dtype)
    out = qmm(x, q, True, 64, 4)
    assert out.dtype == torch.promote_types(torch.promote_types(x_dtype, s_dtype), b_dtype)
    assert_matches(out, oracle(x, q, True, 64, 4), 1e-2)


@pytest.mark.parametrize("s_dtype,b_dtype", [(torch.bfloat16, torch.float32), (torch.bfloat16, torch.float16)])
def test_qmm_affine_mixed_scale_bias_dtypes(s_dtype, b_dtype):
    """Scales and biases of different dtypes: quantized_matmul == x @ lowbit.dequantize(w).T (which computes in
    promote(scales, biases) = float32 here), as lowbit documents and MLX does, to float32 accuracy (1e-4)."""
    gen = make_gen(26)
    w_q, scales, biases = quantize3(normal(gen, (48, 128), 128**-0.5), 64, 4)
    q = (w_q, scales.to(s_dtype), biases.to(b_dtype))
    x = normal(gen, (4, 128), 128**-0.5)
    out = qmm(x, q, True, 64, 4)
    assert out.dtype == torch.float32
    w_hat = lowbit.dequantize(*q, 64, 4)
    assert w_hat.dtype == torch.float32
    ref = x.double() @ w_hat.double().T
    assert_matches(mlx_qmm(x, q, True, 64, 4), ref, 1e-4, "MLX itself")  # guards the premise of this test
    assert_matches(out, ref, 1e-4, "lowbit")


@pytest.mark.parametrize("w_dtype", [torch.bfloat16, torch.float16])
def test_qmm_affine_f32_x_half_weights_like_mlx(w_dtype):
    """float32 x with bf16/f16 scales and biases: MLX casts scales and biases to float32 before dequantizing, so the
    result equals x @ w_hat with w_hat computed in float32 (1e-4 of the output max; MLX is within 1e-6)."""
    gen = make_gen(27)
    q = quantize3(normal(gen, (48, 128), 128**-0.5, w_dtype), 64, 4)
    x = normal(gen, (4, 128), 128**-0.5)
    out = qmm(x, q, True, 64, 4)
    assert out.dtype == torch.float32
    ref = oracle(x, (q[0], q[1].float(), q[2].float()), True, 64, 4)
    assert_matches(mlx_qmm(x, q, True, 64, 4), ref, 1e-4, "MLX itself")  # guards the premise of this test
    assert_matches(out, ref, 1e-4, "lowbit")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("transpose", [True, False])
def test_qmm_half_precision(transpose, dtype):
    """MLX's GPU flavour of test_qmm: f16/bf16 x and weights, output in that dtype, 1e-2 relative."""
    gen = make_gen(14)
    for gs, bits, m in [(64, 4, 33), (32, 8, 8), (128, 3, 17)]:
        x = normal(gen, (m, 256), 256**-0.5, dtype)
        w = normal(gen, (256, 256), 256**-0.5, dtype)
        out = check(x, quantize3(w, gs, bits), transpose, gs, bits, what=f"gs={gs} bits={bits}")
        assert out.dtype == dtype


@pytest.mark.parametrize("asymmetric", [False, True])
@pytest.mark.parametrize("gs", AFFINE_GS)
def test_qmm_1bit_binary_weights(gs, asymmetric):
    """MLX test_1bit_quantize_dequantize: two-valued weights round-trip, so qmm equals x @ w of the ORIGINAL w."""
    gen = make_gen(15)
    x = normal(gen, (4, 256))
    bits01 = (torch.rand((128, 256), generator=gen) > 0.5).float()
    w = bits01 * 0.7 + (1 - bits01) * 0.1 if asymmetric else bits01 * 0.6 - 0.3
    q = quantize3(w, gs, 1)
    out = qmm(x, q, True, gs, 1)
    expected = x.double() @ w.double().T  # independent of lowbit.dequantize
    assert out.shape == expected.shape
    assert (out.double() - expected).abs().max().item() < 2e-5
    assert_matches_mlx(out, x, q, True, gs, 1, atol=1e-5)


# ------------------------------------------------------------------------------------------ shapes and layouts


@pytest.mark.parametrize("mode,gs,bits", [("affine", 64, 4), ("affine", 32, 3), ("mxfp4", 32, 4), ("nvfp4", 16, 4)])
@pytest.mark.parametrize("transpose", [True, False])
def test_1d_x(transpose, mode, gs, bits):
    """A 1-D x (K,) gives a 1-D result (N,), like MLX."""
    gen = make_gen(16)
    x = normal(gen, (128,), 128**-0.5)
    q = quantize3(normal(gen, (192, 128) if transpose else (128, 192), 128**-0.5), gs, bits, mode)
    out = check(x, q, transpose, gs, bits, mode, compare_mlx=True)
    assert out.shape == (192,)


@pytest.mark.parametrize("transpose", [True, False])
def test_2d_x_batched_w_broadcasts(transpose):
    """lowbit extension: 2-D x with a batched w gives (B, M, N), out[b] = x @ w[b] (MLX would silently use w[0])."""
    gen = make_gen(17)
    k, n, m = 128, 64, 5
    for w_batch in [(3,), (2, 3)]:
        x = normal(gen, (m, k), k**-0.5)
        w = normal(gen, (*w_batch, n, k) if transpose else (*w_batch, k, n), k**-0.5)
        q = quantize3(w, 64, 4)
        out = check(x, q, transpose, 64, 4, what=f"w batch {w_batch}")
        assert out.shape == (*w_batch, m, n)
        flat = out.reshape(-1, m, n)
        q_flat = [t.reshape(-1, *t.shape[-2:]) for t in q]
        for i in range(flat.shape[0]):  # each slice matches MLX on the 2-D slice of w
            qi = tuple(t[i] for t in q_flat)
            assert_matches_mlx(flat[i], x, qi, transpose, 64, 4, what=f"slice {i}")
        assert not torch.equal(flat[0], flat[1])  # guards against "only w[0] is used"
    # 1-D x with a batched w: (B, N), torch.matmul's rule
    x1 = normal(gen, (k,), k**-0.5)
    q = quantize3(normal(gen, (3, n, k) if transpose else (3, k, n), k**-0.5), 64, 4)
    out = check(x1, q, transpose, 64, 4, what="1-D x")
    assert out.shape == (3, n)


@pytest.mark.parametrize("bits", [8, 4])
def test_expanded_batch_weights_gqa(bits):
    """Stride-0 expanded w/scales/biases (quantized KV cache under GQA, mlx#3480): every expanded slice is used."""
    gen = make_gen(18)
    bsz, hkv, n_rep, s, d = 2, 2, 3, 40, 64
    keys = normal(gen, (bsz, hkv, s, d), d**-0.5)
    values = normal(gen, (bsz, hkv, s, d), d**-0.5)
    kq, vq = quantize3(keys, 64, bits), quantize3(values, 64, bits)

    def expand(q):
        return tuple(t.unsqueeze(-3).expand(bsz, hkv, n_rep, *t.shape[-2:]) for t in q)

    k_exp, v_exp = expand(kq), expand(vq)
    assert all(t.stride(2) == 0 for t in k_exp + v_exp)
    for m in (1, 2, 3):
        queries = normal(gen, (bsz, hkv, n_rep, m, d), d**-0.5)
        scores = qmm(queries, k_exp, True, 64, bits)
        ref = queries.double() @ dequantize_f64(kq, 64, bits).unsqueeze(-3).transpose(-1, -2)
        assert_matches(scores, ref, 1e-3, f"scores M={m}")
        assert_matches_mlx(scores, queries, k_exp, True, 64, bits, what=f"scores M={m}")

        probs = torch.softmax(scores * 4.0, dim=-1)
        out = qmm(probs, v_exp, False, 64, bits)
        ref = probs.double() @ dequantize_f64(vq, 64, bits).unsqueeze(-3)
        assert_matches(out, ref, 1e-3, f"values M={m}")
        assert_matches_mlx(out, probs, v_exp, False, 64, bits, what=f"values M={m}")

    # a size-1 leading batch expanded against a batched x; only w expanded, scales/biases materialized
    q = quantize3(normal(gen, (1, 48, 128), 128**-0.5), 32, 4)
    x = normal(gen, (4, 2, 128), 128**-0.5)
    q_exp = (q[0].expand(4, -1, -1), q[1].expand(4, -1, -1).contiguous(), q[2].expand(4, -1, -1).contiguous())
    check(x, q_exp, True, 32, 4, compare_mlx=True, what="mixed expand")
    check(x, tuple(t.expand(4, -1, -1) for t in q), True, 32, 4, compare_mlx=True, what="all expanded")


@pytest.mark.parametrize("transpose", [True, False])
def test_noncontiguous_views(transpose):
    """Non-contiguous x (transposed / strided) and w, scales, biases (row and group-aligned column slices)."""
    gen = make_gen(19)
    gs, bits = 32, 4
    big = quantize3(normal(gen, (4, 96, 256), 256**-0.5), gs, bits)
    words, groups = 256 * bits // 32, 256 // gs
    views = {
        "rows ::2": tuple(t[:, ::2] for t in big),
        "row slice": tuple(t[:, 10:58] for t in big),
        "first half of K": tuple(t[..., : (words if t.dtype == torch.uint32 else groups) // 2] for t in big),
        "batch ::2": tuple(t[::2] for t in big),
    }
    for name, q in views.items():
        rows, cols = q[0].shape[-2], q[0].shape[-1] * 32 // bits
        k = cols if transpose else rows
        xt = normal(gen, (q[0].shape[0], k, 7), k**-0.5).transpose(-1, -2)  # (B, 7, K), non-contiguous
        xs = normal(gen, (q[0].shape[0], 7, 2 * k), k**-0.5)[..., ::2]  # strided last axis
        for x in (xt, xs):
            assert not x.is_contiguous()
            out = check(x, q, transpose, gs, bits, compare_mlx=True, what=name)
            contiguous = qmm(x.contiguous(), tuple(t.contiguous() for t in q), transpose, gs, bits)
            torch.testing.assert_close(out, contiguous, rtol=0, atol=1e-6)


ODD_GROUP_CASES = [
    ("affine", 32, 4, 544),  # 17 groups
    ("affine", 32, 3, 544),
    ("affine", 64, 6, 320),  # 5 groups
    ("affine", 64, 4, 576),  # 9 groups
    ("affine", 128, 8, 640),  # 5 groups
    ("affine", 128, 5, 384),  # 3 groups
    ("mxfp4", 32, 4, 544),
    ("mxfp8", 32, 8, 288),
    ("nvfp4", 16, 4, 528),  # 33 groups (K % 32 == 16)
    ("nvfp4", 16, 4, 1040),  # 65 groups
]


@pytest.mark.parametrize("transpose", [True, False])
@pytest.mark.parametrize("mode,gs,bits,length", ODD_GROUP_CASES)
def test_odd_group_multiples(mode, gs, bits, length, transpose):
    """Group axis an odd multiple of the group size (K/N tails, mlx#3444, #3887): reduction or output axis."""
    gen = make_gen(20)
    if transpose:  # the grouped axis is the reduction
        x, w = normal(gen, (5, length), length**-0.5), normal(gen, (48, length), length**-0.5)
    else:  # the grouped axis is the output; reduction over a ragged 67
        x, w = normal(gen, (5, 67), 67**-0.5), normal(gen, (67, length), 67**-0.5)
    check(x, quantize3(w, gs, bits, mode), transpose, gs, bits, mode, compare_mlx=True)


@pytest.mark.parametrize("transpose", [True, False])
def test_nvfp4_global_scale(transpose):
    """lowbit extension: quantized_matmul(global_scale=...) for nvfp4 applies the tensor scale (vs the oracle)."""
    gen = make_gen(21)
    w = normal(gen, (64, 128), 40.0)
    g = w.abs().max().reshape(())
    q = quantize3(w, mode="nvfp4", global_scale=g)
    x = normal(gen, (3, 128 if transpose else 64), 0.1)
    out = qmm(x, q, transpose, mode="nvfp4", global_scale=g)
    ref = oracle(x, q, transpose, mode="nvfp4", global_scale=g)
    assert_matches(out, ref, 1e-3)
    # and the oracle is close to the unquantized product: the scale is really applied
    exact = x.double() @ (w.double().T if transpose else w.double())
    assert_matches(out, exact, 0.2)
    wrong = oracle(x, q, transpose, mode="nvfp4")
    assert (wrong - ref).abs().max() > 0.5 * ref.abs().max()


# --------------------------------------------------------------------------------------------------- large dims


@pytest.fixture(scope="module")
def wide_weight():
    gen = make_gen(22)
    w = normal(gen, (32840, 128), 128**-0.5)
    return quantize3(w, 64, 4)


@pytest.mark.parametrize("m", [3, 33])
def test_qmm_large_dims(wide_weight, m):
    """MLX test_qmm_large_dims (mlx#3631): N = 32840 > 2**15 with partial row tiles."""
    gen = make_gen(23)
    x = normal(gen, (m, 128), 128**-0.5)
    out = check(x, wide_weight, True, 64, 4, compare_mlx=True)
    assert out.shape == (m, 32840)


@pytest.mark.slow
def test_qmm_large_m():
    """MLX test_qmm_large_dims / non_transposed: M = 33000 > 2**15 rows, both layouts."""
    gen = make_gen(24)
    x = normal(gen, (33000, 128), 128**-0.5)
    for transpose in (True, False):
        q = quantize3(normal(gen, (64, 128) if transpose else (128, 64), 128**-0.5), 64, 4)
        check(x, q, transpose, 64, 4, compare_mlx=True, what=f"transpose={transpose}")


@pytest.mark.slow
@pytest.mark.parametrize("mode,gs,bits", [("affine", 64, 4), ("affine", 32, 8), ("mxfp4", 32, 4), ("nvfp4", 16, 4)])
def test_qvm_splitk_large(mode, gs, bits):
    """MLX test_qvm_splitk / multi_row: long reductions (K 2048..16384) with transpose=False."""
    gen = make_gen(25)
    for m, k, n in [(1, 16384, 128), (3, 4096, 128), (2, 2048, 2048)]:
        x = normal(gen, (m, k), 0.1)
        q = quantize3(normal(gen, (k, n), 0.1), gs, bits, mode)
        check(x, q, False, gs, bits, mode, compare_mlx=True, what=f"M={m} K={k} N={n}")
