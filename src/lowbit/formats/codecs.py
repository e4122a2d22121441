"""Element and scale codecs: e2m1 (fp4), e4m3 (fp8 "fn"), e8m0 (power-of-two MX scale).

Pure torch, device-agnostic. Encoders take float32 and return uint8 codes; decoders return the given dtype.
Rounding is round-half-to-even everywhere (the OCP MX spec and MLX's GPU kernels); see docs/deviations.md for the
one place this differs from MLX's CPU fallback (exact fp4 ties).
"""

from __future__ import annotations

import functools

import torch

E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
E2M1_MAX = 6.0
E4M3_MAX = 448.0
E4M3_NAN = 0x7F
E8M0_BIAS = 127
E8M0_NAN = 0xFF

# Magnitude thresholds between consecutive e2m1 values with round-half-to-even at the midpoints:
# `>` where the lower neighbour has the even mantissa, `>=` where the upper one does.
_E2M1_UP_STRICT = (0.25, 1.25, 2.5, 5.0)  # ties go down (to 0, 1, 2, 4)
_E2M1_UP_INCLUSIVE = (0.75, 1.75, 3.5)  # ties go up (to 1, 2, 4)


def e2m1_encode(q: torch.Tensor, ties_to_even: bool = True) -> torch.Tensor:
    """float32 values (already divided by the block scale) -> e2m1 nibbles in uint8.

    Round half to even, saturate at +-6. The sign bit is set only for a non-zero magnitude, so values that round to
    zero give +0 (nibble 0), as MLX does. NaN maps to nibble 0; callers decide about non-finite input beforehand.
    `ties_to_even=False` rounds exact ties toward zero instead: MLX 0.32.4's CPU rule, kept so tests can show that
    exact ties are the only place lowbit and MLX's CPU differ.
    """
    a = q.abs()
    idx = torch.zeros(q.shape, dtype=torch.uint8, device=q.device)
    for t in _E2M1_UP_STRICT:
        idx += a > t
    for t in _E2M1_UP_INCLUSIVE:
        idx += (a >= t) if ties_to_even else (a > t)
    negative = (q < 0) & (idx > 0)
    return idx | (negative.to(torch.uint8) << 3)


@functools.lru_cache(maxsize=None)
def _e2m1_table(dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The 16 e2m1 values on `device`, made once: a host-to-device copy per call would also break CUDA-graph
    capture."""
    return torch.tensor(E2M1_VALUES, dtype=dtype, device=device)


def e2m1_decode(nibbles: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """e2m1 nibbles (any integer dtype, values 0..15) -> values in `dtype` (all e2m1 values are exact in it)."""
    lut = _e2m1_table(dtype, nibbles.device)
    flat = torch.index_select(lut, 0, nibbles.reshape(-1).to(torch.int32))  # int32 indices: cheaper than int64
    return flat.reshape(nibbles.shape)


def e4m3_encode(x: torch.Tensor) -> torch.Tensor:
    """float32 -> e4m3fn bytes: round half to even, finite overflow saturates to +-448.

    NaN and +-inf map to the e4m3 NaN (0x7F, sign kept): a non-finite value never becomes a finite one. (MLX maps
    them to +-448; docs/deviations.md.)
    """
    x = x.float()
    clamped = x.clamp(-E4M3_MAX, E4M3_MAX)
    codes = clamped.to(torch.float8_e4m3fn).view(torch.uint8)
    nonfinite = ~torch.isfinite(x)
    if nonfinite.any():
        nan_code = torch.where(torch.signbit(x), 0x80 | E4M3_NAN, E4M3_NAN).to(torch.uint8)
        codes = torch.where(nonfinite, nan_code, codes)
    return codes


def e4m3_decode(codes: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """e4m3fn bytes -> values in `dtype`; 0x7F / 0xFF decode to NaN (MLX 0.32.4)."""
    return codes.to(torch.uint8).view(torch.float8_e4m3fn).to(dtype)


def e8m0_exponent_ceil(s: torch.Tensor) -> torch.Tensor:
    """ceil(log2(s)) with log2 rounded to float32, as MLX computes it; 0 where s == 0.

    The logarithm is taken in float64 and rounded once to float32, which is the correctly rounded float32 log2 on
    every device (float32 log2 implementations differ by an ulp between CPU and CUDA, which can move the ceiling
    when s is just above a power of two)."""
    s = s.float()
    e = torch.ceil(torch.log2(s.double()).float())
    return torch.where(s == 0, torch.zeros_like(e), e)


def e8m0_encode(exponent: torch.Tensor) -> torch.Tensor:
    """Integer power-of-two exponents -> e8m0 bytes, clamped to the finite range [2**-127, 2**127]."""
    return (exponent + E8M0_BIAS).clamp(0, 254).to(torch.uint8)


def e8m0_decode(codes: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """e8m0 bytes -> 2**(b - 127) in `dtype`; byte 0 is 2**-127 and byte 255 decodes to +inf, as MLX does."""
    b = codes.to(torch.int32)
    value = torch.ldexp(torch.ones(b.shape, dtype=torch.float32, device=b.device), (b - E8M0_BIAS).float())
    # float32 cannot hold 2**-127 as a normal number but ldexp gives the exact subnormal; 2**128 overflows to inf.
    return value.to(dtype)
