"""quantized_matmul, gather_qmm, qqmm, gather_qqmm: MLX 0.32.4's signatures and semantics on torch tensors.

Every matmul is expressed as one gathered product, out[i] = x[lhs[i]] @ dequantize(w[rhs[i]]) (.T), which is what
the backends implement: batch broadcasting is a gather with broadcast index arrays, and weight batch dims that are
stride-0 views (`expand`, the GQA pattern) are collapsed first, so a broadcast weight is read once and never
ignored. Gradients flow to x (fine-tuning adapters on frozen quantized weights).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, replace

import torch

from ..backends import BOUND_PRODUCTS, backend_for, selection, tracing_shapes, workspace_per_call
from ..formats import ModeSpec, resolve_params
from ..formats.nvfp4 import tensor_decode_scale
from . import checks
from .quantization import eager_dequantize, eager_quantize

FP_ACTIVATION_MODES = ("nvfp4", "mxfp8", "mxfp4")


@dataclass(slots=True)
class _Weight:
    """A validated quantized weight and its parameters."""

    w: torch.Tensor
    scales: torch.Tensor
    biases: torch.Tensor | None
    global_scale: torch.Tensor | None
    spec: ModeSpec
    group_size: int
    bits: int
    transpose: bool
    rows: int  # w's second-to-last axis
    cols: int  # w's last axis, unpacked

    @property
    def k(self) -> int:
        return self.cols if self.transpose else self.rows

    @property
    def n(self) -> int:
        return self.rows if self.transpose else self.cols

    def out_dtype(self, x: torch.Tensor) -> torch.dtype:
        if self.spec.has_biases:  # MLX: affine promotes x, scales and biases
            return torch.promote_types(torch.promote_types(x.dtype, self.scales.dtype), self.biases.dtype)
        return x.dtype


def _weight(op, w, scales, biases, transpose, group_size, bits, mode, global_scale, global_scale_numel=1) -> _Weight:
    spec, gs, b = resolve_params(op, mode, group_size, bits)
    checks.check_transpose(op, transpose)
    cols = checks.check_quantized(op, spec, gs, b, w, scales, biases)
    checks.check_global_scale(op, mode, global_scale, global_scale_numel)
    return _Weight(w, scales, biases, global_scale, spec, gs, b, transpose, w.shape[-2], cols)


def _check_x(op: str, x, wt: _Weight, min_ndim: int = 1) -> None:
    checks.check_float(op, "x", x)
    if x.ndim < min_ndim:
        raise ValueError(f"[{op}] x must have at least {min_ndim} dimension(s) but got shape {tuple(x.shape)}.")
    if x.shape[-1] != wt.k:
        raise ValueError(
            f"[{op}] Last dimension of x with shape (..., {x.shape[-1]}) does not match the expanded quantized matrix "
            f"({wt.k}, {wt.n}) computed from w of shape {tuple(wt.w.shape)} with group_size={wt.group_size}, "
            f"bits={wt.bits} and transpose={wt.transpose}."
        )
    checks.check_same_device(op, x=x, w=wt.w, scales=wt.scales, biases=wt.biases, global_scale=wt.global_scale)


_PASSED: dict[tuple, tuple] = {}  # the static facts of argument sets that passed every check -> what they decide
_MAX_PASSED = 4096


def _facts(t) -> tuple | None:
    return None if t is None else (t.shape, t.dtype, t.device)


def _checked(op, x, w, scales, biases, transpose, group_size, bits, mode, global_scale, global_scale_numel=1,
             min_ndim=1) -> tuple[_Weight, torch.dtype]:
    """(the weight, the output dtype) of a matmul call whose arguments pass every check.

    The checks read only static facts -- shapes, dtypes, devices, parameter values and their types -- so a set of
    facts that passed once is not checked again (a decode step repeats the same few sets thousands of times)."""
    try:
        facts = (op, min_ndim, x.ndim, x.shape[-1] if x.ndim else None, x.dtype, x.device, _facts(w), _facts(scales),
                 _facts(biases), _facts(global_scale), type(transpose), transpose, type(group_size), group_size,
                 type(bits), bits, type(mode), mode)
        passed = _PASSED.get(facts)
    except (AttributeError, TypeError):  # not tensors, unhashable parameters: the checks below say what is wrong
        facts = passed = None
    if passed is None:
        wt = _weight(op, w, scales, biases, transpose, group_size, bits, mode, global_scale, global_scale_numel)
        _check_x(op, x, wt, min_ndim)
        passed = (wt.spec, wt.group_size, wt.bits, wt.cols, wt.out_dtype(x))
        if facts is not None:
            if len(_PASSED) >= _MAX_PASSED:
                _PASSED.clear()
            _PASSED[facts] = passed
        return wt, passed[4]
    spec, gs, b, cols, out_dtype = passed
    return _Weight(w, scales, biases, global_scale, spec, gs, b, transpose, w.shape[-2], cols), out_dtype


def _collapsed_weight(wt: _Weight):
    """(w, scales, biases, global_scales, index_map) with w's stride-0 batch dims reduced to size 1 and flattened.

    index_map maps a flat index over w's original batch dims to a flat index over the collapsed ones (None: the
    identity).
    """
    batch = wt.w.shape[:-2]
    tensors = [t for t in (wt.w, wt.scales, wt.biases) if t is not None]
    per_expert_scale = wt.global_scale is not None and wt.global_scale.numel() > 1
    keep = [
        per_expert_scale or any(t.stride(d) != 0 for t in tensors) or batch[d] == 1 for d in range(len(batch))
    ]
    collapsed = tuple(s if k else 1 for s, k in zip(batch, keep))

    def narrow(t):
        if t is None:
            return None
        for d, k in enumerate(keep):
            if not k:
                t = t.narrow(d, 0, 1)
        return t.reshape(-1, *t.shape[len(batch):])

    w, s, b = narrow(wt.w), narrow(wt.scales), narrow(wt.biases)
    n_experts = w.shape[0]
    if wt.global_scale is None:
        g = None
    else:
        g = wt.global_scale.reshape(-1)
        g = g.expand(n_experts) if g.numel() == 1 else g
    if all(keep):  # nothing collapsed: indices stay as they are (no index kernel per call)
        return w, s, b, g, None
    index_map = torch.arange(n_experts, device=wt.w.device).reshape(collapsed).expand(batch).reshape(-1)
    return w, s, b, g, index_map


class _GatherQMM(torch.autograd.Function):
    """out[i] = x[lhs[i]] @ W[rhs[i]]; backward gives the gradient with respect to x only."""

    @staticmethod
    def forward(ctx, x, w, scales, biases, global_scale, lhs, rhs, wt: _Weight, out_dtype, sorted_indices):
        out = _run(x, w, scales, biases, global_scale, lhs, rhs, wt, out_dtype, sorted_indices)
        ctx.save_for_backward(w, scales, biases, global_scale, lhs, rhs)
        ctx.meta = (wt, x.shape, x.dtype)
        return out

    @staticmethod
    def backward(ctx, grad):
        w, scales, biases, global_scale, lhs, rhs = ctx.saved_tensors
        wt, x_shape, x_dtype = ctx.meta
        grad_x = None
        if ctx.needs_input_grad[0]:
            backend = backend_for("quantized_matmul", grad.device)
            items = None if lhs is None else torch.arange(lhs.shape[0], device=grad.device)
            per_item = backend.gather_qmm(
                grad.contiguous(), w, scales, biases, global_scale, items, rhs, not wt.transpose, wt.spec.name,
                wt.group_size, wt.bits, torch.float32,
            )
            if lhs is None:
                grad_x = per_item.to(x_dtype)
            else:
                grad_x = torch.zeros(x_shape, dtype=torch.float32, device=grad.device).index_add_(0, lhs, per_item)
                grad_x = grad_x.to(x_dtype)
        return grad_x, None, None, None, None, None, None, None, None, None


def _broadcast(a: tuple, b: tuple) -> tuple | None:
    """torch.matmul-style broadcast of two batch shapes, None if they do not broadcast (a plain-Python twin of
    torch.broadcast_shapes, which costs tens of microseconds per call)."""
    if a == b or not b:
        return tuple(a)
    if not a:
        return tuple(b)
    n = max(len(a), len(b))
    a, b = (1,) * (n - len(a)) + tuple(a), (1,) * (n - len(b)) + tuple(b)
    out = []
    for i, j in zip(a, b):
        if i != j and 1 not in (i, j):
            return None
        out.append(j if i == 1 else i)
    return tuple(out)


def _reject_weight_grads(op: str, wt: _Weight) -> None:
    if not torch.is_grad_enabled():
        return
    for name in ("scales", "biases", "global_scale"):
        t = getattr(wt, name)
        if t is not None and t.requires_grad:
            raise ValueError(f"[{op}] Gradients are supported with respect to x only, but {name} requires grad.")


def _gathered(op, x_flat, wt: _Weight, lhs, rhs_original, out_dtype, sorted_indices=False):
    """Run the gathered product with rhs indexing w's original flat batch; returns (I, M, N).

    lhs = rhs = None means one plain product of x_flat[0] and a 2-D w: no index arrays are made."""
    _reject_weight_grads(op, wt)
    if rhs_original is None:
        g = None if wt.global_scale is None else wt.global_scale.reshape(1)
        return _apply(x_flat, wt.w, wt.scales, wt.biases, g, None, None, wt, out_dtype, sorted_indices)
    w, s, b, g, index_map = _collapsed_weight(wt)
    rhs = rhs_original if index_map is None else index_map[rhs_original]
    return _apply(x_flat, w, s, b, g, lhs, rhs, wt, out_dtype, sorted_indices)


def _apply(x, w, scales, biases, global_scale, lhs, rhs, wt: _Weight, out_dtype, sorted_indices):
    """Through autograd only when a gradient is wanted (the Function costs tens of microseconds per call)."""
    if x.requires_grad and torch.is_grad_enabled():
        return _GatherQMM.apply(x, w, scales, biases, global_scale, lhs, rhs, wt, out_dtype, sorted_indices)
    return _run(x, w, scales, biases, global_scale, lhs, rhs, wt, out_dtype, sorted_indices)


def _run(x, w, scales, biases, global_scale, lhs, rhs, wt: _Weight, out_dtype, sorted_indices):
    """The backend's gathered product for one call."""
    return backend_for("quantized_matmul", x.device).gather_qmm(
        x, w, scales, biases, global_scale, lhs, rhs, wt.transpose, wt.spec.name, wt.group_size, wt.bits, out_dtype,
        sorted_indices,
    )


