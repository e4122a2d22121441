"""gather_qmm (and quantized_matmul autograd): port of MLX's gather tests in python/tests/test_quantized.py.

Oracle: an explicit per-item loop, out[i] = x_flat[lhs[i]] @ dequantize(w_flat[rhs[i]])(.T) in float64, with
lowbit.dequantize (bit-exact with MLX, tested elsewhere) widened to float64. It shares no code with lowbit's gather
path (index defaults, broadcasting, flattening, stride-0 collapsing). A subset is also compared with `mx.gather_qmm`
on the same packed tensors.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from conftest import dequantize_f64, quantize3, to_mx, to_torch

import lowbit

mx = pytest.importorskip("mlx.core")


# ----------------------------------------------------------------------------------------------------------- helpers


def make_gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def normal(gen, shape, scale=1.0, dtype=torch.float32):
    return (torch.randn(shape, generator=gen) * scale).to(dtype)


def gqmm(x, q, lhs=None, rhs=None, transpose=True, gs=None, bits=None, mode="affine", **kw):
    return lowbit.gather_qmm(x, q[0], q[1], q[2], lhs, rhs, transpose, gs, bits, mode, **kw)


def as_index(idx):
    return None if idx is None else torch.as_tensor(idx, dtype=torch.int64)


def gather_oracle(x, w_hat, lhs=None, rhs=None, transpose=True):
    """float64 per-item loop over the broadcast index arrays; w_hat is the dequantized weight (..., R, C)."""
    x_flat = x.double().reshape(-1, *x.shape[-2:])
    w_flat = w_hat.double().reshape(-1, *w_hat.shape[-2:])
    lhs = torch.arange(x_flat.shape[0]).reshape(x.shape[:-2]) if lhs is None else lhs
    rhs = torch.arange(w_flat.shape[0]).reshape(w_hat.shape[:-2]) if rhs is None else rhs
    lhs, rhs = torch.broadcast_tensors(lhs, rhs)
    m, n = x.shape[-2], w_hat.shape[-2] if transpose else w_hat.shape[-1]
    out = torch.empty(*lhs.shape, m, n, dtype=torch.float64)
    for pos in itertools.product(*(range(s) for s in lhs.shape)):
        w = w_flat[int(rhs[pos])]
        out[pos] = x_flat[int(lhs[pos])] @ (w.T if transpose else w)
    return out


def mlx_gqmm(x, q, lhs=None, rhs=None, transpose=True, gs=None, bits=None, mode="affine", sorted_indices=False):
    idx = [None if i is None else mx.array(i.to(torch.int64).numpy()).astype(mx.uint32) for i in (lhs, rhs)]
    out = mx.gather_qmm(
        to_mx(x), to_mx(q[0]), to_mx(q[1]), to_mx(q[2]), idx[0], idx[1], transpose, gs, bits, mode,
        sorted_indices=sorted_indices,
    )
    return to_torch(out)


def assert_allclose(out, ref, atol, rtol=0.0, what=""):
    assert tuple(out.shape) == tuple(ref.shape), f"{what}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    assert torch.isfinite(out).all(), f"{what}: non-finite output"
    err = (out.double() - ref.double()).abs()
    bound = atol + rtol * ref.double().abs()
    assert (err <= bound).all(), f"{what}: max error {err.max().item():.3g} (atol {atol}, rtol {rtol})"


# -------------------------------------------------------------------------------------------- MLX test_gather_qmm

INDEX_CONFIGS = [
    dict(batch_a=(1,), lhs=(0,), batch_b=(3,), rhs=(2, 1)),
    dict(batch_a=(1,), lhs=None, batch_b=(3,), rhs=(2, 1)),
    dict(batch_a=(2,), lhs=None, batch_b=(3,), rhs=(2, 1)),
    dict(batch_a=(3,), lhs=(0, 2), batch_b=(1,), rhs=(0,)),
    dict(batch_a=(5,), lhs=(0, 2), batch_b=(3,), rhs=(2, 1)),
    dict(batch_a=(4, 2), lhs=((7, 6), (5, 4), (1, 2)), batch_b=(4, 1), rhs=((2,), (0,), (1,))),
    dict(batch_a=(1,), lhs=(0,), batch_b=(3,), rhs=(2, 1), mode="nvfp4"),
    dict(batch_a=(1,), lhs=(0,), batch_b=(3,), rhs=(2, 1), mode="mxfp4"),
    dict(batch_a=(1,), lhs=(0,), batch_b=(3,), rhs=(2, 1), mode="mxfp8"),
]
GATHER_SHAPES = [  # (M, N, K, transpose)
    (1, 32, 128, True), (32, 32, 256, True), (1, 32, 256, True), (32, 256, 32, False), (1, 256, 32, False),
    (32, 32, 512, True), (1, 32, 512, True), (32, 512, 32, False), (1, 512, 32, False),
]


@pytest.mark.parametrize("cfg", INDEX_CONFIGS, ids=[f"cfg{i}" for i in range(len(INDEX_CONFIGS))])
def test_gather_qmm(cfg):
    """MLX test_gather_qmm: 9 index configs (None / 1-D / 2-D indices, broadcasting) x 9 shapes, vs the oracle."""
    gen = make_gen(100)
    mode = cfg.get("mode", "affine")
    lhs, rhs = as_index(cfg["lhs"]), as_index(cfg["rhs"])
    for m, n, k, transpose in GATHER_SHAPES:
        what = f"M={m} N={n} K={k} transpose={transpose}"
        x = normal(gen, (*cfg["batch_a"], m, k))
        w = normal(gen, (*cfg["batch_b"], *((n, k) if transpose else (k, n))))
        q = quantize3(w, mode=mode)
        out = gqmm(x, q, lhs, rhs, transpose, mode=mode)
        ref = gather_oracle(x, dequantize_f64(q, mode=mode), lhs, rhs, transpose)
        assert out.dtype == torch.float32
        assert_allclose(out, ref, atol=1e-4, rtol=1e-5, what=what)
        if (m, n, k, transpose) in [(32, 32, 256, True), (1, 256, 32, False)]:
            assert_allclose(out, mlx_gqmm(x, q, lhs, rhs, transpose, mode=mode), atol=1e-4, rtol=1e-5, what="MLX")


LONG_K_CASES = [  # MLX's long-K gather tail: (M, N, K, batch_a, batch_b, lhs, rhs, mode, noncontiguous_x)
    (1, 32, 1024, (1,), (3,), (0,), (2, 1, 0, 2, 1, 0, 2, 1, 0), "nvfp4", False),
    (1, 33, 1024, (2, 2), (2,), ((0,), (3,)), ((1, 0, 1),), "nvfp4", True),
    (1, 32, 1056, (1,), (3,), (0,), (2, 1, 0, 2, 1, 0, 2, 1, 0), "nvfp4", False),
    (1, 33, 1024, (1,), (3,), (0,), (2, 1, 0, 2, 1, 0, 2, 1, 0), "mxfp4", False),
    (1, 33, 448, (1,), (3,), (0,), (2, 1, 0, 2, 1, 0, 2, 1, 0), "mxfp8", False),
    (1, 33, 704, (2,), (3,), (1,), (2, 1, 0, 2, 1, 0, 2, 1, 0), "nvfp4", True),
]


@pytest.mark.parametrize("case", LONG_K_CASES, ids=[f"case{i}" for i in range(len(LONG_K_CASES))])
def test_gather_qmm_long_k(case):
    """MLX test_gather_qmm tail: long K, repeated experts, (2,2)x(2,) broadcast indices, non-contiguous x."""
    m, n, k, batch_a, batch_b, lhs, rhs, mode, noncontiguous = case
    gen = make_gen(101)
    x = normal(gen, (*batch_a, m, 2 * k if noncontiguous else k), k**-0.5)
    if noncontiguous:
        x = x[..., :k]
        assert not x.is_contiguous()
    q = quantize3(normal(gen, (*batch_b, n, k), k**-0.5), mode=mode)
    lhs, rhs = as_index(lhs), as_index(rhs)
    out = gqmm(x, q, lhs, rhs, mode=mode)
    ref = gather_oracle(x, dequantize_f64(q, mode=mode), lhs, rhs)
    assert_allclose(out, ref, atol=1e-5, rtol=1e-5)
    assert_allclose(out, mlx_gqmm(x, q, lhs, rhs, mode=mode), atol=1e-4, rtol=1e-5, what="MLX")


def test_gather_qmm_int32_indices_and_broadcast():
    """Index arrays of other integer dtypes, 0-d indices and (3,1) x (1,2) broadcasting give MLX's shapes/values."""
    gen = make_gen(102)
    x = normal(gen, (3, 2, 64), 0.125)
    q = quantize3(normal(gen, (4, 32, 64), 0.125), 32, 4)
    w_hat = dequantize_f64(q, 32, 4)
    cases = [
        (torch.tensor([0, 2], dtype=torch.int32), torch.tensor([3, 1], dtype=torch.int32)),
        (torch.tensor([[0], [1], [2]]), torch.tensor([[3, 1]])),
        (None, torch.tensor(2)),
        (torch.tensor(1), None),
    ]
    for lhs, rhs in cases:
        if lhs is not None and rhs is None:
            qq, wh = tuple(t[:1] for t in q), w_hat[:1]  # one expert so that lhs 0-d against rhs (1,) works
        else:
            qq, wh = q, w_hat
        out = gqmm(x, qq, lhs, rhs, True, 32, 4)
        ref = gather_oracle(x, wh, None if lhs is None else lhs.long(), None if rhs is None else rhs.long())
        assert_allclose(out, ref, atol=1e-5, what=f"lhs={lhs} rhs={rhs}")
        assert_allclose(out, mlx_gqmm(x, qq, lhs, rhs, True, 32, 4), atol=1e-5, what="MLX")


