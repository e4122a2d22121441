"""Device-side decoding of MLX's packed formats, shared by the Triton kernels: the numerics of lowbit.formats
written as @triton.jit helpers (bit extraction, e2m1 / e4m3 / e8m0 decoding, affine rescale)."""

import triton
import triton.language as tl


def pack_geometry(bits: int) -> tuple[int, int, int]:
    """(codes per pack, words per pack, words per pack rounded up to a power of two) for `bits`-bit codes:
    one word for 1/2/4/8 bits; 3 words = 32 codes for 3 bits, 5 words = 32 codes for 5, 3 words = 16 codes for 6."""
    per_pack = {3: 32, 5: 32, 6: 16}.get(bits, 32 // bits)
    words = per_pack * bits // 32
    return per_pack, words, 1 << (words - 1).bit_length()


@triton.jit
def unpack_tile(w_base, rows, row_mask, row_stride, word_stride, code_start, n_codes,
                R: tl.constexpr, C: tl.constexpr, BITS: tl.constexpr,
                PER_PACK: tl.constexpr, WORDS: tl.constexpr, WORDS_POW2: tl.constexpr):
    """Codes [code_start, code_start + C) of R rows of MLX's packed stream -> int32 tile (R, C // PER_PACK, PER_PACK).

    Every word is read once. The stream is cut into packs (see `pack_geometry`), the fewest whole words holding
    whole codes; a pack's words are loaded side by side and each code is shifted out of the 64-bit window of the
    two words it touches. Codes at or past n_codes read as 0.
    """
    pack = code_start // PER_PACK + tl.arange(0, C // PER_PACK)
    pack_ok = pack * PER_PACK < n_codes
    j = tl.arange(0, WORDS_POW2)
    word = pack[:, None] * WORDS + j[None, :]  # (PACKS, WORDS_POW2)
    mask = row_mask[:, None, None] & pack_ok[None, :, None] & (j < WORDS)[None, None, :]
    ptrs = w_base + rows[:, None, None] * row_stride + word[None, :, :] * word_stride
    words = tl.load(ptrs, mask=mask, other=0).to(tl.uint32, bitcast=True)  # (R, PACKS, WORDS_POW2)
    slot = tl.arange(0, PER_PACK)
    bit = slot * BITS
    if WORDS == 1:
        codes = (words >> bit[None, None, :].to(tl.uint32)) & ((1 << BITS) - 1)  # (R, PACKS, PER_PACK)
    else:
        lo_word = (bit >> 5)[:, None] == j[None, :]  # (PER_PACK, WORDS_POW2) one-hot selections
        hi_word = ((bit + BITS - 1) >> 5)[:, None] == j[None, :]
        w4 = words.to(tl.uint64)[:, :, None, :]
        lo = tl.sum(tl.where(lo_word[None, None, :, :], w4, 0), axis=3)
        hi = tl.sum(tl.where(hi_word[None, None, :, :], w4, 0), axis=3)
        window = lo | (hi << 32)
        codes = (window >> (bit & 31)[None, None, :].to(tl.uint64)) & ((1 << BITS) - 1)
    return codes.to(tl.int32)


@triton.jit
def pack_group_tile(ptr, rows, row_mask, row_stride, col_stride, code_start, n_codes,
                    C: tl.constexpr, GS: tl.constexpr, PER_PACK: tl.constexpr):
    """The group value (scale or bias) of every pack of unpack_tile's tile: (R, C // PER_PACK, 1).

    A pack never straddles groups (PER_PACK divides every group size it is used with)."""
    pack = code_start // PER_PACK + tl.arange(0, C // PER_PACK)
    mask = row_mask[:, None] & (pack * PER_PACK < n_codes)[None, :]
    values = tl.load(ptr + rows[:, None] * row_stride + (pack * PER_PACK // GS)[None, :] * col_stride, mask=mask,
                     other=0)
    return values[:, :, None]


@triton.jit
def float_of_bits(bits):
    """int32 bits -> the float32 they encode."""
    return bits.to(tl.int32).to(tl.float32, bitcast=True)


@triton.jit
def e2m1_value(code):
    """e2m1 nibble -> float32: +-{0, .5, 1, 1.5, 2, 3, 4, 6}, built from its bits (exact, no exp2)."""
    exponent = (code >> 1) & 3
    mantissa = code & 1
    normal = float_of_bits(((exponent + 126) << 23) | (mantissa << 22))
    magnitude = tl.where(exponent == 0, mantissa.to(tl.float32) * 0.5, normal)
    return tl.where((code & 8) != 0, -magnitude, magnitude)


@triton.jit
def e4m3_value(code):
    """e4m3fn byte -> float32 (0x7F / 0xFF are NaN), built from its bits."""
    exponent = (code >> 3) & 15
    mantissa = code & 7
    normal = float_of_bits(((exponent + 120) << 23) | (mantissa << 20))
    magnitude = tl.where(exponent == 0, mantissa.to(tl.float32) * 0.001953125, normal)
    magnitude = tl.where((code & 127) == 127, float("nan"), magnitude)
    return tl.where((code & 128) != 0, -magnitude, magnitude)


@triton.jit
def e8m0_value(code):
    """e8m0 byte -> float32 2**(b - 127); byte 0 is 2**-127 and 255 is +inf, as MLX."""
    return tl.where(code == 0, 5.877471754111438e-39, float_of_bits(code << 23))


@triton.jit
def round_to(value, DTYPE: tl.constexpr, INTERPRET: tl.constexpr):
    """Round float32 `value` to DTYPE (nearest, ties to even), kept in float32.

    In the interpreter, whose float32 -> bfloat16 cast truncates, bfloat16 is rounded with integer arithmetic
    that gives the GPU's bits; on the GPU the cast is one instruction."""
    if DTYPE == tl.bfloat16 and INTERPRET:
        bits = value.to(tl.int32, bitcast=True)
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) & -65536
        return tl.where(value != value, value, rounded.to(tl.float32, bitcast=True))
    elif DTYPE == tl.float32:
        return value
    else:
        return value.to(DTYPE).to(tl.float32)


@triton.jit
def _select(j: tl.constexpr, w0, w1, w2, w3, w4):
    if j == 0:
        return w0
    elif j == 1:
        return w1
    elif j == 2:
        return w2
    elif j == 3:
        return w3
    else:
        return w4


@triton.jit
def slot_codes(w0, w1, w2, w3, w4, SLOT: tl.constexpr, BITS: tl.constexpr):
    """Code number SLOT of every pack, given the pack's word planes w0..w4 (uint32 tiles; unused planes repeat w0).

    The word(s) a slot lives in and its shift are compile-time constants."""
    lo = _select(SLOT * BITS // 32, w0, w1, w2, w3, w4)
    if (SLOT * BITS + BITS - 1) // 32 == SLOT * BITS // 32:
        return ((lo >> (SLOT * BITS % 32)) & ((1 << BITS) - 1)).to(tl.int32)
    else:  # straddles two words
        hi = _select((SLOT * BITS + BITS - 1) // 32, w0, w1, w2, w3, w4)
        window = (lo >> (SLOT * BITS % 32)) | (hi << (32 - SLOT * BITS % 32))
        return (window & ((1 << BITS) - 1)).to(tl.int32)


@triton.jit
def slot_codes_runtime(w0, w1, w2, w3, w4, slot, BITS: tl.constexpr):
    """slot_codes with a run-time slot: the same codes, with the word choice made by selects. Used where unrolling
    every slot would make the kernel slow to compile (float32 operands)."""
    bit = slot * BITS
    lo_index = bit // 32
    hi_index = (bit + BITS - 1) // 32
    shift = (bit % 32).to(tl.uint32)
    lo = tl.where(lo_index == 0, w0, tl.where(lo_index == 1, w1, tl.where(lo_index == 2, w2,
                  tl.where(lo_index == 3, w3, w4))))
    hi = tl.where(hi_index == 0, w0, tl.where(hi_index == 1, w1, tl.where(hi_index == 2, w2,
                  tl.where(hi_index == 3, w3, w4))))
    window = lo.to(tl.uint64) | (hi.to(tl.uint64) << 32)
    return ((window >> shift.to(tl.uint64)) & ((1 << BITS) - 1)).to(tl.int32)


# --- Packed decoders (GPU only: inline PTX, which the interpreter cannot run) -------------------------------------
#
# A 32-bit word holds two 16-bit lanes. Shifted right by 4p (4-bit codes) or 8p (8-bit codes), its low lane holds
# code slot p and its high lane slot p + PER_PACK / 2, so one packed instruction decodes two weights. Each helper
# returns the two lanes as 16-bit tensors (low lane first) holding exactly the values of the float32 decoders above
# rounded to the 16-bit dtype, because every step is exact or rounds once, as the float32 path does:
# - integer codes: (code | magic) read as bf16 is 128 + code (f16: 1024 + code), minus the magic: exact;
# - affine: mul.rn(code, scale) then add.rn(., bias): the two roundings of MLX's dequantize (no fused multiply-add;
#   each product of a <= 8-bit code and a 16-bit scale is exact before its one rounding);
# - e2m1: the sign and the three exponent/mantissa bits moved into a bf16's bit positions read as 2**-126 times the
#   value (subnormal for 0.5), times 2**126 and the power-of-two or e4m3 block scale: exact products;
# - e4m3: likewise, the seven exponent/mantissa bits read as 2**-120 times the magnitude (subnormal codes too), times
#   2**120 (exact), times the power-of-two block scale (one rounding, as the float32 product's cast).


@triton.jit
def pair_of(lane16):
    """A 16-bit value in both lanes of a uint32 (a packed operand of the helpers below)."""
    bits = lane16.to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
    return (bits | (bits << 16)).to(tl.uint32, bitcast=True)


@triton.jit
def affine_pair_f16(codes, scale2, bias2):
    """Codes below 1024 in both 16-bit lanes of `codes` -> round(round(code * scale) + bias) in f16."""
    return tl.inline_asm_elementwise(
        """{ .reg .b32 t, c;
        mov.b32 c, 0x64006400;
        or.b32 t, $2, c;
        sub.rn.f16x2 t, t, c;
        mul.rn.f16x2 t, t, $3;
        add.rn.f16x2 t, t, $4;
        mov.b32 {$0, $1}, t; }""",
        "=h,=h,r,r,r", [codes, scale2, bias2], dtype=(tl.float16, tl.float16), is_pure=True, pack=1)


# Pack-pair decoding (4-bit affine): the MMA's register pairs hold the same code slot of two neighbouring packs, so
# decoding straight into them needs no lane shuffles afterwards. `nibbles` = word & 0x0F0F0F0F (even slots) or
# (word >> 4) & 0x0F0F0F0F (odd slots): slot s sits in byte s // 2. prmt gathers byte j of two packs' nibbles into
# the two lanes, zero-filling the high bytes (sign replication of a byte below 0x80), so one prmt and one or give
# both lanes' magic-number value.
# bf16: (128 + code) * scale - 128 * scale is computed exactly and rounded once by fma, which is round(code * scale)
# exactly as MLX's first rounding (128 * scale is exact unless |scale| > 2**120, where the result overflows to
# infinity: no finite model has such scales; non-finite scales stay non-finite). f16 keeps sub + mul: 1024 * scale
# overflows f16 from |scale| >= 64.
@triton.jit
def _prmt_byte(BYTE: tl.constexpr):
    """prmt selector: lanes (byte BYTE of a, 0, byte BYTE of b, 0)."""
    return BYTE | ((8 | BYTE) << 4) | ((4 + BYTE) << 8) | ((8 | BYTE) << 12)


@triton.jit
def gather_bytes(a, b, BYTE: tl.constexpr):
    """Byte BYTE of a and of b (each below 0x80) in the low bytes of the two 16-bit lanes, high bytes zero."""
    selector = tl.full(a.shape, _prmt_byte(BYTE), tl.uint32)
    return tl.inline_asm_elementwise("prmt.b32 $0, $1, $2, $3;", "=r,r,r,r", [a, b, selector], dtype=tl.uint32,
                                     is_pure=True, pack=1)


@triton.jit
def affine4_pack_pair(nibbles_a, nibbles_b, scale2, neg128_scale2, bias2, BYTE: tl.constexpr,
                      DTYPE: tl.constexpr):
    """Code slot (2 * BYTE or 2 * BYTE + 1, by which nibbles are given) of packs a and b -> the two lanes (a, b) of
    round(round(code * scale) + bias) in DTYPE (bf16 or f16). neg128_scale2: -128 * scale in both lanes (bf16
    only)."""
    codes = gather_bytes(nibbles_a, nibbles_b, BYTE)
    if DTYPE == tl.bfloat16:
        return tl.inline_asm_elementwise(
            """{ .reg .b32 t;
            or.b32 t, $2, 0x43004300;
            fma.rn.bf16x2 t, t, $3, $4;
            add.rn.bf16x2 t, t, $5;
            mov.b32 {$0, $1}, t; }""",
            "=h,=h,r,r,r,r", [codes, scale2, neg128_scale2, bias2], dtype=(tl.bfloat16, tl.bfloat16),
            is_pure=True, pack=1)
    else:
        return affine_pair_f16(codes, scale2, bias2)


# Pack-pair decoding of 1/2/3/5/6-bit affine codes: slot_lanes puts code slot s of packs a and b at the bottom of
# the two 16-bit lanes (prmt takes the 16 bits from the code's byte on of each pack, a shift drops the bits below
# the code; a code that straddles two words is funnel-shifted out of each pack first), affine_lanes masks the code
# bits, adds the magic number and rescales as affine4_pack_pair does: the same exact steps, the same bits.
@triton.jit
def gather_halves(a, b, FIRST: tl.constexpr):
    """Bytes FIRST and FIRST + 1 of a in the low lane, the same bytes of b in the high lane (FIRST <= 2)."""
    selector = tl.full(a.shape, FIRST | ((FIRST + 1) << 4) | ((FIRST + 4) << 8) | ((FIRST + 5) << 12), tl.uint32)
    return tl.inline_asm_elementwise("prmt.b32 $0, $1, $2, $3;", "=r,r,r,r", [a, b, selector], dtype=tl.uint32,
                                     is_pure=True, pack=1)


@triton.jit
def slot_lanes(a0, a1, a2, a3, a4, b0, b1, b2, b3, b4, SLOT: tl.constexpr, BITS: tl.constexpr):
    """Code slot SLOT of packs a and b (their word planes a0.., b0..; unused planes repeat plane 0) -> a uint32 with
    a's code at bit 0 and b's at bit 16; the bits above each code are left over (the decoder masks them)."""
    BIT: tl.constexpr = SLOT * BITS % 32
    WORD: tl.constexpr = SLOT * BITS // 32
    if BIT + BITS <= 32:  # in one word: the 16 bits from the code's byte (from byte 2 for a code in byte 3)
        FIRST: tl.constexpr = BIT // 8 - BIT // 24
        lanes = gather_halves(_select(WORD, a0, a1, a2, a3, a4), _select(WORD, b0, b1, b2, b3, b4), FIRST)
        if BIT > 8 * FIRST:
            lanes = lanes >> (BIT - 8 * FIRST)
    else:  # across words WORD and WORD + 1: each pack's code funnel-shifted to bit 0 first
        a = (_select(WORD, a0, a1, a2, a3, a4) >> BIT) | (_select(WORD + 1, a0, a1, a2, a3, a4) << (32 - BIT))
        b = (_select(WORD, b0, b1, b2, b3, b4) >> BIT) | (_select(WORD + 1, b0, b1, b2, b3, b4) << (32 - BIT))
        lanes = gather_halves(a, b, 0)
    return lanes


@triton.jit
def affine_lanes(lanes, BITS: tl.constexpr, scale2, neg128_scale2, bias2, DTYPE: tl.constexpr):
    """slot_lanes' two codes -> round(round(code * scale) + bias) in DTYPE (bf16 or f16), one per lane."""
    mask2 = tl.full(lanes.shape, ((1 << BITS) - 1) * 0x10001, tl.uint32)
    if DTYPE == tl.bfloat16:
        return tl.inline_asm_elementwise(
            """{ .reg .b32 t;
            lop3.b32 t, $2, $3, 0x43004300, 0xEA;
            fma.rn.bf16x2 t, t, $4, $5;
            add.rn.bf16x2 t, t, $6;
            mov.b32 {$0, $1}, t; }""",
            "=h,=h,r,r,r,r,r", [lanes, mask2, scale2, neg128_scale2, bias2], dtype=(tl.bfloat16, tl.bfloat16),
            is_pure=True, pack=1)
    else:
        return affine_pair_f16(lanes & mask2, scale2, bias2)


@triton.jit
def affine8_pair(words, scale2, bias2, DTYPE: tl.constexpr):
    """Codes in bits 0-7 and 16-23 of `words` -> round(round(code * scale) + bias) in DTYPE (bf16 or f16).

    bf16 holds 128 + code only for 7-bit codes: there the byte is rebuilt exactly as 16 * high nibble + low nibble."""
    if DTYPE == tl.bfloat16:
        return tl.inline_asm_elementwise(
            """{ .reg .b32 lo, hi, c, sixteen;
            lop3.b32 lo, $2, 0x000F000F, 0x43004300, 0xEA;
            shr.b32 hi, $2, 4;
            lop3.b32 hi, hi, 0x000F000F, 0x43004300, 0xEA;
            mov.b32 c, 0x43004300;
            sub.rn.bf16x2 lo, lo, c;
            sub.rn.bf16x2 hi, hi, c;
            mov.b32 sixteen, 0x41804180;
            fma.rn.bf16x2 lo, hi, sixteen, lo;
            mul.rn.bf16x2 lo, lo, $3;
            add.rn.bf16x2 lo, lo, $4;
            mov.b32 {$0, $1}, lo; }""",
            "=h,=h,r,r,r", [words, scale2, bias2], dtype=(tl.bfloat16, tl.bfloat16), is_pure=True, pack=1)
    else:
        return affine_pair_f16(words & 0x00FF00FF, scale2, bias2)


def e2m1_slot_asm(slot: int) -> str:
    """The inline PTX that decodes e2m1 code slot `slot` (0-3) of a word's two 16-bit lanes (bits 4 * slot .. + 3 of
    each) into value * block scale in bf16 ($2: the word, $3: the scale in both lanes). The magnitude's three bits
    move straight to bf16 bits 6-8 and the sign to bit 15, each by one shift of the word as loaded (no shift of the
    word to the slot first); read as bf16 that is the value times 2**-126 (0.5 the subnormal 2**-127), times 2**126
    and the scale: exact products, one rounding."""
    def shifted(dst, by):  # the word shifted left by `by` (right where negative) into dst
        if by == 0:
            return f"mov.b32 {dst}, $2;"
        return f"shl.b32 {dst}, $2, {by};" if by > 0 else f"shr.u32 {dst}, $2, {-by};"

    return f"""{{ .reg .b32 v, s, c;
        {shifted("v", 6 - 4 * slot)}
        and.b32 v, v, 0x01C001C0;
        {shifted("s", 12 - 4 * slot)}
        and.b32 s, s, 0x80008000;
        or.b32 v, v, s;
        mov.b32 c, 0x7E807E80;
        mul.rn.bf16x2 v, v, c;
        mul.rn.bf16x2 v, v, $3;
        mov.b32 {{$0, $1}}, v; }}"""


_e2m1_slot_asm = triton.constexpr_function(e2m1_slot_asm)  # (the text, as a compile-time string inside a kernel)


@triton.jit
def e2m1_slot(words, scale2, SLOT: tl.constexpr):
    """e2m1 code slot SLOT (0-3) of both 16-bit lanes of `words` -> value * block scale in bf16 (scale2: two bf16
    lanes): slots SLOT and SLOT + 4 of a word of eight codes."""
    return tl.inline_asm_elementwise(_e2m1_slot_asm(SLOT), "=h,=h,r,r", [words, scale2],
                                     dtype=(tl.bfloat16, tl.bfloat16), is_pure=True, pack=1)


# e4m3 codes in bits 0-7 and 16-23 of $2 -> value * block scale ($3: two bf16 lanes) in bf16. The codes 0x7F / 0xFF
# (NaN) are the only ones whose magnitude bits read above 448 * 2**-120: the compare turns their lanes to all ones, a
# NaN, before the multiplies. (Module-level, so that the tests can run the text through their PTX emulator.)
E4M3_PAIR_ASM = tl.constexpr("""{ .reg .b32 v, s, m, c;
        shl.b32 v, $2, 4;
        and.b32 v, v, 0x07F007F0;
        mov.b32 c, 0x07E007E0;
        set.gt.u32.bf16x2 m, v, c;
        shl.b32 s, $2, 8;
        and.b32 s, s, 0x80008000;
        or.b32 v, v, s;
        or.b32 v, v, m;
        mov.b32 c, 0x7B807B80;
        mul.rn.bf16x2 v, v, c;
        mul.rn.bf16x2 v, v, $3;
        mov.b32 {$0, $1}, v; }""")


@triton.jit
def e4m3_pair(words, scale2):
    """e4m3 codes in bits 0-7 and 16-23 of `words` -> value * block scale in bf16 (scale2: two bf16 lanes)."""
    return tl.inline_asm_elementwise(E4M3_PAIR_ASM, "=h,=h,r,r", [words, scale2], dtype=(tl.bfloat16, tl.bfloat16),
                                     is_pure=True, pack=1)