def _matmul(op: str, x: torch.Tensor, wt: _Weight, out_dtype: torch.dtype) -> torch.Tensor:
    """x (..., K) times the (broadcast) batched weight, torch.matmul broadcasting rules."""
    w_batch = tuple(wt.w.shape[:-2])
    if not w_batch:  # one weight: x's batch rows are just more rows (one product, the prefill path's shape)
        return _gathered(op, x.reshape(1, -1, wt.k), wt, None, None, out_dtype).reshape(*x.shape[:-1], wt.n)
    x2 = x.unsqueeze(0) if x.ndim == 1 else x
    x_batch = tuple(x2.shape[:-2])
    batch = _broadcast(x_batch, w_batch)
    if batch is None:
        raise ValueError(f"[{op}] The batch dimensions of x {x_batch} and w {w_batch} cannot be broadcast together.")
    device = x.device
    m = x2.shape[-2]
    lhs = torch.arange(checks.prod(x_batch), device=device).reshape(x_batch).expand(batch).reshape(-1)
    rhs = torch.arange(checks.prod(w_batch), device=device).reshape(w_batch).expand(batch).reshape(-1)
    out = _gathered(op, x2.reshape(-1, m, wt.k), wt, lhs, rhs, out_dtype)
    out = out.reshape(*batch, m, wt.n)
    return out.squeeze(-2) if x.ndim == 1 else out


