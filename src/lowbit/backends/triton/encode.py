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
    if FAST:  # (-s, not -q: fma(q, -s, a) is fma(-q, s, a) exactly, and -s is negated once per group, not per value)
        neg_s = -s
        q = a * inv_s
        q = tl.fma(tl.fma(q, neg_s, a), inv_s, q)
        return tl.fma(tl.fma(q, neg_s, a), inv_s, q)
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
def affine_quotient(g, bias, scale, spread, INTERPRET: tl.constexpr):
    """div_rn(g - bias, scale) of a finite affine group (affine_params' scale and bias; other groups' quotients are
    unused): the values g (V, R, G, VEC), their groups' bias and scale (R, G), `spread` the (R, G) -> g broadcast;
    0 where the scale is infinite (max - min overflowed: the CPU path's quotients are 0, or NaN for 1 bit, whose
    code is 0 there too).

    The group is first scaled by a power of two f, exactly: fma(g, f, -bias * f) is f * (g - bias) rounded once
    (also with the interpreter's two roundings: g * f is exact but where it underflows, and then it is far below
    half an ulp of bias * f, or the quotient is below 2**-100), and (f * a) / (f * s) is a / s. f = 1 for |scale| <
    2**100; 2**-100 for larger finite scales (then |bias * f| >= |scale * f| >= 1 or bias = 0: no underflow); 0 for
    an infinite one (and s = 1). That puts every group where the GPU's fast division is div_rn (`divide`, without
    fast_division_safe's check): affine's scales are above 2**-60 (>= 1e-7 / 2, as edge / round(edge / scale) >
    scale / 2), its quotients at most 2 * (2**bits - 1) + 1 in magnitude, far below 2**100."""
    magnitude = tl.abs(scale)
    f = tl.where(magnitude < 1.2676506002282294e30, 1.0,
                 tl.where(magnitude < float("inf"), 7.888609052210118e-31, 0.0))
    s = tl.where(f == 0.0, 1.0, scale * f)
    a = tl.fma(g, spread(f), spread(-(bias * f)))
    if INTERPRET:
        return tl.math.div_rn(a, spread(s))
    else:
        inv_s = tl.math.div_rn(tl.full(s.shape, 1.0, tl.float32), s)
        return divide(a, spread(s), spread(inv_s), True)


@triton.jit
def affine_codes(quotient, BITS: tl.constexpr):
    """(g - b) / s, float32 -> int32 codes clamp(round((g - b) / s)), round half to even, for the quotients of a
    finite group with affine_params' scale and bias (a non-finite group's codes are replaced by the caller).

    Adding 1.5 * 2**23 rounds |quotient| < 2**22 to an integer (ties to even) held in the low mantissa bits; larger
    quotients land above the clamp either way. The clamp stays in float and the code is read off the bits: no
    float -> int conversion (a quarter-rate instruction). Only the upper clamp is needed: every quotient is >= -1/2,
    so the sum is >= 1.5 * 2**23 (its -1/2 tie rounds to the even 1.5 * 2**23). The scale is > 0 when the edge is
    the min and < 0 when it is the max (edge / round(edge / scale) keeps the sign): with the edge as bias, g - bias
    is 0 or of the scale's sign (one rounding of an exact difference keeps its sign); with bias 0, round(edge /
    scale) == 0 puts edge / scale in [-1/2, 1/2], and g / scale is at or above it (the correctly rounded quotient
    is monotonic in g); 1 bit: g - min >= 0 and the scale > 0 (affine_quotient: no NaN from an infinite scale)."""
    shifted = tl.minimum(quotient + _ROUND_MAGIC, _ROUND_MAGIC + ((1 << BITS) - 1))
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


@triton.jit
def e4m3_value_hardware(code):
    """GPU only (sm_89 on): e4m3fn byte (int32) -> float32, as decode.e4m3_value (0x7F / 0xFF are NaN), by the
    conversion instruction to float16 (which holds every e4m3 value exactly), then to float32."""
    return tl.inline_asm_elementwise(
        "{ .reg .b16 byte, lo, hi; .reg .b32 pair; cvt.u16.u32 byte, $1; cvt.rn.f16x2.e4m3x2 pair, byte; "
        "mov.b32 {lo, hi}, pair; cvt.f32.f16 $0, lo; }",
        "=r,r", [code], dtype=tl.float32, is_pure=True, pack=1)


