"""NVIDIA's nvfp4 as MLX implements it: e2m1 elements, one e4m3 block scale per 16, optional float32 tensor scale.

MLX's tensor scale `global_scale` is the tensor's amax. Quantize multiplies block scales by 2688 / global_scale
(448 * 6: the block scales then use the full e4m3 range) and dequantize multiplies by global_scale / 2688.
The helpers at the bottom convert from the other two conventions in the wild.
"""

from __future__ import annotations

import torch

from . import codecs
from .packing import pack_bits, unpack_bits

GROUP_SIZE = 16
TENSOR_SCALE_RANGE = codecs.E4M3_MAX * codecs.E2M1_MAX  # 2688


def tensor_encode_scale(global_scale: torch.Tensor) -> torch.Tensor:
    """MLX `global_scale` -> the float32 factor that quantize multiplies block scales and elements by: 2688 /
    global_scale, one true division (MLX's arithmetic: 1 / (global_scale / 2688) differs by an ulp at times, which
    moves exact fp4 ties)."""
    g = global_scale.float().reshape(())
    return torch.full_like(g, TENSOR_SCALE_RANGE) / g


def tensor_decode_scale(global_scale: torch.Tensor) -> torch.Tensor:
    """MLX `global_scale` (the tensor amax) -> the float32 factor that block scales are multiplied by on decode."""
    g = global_scale.float().reshape(())
    return g / torch.full_like(g, TENSOR_SCALE_RANGE)  # a true division on every device (see affine.py)


def quantize_nvfp4(
    w: torch.Tensor, global_scale: torch.Tensor | None = None, ties_to_even: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """w (..., K) float -> (w_q uint32 (..., K/8), e4m3 scales uint8 (..., K/16)).

    The tensor scale is taken out of the block scale and of the elements in MLX's order and arithmetic (bit-exact).
    A block holding NaN or +-inf gets the e4m3 NaN scale (0x7F), so it dequantizes to NaN, and codes 0.
    """
    g = w.reshape(*w.shape[:-1], w.shape[-1] // GROUP_SIZE, GROUP_SIZE)
    amax = g.abs().amax(-1)
    s = (amax / torch.full_like(amax, codecs.E2M1_MAX)).float()  # a true division rounded to w's dtype, as MLX
    encode = None if global_scale is None else tensor_encode_scale(global_scale)  # (MLX's arithmetic)
    scale_bytes = codecs.e4m3_encode(s if encode is None else s * encode)
    block_scale = codecs.e4m3_decode(scale_bytes, w.dtype)
    q = (g / block_scale[..., None]).float()  # divided in w's dtype, as MLX
    if encode is not None:
        q = q * encode
    q = torch.where((block_scale == 0)[..., None], torch.zeros_like(q), q)  # empty block: 0/0 -> code 0
    finite = torch.isfinite(g).all(-1)
    q = torch.where(finite[..., None], q, torch.zeros_like(q))
    scale_bytes = torch.where(finite, scale_bytes, torch.full_like(scale_bytes, codecs.E4M3_NAN))
    codes = codecs.e2m1_encode(q, ties_to_even).reshape(w.shape)
    return pack_bits(codes, 4), scale_bytes


def dequantize_nvfp4(
    w_q: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype, global_scale: torch.Tensor | None = None
) -> torch.Tensor:
    """(w_q, e4m3 scales[, tensor scale]) -> values in `dtype`.

    Without a tensor scale the product is rounded once in `dtype`; with one it is computed in float32 (as MLX,
    which returns float32 there) and rounded once to `dtype`.
    """
    compute = dtype if global_scale is None else torch.float32
    codes = unpack_bits(w_q, 4)
    elements = codecs.e2m1_decode(codes, compute)
    g = elements.reshape(*codes.shape[:-1], codes.shape[-1] // GROUP_SIZE, GROUP_SIZE)
    block_scale = codecs.e4m3_decode(scales, compute)
    if global_scale is not None:
        block_scale = block_scale * tensor_decode_scale(global_scale)
    return (g * block_scale[..., None]).reshape(codes.shape).to(dtype)


def global_scale_from_modelopt(weight_scale_2: torch.Tensor) -> torch.Tensor:
    """NVIDIA ModelOpt / torchao `weight_scale_2` (decode scale = amax / 2688) -> MLX `global_scale` (amax)."""
    return (weight_scale_2.float() * TENSOR_SCALE_RANGE).reshape(())


def global_scale_from_compressed_tensors(weight_global_scale: torch.Tensor) -> torch.Tensor:
    """compressed-tensors `weight_global_scale` (encode scale = 2688 / amax) -> MLX `global_scale` (amax)."""
    return (TENSOR_SCALE_RANGE / weight_global_scale.float()).reshape(())


def global_scale_to_modelopt(global_scale: torch.Tensor) -> torch.Tensor:
    """MLX `global_scale` -> ModelOpt `weight_scale_2`."""
    return tensor_decode_scale(global_scale)