def eager_quantized_matmul(
    x: torch.Tensor,
    w: torch.Tensor,
    /,
    scales: torch.Tensor,
    biases: torch.Tensor | None = None,
    transpose: bool = True,
    group_size: int | None = None,
    bits: int | None = None,
    mode: str = "affine",
    *,
    global_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """x @ dequantize(w).T (transpose=True, w is (..., N, K)) or x @ dequantize(w) (w is (..., K, N)).

    Batch dims of x and w broadcast like torch.matmul, stride-0 views included; a 2-D x with a batched w gives one
    result per weight (MLX would silently use w[0]). Output dtype: affine promotes x, scales and biases; fp modes
    keep x's dtype. `global_scale` (nvfp4, a float32 scalar) is a lowbit extension.
    """
    op = "quantized_matmul"
    # A call that repeats an earlier call's static facts (_product_key) runs the product the backend bound to them:
    # the checks passed for those facts and the path is decided, so the call allocates its output and launches.
    key, bound = _bound_product(_product_key, x, w, scales, biases, transpose, group_size, bits, mode, global_scale)
    if bound is not None and bound is not _UNSEEN:
        out = bound(x, w, scales, biases, global_scale)
        if out is not None:
            return out
    wt, out_dtype = _checked(op, x, w, scales, biases, transpose, group_size, bits, mode, global_scale)
    out = _matmul(op, x, wt, out_dtype)
    if bound is _UNSEEN:
        _remember(key, _bind(op, x, wt, out_dtype))
    return out


_UNSEEN = object()


def _bound_product(make_key, *args) -> tuple:
    """(the call's key, the product bound to it; _UNSEEN for a key not met yet; None where there is none or no key:
    while tracing, or for arguments the key cannot be made of, whose checks then say what is wrong)."""
    if tracing_shapes():
        return None, None
    try:
        key = make_key(*args)
        return key, BOUND_PRODUCTS.get(key, _UNSEEN)
    except (AttributeError, TypeError):  # not tensors, unhashable parameters
        return None, None


def _remember(key: tuple, product) -> None:
    """Keep a key's bound product (or None: the key's calls take the general path); the memo is bounded."""
    if len(BOUND_PRODUCTS) >= _MAX_PASSED:
        BOUND_PRODUCTS.clear()
    BOUND_PRODUCTS[key] = product


def _grad_free(x: torch.Tensor, wt: _Weight) -> bool:
    """No argument of the call wants a gradient (a bound product has no autograd)."""
    return not any(t is not None and t.requires_grad for t in (x, wt.scales, wt.biases, wt.global_scale))


def _product_key(x, w, scales, biases, transpose, group_size, bits, mode, global_scale) -> tuple:
    """Every static fact a quantized_matmul call's checks and path depend on: shapes, strides, dtypes, devices and
    whether gradients are wanted, the parameters and their types, and the backend selection."""
    return (
        x.shape, x.stride(), x.dtype, x.device, x.requires_grad, w.shape, w.stride(), w.dtype, w.device,
        scales.shape, scales.stride(), scales.dtype, scales.device, scales.requires_grad,
        None if biases is None else (biases.shape, biases.stride(), biases.dtype, biases.device, biases.requires_grad),
        None if global_scale is None else (global_scale.shape, global_scale.stride(), global_scale.dtype,
                                           global_scale.device, global_scale.requires_grad),
        type(transpose), transpose, type(group_size), group_size, type(bits), bits, type(mode), mode, selection(),
    )


def _bind(op: str, x: torch.Tensor, wt: _Weight, out_dtype: torch.dtype):
    """The backend's prepared product for later calls with the facts of this one (see _product_key), or None: the
    backend has none, the weight is batched, or a gradient is wanted (those calls take the general path)."""
    if wt.w.ndim != 2 or not _grad_free(x, wt):
        return None
    bind = getattr(backend_for(op, x.device), "bind_product", None)
    if bind is None:
        return None
    return bind(x, wt.w, wt.scales, wt.biases, wt.global_scale, wt.transpose, wt.spec.name, wt.group_size, wt.bits,
                out_dtype)


def _indices(op: str, name: str, idx, default_batch, device) -> torch.Tensor:
    if idx is None:
        return torch.arange(checks.prod(default_batch), device=device).reshape(default_batch)
    checks.check_tensor(op, name, idx)
    if idx.dtype.is_floating_point or idx.dtype.is_complex or idx.dtype == torch.bool:
        raise ValueError(f"[{op}] {name} must be an integer tensor but got dtype {idx.dtype}.")
    if idx.device != device:
        raise ValueError(f"[{op}] {name} must be on {device} like x but is on {idx.device}.")
    return idx.long()  # MLX's own index dtype is uint32, which torch cannot reduce


class _CheckedIndices(threading.local):
    """This thread's index tensors checked by an enclosing `routing_checked`, with the matrix counts they fit."""

    held: tuple = ()


_CHECKED_INDICES = _CheckedIndices()


class routing_checked:
    """Within: gather_qmm calls whose rhs_indices is `indices` itself (the same int64 tensor) skip their range check,
    for weights of up to `n_experts` matrices: it is checked once, on entry (one host sync, as one call's check).

    For a mixture-of-experts block whose expert products all route by one index tensor (SwitchGLU: three, a
    transformers experts module: two): one sync instead of one a product. The block's calls run in order on one
    stream and none writes the indices, so what was checked is what they read. Not for use across calls that let
    other code write the tensor in between."""

    def __init__(self, indices: torch.Tensor, n_experts: int, op: str = "gather_qmm"):
        self.indices, self.n_experts, self.op = indices, n_experts, op

    def __enter__(self) -> None:
        self.before = _CHECKED_INDICES.held
        if self.indices.dtype == torch.int64:  # (other dtypes reach the kernels as new int64 tensors: checked there)
            _check_index_ranges(self.op, [("rhs_indices", self.indices, (self.n_experts,))])
            _CHECKED_INDICES.held = (*self.before, (self.indices, self.n_experts))

    def __exit__(self, *exc) -> None:
        _CHECKED_INDICES.held = self.before


def _already_checked(idx: torch.Tensor, batch: tuple) -> bool:
    return any(idx is held and checks.prod(batch) <= n for held, n in _CHECKED_INDICES.held)


def _check_index_ranges(op: str, given: list[tuple[str, torch.Tensor, tuple]]) -> None:
    """Every index within its flattened batch, read on the host in one transfer (one sync per call; none for indices
    an enclosing `routing_checked` checked).

    A CUDA graph capture cannot read device memory on the host: the check runs eagerly (the warm-up call before a
    capture checks the same routing code) and is skipped while capturing."""
    given = [(name, idx, batch) for name, idx, batch in given if idx.numel() and not _already_checked(idx, batch)]
    if not given or tracing_shapes() or (given[0][1].is_cuda and torch.cuda.is_current_stream_capturing()):
        return
    bounds = torch.stack([b for _, idx, _ in given for b in torch.aminmax(idx)]).tolist()
    for (name, _, batch), lo, hi in zip(given, bounds[0::2], bounds[1::2]):
        size = checks.prod(batch)
        if lo < 0 or hi >= size:
            raise ValueError(
                f"[{op}] {name} holds index {lo if lo < 0 else hi}, out of range for the {size} matrices of the "
                f"flattened batch dims {tuple(batch)}."
            )


def _gather(op, x, wt: _Weight, lhs_indices, rhs_indices, out_dtype, sorted_indices):
    x_batch, w_batch = x.shape[:-2], wt.w.shape[:-2]
    lhs = _indices(op, "lhs_indices", lhs_indices, x_batch, x.device)
    rhs = _indices(op, "rhs_indices", rhs_indices, w_batch, x.device)
    _check_index_ranges(op, [(name, idx, batch) for name, idx, batch, given in (
        ("lhs_indices", lhs, x_batch, lhs_indices), ("rhs_indices", rhs, w_batch, rhs_indices)) if given is not None])
    batch = _broadcast(tuple(lhs.shape), tuple(rhs.shape))
    if batch is None:
        raise ValueError(
            f"[{op}] lhs_indices {tuple(lhs.shape)} and rhs_indices {tuple(rhs.shape)} cannot be broadcast together."
        )
    m = x.shape[-2]
    out = _gathered(
        op, x.reshape(-1, m, wt.k), wt, lhs.expand(batch).reshape(-1), rhs.expand(batch).reshape(-1), out_dtype,
        sorted_indices,
    )
    return out.reshape(*batch, m, wt.n)


def eager_gather_qmm(
    x: torch.Tensor,
    w: torch.Tensor,
    /,
    scales: torch.Tensor,
    biases: torch.Tensor | None = None,
    lhs_indices: torch.Tensor | None = None,
    rhs_indices: torch.Tensor | None = None,
    transpose: bool = True,
    group_size: int | None = None,
    bits: int | None = None,
    mode: str = "affine",
    global_scale: torch.Tensor | None = None,
    *,
    sorted_indices: bool = False,
) -> torch.Tensor:
    """Quantized matmul with matrix-level gathers (mixture of experts), MLX's rules.

    lhs_indices / rhs_indices are flat indices into the flattened batch dims of x and w (default: all of them in
    order), broadcast together; out.shape = broadcast(lhs, rhs).shape + (M, N) and
    out[i] = x_flat[lhs[i]] @ dequantize(w_flat[rhs[i]]) (.T). `sorted_indices` is a speed hint only. `global_scale`
    (nvfp4) is one float32 per expert, shape (E,), or one for all.
    """
    op = "gather_qmm"
    n_experts = checks.prod(w.shape[:-2]) if isinstance(w, torch.Tensor) else 1
    wt, out_dtype = _checked(op, x, w, scales, biases, transpose, group_size, bits, mode, global_scale,
                             (1, n_experts), min_ndim=2)
    if lhs_indices is None and rhs_indices is None:
        return _matmul(op, x, wt, out_dtype)
    key = bound = None
    if lhs_indices is None:  # routed experts: a bound decode product may serve the call
        key, bound = _bound_product(_routed_key, x, wt, rhs_indices, bool(sorted_indices))
    if bound is not None and bound is not _UNSEEN:
        _check_index_ranges(op, [("rhs_indices", rhs_indices, wt.w.shape[:-2])])
        out = bound(x, wt.w, wt.scales, wt.biases, wt.global_scale, rhs_indices)
        if out is not None:
            return out
    out = _gather(op, x, wt, lhs_indices, rhs_indices, out_dtype, bool(sorted_indices))
    if bound is _UNSEEN:
        _remember(key, _bind_routed(op, x, wt, rhs_indices, out_dtype))
    return out


def _routed_key(x, wt: _Weight, rhs, sorted_indices: bool) -> tuple:
    """_product_key's facts for a gather_qmm call with rhs_indices only (routed experts), the routing's included."""
    return ("gather_qmm", rhs.shape, rhs.stride(), rhs.dtype, rhs.device, sorted_indices,
            *_product_key(x, wt.w, wt.scales, wt.biases, wt.transpose, wt.group_size, wt.bits, wt.spec.name,
                          wt.global_scale))


def _bind_routed(op: str, x: torch.Tensor, wt: _Weight, rhs: torch.Tensor, out_dtype: torch.dtype):
    """The backend's prepared decode product for later routed calls with the facts of this one, or None: the
    backend has none; w is not one stack of experts; the routing is not one contiguous int64 tensor of the
    broadcast shape; a gradient is wanted; or scratch is per call (a capture, a compiled graph: the items' x order
    kept here must not live in a graph's memory)."""
    if (wt.w.ndim != 3 or rhs.dtype != torch.int64 or not rhs.is_contiguous() or workspace_per_call()
            or not _grad_free(x, wt) or (x.is_cuda and torch.cuda.is_current_stream_capturing())):
        return None
    bind = getattr(backend_for(op, x.device), "bind_gather", None)
    x_batch, m = tuple(x.shape[:-2]), x.shape[-2]
    if bind is None or _broadcast(x_batch, tuple(rhs.shape)) != tuple(rhs.shape):
        return None
    x3 = x.reshape(-1, m, wt.k)
    if x3.data_ptr() != x.data_ptr():  # (a copy)
        return None
    lhs = torch.arange(checks.prod(x_batch), device=x.device).reshape(x_batch).expand(rhs.shape).reshape(-1)
    g = None if wt.global_scale is None else wt.global_scale.reshape(-1).expand(wt.w.shape[0])
    return bind(x3, wt.w, wt.scales, wt.biases, g, lhs.contiguous(), (*rhs.shape, m, wt.n), wt.transpose,
                wt.spec.name, wt.group_size, wt.bits, out_dtype)


def _quantized_activations(op, x, wt: _Weight, global_scale_x) -> tuple[torch.Tensor, _Weight]:
    """(quantize-dequantize of x, the weight with x's tensor scale folded into its own).

    The activations come back without their tensor scale, each a code times its block scale: exact in bfloat16 (an
    e2m1 or e4m3 code times a power of two or an e4m3 scale), so the matmul runs on bfloat16 operands whatever x's
    dtype, and float16 activations cannot overflow. x's tensor factor global_scale_x / 2688 multiplies the weight's
    in the float32 accumulator, before the cast to x's dtype. NaN/Inf propagate as NaN groups (activations never
    raise)."""
    if x.shape[-1] % wt.group_size:
        raise ValueError(
            f"[{op}] The last dimension of x ({x.shape[-1]}) must be divisible by the group size {wt.group_size}."
        )
    backend = backend_for(op, x.device)
    x_hat = backend.fake_quantize(x, wt.spec.name, wt.group_size, wt.bits, global_scale_x, torch.bfloat16)
    if global_scale_x is not None:
        wt = replace(wt, global_scale=wt.global_scale.float() * tensor_decode_scale(global_scale_x))
    return x_hat, wt


def _activation_weight(op, w, scales, group_size, bits, mode, global_scale_x, global_scale_w, n_scale):
    if mode not in FP_ACTIVATION_MODES:
        raise ValueError(
            f"[{op}] Activation quantization supports modes {', '.join(FP_ACTIVATION_MODES)} but got {mode!r}; "
            f"use quantized_matmul for affine weights."
        )
    _, gs, b = resolve_params(op, mode, group_size, bits)
    if (global_scale_x is None) != (global_scale_w is None):
        given = "global_scale_x" if global_scale_w is None else "global_scale_w"
        raise ValueError(
            f"[{op}] global_scale_x and global_scale_w must be given together (both or neither) but only {given} was."
        )
    checks.check_global_scale(op, mode, global_scale_x, 1, "global_scale_x")
    checks.check_global_scale(op, mode, global_scale_w, n_scale, "global_scale_w")
    checks.check_tensor(op, "w", w)
    if w.dtype != torch.uint32:  # a float weight is quantized on the fly
        checks.check_float(op, "w", w)
        if scales is not None:
            raise ValueError(f"[{op}] scales must be None when w is not quantized (w has dtype {w.dtype}).")
        checks.check_group_divisible(op, w, gs)
        if global_scale_w is not None and global_scale_w.numel() > 1:
            raise ValueError(f"[{op}] A float w is quantized with one global_scale_w; got {global_scale_w.numel()}.")
        w, scales = eager_quantize(w, gs, b, mode, global_scale=global_scale_w)
    elif scales is None:
        raise ValueError(f"[{op}] scales must be provided when w is quantized (uint32).")
    return w, scales, gs, b


class _StraightThrough(torch.autograd.Function):
    """An activation-quantized product whose gradients treat quantization as the identity (the straight-through
    estimator of quantization-aware training): dL/dx = g @ w_hat and dL/dw = g^T @ x_hat, where x_hat and w_hat
    are the quantize-dequantized operands the product multiplied. `product(x)` returns (out, x_hat); `w_hat()` the
    weight's values."""

    @staticmethod
    def forward(ctx, x, w, product, w_hat):
        out, x_hat = product(x)
        ctx.save_for_backward(x_hat, w_hat())
        ctx.dtypes = (x.dtype, w.dtype)
        return out

    @staticmethod
    def backward(ctx, grad):
        x_hat, w_hat = ctx.saved_tensors
        g = grad.float()
        grad_x = (g @ w_hat).to(ctx.dtypes[0]) if ctx.needs_input_grad[0] else None
        grad_w = None
        if ctx.needs_input_grad[1]:
            x_hat = x_hat.reshape(-1, x_hat.shape[-1]).float()
            grad_w = (g.reshape(-1, g.shape[-1]).T @ x_hat).to(ctx.dtypes[1])
        return grad_x, grad_w, None, None


def _wants_grad(op, x, w, scales, global_scale_x) -> bool:
    """Whether the call needs the straight-through gradient (x or a float w requires grad); what it cannot give
    is refused: gradients for scales (MLX refuses them for fp modes) and with tensor scales."""
    if not torch.is_grad_enabled():
        return False
    if isinstance(scales, torch.Tensor) and scales.requires_grad:
        raise ValueError(f"[{op}] Gradients are supported with respect to x and a float w only, but scales "
                         f"requires grad.")
    wants = x.requires_grad or (isinstance(w, torch.Tensor) and w.requires_grad)
    if wants and global_scale_x is not None:
        raise ValueError(f"[{op}] Gradients with tensor scales (global_scale_x / global_scale_w) are not supported.")
    return wants


def eager_qqmm(
    x: torch.Tensor,
    w: torch.Tensor,
    scales: torch.Tensor | None = None,
    group_size: int | None = None,
    bits: int | None = None,
    mode: str = "nvfp4",
    global_scale_x: torch.Tensor | None = None,
    global_scale_w: torch.Tensor | None = None,
) -> torch.Tensor:
    """x @ w.T with x quantized on the fly in w's mode (nvfp4, mxfp8, mxfp4); w quantized (uint32 + scales) or float.

    Equals quantize-dequantize(x) @ dequantize(w).T accumulated in float32, for any M; output dtype x.dtype. Global
    scales (nvfp4) are given both or neither and are applied (MLX's CPU ignores them).
    """
    op = "qqmm"
    checks.check_float(op, "x", x)
    wants_grad = _wants_grad(op, x, w, scales, global_scale_x)
    w_given = w
    w, scales, gs, b = _activation_weight(op, w.detach() if isinstance(w, torch.Tensor) else w, scales, group_size,
                                          bits, mode, global_scale_x, global_scale_w, 1)
    if w.ndim != 2:
        raise ValueError(f"[{op}] w must be a 2-D matrix but got shape {tuple(w.shape)}; use gather_qqmm for experts.")
    wt = _weight(op, w, scales, None, True, gs, b, mode, global_scale_w)
    _check_x(op, x, wt)
    checks.check_same_device(op, global_scale_x=global_scale_x, x=x)

    def product(x):
        x_hat, wt_x = _quantized_activations(op, x, wt, global_scale_x)
        return _matmul(op, x_hat, wt_x, x.dtype), x_hat

    if wants_grad:  # (no tensor scales here: x_hat is the whole quantize-dequantized x)
        return _StraightThrough.apply(
            x, w_given, product, lambda: eager_dequantize(w, scales, None, gs, b, mode, None, torch.float32))
    return product(x)[0]


def eager_gather_qqmm(
    x: torch.Tensor,
    w: torch.Tensor,
    /,
    scales: torch.Tensor | None = None,
    lhs_indices: torch.Tensor | None = None,
    rhs_indices: torch.Tensor | None = None,
    group_size: int | None = None,
    bits: int | None = None,
    mode: str = "nvfp4",
    global_scale_x: torch.Tensor | None = None,
    global_scale_w: torch.Tensor | None = None,
    *,
    sorted_indices: bool = False,
) -> torch.Tensor:
    """gather_qmm with x quantized on the fly in w's mode: the MoE form of qqmm (MLX's CPU has none)."""
    op = "gather_qqmm"
    checks.check_float(op, "x", x)
    n_experts = checks.prod(w.shape[:-2]) if isinstance(w, torch.Tensor) else 1
    w, scales, gs, b = _activation_weight(
        op, w, scales, group_size, bits, mode, global_scale_x, global_scale_w, (1, n_experts)
    )
    wt = _weight(op, w, scales, None, True, gs, b, mode, global_scale_w, (1, n_experts))
    _check_x(op, x, wt, min_ndim=2)
    checks.check_same_device(op, global_scale_x=global_scale_x, x=x)
    if torch.is_grad_enabled() and x.requires_grad:
        raise ValueError(f"[{op}] gather_qqmm has no gradient; use gather_qmm to train.")
    x_hat, wt = _quantized_activations(op, x, wt, global_scale_x)
    if lhs_indices is None and rhs_indices is None:
        return _matmul(op, x_hat, wt, x.dtype)
    return _gather(op, x_hat, wt, lhs_indices, rhs_indices, x.dtype, bool(sorted_indices))
