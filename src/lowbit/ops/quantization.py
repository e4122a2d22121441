"""quantize, dequantize, to_fp8, from_fp8: MLX 0.32.4's signatures, defaults and return structure on torch tensors."""

from __future__ import annotations

import torch

from ..backends import backend_for, tracing_shapes
from ..formats import codecs, resolve_params
from . import checks


def eager_quantize(
    w: torch.Tensor,
    /,
    group_size: int | None = None,
    bits: int | None = None,
    mode: str = "affine",
    *,
    global_scale: torch.Tensor | None = None,
    nonfinite: str = "raise",
) -> tuple[torch.Tensor, ...]:
    """Quantize w (..., K) along its last axis in groups.

    Returns (w_q, scales, biases) for affine and (w_q, scales) for mxfp4 / mxfp8 / nvfp4, exactly as MLX.
    Defaults: affine group_size 64 bits 4; mxfp4 32/4; mxfp8 32/8; nvfp4 16/4. `global_scale` (nvfp4 only) is the
    float32 tensor scale in MLX's convention (the tensor's amax). A NaN or Inf in w raises a ValueError saying where
    (nonfinite="raise", default); nonfinite="nan" instead stores the groups holding them so they dequantize to NaN.
    """
    op = "quantize"
    checks.check_float(op, "w", w)
    spec, gs, b = resolve_params(op, mode, group_size, bits)
    checks.check_group_divisible(op, w, gs)
    checks.check_global_scale(op, mode, global_scale)
    checks.check_same_device(op, w=w, global_scale=global_scale)
    checks.check_nonfinite_option(op, nonfinite)
    out = backend_for(op, w.device).quantize(w, mode, gs, b, global_scale)
    if nonfinite == "raise" and not tracing_shapes() and not _groups_look_finite(mode, out):
        checks.check_finite(op, "w", w)  # w itself decides, and the message points at the first NaN/Inf
    return out


def _groups_look_finite(mode: str, out: tuple[torch.Tensor, ...]) -> bool:
    """False when some group was stored as non-finite (NaN/Inf scale or bias, the MX / e4m3 NaN scale byte): a
    group holding a NaN or Inf always is. One pass over the scales, not over w (a group of finite values can also
    land here, e.g. an affine range that overflows float32; check_finite on w then lets it through)."""
    if mode == "affine":
        return bool(torch.isfinite(out[1]).all() & torch.isfinite(out[2]).all())
    if mode == "nvfp4":
        return bool(((out[1] & 0x7F) != 0x7F).all())
    return bool((out[1] != 0xFF).all())


def eager_dequantize(
    w: torch.Tensor,
    /,
    scales: torch.Tensor,
    biases: torch.Tensor | None = None,
    group_size: int | None = None,
    bits: int | None = None,
    mode: str = "affine",
    global_scale: torch.Tensor | None = None,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Unpack and rescale quantized w (..., K*bits/32) to (..., K), bit-exact with MLX.

    Default dtype: the promoted dtype of scales and biases for affine, bfloat16 for the fp modes.
    """
    op = "dequantize"
    spec, gs, b = resolve_params(op, mode, group_size, bits)
    checks.check_quantized(op, spec, gs, b, w, scales, biases)
    checks.check_global_scale(op, mode, global_scale)
    checks.check_same_device(op, w=w, scales=scales, biases=biases, global_scale=global_scale)
    if dtype is None:
        dtype = torch.promote_types(scales.dtype, biases.dtype) if spec.has_biases else torch.bfloat16
    checks.check_float_dtype(op, "dtype", dtype)
    return backend_for(op, w.device).dequantize(w, scales, biases, mode, gs, b, dtype, global_scale)


def to_fp8(x: torch.Tensor) -> torch.Tensor:
    """float -> e4m3 bytes (uint8): round half to even, finite overflow saturates to +-448, NaN/Inf -> NaN (0x7F)."""
    checks.check_float("to_fp8", "x", x)
    return codecs.e4m3_encode(x)


def from_fp8(x: torch.Tensor, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """e4m3 bytes (uint8) -> `dtype` (default bfloat16); 0x7F / 0xFF decode to NaN."""
    op = "from_fp8"
    checks.check_tensor(op, "x", x)
    if x.dtype != torch.uint8:
        raise ValueError(f"[{op}] x must be uint8 fp8 (e4m3) codes but got dtype {x.dtype}.")
    checks.check_float_dtype(op, "dtype", dtype)
    return codecs.e4m3_decode(x, dtype)
