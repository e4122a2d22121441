"""The formats: the specification in code. Pure torch, no device-specific code, no argument validation.

`quantize` and `dequantize` here take already-validated parameters; `lowbit.ops` is the user-facing layer.
"""

from __future__ import annotations

import torch

from .affine import dequantize_affine, quantize_affine
from .mx import dequantize_mx, quantize_mx
from .nvfp4 import (
    dequantize_nvfp4,
    global_scale_from_compressed_tensors,
    global_scale_from_modelopt,
    global_scale_to_modelopt,
    quantize_nvfp4,
)
from .packing import pack_bits, packed_words, unpack_bits
from .params import MODES, ModeSpec, bits_per_weight, mode_spec, resolve_params

__all__ = [
    "MODES", "ModeSpec", "bits_per_weight", "mode_spec", "resolve_params", "pack_bits", "unpack_bits",
    "packed_words", "quantize_groups", "dequantize_groups", "global_scale_from_modelopt",
    "global_scale_from_compressed_tensors", "global_scale_to_modelopt",
]


def quantize_groups(
    w: torch.Tensor, mode: str, group_size: int, bits: int, global_scale: torch.Tensor | None = None
) -> tuple[torch.Tensor, ...]:
    """w (..., K) -> (w_q, scales, biases) for affine, (w_q, scales) otherwise."""
    if mode == "affine":
        return quantize_affine(w, group_size, bits)
    if mode == "nvfp4":
        return quantize_nvfp4(w, global_scale)
    return quantize_mx(w, mode)


def dequantize_groups(
    w_q: torch.Tensor,
    scales: torch.Tensor,
    biases: torch.Tensor | None,
    mode: str,
    group_size: int,
    bits: int,
    dtype: torch.dtype,
    global_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """Packed (w_q, scales[, biases]) -> values (..., K) in `dtype`, bit-exact with MLX."""
    if mode == "affine":
        return dequantize_affine(w_q, scales, biases, group_size, bits, dtype)
    if mode == "nvfp4":
        return dequantize_nvfp4(w_q, scales, dtype, global_scale)
    return dequantize_mx(w_q, scales, mode, dtype)