# The e2m1 word encoder of bfloat16 weights on the GPU (`e2m1_words_bf16`): eight values a PTX block, two a 32-bit
# register from the conversion to bfloat16 on. Per pair of values (lanes lo, hi of a register; value 2k in lo):
#   b = |bf16(q)| clamped to 6 (the lane's bits, unsigned min); E = max(b's exponent bits, those of 1.0);
#   M = 2**(e + 6) (E + 6 << 7): bf16(b + M) rounds b to a multiple of 2**(e - 1), e2m1's spacing in b's binade
#   (0.5 below 2), ties to even (M's bits end in zeros, so the sum's last bit is the rounded value's), and the sum
#   stays in M's binade, so S - M = rounded b / 2**(e - 1) in 0..4; the code is that plus 2 * max(e, 0).
#   The lanes never carry into each other where it matters: each lane's result lies in 0..15, so the 32-bit sums
#   and differences equal the lanes' own (a borrow taken in one step is paid back in another).
#   The sign (bit 3) is q's sign where b > 0.25 (b + 0x417F reaches bit 15 exactly from 0x3E81 on), i.e. where the
#   code is not 0.
# Then the four pairs are packed into one little-endian word of eight nibbles (value j at bits 4j).
# With a tensor scale (`e2m1_words_bf16_scaled`) the lanes' bfloat16 values p are widened, multiplied by the encode
# factor in float32 (q = p * encode rounded once, the CPU path's product) and brought back to bfloat16 rounded to
# odd (truncated, the last bit set where that dropped anything: the two products' low halves side by side, each
# lane min'ed with 1): rounding that to e2m1 (which keeps at most 2 significant bits, bfloat16 8) gives e2m1(q)
# itself, never a tie that q was not (the round-to-odd property).
_E2M1_PRODUCTS = """mul.rn.f32 q0, $8, $16;
mul.rn.f32 q1, $9, $17;
mul.rn.f32 q2, $10, $18;
mul.rn.f32 q3, $11, $19;
mul.rn.f32 q4, $12, $20;
mul.rn.f32 q5, $13, $21;
mul.rn.f32 q6, $14, $22;
mul.rn.f32 q7, $15, $23;
cvt.rn.bf16x2.f32 p0, q1, q0;
cvt.rn.bf16x2.f32 p1, q3, q2;
cvt.rn.bf16x2.f32 p2, q5, q4;
cvt.rn.bf16x2.f32 p3, q7, q6;
"""
_E2M1_TENSOR_SCALE = "".join(f"""shl.b32 b{k}, p{k}, 16;
and.b32 e{k}, p{k}, 0xFFFF0000;
mul.rn.f32 q{2 * k}, b{k}, ${24 + 2 * k};
mul.rn.f32 q{2 * k + 1}, e{k}, ${25 + 2 * k};
cvt.rz.bf16x2.f32 p{k}, q{2 * k + 1}, q{2 * k};
prmt.b32 b{k}, q{2 * k}, q{2 * k + 1}, 0x5410;
min.u16x2 b{k}, b{k}, k2;
or.b32 p{k}, p{k}, b{k};
""" for k in range(4))
_E2M1_LANES = "".join(f"""and.b32 b{k}, p{k}, 0x7FFF7FFF;
min.u16x2 b{k}, b{k}, k0;
and.b32 e{k}, b{k}, 0x7F807F80;
max.u16x2 e{k}, e{k}, k1;
add.u32 m{k}, e{k}, 0x03000300;
add.rn.bf16x2 s{k}, b{k}, m{k};
shr.u32 e{k}, e{k}, 6;
sub.u32 e{k}, e{k}, 0x00FE00FE;
sub.u32 c{k}, s{k}, m{k};
add.u32 c{k}, c{k}, e{k};
add.u32 z{k}, b{k}, 0x417F417F;
and.b32 z{k}, z{k}, p{k};
and.b32 z{k}, z{k}, 0x80008000;
shr.u32 z{k}, z{k}, 12;
add.u32 c{k}, c{k}, z{k};
""" for k in range(4)) + """shl.b32 t0, c1, 8;
or.b32 w0, c0, t0;
shr.u32 t0, w0, 12;
or.b32 w0, w0, t0;
shl.b32 t1, c3, 8;
or.b32 w1, c2, t1;
shr.u32 t1, w1, 12;
or.b32 w1, w1, t1;
prmt.b32 $0, w0, w1, 0x5410;
}"""
_E2M1_HEADER = """{
.reg .f32 q<8>;
.reg .b32 p<4>, b<4>, e<4>, m<4>, s<4>, c<4>, z<4>, w<2>, t<2>, k<7>;
mov.b32 k0, 0x40C040C0;
mov.b32 k1, 0x3F803F80;
mov.b32 k2, 0x00010001;
"""
_E2M1_WORD_ASM = tl.constexpr(_E2M1_HEADER + _E2M1_PRODUCTS + _E2M1_LANES)
_E2M1_WORD_SCALED_ASM = tl.constexpr(_E2M1_HEADER + _E2M1_PRODUCTS + _E2M1_TENSOR_SCALE + _E2M1_LANES)

