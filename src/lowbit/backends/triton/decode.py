"""Device-side decoding of MLX's packed formats, shared by the Triton kernels: the numerics of lowbit.formats
written as @triton.jit helpers (bit extraction, e2m1 / e4m3 / e8m0 decoding, affine rescale)."""

import triton
import triton.language as tl


@triton.jit
def extract_codes(w_ptr, row, code_index, row_stride, word_stride, mask, BITS: tl.constexpr):
    """The BITS-bit code number `code_index` of row `row` in MLX's LSB-first stream of uint32 words (read as int32).

    3-, 5- and 6-bit codes may straddle two words; they are read as one 64-bit window.
    """
    bit = code_index * BITS
    base = w_ptr + row * row_stride
    lo = tl.load(base + (bit >> 5) * word_stride, mask=mask, other=0).to(tl.uint32, bitcast=True)
    shift = (bit & 31).to(tl.uint32)
    if BITS == 3 or BITS == 5 or BITS == 6:
        hi = tl.load(base + ((bit + BITS - 1) >> 5) * word_stride, mask=mask, other=0).to(tl.uint32, bitcast=True)
        window = lo.to(tl.uint64) | (hi.to(tl.uint64) << 32)
        return ((window >> shift.to(tl.uint64)) & ((1 << BITS) - 1)).to(tl.int32)
    else:
        return ((lo >> shift) & ((1 << BITS) - 1)).to(tl.int32)


@triton.jit
def _float_bits(bits):
    return bits.to(tl.int32).to(tl.float32, bitcast=True)


@triton.jit
def e2m1_value(code):
    """e2m1 nibble -> float32: +-{0, .5, 1, 1.5, 2, 3, 4, 6}, built from its bits (exact, no exp2)."""
    exponent = (code >> 1) & 3
    mantissa = code & 1
    normal = _float_bits(((exponent + 126) << 23) | (mantissa << 22))
    magnitude = tl.where(exponent == 0, mantissa.to(tl.float32) * 0.5, normal)
    return tl.where((code & 8) != 0, -magnitude, magnitude)


@triton.jit
def e4m3_value(code):
    """e4m3fn byte -> float32 (0x7F / 0xFF are NaN), built from its bits."""
    exponent = (code >> 3) & 15
    mantissa = code & 7
    normal = _float_bits(((exponent + 120) << 23) | (mantissa << 20))
    magnitude = tl.where(exponent == 0, mantissa.to(tl.float32) * 0.001953125, normal)
    magnitude = tl.where((code & 127) == 127, float("nan"), magnitude)
    return tl.where((code & 128) != 0, -magnitude, magnitude)


@triton.jit
def e8m0_value(code):
    """e8m0 byte -> float32 2**(b - 127); byte 0 is 2**-127 and 255 is +inf, as MLX."""
    return tl.where(code == 0, 5.877471754111438e-39, _float_bits(code << 23))


@triton.jit
def round_to(value, DTYPE: tl.constexpr):
    """Round float32 `value` to DTYPE (nearest, ties to even), kept in float32.

    bfloat16 is rounded with integer arithmetic: the interpreter's float32 -> bfloat16 cast truncates, and this
    gives the GPU's bits on both."""
    if DTYPE == tl.bfloat16:
        bits = value.to(tl.int32, bitcast=True)
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) & -65536
        return tl.where(value != value, value, rounded.to(tl.float32, bitcast=True))
    elif DTYPE == tl.float16:
        return value.to(tl.float16).to(tl.float32)
    else:
        return value
