"""Argument checks shared by the ops. Every failure is a ValueError that names the op, says what was expected and
what was given."""

from __future__ import annotations

import math

import torch

from ..formats import ModeSpec

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_DTYPE_NAMES = "float16, bfloat16 or float32"


def _shape(t: torch.Tensor) -> str:
    return "(" + ",".join(str(d) for d in t.shape) + ")"


def check_tensor(op: str, name: str, t) -> None:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"[{op}] {name} must be a torch.Tensor but got {type(t).__name__}.")


def check_float(op: str, name: str, t: torch.Tensor) -> None:
    check_tensor(op, name, t)
    if t.dtype not in FLOAT_DTYPES:
        raise ValueError(f"[{op}] {name} must have a floating dtype ({_DTYPE_NAMES}) but got {t.dtype}.")


def check_float_dtype(op: str, name: str, dtype) -> None:
    if dtype not in FLOAT_DTYPES:
        raise ValueError(f"[{op}] {name} must be a floating dtype ({_DTYPE_NAMES}) but got {dtype}.")


def check_same_device(op: str, **tensors) -> None:
    present = {k: v for k, v in tensors.items() if isinstance(v, torch.Tensor)}
    devices = {v.device for v in present.values()}
    if len(devices) > 1:
        where = ", ".join(f"{k} on {v.device}" for k, v in present.items())
        raise ValueError(f"[{op}] All tensors must be on the same device but got {where}.")


def check_group_divisible(op: str, w: torch.Tensor, group_size: int) -> None:
    if w.ndim < 2:
        raise ValueError(
            f"[{op}] The matrix to be quantized must have at least 2 dimensions but it has only {w.ndim}."
        )
    if w.shape[-1] % group_size:
        raise ValueError(
            f"[{op}] The last dimension of the matrix needs to be divisible by the quantization group size "
            f"{group_size}. However the provided matrix has shape {_shape(w)}."
        )


def check_global_scale(op: str, mode: str, global_scale, numel: int | tuple[int, ...] = 1, name="global_scale"):
    """global_scale: nvfp4 only, float32, `numel` elements (an int, or a tuple of allowed counts)."""
    if global_scale is None:
        return
    check_tensor(op, name, global_scale)
    if mode != "nvfp4":
        raise ValueError(f"[{op}] {name} is only supported for nvfp4 quantization but mode is {mode!r}.")
    allowed = (numel,) if isinstance(numel, int) else numel
    if global_scale.dtype != torch.float32 or global_scale.numel() not in allowed:
        want = " or ".join(str(a) for a in allowed)
        raise ValueError(
            f"[{op}] {name} must be a float32 tensor with {want} element(s) but got dtype {global_scale.dtype} "
            f"and shape {_shape(global_scale)}."
        )


def check_finite(op: str, name: str, w: torch.Tensor) -> None:
    """Raise, pointing at the first NaN/Inf, unless every element of w is finite."""
    finite = torch.isfinite(w)
    if bool(finite.all()):
        return
    flat = int((~finite).reshape(-1).nonzero()[0])
    index = tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), w.shape))
    value = w.reshape(-1)[flat].item()
    raise ValueError(
        f"[{op}] {name} has a non-finite value ({value}) at index {index}; quantizing it would hide it. "
        f"Pass nonfinite='nan' to keep the groups that hold NaN/Inf as NaN."
    )


def check_quantized(op: str, spec: ModeSpec, group_size: int, bits: int, w, scales, biases) -> int:
    """Check a packed (w, scales, biases) triple; return the unpacked length of w's last axis."""
    check_tensor(op, "w", w)
    check_tensor(op, "scales", scales)
    if w.dtype != torch.uint32:
        raise ValueError(f"[{op}] The quantized weight w must be uint32 packed codes but got dtype {w.dtype}.")
    if w.ndim < 2:
        raise ValueError(f"[{op}] The quantized weight w must have at least 2 dimensions but got shape {_shape(w)}.")
    if spec.has_biases:
        if biases is None:
            raise ValueError(f"[{op}] Biases must be provided for affine quantization.")
        check_tensor(op, "biases", biases)
        check_float(op, "scales", scales)
        check_float(op, "biases", biases)
        if biases.shape != scales.shape:
            raise ValueError(
                f"[{op}] Scales and biases must have the same shape but got {_shape(scales)} and {_shape(biases)}."
            )
    else:
        if biases is not None:
            raise ValueError(f"[{op}] Biases must be None for {spec.name} quantization but were given.")
        if scales.dtype != torch.uint8:
            raise ValueError(
                f"[{op}] {spec.name} scales must be uint8 ({spec.scale_format} bytes) but got dtype {scales.dtype}."
            )
    cols = w.shape[-1] * 32 // bits
    expected = (*w.shape[:-1], cols // group_size)
    if tuple(scales.shape) != expected or cols % group_size:
        raise ValueError(
            f"[{op}] Scales of shape {_shape(scales)} do not match w of shape {_shape(w)} with group_size={group_size} "
            f"and bits={bits}: expected scales of shape {_shape(torch.empty(expected, device='meta'))}."
        )
    return cols


def check_nonfinite_option(op: str, nonfinite: str) -> None:
    if nonfinite not in ("raise", "nan"):
        raise ValueError(f"[{op}] nonfinite must be 'raise' or 'nan' but got {nonfinite!r}.")


def check_transpose(op: str, transpose) -> None:
    if not isinstance(transpose, bool):
        raise ValueError(f"[{op}] transpose must be a bool but got {transpose!r}.")


def prod(shape) -> int:
    return math.prod(shape)
