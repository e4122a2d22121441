"""Bound products (ops.matmul's memo of prepared plain products, qmm.BoundProduct, launch.BoundLaunch): a repeated
quantized_matmul call must give what the general path gives, bit for bit, whatever changed between the calls that
the memo's key does not see, and every bad call must still get the general path's ValueError. On the GPU when there
is one, else interpreted on CPU tensors (TRITON_INTERPRET=1); the GPU launch path (addresses as integers, binaries
looked up by alignment) is also checked on CPU against fake compiled launchers."""

import gc
import os
import threading
import weakref

import pytest
import torch
from conftest import dequantize_f64, same_bits
from conftest import quantize3 as quantize3_by_backend

import lowbit

triton = pytest.importorskip("triton")
from lowbit.backends import BOUND_PRODUCTS  # noqa: E402
from lowbit.backends.triton import launch as launch_module  # noqa: E402
from lowbit.backends.triton import qmm  # noqa: E402
from lowbit.backends.triton.qmm import forget_plans, tuned  # noqa: E402
from lowbit.backends.triton.reduction import block_k  # noqa: E402
from lowbit.ops import matmul as matmul_module  # noqa: E402

GPU = torch.cuda.is_available()
DEVICE = "cuda" if GPU else "cpu"
if not GPU and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("no GPU and TRITON_INTERPRET is not set", allow_module_level=True)


@pytest.fixture(autouse=True)
def triton_backend(monkeypatch):
    monkeypatch.setenv("LOWBIT_BACKEND", "triton")
    forget_plans()
    yield
    forget_plans()  # (a test's tuning knobs and bound products must not outlive it)


def quantize3(*args, **kwargs):
    """Weights quantized by the torch reference under the interpreter (see test_triton.reference_quantize)."""
    if GPU:
        return quantize3_by_backend(*args, **kwargs)
    with tuned(LOWBIT_BACKEND="cpu"):
        return quantize3_by_backend(*args, **kwargs)


def randn(*shape, gen, dtype=torch.bfloat16, scale=1.0):
    return (torch.randn(*shape, generator=gen) * scale).to(device=DEVICE, dtype=dtype)