_E2M1_WORD_CONSTRAINTS = tl.constexpr(",".join(["=r"] * 8 + ["r"] * 16))  # 8 results (the word in $0), 8 g, 8 m
_E2M1_WORD_SCALED_CONSTRAINTS = tl.constexpr(",".join(["=r"] * 8 + ["r"] * 24))  # and 8 encode factors


@triton.jit
def _first_of_8(x):
    """(A, B, C, 8) -> (A, B, C): element 0 of the last axis (register moves: the axis is in one thread)."""
    a, _ = tl.split(tl.reshape(x, (x.shape[0], x.shape[1], x.shape[2], 4, 2)))
    a, _ = tl.split(tl.reshape(a, (x.shape[0], x.shape[1], x.shape[2], 2, 2)))
    a, _ = tl.split(tl.reshape(a, (x.shape[0], x.shape[1], x.shape[2], 1, 2)))
    return tl.reshape(a, (x.shape[0], x.shape[1], x.shape[2]))


@triton.jit
def e2m1_words_bf16(g, multiplier):
    """GPU only (inline PTX, sm_90): the e2m1 codes of bf16(g * multiplier), packed eight to a word: g (..., 8) holds
    bfloat16 values (as float32), `multiplier` (broadcast to g) each value's group factor, finite, >= 0 -> int32
    words (...). Rounding the product to bfloat16 first is what makes this the CPU path's e2m1(bf16(g / scale))
    for nvfp4 (multiplier = div_rn(1, scale): the product lands on the same side of every e2m1 decision, checked
    for every bfloat16 g and e4m3 scale by the tests' emulation) and exact for mxfp4 (a power of two). g must be
    finite where the word is kept."""
    m = tl.broadcast_to(multiplier, g.shape)
    words = tl.inline_asm_elementwise(_E2M1_WORD_ASM, _E2M1_WORD_CONSTRAINTS, [g, m], dtype=tl.int32, is_pure=True,
                                      pack=8)
    return _first_of_8(words)


@triton.jit
def e2m1_words_bf16_scaled(g, multiplier, encode):
    """GPU only (inline PTX, sm_90), nvfp4 with a tensor scale: the e2m1 codes of bf16(g * multiplier) * encode (a
    float32 product), packed eight to a word, as e2m1_words_bf16 packs them. With multiplier = div_rn(1, scale),
    bf16(g * multiplier) is the CPU path's bf16(g / scale) itself for every bfloat16 g and e4m3 scale (the tests
    check every pair), so the product is the CPU path's q, whatever the encode factor; its e2m1 code is exact by
    rounding to odd (see _E2M1_TENSOR_SCALE). `encode` (broadcast to g) must be 0 where the multiplier is."""
    m = tl.broadcast_to(multiplier, g.shape)
    e = tl.broadcast_to(encode, g.shape)
    words = tl.inline_asm_elementwise(_E2M1_WORD_SCALED_ASM, _E2M1_WORD_SCALED_CONSTRAINTS, [g, m, e],
                                      dtype=tl.int32, is_pure=True, pack=8)
    return _first_of_8(words)
