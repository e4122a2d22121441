"""Weight tiles of one K block of the canonical reduction, decoded on the device: shared by the decode kernel
(qmm.py), which dots them against the tokens, and the prefill dequantizer (prefill.py), which stores them.

A K block of a transposed (N, K) weight is PACKS packs of every row (a pack: the fewest whole words holding whole
codes, see `pack_geometry`). Code slot s of every pack forms an (N, PACKS) "plane"; the canonical K order inside a
block is plane 0, plane 1, ... (slot-major), each plane in pack order. Both kernels produce a plane's values with
the same helpers, so they hold the same bits: exactly the values of `lowbit.dequantize`.
"""

import triton
import triton.language as tl

from .decode import (
    affine4_pack_pair, affine8_pair, affine_lanes, e2m1_slot, e2m1_value, e4m3_pair, e4m3_value, e8m0_value,
    pack_group_tile, pair_of, round_to, slot_codes, slot_codes_runtime, slot_lanes, unpack_tile,
)


@triton.jit
def values_of(codes, scale, bias, MODE: tl.constexpr, SCALE_DTYPE: tl.constexpr, INTERPRET: tl.constexpr):
    """Codes and their group's scale (and bias) -> the exact values of lowbit.dequantize, in float32."""
    if MODE == 0:  # affine: code * scale + bias, rounded twice in the compute dtype (as MLX)
        scaled = round_to(codes.to(tl.float32) * scale.to(tl.float32), SCALE_DTYPE, INTERPRET)
        return round_to(scaled + bias.to(tl.float32), SCALE_DTYPE, INTERPRET)
    elif MODE == 1:  # mxfp4
        return e2m1_value(codes) * e8m0_value(scale.to(tl.int32))
    elif MODE == 2:  # mxfp8
        return e4m3_value(codes) * e8m0_value(scale.to(tl.int32))
    else:  # nvfp4 block scale (the tensor scale multiplies the float32 result)
        return e2m1_value(codes) * e4m3_value(scale.to(tl.int32))