def test_gather_qmm_uint32_indices():
    """uint32 index tensors (MLX casts indices to uint32; ported code passes them) work like int64 ones."""
    gen = make_gen(103)
    x = normal(gen, (3, 2, 64))
    q = quantize3(normal(gen, (4, 32, 64)), 32, 4)
    lhs, rhs = torch.tensor([0, 2, 1]), torch.tensor([3, 1, 3])
    expected = gqmm(x, q, lhs, rhs, True, 32, 4)
    out = gqmm(x, q, lhs.to(torch.uint32), rhs.to(torch.uint32), True, 32, 4)
    assert torch.equal(out, expected)


# --------------------------------------------------------------------------------------------- sorted gathers

SORTED_PARAMS = [  # MLX test_gather_qmm_sorted: (L, K, D, E, I, transpose, mode)
    (32, 512, 512, 4, 2, True, "affine"),
    (32, 512, 544, 4, 2, True, "mxfp4"),
    (32, 512, 544, 4, 2, True, "nvfp4"),
    (32, 512, 544, 4, 2, True, "mxfp8"),
    (39, 512, 512, 4, 2, True, "affine"),
    (128, 512, 512, 4, 2, True, "affine"),
    (133, 512, 512, 4, 2, True, "affine"),
    (133, 512, 555, 4, 2, True, "affine"),
    (64, 512, 512, 4, 2, False, "affine"),
    (64, 512, 544, 4, 2, False, "mxfp4"),
    (64, 512, 544, 4, 2, False, "nvfp4"),
    (64, 512, 544, 4, 2, False, "mxfp8"),
    (133, 512, 512, 4, 2, False, "affine"),
    (133, 512, 544, 4, 2, False, "affine"),
    (133, 512, 555, 4, 2, False, "affine"),
]


