"""The ops as torch.library custom ops (namespace `lowbit`) and the public functions that call them.

Eagerly, the public functions run the implementations directly: the dispatcher's Python round trip costs more than
the rest of a decode-sized call. Under torch.compile they call `torch.ops.lowbit.*`, which Dynamo keeps as single
opaque nodes (no graph breaks, one graph for every M): the fake implementations run the same Python on fake tensors
with the shapes-only backend (backends/meta.py), and quantized_matmul / gather_qmm carry their gradient with
respect to x.
"""

from __future__ import annotations

import torch

from ..backends import per_call_workspace, shapes_only
from . import checks
from .matmul import eager_gather_qmm, eager_gather_qqmm, eager_qqmm, eager_quantized_matmul
from .quantization import eager_dequantize, eager_quantize

_lib = torch.library.Library("lowbit", "DEF")


def _three(quantized: tuple) -> tuple:
    """A schema returns a fixed number of tensors: the fp modes' missing biases travel as an empty tensor."""
    return quantized if len(quantized) == 3 else (*quantized, quantized[1].new_empty(0))


SCHEMAS = {
    "quantize": "(Tensor w, int? group_size, int? bits, str mode, Tensor? global_scale, str nonfinite) "
                "-> (Tensor, Tensor, Tensor)",
    "dequantize": "(Tensor w, Tensor scales, Tensor? biases, int? group_size, int? bits, str mode, "
                  "Tensor? global_scale, ScalarType? dtype) -> Tensor",
    "quantized_matmul": "(Tensor x, Tensor w, Tensor scales, Tensor? biases, bool transpose, int? group_size, "
                        "int? bits, str mode, Tensor? global_scale) -> Tensor",
    "gather_qmm": "(Tensor x, Tensor w, Tensor scales, Tensor? biases, Tensor? lhs_indices, Tensor? rhs_indices, "
                  "bool transpose, int? group_size, int? bits, str mode, Tensor? global_scale, "
                  "bool sorted_indices) -> Tensor",
    "qqmm": "(Tensor x, Tensor w, Tensor? scales, int? group_size, int? bits, str mode, Tensor? global_scale_x, "
            "Tensor? global_scale_w) -> Tensor",
    "gather_qqmm": "(Tensor x, Tensor w, Tensor? scales, Tensor? lhs_indices, Tensor? rhs_indices, int? group_size, "
                   "int? bits, str mode, Tensor? global_scale_x, Tensor? global_scale_w, "
                   "bool sorted_indices) -> Tensor",
}
EAGER = {
    "quantize": lambda w, gs, b, mode, g, nonfinite: _three(eager_quantize(w, gs, b, mode, global_scale=g,
                                                                           nonfinite=nonfinite)),
    "dequantize": eager_dequantize,
    "quantized_matmul": lambda x, w, s, b, t, gs, bits, mode, g: eager_quantized_matmul(x, w, s, b, t, gs, bits, mode,
                                                                                       global_scale=g),
    "gather_qmm": lambda x, w, s, b, lhs, rhs, t, gs, bits, mode, g, srt: eager_gather_qmm(
        x, w, s, b, lhs, rhs, t, gs, bits, mode, g, sorted_indices=srt),
    "qqmm": eager_qqmm,
    "gather_qqmm": lambda x, w, s, lhs, rhs, gs, bits, mode, gx, gw, srt: eager_gather_qqmm(
        x, w, s, lhs, rhs, gs, bits, mode, gx, gw, sorted_indices=srt),
}


def _register(name: str) -> None:
    _lib.define(name + SCHEMAS[name])
    eager = EAGER[name]

    def real(*args):
        if torch.is_grad_enabled():  # the registered autograd formula owns the gradient
            with torch.no_grad(), per_call_workspace():
                return eager(*args)
        with per_call_workspace():  # (inference: no grad-mode switch, a microseconds saving per call)
            return eager(*args)

    def fake(*args):
        with shapes_only():
            return eager(*args)

    _lib.impl(name, real, "CompositeExplicitAutograd")
    torch.library.register_fake(f"lowbit::{name}", fake, lib=_lib)


for _name in SCHEMAS:
    _register(_name)


def _save_weight(ctx, inputs, output):
    x = inputs[0]
    ctx.x_meta = (x.shape, x.dtype)
    ctx.args = inputs[1:]
    ctx.save_for_backward(*(t for t in inputs[1:] if isinstance(t, torch.Tensor)))


def _weight_args(ctx):
    saved = iter(ctx.saved_tensors)
    return [next(saved) if isinstance(a, torch.Tensor) else a for a in ctx.args]


# The backward formulas call the registered ops (traced by AOTAutograd, which is not Dynamo).
def _quantized_matmul_backward(ctx, grad):
    """dL/dx = grad @ dequantize(w) (the other transpose), summed over the batch dims x was broadcast along."""
    w, scales, biases, transpose, gs, bits, mode, g = _weight_args(ctx)
    shape, dtype = ctx.x_meta
    grad_x = torch.ops.lowbit.quantized_matmul(grad.float(), w, scales, biases, not transpose, gs, bits, mode, g)
    return (grad_x.sum_to_size(shape).to(dtype),) + (None,) * 8


