"""MLX affine quantization: b-bit unsigned codes with a per-group scale and bias, w_hat = code * scale + bias.

The rule is MLX 0.32.4's CPU rule, reproduced bit for bit (all arithmetic in float32):
the group's range [min, max] is split into 2**b - 1 steps; the extreme with the larger magnitude ("edge") is made
exactly representable (code 0), and 0.0 too where possible, which makes the scale negative when that edge is the max.
1-bit groups map code 0 to the min and code 1 to the max. Scales and biases are stored in w's dtype.
"""

from __future__ import annotations

import torch

from .packing import pack_bits, unpack_bits

EPS = 1e-7


def _grouped(w: torch.Tensor, group_size: int) -> torch.Tensor:
    return w.reshape(*w.shape[:-1], w.shape[-1] // group_size, group_size)


def _min_keeping_first_zero(g: torch.Tensor, lo: torch.Tensor) -> torch.Tensor:
    """The group minimum with MLX's sign of zero: its sequential min keeps the first of equal values, so a group
    whose minimum is zero gets the sign of its first zero (only the 1-bit bias stores the minimum itself)."""
    first_zero = (g == 0).to(torch.uint8).argmax(-1, keepdim=True)
    return torch.where(lo == 0, torch.gather(g, -1, first_zero).squeeze(-1), lo)


def quantize_affine(w: torch.Tensor, group_size: int, bits: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """w (..., K) float -> (w_q uint32 (..., K*bits/32), scales (..., K/gs), biases (..., K/gs)).

    A group holding NaN or +-inf gets NaN scale and bias (so it dequantizes to NaN) and codes 0.
    """
    g = _grouped(w.float(), group_size)
    n = float(2**bits - 1)
    lo, hi = g.amin(-1), g.amax(-1)
    if bits == 1:
        scale = torch.clamp_min(hi - lo, EPS)
        bias = _min_keeping_first_zero(g, lo)
    else:
        # divide by a tensor: torch on CUDA turns division by a Python number into a multiply by its reciprocal,
        # which rounds differently from MLX's (and the CPU's) true division
        scale = torch.clamp_min((hi - lo) / torch.full_like(hi, n), EPS)
        edge_is_min = lo.abs() > hi.abs()
        edge = torch.where(edge_is_min, lo, hi)
        scale = torch.where(edge_is_min, scale, -scale)
        q0 = torch.round(edge / scale)
        exact_edge = q0 != 0
        scale = torch.where(exact_edge, edge / q0, scale)
        bias = torch.where(exact_edge, edge, torch.zeros_like(edge))
    codes = torch.round((g - bias[..., None]) / scale[..., None]).clamp(0, n)

    scale, bias = scale.to(w.dtype), bias.to(w.dtype)
    finite = torch.isfinite(g).all(-1)
    if not bool(finite.all()):
        nan = _quiet_nan(w.dtype, w.device)
        scale, bias = torch.where(finite, scale, nan), torch.where(finite, bias, nan)
        codes = torch.where(finite[..., None], codes, torch.zeros_like(codes))

    codes = codes.to(torch.uint8).reshape(w.shape)
    return pack_bits(codes, bits), scale, bias


def _quiet_nan(dtype: torch.dtype, device) -> torch.Tensor:
    """The positive quiet NaN of `dtype` from its bits: torch's float32 -> bfloat16 casts give other NaN payloads
    depending on the code path, and stored bytes must not."""
    bits, int_dtype = {torch.float32: (0x7FC00000, torch.int32), torch.float16: (0x7E00, torch.int16),
                       torch.bfloat16: (0x7FC0, torch.int16)}[dtype]
    return torch.tensor(bits, dtype=int_dtype, device=device).view(dtype)


def dequantize_affine(
    w_q: torch.Tensor,
    scales: torch.Tensor,
    biases: torch.Tensor,
    group_size: int,
    bits: int,
    dtype: torch.dtype,
) -> torch.Tensor:
    """w_q (..., W) uint32 -> (..., W*32/bits) in `dtype`.

    As MLX: code * scale + bias with two roundings (no FMA) in the promoted dtype of scales and biases, then cast.
    """
    compute = torch.promote_types(scales.dtype, biases.dtype)
    codes = unpack_bits(w_q, bits)
    g = _grouped(codes, group_size).to(compute)
    out = g * scales.to(compute)[..., None] + biases.to(compute)[..., None]
    return out.reshape(codes.shape).to(dtype)
