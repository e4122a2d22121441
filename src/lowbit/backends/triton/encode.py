"""Device-side encoding of MLX's formats, shared by the quantize kernels: the numerics of lowbit.formats' quantize
functions written as @triton.jit helpers, bit for bit.

Everything is float32 or integer arithmetic whose rounding is spelled out: true divisions are `tl.math.div_rn` (Triton's
`/` on float32 is an approximate division on the GPU), round-half-to-even is built from floor, and the fp8 and
power-of-two encodings are integer manipulations of the float's bits, so the interpreter and the GPU agree.
"""

import triton
import triton.language as tl

from .decode import float_of_bits

_ROUND_MAGIC = tl.constexpr(12582912.0)  # 1.5 * 2**23


@triton.jit
def _as_bits(value):
    return value.to(tl.float32).to(tl.int32, bitcast=True)


@triton.jit
def round_half_even(v):
    """float32 -> the nearest integer, ties to even (torch.round), as float32; exact for every float32."""
    f = tl.floor(v)
    d = v - f  # exact wherever it decides anything (see the tests' sweep of every tie and its neighbours)
    f_odd = (f - 2.0 * tl.floor(f * 0.5)) != 0.0
    r = f + tl.where((d > 0.5) | ((d == 0.5) & f_odd), 1.0, 0.0)
    return tl.where(tl.abs(v) >= 8388608.0, v, r)  # from 2**23 on every float32 is an integer


@triton.jit
def group_min_keeping_first_zero(g, pos, GS: tl.constexpr):
    """Each group's min of a quantize tile g (V, R, G, VEC) -> (R, G), with MLX's sign of zero: a minimum of zero
    takes the sign of the group's first zero, as a sequential min does (lowbit.formats.affine). `pos` is each
    value's place in its group."""
    lo = tl.min(tl.min(g, axis=3), axis=0)
    first = tl.min(tl.min(tl.where(g == 0.0, pos, GS), axis=3), axis=0)
    sign = tl.where(pos == first[None, :, :, None], (_as_bits(g) >> 31) & 1, 0)
    negative = tl.max(tl.max(sign, axis=3), axis=0)
    return tl.where(lo == 0.0, float_of_bits(negative << 31), lo)


@triton.jit
def affine_params(lo, hi, BITS: tl.constexpr):
    """A group's float32 (min, max) -> float32 (scale, bias) by MLX's rule (lowbit.formats.affine)."""
    if BITS == 1:
        return tl.maximum(hi - lo, 1e-7), lo
    else:
        n = (1 << BITS) - 1
        scale = tl.maximum(tl.math.div_rn(hi - lo, tl.full(lo.shape, n, tl.float32)), 1e-7)
        edge_is_min = tl.abs(lo) > tl.abs(hi)
        edge = tl.where(edge_is_min, lo, hi)
        scale = tl.where(edge_is_min, scale, -scale)
        q0 = round_half_even(tl.math.div_rn(edge, scale))
        exact_edge = q0 != 0.0
        scale = tl.where(exact_edge, tl.math.div_rn(edge, tl.where(exact_edge, q0, 1.0)), scale)
        bias = tl.where(exact_edge, edge, 0.0)
        return scale, bias


@triton.jit
def divide(a, s, inv_s, FAST: tl.constexpr):
    """a / s rounded to nearest even (tl.math.div_rn's bits), given inv_s = div_rn(1, s) of the divisor.

    FAST (the GPU): two remainder corrections of a * inv_s by fma, five instructions instead of div_rn's sequence and
    its range check: the first correction leaves the quotient within an ulp, and from a quotient within an ulp and a
    correctly rounded reciprocal the second gives the correctly rounded quotient (Markstein's theorem), provided no
    intermediate overflows or underflows (`fast_division_safe`). The interpreter's fma rounds twice: it divides."""
    if FAST:
        q = a * inv_s
        q = tl.fma(tl.fma(-q, s, a), inv_s, q)
        return tl.fma(tl.fma(-q, s, a), inv_s, q)
    else:
        return tl.math.div_rn(a, s)


@triton.jit
def fast_division_safe(a_max, s, inv_s):
    """True where `divide` with FAST gives div_rn's bits for every a with 2**-100 <= |a| <= a_max: no intermediate
    overflows or underflows (2**-60 <= |s| < 2**100, |a / s| < 2**100). Smaller |a| give quotients below 2**-40
    within a few ulps, which round to code 0 either way."""
    return (a_max * tl.abs(inv_s) < 1.2676506002282294e30) & (tl.abs(s) < 1.2676506002282294e30) & (
        tl.abs(s) >= 8.673617379884035e-19)


@triton.jit
def divide_tile(a, s, inv_s, safe, INTERPRET: tl.constexpr):
    """div_rn(a, s) over a tile: the values a, their groups' divisors s and inv_s = div_rn(1, s) (broadcast to a).
    The fast division if every group of the tile is `safe` (fast_division_safe, or its result unused), else div_rn:
    one branch per tile; only extreme scales take the slow one."""
    if INTERPRET:
        q = divide(a, s, inv_s, False)
    else:
        if tl.min(safe.to(tl.int32)) == 1:
            q = divide(a, s, inv_s, True)
        else:
            q = divide(a, s, inv_s, False)
    return q