@triton.jit
def block_words(w_base, pack0, K, offs_n, n_mask, sw_r, sw_c,
                GS: tl.constexpr, PER_PACK: tl.constexpr, WORDS: tl.constexpr, PACKS: tl.constexpr):
    """The word planes (N, PACKS) of packs pack0, pack0 + 1, ...: plane j holds word j of every pack (unused planes
    repeat plane 0). Packs at or past K read as 0.

    K is a whole number of groups, so the mask is constant over each group's packs; saying so lets the compiler
    load a row's words in 16-byte vectors (without it, one 4-byte load per word)."""
    pack = (pack0 + tl.arange(0, PACKS)).to(tl.int64)
    mask = n_mask[:, None] & (pack * PER_PACK < K)[None, :]
    if GS // PER_PACK > 1:
        mask = tl.max_constancy(mask, [1, GS // PER_PACK])
    row = w_base + offs_n[:, None] * sw_r
    w0 = tl.load(row + (pack * WORDS)[None, :] * sw_c, mask=mask, other=0).to(tl.uint32, bitcast=True)
    w1 = w0
    w2 = w0
    w3 = w0
    w4 = w0
    if WORDS > 1:
        w1 = tl.load(row + (pack * WORDS + 1)[None, :] * sw_c, mask=mask, other=0).to(tl.uint32, bitcast=True)
        w2 = tl.load(row + (pack * WORDS + 2)[None, :] * sw_c, mask=mask, other=0).to(tl.uint32, bitcast=True)
    if WORDS > 3:
        w3 = tl.load(row + (pack * WORDS + 3)[None, :] * sw_c, mask=mask, other=0).to(tl.uint32, bitcast=True)
        w4 = tl.load(row + (pack * WORDS + 4)[None, :] * sw_c, mask=mask, other=0).to(tl.uint32, bitcast=True)
    return w0, w1, w2, w3, w4


@triton.jit
def block_groups(ptr, group0, K, offs_n, n_mask, s_r, s_c, GS: tl.constexpr, GROUPS: tl.constexpr):
    """The (N, GROUPS) scales (or biases) of groups group0, group0 + 1, ..., in their stored dtype (0 past K)."""
    group = group0 + tl.arange(0, GROUPS)
    mask = n_mask[:, None] & (group * GS < K)[None, :]
    return tl.load(ptr + offs_n[:, None] * s_r + group[None, :] * s_c, mask=mask, other=0)


@triton.jit
def block_scales(s_base, b_base, kb, K, offs_n, n_mask, ss_r, ss_c, sb_r, sb_c,
                 MODE: tl.constexpr, GS: tl.constexpr, BLOCK_K: tl.constexpr, BLOCKS: tl.constexpr):
    """The (N, BLOCKS * GROUPS) scales and biases of K blocks kb .. kb + BLOCKS - 1; fp modes have no biases and
    get the scales in their place."""
    scale = block_groups(s_base, kb * (BLOCK_K // GS), K, offs_n, n_mask, ss_r, ss_c, GS, BLOCKS * BLOCK_K // GS)
    if MODE == 0:
        bias = block_groups(b_base, kb * (BLOCK_K // GS), K, offs_n, n_mask, sb_r, sb_c, GS, BLOCKS * BLOCK_K // GS)
    else:
        bias = scale
    return scale, bias


@triton.jit
def block_tiles(w_base, s_base, b_base, kb, K, offs_n, n_mask, sw_r, sw_c, ss_r, ss_c, sb_r, sb_c,
                MODE: tl.constexpr, GS: tl.constexpr, PER_PACK: tl.constexpr, WORDS: tl.constexpr,
                BLOCK_K: tl.constexpr):
    """Everything K block kb of rows offs_n needs: its word planes (block_words), scales and biases (block_scales)."""
    w0, w1, w2, w3, w4 = block_words(w_base, kb * (BLOCK_K // PER_PACK), K, offs_n, n_mask, sw_r, sw_c, GS,
                                     PER_PACK, WORDS, BLOCK_K // PER_PACK)
    scale, bias = block_scales(s_base, b_base, kb, K, offs_n, n_mask, ss_r, ss_c, sb_r, sb_c, MODE, GS, BLOCK_K, 1)
    return w0, w1, w2, w3, w4, scale, bias


@triton.jit
def per_pack(tile, GROUPS: tl.constexpr, PACKS: tl.constexpr):
    """(N, GROUPS) group values -> (N, PACKS): each group's value repeated over its packs, in registers."""
    return tl.reshape(tl.broadcast_to(tile[:, :, None], (tile.shape[0], GROUPS, PACKS // GROUPS)),
                      (tile.shape[0], PACKS))


@triton.jit
def slot_plane(w0, w1, w2, w3, w4, scale, bias, SLOT: tl.constexpr, MODE: tl.constexpr, BITS: tl.constexpr,
               SCALE_DTYPE: tl.constexpr, DOT_DTYPE: tl.constexpr, INTERPRET: tl.constexpr):
    """Plane SLOT in DOT_DTYPE, decoded in float32 (every format); scale and bias are per pack (N, PACKS)."""
    return values_of(slot_codes(w0, w1, w2, w3, w4, SLOT, BITS), scale, bias, MODE, SCALE_DTYPE,
                     INTERPRET).to(DOT_DTYPE)


@triton.jit
def slot_plane_runtime(w0, w1, w2, w3, w4, scale, bias, slot, MODE: tl.constexpr, BITS: tl.constexpr,
                       SCALE_DTYPE: tl.constexpr, DOT_DTYPE: tl.constexpr, INTERPRET: tl.constexpr):
    """slot_plane with a run-time slot (same values; short compiles where unrolling is slow)."""
    return values_of(slot_codes_runtime(w0, w1, w2, w3, w4, slot, BITS), scale, bias, MODE, SCALE_DTYPE,
                     INTERPRET).to(DOT_DTYPE)


@triton.jit
def _packed_pair(words, scale2, bias2, MODE: tl.constexpr, DOT_DTYPE: tl.constexpr):
    """Affine 8-bit or e4m3 codes in bits 0-7 and 16-23 of `words`, decoded (4-bit codes: e2m1_slot or, affine,
    pack pairs)."""
    if MODE == 0:
        return affine8_pair(words, scale2, bias2, DOT_DTYPE)
    else:
        return e4m3_pair(words, scale2)


@triton.jit
def _pack_pair_plane(nib_a, nib_b, scale2, neg2, bias2, BYTE: tl.constexpr, DTYPE: tl.constexpr):
    """One plane (N, PACKS) from the nibbles of its even packs (nib_a) and odd packs (nib_b)."""
    a, b = affine4_pack_pair(nib_a, nib_b, scale2, neg2, bias2, BYTE, DTYPE)
    return tl.reshape(tl.join(a, b), (nib_a.shape[0], 2 * nib_a.shape[1]))


@triton.jit
def pack_pairs(tile):
    """(N, PACKS) -> its even packs and its odd packs, (N, PACKS // 2) each: the two lanes of pack-pair decoding."""
    return tl.split(tl.reshape(tile, (tile.shape[0], tile.shape[1] // 2, 2)))


@triton.jit
def _lanes_of(low16, high16):
    """Two 16-bit tiles -> one uint32 tile holding them in its low and high lanes."""
    low = low16.to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
    high = high16.to(tl.int16, bitcast=True).to(tl.int32) << 16
    return (low | high).to(tl.uint32, bitcast=True)


@triton.jit
def pack_pair_operands(scale, bias, GROUPS: tl.constexpr, PACKS: tl.constexpr, DOT_DTYPE: tl.constexpr):
    """The (N, GROUPS) scales and biases -> per pack pair (N, PACKS // 2): scale, -128 * scale (bf16; f16 does not
    use it) and bias, each with pack 2i's value in the low lane and pack 2i + 1's in the high lane."""
    if DOT_DTYPE == tl.bfloat16:
        neg = (scale.to(tl.float32) * -128.0).to(scale.dtype)
    else:  # (f16 subtracts the magic number instead)
        neg = scale
    if 2 * GROUPS <= PACKS:  # a pack pair lies in one group: both lanes hold the group's value
        return (per_pack(pair_of(scale), GROUPS, PACKS // 2), per_pack(pair_of(neg), GROUPS, PACKS // 2),
                per_pack(pair_of(bias), GROUPS, PACKS // 2))
    else:  # a group per pack (GROUPS == PACKS)
        scale_a, scale_b = pack_pairs(scale)
        neg_a, neg_b = pack_pairs(neg)
        bias_a, bias_b = pack_pairs(bias)
        return _lanes_of(scale_a, scale_b), _lanes_of(neg_a, neg_b), _lanes_of(bias_a, bias_b)


@triton.jit
def affine_plane(a0, a1, a2, a3, a4, b0, b1, b2, b3, b4, scale2, neg2, bias2, SLOT: tl.constexpr,
                 BITS: tl.constexpr, DTYPE: tl.constexpr):
    """Plane SLOT (N, PACKS) of 1/2/3/5/6-bit affine codes, decoded by pack pairs: a0.. / b0.. are the word planes
    of the even / odd packs, scale2, neg2 and bias2 pack_pair_operands' lanes."""
    even, odd = affine_lanes(slot_lanes(a0, a1, a2, a3, a4, b0, b1, b2, b3, b4, SLOT, BITS), BITS, scale2, neg2,
                             bias2, DTYPE)
    return tl.reshape(tl.join(even, odd), (even.shape[0], 2 * even.shape[1]))


@triton.jit
def affine_eight_planes(a0, a1, a2, a3, a4, b0, b1, b2, b3, b4, scale2, neg2, bias2, FIRST: tl.constexpr,
                        BITS: tl.constexpr, DTYPE: tl.constexpr):
    """Planes FIRST .. FIRST + 7 (affine_plane)."""
    p0 = affine_plane(a0, a1, a2, a3, a4, b0, b1, b2, b3, b4, scale2, neg2, bias2, FIRST, BITS, DTYPE)
    p1 = affine_plane(a0, a1, a2, a3, a4, b0, b1, b2, b3, b4, scale2, neg2, bias2, FIRST + 1, BITS, DTYPE)
    p2 = affine_plane(a0, a1, a2, a3, a4, b0, b1, b2, b3, b4, scale2, neg2, bias2, FIRST + 2, BITS, DTYPE)
    p3 = affine_plane(a0, a1, a2, a3, a4, b0, b1, b2, b3, b4, scale2, neg2, bias2, FIRST + 3, BITS, DTYPE)
    p4 = affine_plane(a0, a1, a2, a3, a4, b0, b1, b2, b3, b4, scale2, neg2, bias2, FIRST + 4, BITS, DTYPE)
    p5 = affine_plane(a0, a1, a2, a3, a4, b0, b1, b2, b3, b4, scale2, neg2, bias2, FIRST + 5, BITS, DTYPE)
    p6 = affine_plane(a0, a1, a2, a3, a4, b0, b1, b2, b3, b4, scale2, neg2, bias2, FIRST + 6, BITS, DTYPE)
    p7 = affine_plane(a0, a1, a2, a3, a4, b0, b1, b2, b3, b4, scale2, neg2, bias2, FIRST + 7, BITS, DTYPE)
    return p0, p1, p2, p3, p4, p5, p6, p7


@triton.jit
def packed_planes(w0, scale, bias, MODE: tl.constexpr, BITS: tl.constexpr, GROUPS: tl.constexpr,
                  PACKS: tl.constexpr, DOT_DTYPE: tl.constexpr):
    """All planes of a one-word pack of 4-bit or 8-bit codes through the packed decoders, in slot order: 8 for
    4-bit codes, 4 for 8-bit (then the last four repeat plane 0). scale and bias are the (N, GROUPS) tiles as stored.
    (Affine codes of other widths decode plane by plane: affine_plane.)

    Formats served (see `packed_decoding`): affine with scales, biases and dot in one 16-bit dtype; mxfp4, mxfp8 and
    nvfp4 with bf16 dots."""
    if MODE == 0 and BITS == 4:  # pack-pair decoding (decode.py): even and odd packs side by side (one group)
        even, odd = pack_pairs(w0)
        scale2, neg2, bias2 = pack_pair_operands(scale, bias, GROUPS, PACKS, DOT_DTYPE)
        lo_a = even & 0x0F0F0F0F
        lo_b = odd & 0x0F0F0F0F
        hi_a = (even >> 4) & 0x0F0F0F0F
        hi_b = (odd >> 4) & 0x0F0F0F0F
        p0 = _pack_pair_plane(lo_a, lo_b, scale2, neg2, bias2, 0, DOT_DTYPE)
        p1 = _pack_pair_plane(hi_a, hi_b, scale2, neg2, bias2, 0, DOT_DTYPE)
        p2 = _pack_pair_plane(lo_a, lo_b, scale2, neg2, bias2, 1, DOT_DTYPE)
        p3 = _pack_pair_plane(hi_a, hi_b, scale2, neg2, bias2, 1, DOT_DTYPE)
        p4 = _pack_pair_plane(lo_a, lo_b, scale2, neg2, bias2, 2, DOT_DTYPE)
        p5 = _pack_pair_plane(hi_a, hi_b, scale2, neg2, bias2, 2, DOT_DTYPE)
        p6 = _pack_pair_plane(lo_a, lo_b, scale2, neg2, bias2, 3, DOT_DTYPE)
        p7 = _pack_pair_plane(hi_a, hi_b, scale2, neg2, bias2, 3, DOT_DTYPE)
        return p0, p1, p2, p3, p4, p5, p6, p7
    if MODE == 0:
        scale2 = per_pack(pair_of(scale), GROUPS, PACKS)
        bias2 = per_pack(pair_of(bias), GROUPS, PACKS)
    elif MODE == 1 or MODE == 2:  # e8m0 byte e -> bf16 2**(e - 127): bits e << 7 (byte 0: the subnormal 2**-127, 0x40)
        e = scale.to(tl.int32)
        bits = tl.where(e == 0, 0x40, e << 7)
        scale2 = per_pack((bits | (bits << 16)).to(tl.uint32, bitcast=True), GROUPS, PACKS)
        bias2 = scale2
    else:  # nvfp4: the e4m3 block scale is exact in bf16; e4m3_pair decodes it (times 1.0) with a few bit operations
        byte = scale.to(tl.int32) & 0xFF
        one = tl.full(byte.shape, 0x3F803F80, tl.uint32)  # bf16 1.0 in both lanes
        value, _ = e4m3_pair((byte | (byte << 16)).to(tl.uint32, bitcast=True), one)
        scale2 = per_pack(pair_of(value), GROUPS, PACKS)
        bias2 = scale2
    if BITS == 4:  # e2m1 (mxfp4, nvfp4): each slot's shifts taken from the word as loaded
        p0, p4 = e2m1_slot(w0, scale2, 0)
        p1, p5 = e2m1_slot(w0, scale2, 1)
        p2, p6 = e2m1_slot(w0, scale2, 2)
        p3, p7 = e2m1_slot(w0, scale2, 3)
        return p0, p1, p2, p3, p4, p5, p6, p7
    else:
        p0, p2 = _packed_pair(w0, scale2, bias2, MODE, DOT_DTYPE)
        p1, p3 = _packed_pair(w0 >> 8, scale2, bias2, MODE, DOT_DTYPE)
        return p0, p1, p2, p3, p0, p0, p0, p0


@triton.jit
def slot_major_tile(p0, p1, p2, p3, p4, p5, p6, p7, PLANES: tl.constexpr, BLOCKS: tl.constexpr):
    """PLANES (8, or 4: p4.. unused) planes (N, BLOCKS * PACKS) in slot order side by side, as each block's K order
    has them: (N, BLOCKS * PLANES * PACKS), block b's column s * PACKS + p holding its plane s's column p. Joins, a
    permute and a reshape: register moves, no data exchange between threads."""
    n: tl.constexpr = p0.shape[0]
    packs: tl.constexpr = p0.shape[1] // BLOCKS
    if PLANES == 8:  # join order: dims (pack, slot bit 2, slot bit 0, slot bit 1)
        planes = tl.join(tl.join(tl.join(p0, p4), tl.join(p1, p5)), tl.join(tl.join(p2, p6), tl.join(p3, p7)))
        planes = tl.reshape(planes, (n, BLOCKS, packs, 2, 2, 2))
        return tl.reshape(tl.permute(planes, (0, 1, 3, 5, 4, 2)), (n, BLOCKS * 8 * packs))
    else:  # dims (pack, slot bit 1, slot bit 0)
        planes = tl.reshape(tl.join(tl.join(p0, p2), tl.join(p1, p3)), (n, BLOCKS, packs, 2, 2))
        return tl.reshape(tl.permute(planes, (0, 1, 3, 4, 2)), (n, BLOCKS * 4 * packs))


def packed_decoding(mode: str, bits: int, scale_dtype, bias_dtype, weight_dtype, dot_dtype, interpret: bool) -> bool:
    """Whether `packed_planes` serves this format (the GPU only: the interpreter cannot run inline PTX).
    LOWBIT_QMM_PACKED=0 turns it off (a benchmark knob: the float32 decoders give the same bits)."""
    import os

    import torch

    if interpret or os.environ.get("LOWBIT_QMM_PACKED", "1") == "0":
        return False
    if mode == "affine":
        return dot_dtype in (torch.bfloat16, torch.float16) and scale_dtype == bias_dtype == weight_dtype == dot_dtype
    return mode in ("mxfp4", "mxfp8", "nvfp4") and dot_dtype == torch.bfloat16


@triton.jit
def nn_weight_tile(w_base, s_base, b_base, rows, row_mask, code_start, n_codes,
                   sw_r, sw_c, ss_r, ss_c, sb_r, sb_c,
                   R: tl.constexpr, C: tl.constexpr, MODE: tl.constexpr, BITS: tl.constexpr, GS: tl.constexpr,
                   PER_PACK: tl.constexpr, WORDS: tl.constexpr, WORDS_POW2: tl.constexpr,
                   SCALE_DTYPE: tl.constexpr, DOT_DTYPE: tl.constexpr, INTERPRET: tl.constexpr):
    """transpose=False: rows `rows` (along K) x codes [code_start, code_start + C) (along N) of dequantize(w), an
    (R, C) tile in DOT_DTYPE, natural order. Dequantized pack by pack, reshaped once at the end."""
    codes = unpack_tile(w_base, rows, row_mask, sw_r, sw_c, code_start, n_codes, R, C, BITS,
                        PER_PACK, WORDS, WORDS_POW2)
    scale = pack_group_tile(s_base, rows, row_mask, ss_r, ss_c, code_start, n_codes, C, GS, PER_PACK)
    if MODE == 0:
        bias = pack_group_tile(b_base, rows, row_mask, sb_r, sb_c, code_start, n_codes, C, GS, PER_PACK)
    else:
        bias = scale
    values = values_of(codes, scale, bias, MODE, SCALE_DTYPE, INTERPRET).to(DOT_DTYPE)
    return tl.reshape(values, (R, C))