@pytest.mark.parametrize("L,K,D,E,I,transpose,mode", SORTED_PARAMS)
def test_gather_qmm_sorted(L, K, D, E, I, transpose, mode):  # noqa: E741
    """MLX test_gather_qmm_sorted: the SwitchGLU sort (x (L,1,1,K), argsort of the routing) with
    sorted_indices=True is bit-identical to sorted_indices=False and, unsorted, to the direct gather; all match the
    oracle (1.5e-5)."""
    gen = make_gen(104)
    gs = 64 if mode == "affine" else None
    K, D = (K, D) if transpose else (D, K)  # as MLX: transpose=False swaps the roles (N = 512, K = D)
    x = normal(gen, (L, 1, 1, K), K**-0.5)
    q = quantize3(normal(gen, (E, D, K) if transpose else (E, K, D), K**-0.5), gs, None, mode)
    indices = torch.randint(0, E, (L, I), generator=gen)
    kw = dict(transpose=transpose, gs=gs, mode=mode)

    direct = gqmm(x, q, rhs=indices, **kw)
    assert direct.shape == (L, I, 1, D)

    flat = indices.flatten()
    order = torch.argsort(flat, stable=True)
    inv_order = torch.argsort(order)
    xs, idx = x.flatten(0, -3)[order // I], flat[order]
    y_sorted = gqmm(xs, q, rhs=idx, sorted_indices=True, **kw)
    y_hint_off = gqmm(xs, q, rhs=idx, sorted_indices=False, **kw)
    assert torch.equal(y_sorted, y_hint_off), "sorted_indices must only be a hint"
    unsorted = y_sorted[inv_order].unflatten(0, (L, I))
    assert torch.equal(unsorted, direct), "sorting the routing changed a token's result"

    ref = gather_oracle(x, dequantize_f64(q, gs, None, mode), None, indices, transpose)
    assert_allclose(direct, ref, atol=1.5e-5)
    if L == 133 or mode != "affine":
        mlx_sorted = mlx_gqmm(xs, q, None, idx, transpose, gs, None, mode, sorted_indices=True)
        assert_allclose(y_sorted, mlx_sorted, atol=2e-5, what="MLX")


@pytest.mark.parametrize("mode,gs", [("affine", 32), ("mxfp4", None), ("nvfp4", None)])
def test_gather_qmm_sorted_unaligned_k(mode, gs):
    """MLX test_gather_qmm_sorted_unaligned_k (mlx#3887): K % 64 != 0 with sorted experts."""
    gen = make_gen(105)
    L, D, E = 128, 256, 4
    for K in (160, 288, 544):
        indices = torch.sort(torch.randint(0, E, (L,), generator=gen)).values
        x = normal(gen, (L, 1, K), K**-0.5)
        q = quantize3(normal(gen, (E, D, K), K**-0.5), gs, None, mode)
        y_sorted = gqmm(x, q, rhs=indices, gs=gs, mode=mode, sorted_indices=True)
        y_unsorted = gqmm(x, q, rhs=indices, gs=gs, mode=mode, sorted_indices=False)
        assert torch.equal(y_sorted, y_unsorted)
        assert_allclose(y_sorted, gather_oracle(x, dequantize_f64(q, gs, None, mode), None, indices), atol=1.5e-5,
                        what=f"K={K}")


def test_gather_qmm_sorted_lhs():
    """sorted_indices with only lhs given (left-sorted path): same bits as unsorted, matches the oracle."""
    gen = make_gen(106)
    x = normal(gen, (6, 3, 128), 128**-0.5)
    q = quantize3(normal(gen, (96, 128), 128**-0.5), 64, 4)
    lhs = torch.tensor([0, 0, 1, 3, 3, 3, 5])
    a = gqmm(x, q, lhs=lhs, gs=64, bits=4, sorted_indices=True)
    b = gqmm(x, q, lhs=lhs, gs=64, bits=4, sorted_indices=False)
    assert torch.equal(a, b)
    assert_allclose(a, gather_oracle(x, dequantize_f64(q, 64, 4), lhs, None), atol=1e-5)
    assert_allclose(a, mlx_gqmm(x, q, lhs, None, True, 64, 4, sorted_indices=True), atol=1e-5, what="MLX")


def test_gather_qmm_sorted_sliced_weight():
    """MLX test_gather_qmm_sorted_sliced_weight (mlx#4055): a non-contiguous row slice of an (8,128,256) 4-bit
    weight gives exactly the result of its contiguous copy (and the oracle's)."""
    gen = make_gen(107)
    E, R, D, N = 8, 64, 256, 64
    q = quantize3(normal(gen, (E, 2 * R, D), 0.05), 64, 4)
    x = normal(gen, (N, 1, D), 0.5)
    indices = torch.sort(torch.randint(0, E, (N,), generator=gen)).values
    for sl in (slice(0, R), slice(R, 2 * R)):
        view = tuple(t[:, sl] for t in q)
        assert not any(t.is_contiguous() for t in view)
        copy = tuple(t.contiguous() for t in view)
        out_view = gqmm(x, view, rhs=indices, gs=64, bits=4, sorted_indices=True)
        out_copy = gqmm(x, copy, rhs=indices, gs=64, bits=4, sorted_indices=True)
        assert torch.equal(out_view, out_copy)
        assert_allclose(out_view, gather_oracle(x, dequantize_f64(copy, 64, 4), None, indices), atol=1e-4)
        mlx_out = mlx_gqmm(x, copy, None, indices, True, 64, 4, sorted_indices=True)
        assert_allclose(out_view, mlx_out, atol=1e-4, what="MLX")


# ------------------------------------------------------------------------------------------------- invariance


@pytest.mark.parametrize("mode,gs,bits", [("affine", 64, 4), ("affine", 32, 3), ("nvfp4", 16, 4), ("mxfp8", 32, 8)])
@pytest.mark.parametrize("transpose", [True, False])
def test_gather_rows_independent_of_routing(mode, gs, bits, transpose):
    """A token's gather_qmm rows are bit-identical whichever other tokens are routed with it (decode vs prefill,
    subsets via x slicing or via lhs_indices, sorted or not), and quantized_matmul rows likewise."""
    gen = make_gen(108)
    E, T, K, N = 4, 40, 128, 128
    for m in (1, 3):
        x = normal(gen, (T, m, K), K**-0.5)
        q = quantize3(normal(gen, (E, N, K) if transpose else (E, K, N), K**-0.5), gs, bits, mode)
        idx = torch.randint(0, E, (T,), generator=gen)
        kw = dict(transpose=transpose, gs=gs, bits=bits, mode=mode)
        full = gqmm(x, q, rhs=idx, **kw)
        subsets = [torch.tensor([5]), torch.tensor([0, 7, 19]), torch.arange(0, T, 3), torch.arange(T - 1, -1, -2),
                   (idx == idx[0]).nonzero().squeeze(1)]
        for s in subsets:
            assert torch.equal(gqmm(x[s], q, rhs=idx[s], **kw), full[s]), f"x[subset] {s.tolist()}"
            assert torch.equal(gqmm(x, q, lhs=s, rhs=idx[s], **kw), full[s]), f"lhs subset {s.tolist()}"
        order = torch.argsort(idx, stable=True)
        sorted_out = gqmm(x[order], q, rhs=idx[order], sorted_indices=True, **kw)
        assert torch.equal(sorted_out, full[order])

        # quantized_matmul on one expert: one row alone == the same row inside a 40-row batch
        w0 = tuple(None if t is None else t[0] for t in q)
        rows = x.reshape(-1, K)
        batch = lowbit.quantized_matmul(rows, *w0, transpose, gs, bits, mode)
        for i in (0, 17, rows.shape[0] - 1):
            alone = lowbit.quantized_matmul(rows[i : i + 1], *w0, transpose, gs, bits, mode)
            assert torch.equal(alone, batch[i : i + 1]), f"row {i}"


# ---------------------------------------------------------------------------------------------- global scales


@pytest.mark.parametrize("transpose", [True, False])
@pytest.mark.parametrize("E", [4, 7])
def test_gather_qmm_global_scale_per_expert(E, transpose):
    """MLX test_gather_qmm_global_scale (GPU-only in MLX): nvfp4 with one float32 global scale per expert, shape
    (E,); each expert uses its own scale (a rotated scale vector is far off)."""
    gen = make_gen(109)
    N, K = 64, 128
    factors = torch.tensor([[1.0, 2.0, 4.0, 8.0][e % 4] for e in range(E)]).reshape(E, 1, 1)
    w = normal(gen, (E, N, K) if transpose else (E, K, N)) * factors
    g = w.abs().amax(dim=(1, 2))
    assert g.shape == (E,) and g.dtype == torch.float32
    parts = [lowbit.quantize(w[e], mode="nvfp4", global_scale=g[e]) for e in range(E)]
    w_q, scales = torch.stack([p[0] for p in parts]), torch.stack([p[1] for p in parts])
    w_hat = torch.stack([dequantize_f64((w_q[e], scales[e], None), mode="nvfp4", global_scale=g[e]) for e in range(E)])

    def run(x, lhs, rhs, gscale, **kw):
        return lowbit.gather_qmm(x, w_q, scales, None, lhs, rhs, transpose, mode="nvfp4", global_scale=gscale, **kw)

    x = normal(gen, (5, 3, K), K**-0.5)
    rhs = torch.randint(0, E, (5,), generator=gen)
    rhs[:2] = torch.tensor([E - 1, 0])
    ref = gather_oracle(x, w_hat, None, rhs, transpose)
    out = run(x, None, rhs, g)
    assert_allclose(out, ref, atol=1e-4 * ref.abs().max().item())
    rotated = torch.cat([g[1:], g[:1]])
    wrong = run(x, None, rhs, rotated)
    assert (wrong.double() - ref).abs().max() > 0.5 * ref.abs().max()

    # repeated, out-of-order experts with explicit lhs on the M=1 path, sorted and unsorted
    x1 = normal(gen, (2, 1, K), K**-0.5)
    lhs = torch.tensor([0, 1, 0, 1, 0, 1])
    rhs = torch.tensor([3, 0, E - 1, 3, 1, 0])
    ref = gather_oracle(x1, w_hat, lhs, rhs, transpose)
    assert_allclose(run(x1, lhs, rhs, g), ref, atol=1e-4 * ref.abs().max().item())
    srt = torch.sort(rhs).values
    a = run(x1[:1].expand(6, 1, K), None, srt, g, sorted_indices=True)
    b = run(x1[:1].expand(6, 1, K), None, srt, g, sorted_indices=False)
    assert torch.equal(a, b)
    ref = gather_oracle(x1[:1].expand(6, 1, K), w_hat, None, srt, transpose)
    assert_allclose(a, ref, atol=1e-4 * ref.abs().max().item())


def test_gather_qmm_scalar_global_scale():
    """A single float32 global scale shared by all experts (numel 1) is applied to every expert."""
    gen = make_gen(110)
    w = normal(gen, (3, 32, 64), 30.0)
    g = w.abs().max().reshape(())
    w_q, scales = lowbit.quantize(w, mode="nvfp4", global_scale=g)
    x = normal(gen, (4, 2, 64), 0.1)
    rhs = torch.tensor([2, 0, 1, 2])
    out = lowbit.gather_qmm(x, w_q, scales, rhs_indices=rhs, mode="nvfp4", global_scale=g)
    ref = gather_oracle(x, dequantize_f64((w_q, scales, None), mode="nvfp4", global_scale=g), None, rhs)
    assert_allclose(out, ref, atol=1e-4 * ref.abs().max().item())


# ------------------------------------------------------------------------------------------------------ autograd


def test_gather_matmul_grad():
    """MLX test_gather_matmul_grad: value and d/dx of gather_qmm(...).sum() with 2-D lhs/rhs over (4,2) and (4,1)
    batches, vs torch autograd through the dequantized weight (float64 and float32); unused x rows get 0."""
    gen = make_gen(111)
    lhs = torch.tensor([[7, 6], [4, 1], [0, 2]])
    rhs = torch.tensor([[2], [0], [1]])
    x = normal(gen, (4, 2, 32, 256)).requires_grad_(True)
    q = quantize3(normal(gen, (4, 1, 32, 256)), 64, 4)
    w_hat = dequantize_f64(q, 64, 4)

    def reference(xr, wr):
        xf, wf = xr.reshape(8, 32, 256), wr.reshape(4, 32, 256)
        lb, rb = torch.broadcast_tensors(lhs, rhs)
        return (xf[lb] @ wf[rb].transpose(-1, -2)).sum()

    value = gqmm(x, q, lhs, rhs, True, 64, 4).sum()
    value.backward()
    for dtype in (torch.float64, torch.float32):
        xr = x.detach().to(dtype).requires_grad_(True)
        ref_value = reference(xr, w_hat.to(dtype))
        ref_value.backward()
        assert torch.allclose(value.double(), ref_value.double(), atol=1e-4, rtol=1e-5), dtype
        assert torch.allclose(x.grad.double(), xr.grad.double(), atol=1e-4, rtol=1e-5), dtype
    assert x.grad.dtype == torch.float32
    unused = x.grad.reshape(8, 32, 256)[[3, 5]]
    assert torch.equal(unused, torch.zeros_like(unused))


@pytest.mark.parametrize("transpose", [True, False])
def test_qmm_vjp(transpose):
    """MLX test_qmm_vjp: d/dx quantized_matmul = quantized_matmul(cotangent, w, transpose=not transpose); also vs
    the float64 oracle and MLX's vjp."""
    gen = make_gen(112)
    M, N, K = 64, 256, 512
    x = normal(gen, (2, M, K)).requires_grad_(True)
    q = quantize3(normal(gen, (N, K) if transpose else (K, N)), 64, 8)
    cot = normal(gen, (2, M, N))
    out = lowbit.quantized_matmul(x, *q, transpose, 64, 8)
    out.backward(cot)
    expected = lowbit.quantized_matmul(cot, *q, not transpose, 64, 8)
    torch.testing.assert_close(x.grad, expected)
    w_hat = dequantize_f64(q, 64, 8)
    ref = cot.double() @ (w_hat if transpose else w_hat.T)
    assert_allclose(x.grad, ref, atol=1e-3 * ref.abs().max().item())

    def f(xm):
        return mx.quantized_matmul(xm, to_mx(q[0]), to_mx(q[1]), to_mx(q[2]), transpose, 64, 8)

    _, (mlx_grad,) = mx.vjp(f, [to_mx(x.detach())], [to_mx(cot)])
    assert_allclose(x.grad, to_torch(mlx_grad), atol=1e-3, what="MLX vjp")


@pytest.mark.parametrize("transpose", [True, False])
def test_qmm_vjp_broadcast_batch(transpose):
    """d/dx sums over the batches x was broadcast against: x (1,M,K) or 2-D x against w (3,...), and a stride-0
    expanded w (GQA) against x (2,3,M,K)."""
    gen = make_gen(113)
    M, N, K = 5, 64, 128
    q = quantize3(normal(gen, (3, N, K) if transpose else (3, K, N), K**-0.5), 32, 4)
    for x_shape in [(1, M, K), (M, K)]:
        x = normal(gen, x_shape, K**-0.5).requires_grad_(True)
        out = lowbit.quantized_matmul(x, *q, transpose, 32, 4)
        assert out.shape == (3, M, N)
        cot = normal(gen, out.shape)
        out.backward(cot)
        expected = lowbit.quantized_matmul(cot, *q, not transpose, 32, 4).sum(0).reshape(x_shape)
        torch.testing.assert_close(x.grad, expected, rtol=1e-5, atol=1e-6)
        w_hat = dequantize_f64(q, 32, 4)
        ref = (cot.double() @ (w_hat if transpose else w_hat.transpose(-1, -2))).sum(0).reshape(x_shape)
        assert_allclose(x.grad, ref, atol=1e-5, what=f"x {x_shape}")

    kv = quantize3(normal(gen, (2, 1, N, K) if transpose else (2, 1, K, N), K**-0.5), 64, 8)
    kv_exp = tuple(t.expand(2, 3, *t.shape[-2:]) for t in kv)
    x = normal(gen, (2, 3, M, K), K**-0.5).requires_grad_(True)
    out = lowbit.quantized_matmul(x, *kv_exp, transpose, 64, 8)
    cot = normal(gen, out.shape)
    out.backward(cot)
    torch.testing.assert_close(x.grad, lowbit.quantized_matmul(cot, *kv, not transpose, 64, 8))
    w_hat = dequantize_f64(kv, 64, 8)
    ref = cot.double() @ (w_hat if transpose else w_hat.transpose(-1, -2))
    assert_allclose(x.grad, ref, atol=1e-5, what="expanded w")


def test_gather_qmm_vjp_sorted():
    """MLX test_gather_qmm_grad (x part): d/dx of sorted gather_qmm equals that of quantized_matmul on the gathered
    weights."""
    gen = make_gen(114)
    x = normal(gen, (16, 1, 256)).requires_grad_(True)
    q = quantize3(normal(gen, (4, 256, 256)))
    indices = torch.sort(torch.randint(0, 4, (16,), generator=gen)).values
    cot = normal(gen, (16, 1, 256))
    out = gqmm(x, q, rhs=indices, sorted_indices=True)
    out.backward(cot)
    x2 = x.detach().clone().requires_grad_(True)
    out2 = lowbit.quantized_matmul(x2, *(t[indices] for t in q))
    out2.backward(cot)
    torch.testing.assert_close(out, out2, rtol=0, atol=1e-4)
    torch.testing.assert_close(x.grad, x2.grad, rtol=0, atol=1e-4)