@triton.jit
def affine_codes(quotient, BITS: tl.constexpr):
    """(g - b) / s, float32 -> int32 codes clamp(round((g - b) / s)), round half to even.

    Adding 1.5 * 2**23 rounds |quotient| < 2**22 to an integer (ties to even) held in the low mantissa bits; larger
    quotients land outside the clamp either way. The clamp stays in float and the code is read off the bits: no
    float -> int conversion (a quarter-rate instruction)."""
    shifted = tl.minimum(tl.maximum(quotient + _ROUND_MAGIC, _ROUND_MAGIC), _ROUND_MAGIC + ((1 << BITS) - 1))
    return _as_bits(shifted) - 0x4B400000


@triton.jit
def e8m0_exponent_ceil(s):
    """ceil(log2(s)) with the logarithm rounded to float32 (lowbit.formats.codecs.e8m0_exponent_ceil), for finite
    s >= 0 (0 for s == 0), as int32, with integer arithmetic only.

    Write s = 2**e * (1 + k / 2**23). For k = 0 the answer is e. Otherwise log2(s) lies in (e, e + 1) and its
    float32 rounding is e exactly when log2(1 + k / 2**23) is below half the float32 spacing next to e, T = 2**q;
    that holds when k < 2**(23 + q) * ln 2 (a bound never within 0.09 of an integer, so the first-order logarithm
    decides exactly); else the rounding lies above e and the ceiling is e + 1."""
    subnormal = s < 1.1754943508222875e-38
    bits = _as_bits(tl.where(subnormal, s * 18446744073709551616.0, s))  # times 2**64: normal, exact
    e = ((bits >> 23) & 0xFF) - 127 - tl.where(subnormal, 64, 0)
    k = bits & 0x7FFFFF
    ae = tl.abs(e)
    p = ((_as_bits(ae.to(tl.float32)) >> 23) & 0xFF) - 127  # floor(log2(|e|)) for |e| >= 1
    power_of_two = (ae & (ae - 1)) == 0
    q = tl.where((e < 0) & power_of_two, p - 25, p - 24)  # below a power of two the float32 spacing halves
    bound = 0.6931471805599453 * float_of_bits((23 + q + 127) << 23)
    rounds_to_e = (k == 0) | ((e != 0) & (k.to(tl.float32) < bound))
    exponent = tl.where(rounds_to_e, e, e + 1)
    return tl.where(s == 0.0, 0, exponent)


@triton.jit
def power_of_two(exponent):
    """2**exponent in float32 for int32 exponent in [-127, 127] (exact: 2**-127 is the subnormal 0x00400000)."""
    return tl.where(exponent < -126, 5.877471754111438e-39, float_of_bits((exponent + 127) << 23))


@triton.jit
def e2m1_encode(q):
    """float32 -> e2m1 nibble (int32): round half to even, saturate at 6, sign only on a non-zero code. q must not
    be NaN (codecs.e2m1_encode maps it to 0; the quantize kernel zeroes non-finite groups before encoding).

    From 1 on (the normal codes) the float's bits are rounded to one mantissa bit, as e4m3_encode's integer path
    does to three; below 1, 2 * |q| is rounded to 0, 1 or 2 (codes 0, 0.5, 1.0) by adding 1.5 * 2**23."""
    a = tl.abs(q)
    bits = _as_bits(tl.minimum(a, 6.0))
    normal = ((bits + 0x1FFFFF + ((bits >> 22) & 1)) >> 22) - 252  # 1.0 (0x3F800000) is code 2
    small = _as_bits(a * 2.0 + _ROUND_MAGIC) - 0x4B400000
    idx = tl.where(a < 1.0, small, normal)
    return idx | tl.where((q < 0) & (idx > 0), 8, 0)


@triton.jit
def e4m3_encode(x, HARDWARE: tl.constexpr):
    """float32 -> e4m3fn byte (int32): clamp to +-448, round half to even, the sign always kept (-0 -> 0x80);
    NaN and +-inf -> 0x7F with their sign (lowbit.formats.codecs.e4m3_encode).

    HARDWARE (the GPU, sm_89 on): the saturating conversion instruction, two values at a time, which rounds the
    same way; only +-inf need fixing (it saturates them to 448). Else integer arithmetic on the float's bits."""
    sign = (_as_bits(x) >> 24) & 0x80
    finite = tl.abs(x) < float("inf")
    if HARDWARE:
        code = tl.inline_asm_elementwise(
            "{ .reg .b16 pair; cvt.rn.satfinite.e4m3x2.f32 pair, $3, $2; cvt.u32.u16 $0, pair; "
            "shr.u32 $1, $0, 8; and.b32 $0, $0, 255; }",
            "=r,=r,r,r", [x.to(tl.float32)], dtype=tl.int32, is_pure=True, pack=2)
        return tl.where(finite, code, 0x7F | sign)
    else:
        a = tl.minimum(tl.abs(x), 448.0)
        bits = _as_bits(a)
        normal = ((bits + 0x7FFFF + ((bits >> 20) & 1)) >> 20) - (120 << 3)  # 3 mantissa bits, exponent bias 7
        subnormal = round_half_even(a * 512.0).to(tl.int32)  # multiples of 2**-9 (8 is the smallest normal)
        code = tl.where(a < 0.015625, subnormal, normal)
        return tl.where(finite, code, 0x7F) | sign