def rel_err(got, ref):
    return ((got.double() - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()


@pytest.fixture
def bound_calls(monkeypatch):
    """Outcomes of BoundProduct calls: True where the bound product launched, False where it left the call to the
    general path."""
    calls = []
    original = qmm.BoundProduct.__call__

    def counted(self, *args):
        out = original(self, *args)
        calls.append(out is not None)
        return out

    monkeypatch.setattr(qmm.BoundProduct, "__call__", counted)
    return calls


def general(*args, **kwargs):
    """quantized_matmul through the general path (no bound product exists for the call, none is kept after)."""
    BOUND_PRODUCTS.clear()
    try:
        return lowbit.quantized_matmul(*args, **kwargs)
    finally:
        BOUND_PRODUCTS.clear()


def bound(calls, *args, **kwargs):
    """quantized_matmul called until a bound product serves it (a GPU's first call of a new alignment may take the
    general path, which compiles); asserts that one did."""
    for _ in range(3):
        del calls[:]
        out = lowbit.quantized_matmul(*args, **kwargs)
        if calls and calls[-1]:
            return out
    raise AssertionError("no bound product served the call")


PRODUCTS = [("affine", 64, 4, None), ("mxfp4", 32, 4, None), ("nvfp4", 16, 4, "0-d"), ("nvfp4", 16, 4, "1-element"),
            ("affine", 32, 3, None)]


def _product(mode, gs, bits, scale, gen, k=256, n=96, transpose=True):
    g = None if scale is None else torch.tensor(3.5 if scale == "0-d" else [3.5], device=DEVICE)
    shape = (n, k) if transpose else (k, n)
    q = quantize3(randn(*shape, gen=gen, scale=k**-0.5), gs, bits, mode,
                  global_scale=None if g is None else g.reshape(()))
    return q, g


# -- every layout of x, and graph capture ------------------------------------------------------------------------------


def _x_layouts(k: int, gen, dtype=torch.bfloat16) -> dict:
    """Activations of one product in every layout a caller may pass: 1-D, 2-D, 3-D, rows with a stride, and rows that
    start off a 16-byte boundary (one element in)."""
    buffer = randn(4 * 2 * k + 1, gen=gen, dtype=dtype)
    return {
        "vector": randn(k, gen=gen, dtype=dtype),
        "rows": randn(3, k, gen=gen, dtype=dtype),
        "batched": randn(2, 3, k, gen=gen, dtype=dtype),
        "strided rows": buffer[: 4 * 2 * k].view(4, 2 * k)[:, :k],
        "unaligned": buffer[1: 1 + 2 * k].view(2, k),
    }


@pytest.mark.parametrize("mode, gs, bits, with_scale", [("affine", 64, 4, False), ("mxfp4", 32, 4, False),
                                                        ("nvfp4", 16, 4, True), ("affine", 32, 3, False)])
def test_repeated_calls_run_the_bound_product_with_the_same_bits(monkeypatch, mode, gs, bits, with_scale, gen,
                                                                 bound_calls):
    """A quantized_matmul call that repeats an earlier call's static facts (shapes, strides, dtypes, devices) runs
    the product bound to them (BoundProduct: plan, integer arguments and binaries fixed). Its bits equal the general
    path's for every layout of x, and a new layout or a changed selection takes the general path again."""
    k, n = 256, 96
    g = torch.tensor(3.5, device=DEVICE) if with_scale else None
    q = quantize3(randn(n, k, gen=gen, dtype=torch.bfloat16), gs, bits, mode, global_scale=g)
    w_ref = dequantize_f64(q, gs, bits, mode, g).to(DEVICE)
    for name, x in _x_layouts(k, gen).items():
        forget_plans()
        by_general_path = lowbit.quantized_matmul(x, *q, True, gs, bits, mode, global_scale=g)
        assert not bound_calls, name
        assert any(isinstance(b, qmm.BoundProduct) for b in BOUND_PRODUCTS.values()), name
        for _ in range(2):  # (on the GPU the first call of a new alignment may take the general path; then bound)
            again = lowbit.quantized_matmul(x.clone() if name in ("vector", "rows", "batched") else x, *q, True, gs,
                                            bits, mode, global_scale=g)
            assert same_bits(again, by_general_path), name
        assert bound_calls and bound_calls[-1], name
        assert again.shape == (*x.shape[:-1], n) and again.dtype == torch.bfloat16
        assert rel_err(again, x.double() @ w_ref.T) < 1e-2, name
        bound_calls.clear()
    with pytest.raises(ValueError, match=r"\[quantized_matmul\] Last dimension of x"):  # a new fact: checked again
        lowbit.quantized_matmul(randn(3, k + gs, gen=gen, dtype=torch.bfloat16), *q, True, gs, bits, mode,
                                global_scale=g)
    x = randn(3, k, gen=gen, dtype=torch.bfloat16)
    triton_out = lowbit.quantized_matmul(x, *q, True, gs, bits, mode, global_scale=g)
    monkeypatch.setenv("LOWBIT_BACKEND", "cpu")  # the selection is one of the facts
    calls = len(bound_calls)
    cpu_out = lowbit.quantized_matmul(x, *q, True, gs, bits, mode, global_scale=g)
    assert len(bound_calls) == calls and rel_err(cpu_out, triton_out.double()) < 1e-2


@pytest.mark.skipif(not GPU, reason="CUDA graphs need the GPU")
def test_bound_product_captured_in_a_cuda_graph(gen):
    """A bound product captures in a CUDA graph (fresh split workspace owned by the graph) and its replay equals the
    eager call for new activations written into the same input."""
    q = quantize3(randn(512, 1024, gen=gen, dtype=torch.bfloat16), 32, 4, "mxfp4")
    x = randn(1, 1024, gen=gen, dtype=torch.bfloat16)
    for _ in range(2):
        lowbit.quantized_matmul(x, *q, True, 32, 4, "mxfp4")  # warm-up: compiles, binds
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = lowbit.quantized_matmul(x, *q, True, 32, 4, "mxfp4")
    x.copy_(randn(1, 1024, gen=gen, dtype=torch.bfloat16))
    graph.replay()
    assert same_bits(out, lowbit.quantized_matmul(x, *q, True, 32, 4, "mxfp4"))


# -- routed experts (gather_qmm with rhs_indices) -----------------------------------------------------------------


@pytest.mark.parametrize("mode, gs, bits, per_expert_scale", [("affine", 64, 4, False), ("mxfp4", 32, 4, False),
                                                              ("nvfp4", 16, 4, True), ("affine", 32, 3, False)])
@pytest.mark.parametrize("tokens", [1, 3])
def test_routed_decode_calls_run_a_bound_product_with_the_same_bits(mode, gs, bits, per_expert_scale, tokens, gen,
                                                                     bound_calls):
    """Repeated gather_qmm calls routed by rhs_indices (each token's top-k experts: MoE decode) run a bound product
    with the general path's bits for new routing each call; out-of-range routing still raises gather_qmm's error,
    and routing the bound product cannot take (int32, non-contiguous) takes the general path with the same bits."""
    experts, k, n, top_k = 8, 256, 64, 2
    g = torch.rand(experts, generator=gen).to(DEVICE) + 0.5 if per_expert_scale else None
    w = randn(experts, n, k, gen=gen, scale=k**-0.5)
    q = quantize3(w, gs, bits, mode) if g is None else _per_expert(w, gs, bits, mode, g)
    x = randn(tokens, 1, 1, k, gen=gen)
    w_ref = dequantize_f64(q, gs, bits, mode).to(DEVICE)
    if g is not None:
        w_ref = w_ref * (g.double() / 2688.0)[:, None, None]

    def call(idx):
        return lowbit.gather_qmm(x, *q, rhs_indices=idx, transpose=True, group_size=gs, bits=bits, mode=mode,
                                 global_scale=g)

    for step in range(4):
        idx = torch.stack([torch.randperm(experts, generator=gen)[:top_k] for _ in range(tokens)]).to(DEVICE)
        BOUND_PRODUCTS.clear()
        by_general_path = call(idx)
        bound_calls.clear()
        for _ in range(3):  # (a GPU's first call of a new alignment may take the general path, which compiles)
            again = call(idx)
            if bound_calls and bound_calls[-1]:
                break
        assert bound_calls and bound_calls[-1] and same_bits(again, by_general_path), step
        ref = torch.einsum("tk,tjnk->tjn", x.reshape(tokens, k).double(), w_ref[idx])
        assert rel_err(by_general_path.reshape(tokens, top_k, n), ref) < 1e-2
        assert same_bits(call(idx.int()), by_general_path)  # (int32: the general path)
        assert same_bits(call(idx.t().contiguous().t()), by_general_path)  # (a transposed copy: the general path)
    bad = idx.clone()
    bad[-1, -1] = experts
    with pytest.raises(ValueError, match=rf"\[gather_qmm\] rhs_indices holds index {experts}, out of range"):
        call(bad)


def _per_expert(w, gs, bits, mode, g):
    """nvfp4 experts each quantized with its own tensor scale."""
    parts = [quantize3(w[e], gs, bits, mode, global_scale=g[e]) for e in range(w.shape[0])]
    return torch.stack([p[0] for p in parts]), torch.stack([p[1] for p in parts]), None


# -- staleness: what the key does not see ------------------------------------------------------------------------


@pytest.mark.parametrize("mode, gs, bits, scale", PRODUCTS)
def test_swapped_data_is_read_afresh(mode, gs, bits, scale, gen, bound_calls):
    """`.data` of x, w and scales (biases) swapped between calls, same shapes: the bound product reads the new
    tensors, as the general path does."""
    q, g = _product(mode, gs, bits, scale, gen)
    q2, _ = _product(mode, gs, bits, scale, gen)
    x = randn(3, 256, gen=gen)
    args = (True, gs, bits, mode)
    w, s, b = (t if t is None else t.clone() for t in q)
    bound(bound_calls, x, w, s, b, *args, global_scale=g)
    x.data = randn(3, 256, gen=gen)
    w.data, s.data = q2[0].clone(), q2[1].clone()
    if b is not None:
        b.data = q2[2].clone()
    got = bound(bound_calls, x, w, s, b, *args, global_scale=g)
    assert same_bits(got, general(x, *q2, *args, global_scale=g))
    assert rel_err(got, x.double() @ dequantize_f64(q2, gs, bits, mode, g).to(DEVICE).T) < 1e-2


def test_resized_x_and_changed_storage_offset(gen, bound_calls):
    """x resized in place (a new shape: a new key) and x with the same shape and strides at another storage offset
    (one element in: off a 16-byte boundary, which picks another binary on the GPU)."""
    q, _ = _product("affine", 64, 4, None, gen)
    x = randn(2, 256, gen=gen)
    bound(bound_calls, x, *q)
    x.resize_(5, 256).copy_(randn(5, 256, gen=gen))
    got = bound(bound_calls, x, *q)
    assert got.shape == (5, 96) and same_bits(got, general(x, *q))
    buffer = randn(2 * 256 + 8, gen=gen)
    for offset in (0, 1, 8, 0, 1):
        x = buffer[offset: offset + 2 * 256].view(2, 256)
        assert same_bits(bound(bound_calls, x, *q), general(x, *q)), offset
    for offset in (1, 0):  # (the weight's tensors off their alignment too)
        w_buffer = torch.empty(q[0].numel() + 1, dtype=q[0].dtype, device=DEVICE)
        w = w_buffer[offset: offset + q[0].numel()].view(q[0].shape).copy_(q[0])
        assert same_bits(bound(bound_calls, x, w, q[1], q[2]), general(x, *q)), offset


def test_requires_grad_toggled_and_grad_modes(gen, bound_calls):
    """x.requires_grad toggled after a bound product exists: the gradient flows (general path, through autograd);
    scales that require grad are refused with grad mode on whatever was bound under no_grad, and accepted under
    no_grad; inference mode gives inference tensors on both paths."""
    q, _ = _product("affine", 64, 4, None, gen)
    x = randn(3, 256, gen=gen, dtype=torch.float32)
    first = bound(bound_calls, x, *q)
    x.requires_grad_(True)
    y = lowbit.quantized_matmul(x, *q)
    assert y.requires_grad and same_bits(y.detach(), first)
    y.sum().backward()
    expected = torch.ones(3, 96, dtype=torch.float64, device=DEVICE) @ dequantize_f64(q, 64, 4).to(DEVICE)
    assert rel_err(x.grad, expected) < 1e-2  # (bfloat16 scales)
    with torch.no_grad():
        assert same_bits(lowbit.quantized_matmul(x, *q), first)
    x = x.detach()
    assert same_bits(bound(bound_calls, x, *q), first) and not first.requires_grad

    s = q[1].clone().requires_grad_(True)
    for _ in range(2):
        with torch.no_grad():
            assert same_bits(lowbit.quantized_matmul(x, q[0], s, q[2]), first)
        with pytest.raises(ValueError, match=r"\[quantized_matmul\] Gradients are supported with respect to x only"):
            lowbit.quantized_matmul(x, q[0], s, q[2])

    with torch.inference_mode():
        inside = bound(bound_calls, x, *q)
        assert inside.is_inference() and same_bits(inside, first)
    outside = bound(bound_calls, x, *q)
    assert not outside.is_inference() and same_bits(outside, first)
    with torch.inference_mode():
        made_inside = x.clone()
    assert same_bits(bound(bound_calls, made_inside, *q), first)


def test_global_scale_shapes_and_strides(gen, bound_calls):
    """nvfp4's tensor scale as a 0-d tensor, a 1-element tensor, a strided 1-element view, in any order after one
    another: each its own bound product, the general path's bits."""
    q, _ = _product("nvfp4", 16, 4, None, gen)
    x = randn(3, 256, gen=gen)
    scales = [torch.tensor(3.5, device=DEVICE), torch.tensor([3.5], device=DEVICE),
              torch.tensor([9.0, 3.5, 9.0, 9.0], device=DEVICE)[1:2], torch.full((8,), 3.5, device=DEVICE)[::8]]
    reference = general(x, *q, True, 16, 4, "nvfp4", global_scale=scales[0])
    for g in scales + scales[::-1]:
        assert same_bits(bound(bound_calls, x, *q, True, 16, 4, "nvfp4", global_scale=g), reference), g.shape
    g = torch.tensor(7.0, device=DEVICE)  # a new value, same facts
    assert same_bits(bound(bound_calls, x, *q, True, 16, 4, "nvfp4", global_scale=g),
                     general(x, *q, True, 16, 4, "nvfp4", global_scale=g))


@pytest.mark.parametrize("x_dtype, s_dtype, b_dtype", [
    (torch.bfloat16, torch.bfloat16, torch.bfloat16), (torch.bfloat16, torch.float16, torch.float16),
    (torch.float16, torch.bfloat16, torch.bfloat16), (torch.bfloat16, torch.float32, torch.float32),
    (torch.float32, torch.bfloat16, torch.bfloat16), (torch.float16, torch.float16, torch.float32)])
def test_affine_dtype_promotion(x_dtype, s_dtype, b_dtype, gen, bound_calls):
    """affine promotes x, scales and biases (MLX): each combination its own bound product, with the promoted dtype
    and the general path's bits, called after the others."""
    q, _ = _product("affine", 64, 4, None, gen)
    x = randn(3, 256, gen=gen, dtype=x_dtype)
    w, s, b = q[0], q[1].to(s_dtype), q[2].to(b_dtype)
    lowbit.quantized_matmul(x.to(torch.bfloat16), *q)  # (another product bound first)
    got = bound(bound_calls, x, w, s, b)
    assert got.dtype == torch.promote_types(torch.promote_types(x_dtype, s_dtype), b_dtype)
    assert same_bits(got, general(x, w, s, b))


@pytest.mark.parametrize("transpose", [True, False])
@pytest.mark.parametrize("in_grid", ["1", "0"])
def test_bound_rows_are_batch_invariant(transpose, in_grid, gen, bound_calls, monkeypatch):
    """Rows bit-identical across batch sizes through bound products (the splits in the grid or not), and equal to
    the oracle."""
    monkeypatch.setenv("LOWBIT_QMM_SPLIT_IN_GRID", in_grid)
    forget_plans()
    k = 9 * block_k(4, 64, transpose)
    q, _ = _product("affine", 64, 4, None, gen, k=k, n=64, transpose=transpose)
    x = randn(5, k, gen=gen)
    whole = bound(bound_calls, x, *q, transpose)
    for i in range(5):
        assert same_bits(bound(bound_calls, x[i], *q, transpose), whole[i]), i
    w_hat = dequantize_f64(q, 64, 4).to(DEVICE)
    assert rel_err(whole, x.double() @ (w_hat.T if transpose else w_hat)) < 1e-2


def test_tuning_knobs_forget_bound_products(monkeypatch, gen, bound_calls):
    """`tuned` / forget_plans drop the bound products with the plans: the next call plans afresh (here: the splits
    move from the grid into one program) and gives the same bits."""
    k = 13 * block_k(4, 64, True)
    q, _ = _product("affine", 64, 4, None, gen, k=k, n=64)
    x = randn(2, k, gen=gen)
    with tuned(LOWBIT_QMM_SPLIT_IN_GRID="1"):
        in_grid = bound(bound_calls, x, *q)
        (product,) = [p for p in BOUND_PRODUCTS.values() if p is not None]
        assert product.plan.split_in_grid
    assert not BOUND_PRODUCTS
    with tuned(LOWBIT_QMM_SPLIT_IN_GRID="0"):
        one_program = bound(bound_calls, x, *q)
        (product,) = [p for p in BOUND_PRODUCTS.values() if p is not None]
        assert not product.plan.split_in_grid
    assert same_bits(in_grid, one_program)


def test_backend_selection_is_part_of_the_key(monkeypatch, gen, bound_calls):
    """LOWBIT_BACKEND changed (including an invalid value) after a product was bound: the general path's choice,
    or its ValueError, every time."""
    q, _ = _product("affine", 64, 4, None, gen)
    x = randn(3, 256, gen=gen)
    bound(bound_calls, x, *q)
    for _ in range(2):
        monkeypatch.setenv("LOWBIT_BACKEND", "bogus")
        with pytest.raises(ValueError, match="LOWBIT_BACKEND must be one of"):
            lowbit.quantized_matmul(x, *q)
        monkeypatch.setenv("LOWBIT_BACKEND", "cpu")
        del bound_calls[:]
        lowbit.quantized_matmul(x, *q)
        assert not bound_calls
        monkeypatch.setenv("LOWBIT_BACKEND", "triton")
        bound(bound_calls, x, *q)


# -- errors -------------------------------------------------------------------------------------------------------


def _bad_calls(q, x):
    w, s, b = q
    return {
        "x not a tensor": ((x.tolist(), w, s, b), {}, "x must be a torch.Tensor"),
        "x None": ((None, w, s, b), {}, "x must be a torch.Tensor"),
        "x integer": ((x.to(torch.int32), w, s, b), {}, "x must have a floating dtype"),
        "x wrong K": ((x[:, :-64], w, s, b), {}, "Last dimension of x"),
        "w int32": ((x, w.view(torch.int32), s, b), {}, "must be uint32"),
        "scales wrong shape": ((x, w, s[:, :-1], b[:, :-1]), {}, "Scales of shape"),
        "biases missing": ((x, w, s, None), {}, "Biases must be provided"),
        "biases shape": ((x, w, s, b[:-1]), {}, "Scales and biases must have the same shape"),
        "global_scale on affine": ((x, w, s, b), {"global_scale": torch.tensor(1.0, device=DEVICE)}, "only supported"),
        "transpose int": ((x, w, s, b, 1), {}, "transpose must be a bool"),
        "group_size float": ((x, w, s, b, True, 64.0), {}, "group size"),
        "bits wrong": ((x, w, s, b, True, 64, 3), {}, ""),
        "mode list": ((x, w, s, b, True, 64, 4, ["affine"]), {}, "Invalid quantization mode"),
        "mode unknown": ((x, w, s, b, True, 64, 4, "int4"), {}, "Invalid quantization mode"),
        "x on meta": ((x.to("meta"), w, s, b), {}, "same device"),
        "scales need grad": ((x, w, s.clone().requires_grad_(True), b), {}, "Gradients are supported"),
    }


def test_bad_calls_get_the_same_value_error_every_time(gen, bound_calls):
    """Each bad call, made after good calls bound their products (and after itself), raises the same ValueError
    naming the op, at the first and at later calls."""
    q, _ = _product("affine", 64, 4, None, gen)
    x = randn(3, 256, gen=gen)
    for name, (args, kwargs, match) in _bad_calls(q, x).items():
        messages = []
        for _ in range(3):
            bound(bound_calls, x, *q)
            with pytest.raises(ValueError, match=r"\[quantized_matmul\]") as raised:
                lowbit.quantized_matmul(*args, **kwargs)
            assert match in str(raised.value), (name, str(raised.value))
            messages.append(str(raised.value))
        assert len(set(messages)) == 1, name


def test_key_errors_fall_back_to_the_checks(gen):
    """_product_key on arguments that are not tensors (objects with a `shape` but no strides, unhashable
    parameters): the checks' ValueError, not an AttributeError or TypeError."""
    q, _ = _product("affine", 64, 4, None, gen)

    class Shaped:
        shape = (3, 256)
        dtype = torch.bfloat16
        device = torch.device(DEVICE)

    for x in (Shaped(), torch.zeros(3, 256).numpy()):
        for _ in range(2):
            with pytest.raises(ValueError, match=r"\[quantized_matmul\] x must be a torch.Tensor"):
                lowbit.quantized_matmul(x, *q)
    with pytest.raises(ValueError, match=r"\[quantized_matmul\]"):
        lowbit.quantized_matmul(randn(3, 256, gen=gen), *q, True, 64, 4, {"mode": "affine"})


# -- memory -------------------------------------------------------------------------------------------------------


def test_bound_products_keep_no_tensor_alive(gen, bound_calls):
    """Neither the memo's keys nor the bound products hold the call's tensors."""
    q, _ = _product("affine", 64, 4, None, gen)
    x = randn(3, 256, gen=gen)
    w, s, b = (t.clone() for t in q)
    bound(bound_calls, x, w, s, b)
    refs = [weakref.ref(t) for t in (x, w, s, b)]
    del x, w, s, b
    gc.collect()
    assert all(r() is None for r in refs)
    assert any(isinstance(p, qmm.BoundProduct) for p in BOUND_PRODUCTS.values())


def test_the_memo_is_bounded(monkeypatch, gen):
    """Past its size the memo starts over (each distinct x shape is a new key)."""
    monkeypatch.setattr(matmul_module, "_MAX_PASSED", 4)
    q, _ = _product("affine", 64, 4, None, gen, n=32)
    for m in range(1, 11):
        lowbit.quantized_matmul(randn(m, 256, gen=gen), *q)
        assert len(BOUND_PRODUCTS) <= 4


# -- the GPU launch path, on fake compiled launchers --------------------------------------------------------------


class PlainLauncher:
    """Triton 3.5-3.6's CudaLauncher as far as a launch goes (see launch._plain_c_launcher): `launch` records."""

    global_scratch_size = profile_scratch_size = 0
    launch_cooperative_grid = launch_pdl = False

    def __init__(self):
        self.log = []
        self.launch = lambda *args: self.log.append(args)

    def __call__(self, gridX, gridY, gridZ, stream, function, *args):
        self.launch(gridX, gridY, gridZ, stream, function, self.launch_cooperative_grid, self.launch_pdl, None, None,
                    *args)


def _installed_launcher():
    """The installed Triton's CudaLauncher, made without compiling (the attributes a no-scratch launch reads), its
    C `launch` recording."""
    driver = pytest.importorskip("triton.backends.nvidia.driver")
    run = object.__new__(driver.CudaLauncher)
    attributes = dict(global_scratch_size=0, global_scratch_align=1, profile_scratch_size=0, profile_scratch_align=1,
                      launch_cooperative_grid=False, launch_pdl=False, num_ctas=1, gsan_enabled=False,
                      arg_annotations=("annotations",), kernel_signature=b"signature")
    for name, value in attributes.items():
        setattr(run, name, value)
    run.log = []
    run.launch = lambda *args: run.log.append(args)
    return run


class FakeBinary:
    def __init__(self, run):
        self.run, self.function, self.packed_metadata = run, 1234, (4, 1, 0)


class FakeDriver:
    def get_current_stream(self, device):
        return 77


@pytest.mark.parametrize("launcher", ["plain", "installed"])
def test_direct_launch_passes_what_the_wrapper_passes(monkeypatch, launcher):
    """BoundLaunch's launch of a binary (launch._direct_launch: Triton's C launcher itself where its argument layout
    is known, else the Python wrapper) reaches the C launcher with exactly the arguments that the wrapper, called as
    Launcher.__call__ calls it, gives it: for Triton 3.6's layout and for the installed Triton's."""
    from triton.runtime import driver

    monkeypatch.setattr(driver, "_active", FakeDriver())  # (the installed wrapper reads the active driver)
    run = PlainLauncher() if launcher == "plain" else _installed_launcher()
    binary = FakeBinary(run)
    pointers, ints, tail = (1 << 40, (1 << 40) + 16, (1 << 40) + 4), (3, 96, 256), (True, 64)
    run(5, 1, 1, 77, binary.function, binary.packed_metadata, None, None, None, *pointers, *ints, *tail)
    c_launch, head, after = launch_module._direct_launch(binary, (*ints, *tail))
    c_launch(5, 1, 1, 77, *head, *pointers, *after)
    assert len(run.log) == 2 and run.log[1] == run.log[0]
    if launcher == "plain":
        assert c_launch == run.launch  # (the C launcher itself: no wrapper)


def _labels(pointers, named: dict) -> list:
    """Pointer arguments as names: the call's own tensors by name, others (fresh outputs, scratch) by order of first
    appearance, so equal addresses get equal labels."""
    fresh, out = {}, []
    for p in pointers:
        p = p.data_ptr() if isinstance(p, torch.Tensor) else p
        out.append(named.get(p) or fresh.setdefault(p, f"fresh{len(fresh)}"))
    return out


@pytest.mark.skipif(GPU, reason="fakes the CUDA device queries (the GPU runs the real launches)")
@pytest.mark.parametrize("mode, gs, bits, scale, transpose, in_grid", [
    ("affine", 64, 4, None, True, "0"), ("affine", 64, 4, None, True, "1"), ("affine", 64, 4, None, False, "1"),
    ("mxfp4", 32, 4, None, True, "1"), ("nvfp4", 16, 4, "0-d", True, "1"), ("nvfp4", 16, 4, "1-element", False, "0")])
def test_bound_launch_runs_the_binary_and_arguments_of_the_general_launch(monkeypatch, mode, gs, bits, scale,
                                                                         transpose, in_grid, gen, bound_calls):
    """With the kernels' Launchers made 'compiled' (fake binaries recording their launches): the first call compiles
    (general path), a later one finds the binaries by the bound product's dtypes, alignments and integers, and
    launches them directly with the same grid, integers, constexprs and pointers, tensor for tensor, as the general
    path's cached launch of the same call."""
    from triton.runtime import driver

    monkeypatch.setenv("LOWBIT_QMM_SPLIT_IN_GRID", in_grid)
    forget_plans()
    k = 9 * block_k(bits, gs, transpose)
    q, g = _product(mode, gs, bits, scale, gen, k=k, n=64, transpose=transpose)
    x = randn(3, k, gen=gen)
    args = (transpose, gs, bits, mode)
    lowbit.quantized_matmul(x, *q, *args, global_scale=g)  # (the interpreter: plans and binds)
    (product,) = [p for p in BOUND_PRODUCTS.values() if p is not None]
    launches = [product.qmm] + ([product.slot_major] if product.slot_major is not None else [])
    compiled_at = {}

    def fake_first_launch(launcher):
        def first(grid, given, signature):
            launcher._binaries[signature] = FakeBinary(PlainLauncher())
            launcher._tail = tuple(launcher.constexprs[n] for n in launcher.kernel.arg_names[len(given):])
            compiled_at[launcher] = signature
        return first

    for bound_launch in launches:
        launcher = bound_launch.launch
        monkeypatch.setattr(launcher, "compiled", True)
        monkeypatch.setattr(launcher, "_binaries", {})
        monkeypatch.setattr(launcher, "_tail", None)
        monkeypatch.setattr(launcher, "_first_launch", fake_first_launch(launcher))
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch._C, "_cuda_getDevice", lambda: 0, raising=False)
    monkeypatch.setattr(torch._C, "_cuda_getCurrentRawStream", lambda device: 77, raising=False)
    monkeypatch.setattr(driver, "_active", FakeDriver())

    del bound_calls[:]
    lowbit.quantized_matmul(x, *q, *args, global_scale=g)  # no binaries yet: the general path "compiles"
    assert bound_calls == [False] and len(compiled_at) == len(launches)
    lowbit.quantized_matmul(x, *q, *args, global_scale=g)  # the bound product, launching directly
    assert bound_calls[-1]
    bound_log = {bl.launch: bl.launch._binaries[compiled_at[bl.launch]].run.log[-1] for bl in launches}
    key = next(key for key, p in BOUND_PRODUCTS.items() if p is product)
    BOUND_PRODUCTS[key] = None  # the general path for the same call: the cached binaries' launches (wrapper)
    lowbit.quantized_matmul(x, *q, *args, global_scale=g)
    BOUND_PRODUCTS[key] = product
    named = {t.data_ptr(): name for name, t in (("x", x), ("w", q[0]), ("scales", q[1]), ("biases", q[2]),
                                                 ("global_scale", g)) if t is not None}
    for bound_launch in launches:
        log = bound_launch.launch._binaries[compiled_at[bound_launch.launch]].run.log
        assert len(log) == 2 and log[0] is bound_log[bound_launch.launch]  # (one direct launch, one general)
        direct, through_wrapper = log
        pointers = len(bound_launch.dtypes)
        head = 13  # grid, stream, function, cooperative / PDL flags, scratch, metadata, hooks
        assert direct[:head] == through_wrapper[:head]
        assert direct[head + pointers:] == through_wrapper[head + pointers:]  # integers and constexprs
        assert (_labels(direct[head:head + pointers], named)
                == _labels(through_wrapper[head:head + pointers], named)), bound_launch.launch.kernel


def test_interpreted_bound_launch_passes_the_dtypes_binaries_are_found_by(monkeypatch, gen):
    """Under the interpreter a BoundLaunch passes each pointer argument with the dtype its GPU binary is looked up by
    (w_q as int32, as gather_qmm passes it): the interpreter runs what the GPU runs."""
    if GPU:
        pytest.skip("the interpreter's path")
    q, _ = _product("affine", 64, 4, None, gen)
    x = randn(3, 256, gen=gen)
    lowbit.quantized_matmul(x, *q)
    (product,) = [p for p in BOUND_PRODUCTS.values() if p is not None]
    seen = []
    launcher = product.qmm.launch
    original = type(launcher).__call__
    monkeypatch.setattr(type(launcher), "__call__",
                        lambda self, grid, *a: seen.append([t.dtype for t in a if isinstance(t, torch.Tensor)])
                        or original(self, grid, *a))
    lowbit.quantized_matmul(x, *q)
    assert seen and seen[-1] == list(product.qmm.dtypes)


# -- the GPU's per-stream scratch ---------------------------------------------------------------------------------


@pytest.mark.skipif(not GPU, reason="streams need the GPU")
def test_streams_and_threads_share_no_scratch_in_flight(monkeypatch, gen):
    """Split partials, arrival counters and slot-major copies are kept per stream: products in flight at once on
    several streams (from one thread, and from several threads), each with a long queue of kernels, give the bits
    of the same products run one at a time; a stream's buffers growing for a larger product keep the results of
    the smaller ones queued before."""
    monkeypatch.setenv("LOWBIT_QMM_SPLIT_IN_GRID", "1")
    forget_plans()
    k = 16384
    q = quantize3(randn(512, k, gen=gen, scale=k**-0.5), 64, 4, "affine")
    xs = [randn(m, k, gen=gen) for m in (1, 3, 16, 2, 8, 1, 4, 3)]
    expected = [general(x, *q) for x in xs]
    streams = [torch.cuda.Stream() for _ in range(4)]
    for x in xs:  # compile and bind every shape
        lowbit.quantized_matmul(x, *q)
        lowbit.quantized_matmul(x, *q)
    torch.cuda.synchronize()
    for _ in range(3):
        outs = []
        for i, x in enumerate(xs * 4):
            with torch.cuda.stream(streams[i % len(streams)]):
                outs.append(lowbit.quantized_matmul(x, *q))
        torch.cuda.synchronize()
        for i, out in enumerate(outs):
            assert same_bits(out, expected[i % len(xs)]), i

    results, errors = {}, []

    def worker(t):
        try:
            stream = torch.cuda.Stream()
            with torch.cuda.stream(stream):
                results[t] = [lowbit.quantized_matmul(x, *q) for x in xs * 8]
            stream.synchronize()
        except Exception as e:  # noqa: BLE001 (reported below)
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for t, outs in results.items():
        for i, out in enumerate(outs):
            assert same_bits(out, expected[i % len(xs)]), (t, i)

    qmm._SCRATCH.clear()  # (each stream's buffers start small and grow under queued launches)
    big = randn(64, k, gen=gen)
    expected_big = general(big, *q)
    lowbit.quantized_matmul(big, *q)
    for _ in range(2):
        torch.cuda.synchronize()
        qmm._SCRATCH.clear()
        small = [lowbit.quantized_matmul(x, *q) for x in xs]
        large = lowbit.quantized_matmul(big, *q)
        torch.cuda.synchronize()
        assert same_bits(large, expected_big)
        assert all(same_bits(s, e) for s, e in zip(small, expected))


@pytest.mark.skipif(not GPU, reason="CUDA graphs need the GPU")
def test_graph_replays_and_eager_calls_interleaved(monkeypatch, gen):
    """A captured bound product (fresh scratch owned by the graph) replayed on the stream where eager calls of the
    same product use the stream's kept scratch, replay and eager calls queued alternately, splits in the grid."""
    monkeypatch.setenv("LOWBIT_QMM_SPLIT_IN_GRID", "1")
    forget_plans()
    k = 8192
    q = quantize3(randn(256, k, gen=gen, scale=k**-0.5), 32, 4, "mxfp4")
    x_graph = randn(2, k, gen=gen)
    for _ in range(3):
        lowbit.quantized_matmul(x_graph, *q, True, 32, 4, "mxfp4")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            lowbit.quantized_matmul(x_graph, *q, True, 32, 4, "mxfp4")
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out_graph = lowbit.quantized_matmul(x_graph, *q, True, 32, 4, "mxfp4")
    inputs = [randn(2, k, gen=gen) for _ in range(6)]
    expected = [general(x, *q, True, 32, 4, "mxfp4") for x in inputs]
    eager_x = [randn(2, k, gen=gen) for _ in range(6)]
    expected_eager = [general(x, *q, True, 32, 4, "mxfp4") for x in eager_x]
    replayed, eager = [], []
    for x, y in zip(inputs, eager_x):
        x_graph.copy_(x)
        graph.replay()
        replayed.append(out_graph.clone())
        eager.append(lowbit.quantized_matmul(y, *q, True, 32, 4, "mxfp4"))
    torch.cuda.synchronize()
    assert all(same_bits(a, b) for a, b in zip(replayed, expected))
    assert all(same_bits(a, b) for a, b in zip(eager, expected_eager))


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_second_device(gen, bound_calls):
    """The same product on cuda:0 and cuda:1 (current device either): each device's own bound product, binaries
    and scratch."""
    q0, _ = _product("affine", 64, 4, None, gen)
    q1 = tuple(t.to("cuda:1") for t in q0)
    x0 = randn(3, 256, gen=gen)
    x1 = x0.to("cuda:1")
    expected = general(x0, *q0)
    for current in (0, 1, 0):
        with torch.cuda.device(current):
            assert same_bits(bound(bound_calls, x0, *q0), expected), current
            assert same_bits(bound(bound_calls, x1, *q1).cpu(), expected.cpu()), current