def _gather_qmm_backward(ctx, grad):
    """Per routed item grad[i] @ dequantize(w[rhs[i]]), added into the x matrix it came from (lhs[i])."""
    w, scales, biases, lhs, rhs, transpose, gs, bits, mode, g, _ = _weight_args(ctx)
    shape, dtype = ctx.x_meta
    x_batch, w_batch, m, n = shape[:-2], w.shape[:-2], grad.shape[-2], grad.shape[-1]
    device = grad.device
    if lhs is None:
        lhs = torch.arange(checks.prod(x_batch), device=device).reshape(x_batch)
    if rhs is None:
        rhs = torch.arange(checks.prod(w_batch), device=device).reshape(w_batch)
    batch = torch.broadcast_shapes(lhs.shape, rhs.shape)
    lhs, rhs = lhs.expand(batch).reshape(-1), rhs.expand(batch).reshape(-1)
    items = torch.arange(lhs.shape[0], device=device)
    per_item = torch.ops.lowbit.gather_qmm(grad.reshape(-1, m, n).float(), w, scales, biases, items, rhs,
                                           not transpose, gs, bits, mode, g, False)
    grad_x = torch.zeros((checks.prod(x_batch), m, shape[-1]), dtype=torch.float32, device=device)
    grad_x = grad_x.index_add(0, lhs, per_item).reshape(shape).to(dtype)
    return (grad_x,) + (None,) * 11


torch.library.register_autograd("lowbit::quantized_matmul", _quantized_matmul_backward, setup_context=_save_weight,
                                lib=_lib)
torch.library.register_autograd("lowbit::gather_qmm", _gather_qmm_backward, setup_context=_save_weight, lib=_lib)


def quantize(w, /, group_size=None, bits=None, mode="affine", *, global_scale=None, nonfinite="raise"):
    if torch.compiler.is_compiling():
        out = torch.ops.lowbit.quantize(w, group_size, bits, mode, global_scale, nonfinite)
        return out if mode == "affine" else out[:2]
    return eager_quantize(w, group_size, bits, mode, global_scale=global_scale, nonfinite=nonfinite)


def dequantize(w, /, scales, biases=None, group_size=None, bits=None, mode="affine", global_scale=None, dtype=None):
    if torch.compiler.is_compiling():
        return torch.ops.lowbit.dequantize(w, scales, biases, group_size, bits, mode, global_scale, dtype)
    return eager_dequantize(w, scales, biases, group_size, bits, mode, global_scale, dtype)


def quantized_matmul(x, w, /, scales, biases=None, transpose=True, group_size=None, bits=None, mode="affine", *,
                     global_scale=None):
    if torch.compiler.is_compiling():
        return torch.ops.lowbit.quantized_matmul(x, w, scales, biases, transpose, group_size, bits, mode, global_scale)
    return eager_quantized_matmul(x, w, scales, biases, transpose, group_size, bits, mode, global_scale=global_scale)


def gather_qmm(x, w, /, scales, biases=None, lhs_indices=None, rhs_indices=None, transpose=True, group_size=None,
               bits=None, mode="affine", global_scale=None, *, sorted_indices=False):
    if torch.compiler.is_compiling():
        return torch.ops.lowbit.gather_qmm(x, w, scales, biases, lhs_indices, rhs_indices, transpose, group_size, bits,
                                           mode, global_scale, sorted_indices)
    return eager_gather_qmm(x, w, scales, biases, lhs_indices, rhs_indices, transpose, group_size, bits, mode,
                            global_scale, sorted_indices=sorted_indices)


def qqmm(x, w, scales=None, group_size=None, bits=None, mode="nvfp4", global_scale_x=None, global_scale_w=None):
    if torch.compiler.is_compiling():
        return torch.ops.lowbit.qqmm(x, w, scales, group_size, bits, mode, global_scale_x, global_scale_w)
    return eager_qqmm(x, w, scales, group_size, bits, mode, global_scale_x, global_scale_w)


def gather_qqmm(x, w, /, scales=None, lhs_indices=None, rhs_indices=None, group_size=None, bits=None, mode="nvfp4",
                global_scale_x=None, global_scale_w=None, *, sorted_indices=False):
    if torch.compiler.is_compiling():
        return torch.ops.lowbit.gather_qqmm(x, w, scales, lhs_indices, rhs_indices, group_size, bits, mode,
                                            global_scale_x, global_scale_w, sorted_indices)
    return eager_gather_qqmm(x, w, scales, lhs_indices, rhs_indices, group_size, bits, mode, global_scale_x,
                             global_scale_w, sorted_indices=sorted_indices)


for _public, _eager in ((quantize, eager_quantize), (dequantize, eager_dequantize),
                        (quantized_matmul, eager_quantized_matmul), (gather_qmm, eager_gather_qmm),
                        (qqmm, eager_qqmm), (gather_qqmm, eager_gather_qqmm)):
    _public.__doc__ = _eager.__doc__
