"""OCP MX formats as MLX implements them: mxfp4 (e2m1 elements) and mxfp8 (e4m3 elements), one e8m0 scale per 32.

Scale rule (MLX 0.32.4, "round up" since mlx#4353): s = amax / max_element rounded to w's dtype; the scale is the
smallest power of two >= s, so no element saturates. Elements are w / scale, encoded with round-half-to-even.
A block holding NaN or +-inf gets scale byte 0xFF and codes 0, which MLX's decoder turns into NaN (0 * inf).
"""

from __future__ import annotations

import torch

from . import codecs
from .packing import pack_bits, unpack_bits

ELEMENT_MAX = {"mxfp4": codecs.E2M1_MAX, "mxfp8": codecs.E4M3_MAX}
ELEMENT_BITS = {"mxfp4": 4, "mxfp8": 8}
GROUP_SIZE = 32


def quantize_mx(w: torch.Tensor, mode: str, ties_to_even: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """w (..., K) float -> (w_q uint32 (..., K*bits/32), scales uint8 (..., K/32))."""
    g = w.reshape(*w.shape[:-1], w.shape[-1] // GROUP_SIZE, GROUP_SIZE)
    amax = g.abs().amax(-1)
    s = amax / torch.full_like(amax, ELEMENT_MAX[mode])  # a true division rounded to w's dtype, as MLX (see affine)
    exponent = codecs.e8m0_exponent_ceil(s)
    finite = torch.isfinite(g).all(-1)
    exponent = torch.where(finite, exponent, torch.zeros_like(exponent))
    scale_bytes = codecs.e8m0_encode(exponent)
    q = g.float() * torch.exp2(-(scale_bytes.float() - codecs.E8M0_BIAS))[..., None]  # exact power-of-two scaling
    q = torch.where(finite[..., None], q, torch.zeros_like(q))
    codes = codecs.e2m1_encode(q, ties_to_even) if mode == "mxfp4" else codecs.e4m3_encode(q)
    scale_bytes = torch.where(finite, scale_bytes, torch.full_like(scale_bytes, codecs.E8M0_NAN))
    return pack_bits(codes.reshape(w.shape), ELEMENT_BITS[mode]), scale_bytes


def dequantize_mx(w_q: torch.Tensor, scales: torch.Tensor, mode: str, dtype: torch.dtype) -> torch.Tensor:
    """(w_q, e8m0 scales) -> values in `dtype`: element * 2**(scale - 127), rounded once in `dtype` (as MLX)."""
    codes = unpack_bits(w_q, ELEMENT_BITS[mode])
    elements = codecs.e2m1_decode(codes, dtype) if mode == "mxfp4" else codecs.e4m3_decode(codes, dtype)
    g = elements.reshape(*codes.shape[:-1], codes.shape[-1] // GROUP_SIZE, GROUP_SIZE)
    out = g * codecs.e8m0_decode(scales, dtype)[..., None]
    return out.reshape(codes.shape)
