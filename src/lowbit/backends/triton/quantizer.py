"""quantize on the device: one Triton kernel for every format, byte-identical to lowbit.formats (the CPU path).

Each program reads a tile of BLOCK_R rows by BLOCK_C values once, finds each group's scale (and bias), encodes the
codes and writes the packed words and the scales. A thread owns whole groups (see `_quantize_tile`), so the work
is a thread's own register arithmetic: that, not memory, is what bounds the kernel (benchmarks/NOTES.md, v8).
The same kernel can instead write the quantize-dequantize of its input (`fake_quantize`): the activations of
qqmm, quantized on the fly, in one pass.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ...formats.nvfp4 import tensor_encode_scale
from .. import interpreting
from .decode import e4m3_value, round_to
from .encode import (
    affine_codes, affine_params, affine_quotient, divide_tile, e2m1_encode, e2m1_words_bf16,
    e2m1_words_bf16_scaled, e4m3_encode, e4m3_value_hardware, e8m0_exponent_ceil,
    fast_division_safe, group_min_keeping_first_zero, power_of_two,
)
from .launch import MODE_IDS, TL_DTYPES
from .tiles import values_of


@triton.jit
def _max_keeping_nan(a, b):
    return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _group_max(x):
    """(V, R, G, VEC) -> (R, G): each group's maximum, NaN if the group holds one (so that one reduction also tells
    the non-finite groups). A group's values are in one thread's registers (or one warp's): few or no shuffles."""
    return tl.reduce(tl.reduce(x, 3, _max_keeping_nan), 0, _max_keeping_nan)


@triton.jit
def _group_min(x):
    return tl.min(tl.min(x, axis=3), axis=0)


@triton.jit
def _spread(t):
    """(R, G) -> (1, R, G, 1): a group's value beside each of its values."""
    return t[None, :, :, None]


@triton.jit
def _packed_words(codes, GS: tl.constexpr, VEC: tl.constexpr, BLOCK_R: tl.constexpr, G: tl.constexpr,
                  BITS: tl.constexpr, WP: tl.constexpr):
    """Pack int32 codes (V, R, G, VEC) into MLX's little-endian bit stream: -> int32 words (WP, R, G), word w of
    each group (WP: GS * BITS / 32 rounded up to a power of two; the words past the group's are 0). Code
    (v, r, g, e) is value v * VEC + e of its group. Every word is built from one thread's registers, so the shifts
    are constants and the packing is a few integer instructions per code."""
    V: tl.constexpr = GS // VEC
    if 32 % BITS == 0:  # whole codes per word
        PER: tl.constexpr = 32 // BITS
        M: tl.constexpr = PER // VEC if PER > VEC else 1  # vectors per word
        NW: tl.constexpr = VEC // PER if PER < VEC else 1  # words per vector
        PV: tl.constexpr = PER // M  # codes of a word in one vector
        c = tl.reshape(codes, (V // M, M, BLOCK_R, G, NW, PV))
        shifts = (tl.arange(0, M)[:, None] * PV + tl.arange(0, PV)[None, :]) * BITS
        words = tl.sum(tl.sum(c << shifts[None, :, None, None, None, :], axis=5), axis=1)  # (V // M, R, G, NW)
        return tl.reshape(tl.permute(words, (0, 3, 1, 2)), (WP, BLOCK_R, G))  # word v * NW + n
    else:  # 3, 5, 6 bits: every 32 codes (M vectors) fill BITS words, codes straddle words
        M: tl.constexpr = 32 // VEC
        BP: tl.constexpr = 8 if BITS > 4 else 4  # word i of a superpack, BITS of BP used
        c = tl.reshape(codes, (V // M, 1, M, BLOCK_R, G, VEC)).to(tl.uint32)
        j = (tl.arange(0, M)[:, None] * VEC + tl.arange(0, VEC)[None, :])[None, None, :, None, None, :]  # code in 32
        i = tl.arange(0, BP)[None, :, None, None, None, None]
        shift = j * BITS - 32 * i  # where code j starts relative to word i's bit 0
        left = c << tl.minimum(tl.maximum(shift, 0), 31).to(tl.uint32)
        right = c >> tl.minimum(tl.maximum(-shift, 0), 31).to(tl.uint32)
        part = tl.where(shift >= 0, left, right)
        part = tl.where((shift < 32) & (shift > -BITS) & (i < BITS), part, 0)
        words = tl.sum(tl.sum(part.to(tl.int32, bitcast=True), axis=5), axis=2)  # (V // M, BP, R, G): bits disjoint
        w = tl.arange(0, WP)[:, None, None]  # word of the group: superpack p's word i is p * BITS + i
        p = tl.arange(0, V // M)[None, :, None]
        k = tl.arange(0, BP)[None, None, :]
        pick = (w == p * BITS + k) & (k < BITS)  # (WP, V // M, BP), constant: register moves
        words = tl.reshape(words, (1, V // M, BP, BLOCK_R, G))
        return tl.sum(tl.sum(tl.where(pick[:, :, :, None, None], words, 0), axis=2), axis=1)


@triton.jit
def _store_group_words(q_ptr, words, row, group, g_mask, n_words, WG: tl.constexpr, ROWS_OUTER: tl.constexpr):
    """Store words (WP, R, G), the first WG of each group's (its GS * BITS / 32 words, contiguous in q's row of
    n_words), as 16-byte (or the widest aligned) stores from the thread that holds them.

    The store's layout comes from Triton's coalescing pass, as the load's does (see _load_tile): the contiguous
    axis gets up to 16 bytes a thread, then the threads go along the other axes in its tie order. So the words are
    stored as (chunks of A, A) with the chunk axis ordered last among the ties: the threads go along R and G, as
    they do for the values, and no layout conversion (shared memory, barriers) is needed."""
    WP: tl.constexpr = words.shape[0]
    A: tl.constexpr = 4 if WG % 4 == 0 else (2 if WG % 2 == 0 else 1)  # words a store (WG <= WP)
    B: tl.constexpr = WP // A
    chunks = tl.reshape(words, (B, A, words.shape[1], words.shape[2]))
    w = tl.arange(0, B)[:, None] * A + tl.arange(0, A)[None, :]  # (B, A): word of the group
    offsets = (row[:, None] * n_words + group[None, :] * WG)[None, None, :, :] + w[:, :, None, None]  # (B, A, R, G)
    mask = g_mask[None, None, :, :] & (w < WG)[:, :, None, None]
    if A == 1:  # (an odd WG) one store a word: a chunk axis would be the contiguous one, and get the threads
        for b in tl.static_range(WG):
            word = tl.sum(tl.where((tl.arange(0, WP) == b)[:, None, None], words, 0), axis=0)  # (R, G)
            at = row[:, None] * n_words + group[None, :] * WG + b
            if ROWS_OUTER:  # (G, R)
                tl.store(q_ptr + tl.trans(at), tl.trans(word), mask=tl.trans(g_mask))
            else:
                tl.store(q_ptr + at, word, mask=g_mask)
    elif ROWS_OUTER:  # (G, R, B, A): ties first-axis-first
        tl.store(q_ptr + tl.permute(offsets, (3, 2, 0, 1)), tl.permute(chunks, (3, 2, 0, 1)),
                 mask=tl.permute(mask, (3, 2, 0, 1)))
    else:  # (B, R, G, A): ties last-axis-first
        tl.store(q_ptr + tl.permute(offsets, (0, 2, 3, 1)), tl.permute(chunks, (0, 2, 3, 1)),
                 mask=tl.permute(mask, (0, 2, 3, 1)))


@triton.jit
def _stored_bits(value, finite, DTYPE: tl.constexpr):
    """float32 -> the bits of DTYPE (an integer of its width) that lowbit.formats stores: rounded to nearest even
    where `finite`, the quiet NaN elsewhere (the GPU's own NaN has another payload). bfloat16 is rounded with
    integer arithmetic (the interpreter's cast mangles subnormals)."""
    if DTYPE == tl.float32:
        return tl.where(finite, value.to(tl.int32, bitcast=True), 0x7FC00000)
    elif DTYPE == tl.bfloat16:
        rounded = round_to(value, tl.bfloat16, True).to(tl.int32, bitcast=True) >> 16  # (round_to's integer path)
        return tl.where(finite, rounded, 0x7FC0).to(tl.int16)
    else:
        return tl.where(finite, value.to(tl.float16).to(tl.int16, bitcast=True), 0x7E00).to(tl.int16)


_RECIPROCAL_6 = tl.constexpr(0.1666666716337204)  # float32(1 / 6)
_RECIPROCAL_448 = tl.constexpr(0.0022321429569274187)  # float32(1 / 448)


@triton.jit
def _block_scale_target(amax, element_max: tl.constexpr, DTYPE: tl.constexpr, INTERPRET: tl.constexpr):
    """A group's amax / element_max: a true division rounded to w's dtype (as MLX), kept in float32. For bfloat16
    amax the product with the float32 reciprocal, rounded to bfloat16, is that (a test checks every bfloat16 amax)."""
    if DTYPE == tl.bfloat16:
        if element_max == 6.0:
            return round_to(amax * _RECIPROCAL_6, DTYPE, INTERPRET)
        else:
            tl.static_assert(element_max == 448.0)
            return round_to(amax * _RECIPROCAL_448, DTYPE, INTERPRET)
    else:
        return round_to(tl.math.div_rn(amax, tl.full(amax.shape, element_max, tl.float32)), DTYPE, INTERPRET)


@triton.jit
def _tile_place(tile, n_col_tiles, n_rows, K, BLOCK_R: tl.constexpr, G: tl.constexpr, GS: tl.constexpr):
    """Tile number -> its rows (R,), groups (G,) and which (row, group) pairs exist (R, G)."""
    row = (tile // n_col_tiles).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    group = (tile % n_col_tiles) * G + tl.arange(0, G)
    return row, group, (row < n_rows)[:, None] & (group * GS < K)[None, :]


@triton.jit
def _load_tile(w_ptr, row, group, g_mask, sw_r, sw_c, pos, GS: tl.constexpr, ROWS_OUTER: tl.constexpr):
    """The raw values (V, R, G, VEC) of a tile.

    Triton's coalescing pass lays the axes of a load across threads fastest-first: the contiguous VEC axis, then,
    among axes of equal contiguity, the last one first (Triton 3.7 on) or the first one first (before 3.7). The
    threads must go along R and G (a thread owns whole groups), not along V: with ROWS_OUTER (Triton < 3.7) the
    load is issued as (R, G, V, VEC) and its result permuted back, which moves no data."""
    offsets = (row * sw_r)[None, :, None, None] + ((group * GS)[None, None, :, None] + pos) * sw_c
    mask = tl.broadcast_to(_spread(g_mask), offsets.shape)
    if ROWS_OUTER:
        values = tl.load(w_ptr + tl.permute(offsets, (2, 1, 0, 3)), mask=tl.permute(mask, (2, 1, 0, 3)), other=0.0)
        return tl.permute(values, (2, 1, 0, 3))
    else:
        return tl.load(w_ptr + offsets, mask=mask, other=0.0)


@triton.jit
def quantize_kernel(w_ptr, q_ptr, s_ptr, b_ptr, out_ptr, encode_ptr, n_rows, K, n_words, sw_r, sw_c, n_col_tiles,
                    MODE: tl.constexpr, BITS: tl.constexpr, GS: tl.constexpr, W_DTYPE: tl.constexpr,
                    HAS_ENCODE: tl.constexpr, FAKE: tl.constexpr, OUT_DTYPE: tl.constexpr,
                    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, VEC: tl.constexpr, ROWS_OUTER: tl.constexpr,
                    WORDS: tl.constexpr, INTERPRET: tl.constexpr):
    """Quantize rows of w (n_rows, K) in groups of GS: packed words to q, scales (and biases) to s (and b); with
    FAKE, write the dequantized values (float32 products of code and scale, without the tensor scale) to out.

    One program a tile (the column tiles of a row tile are consecutive). A persistent variant that loaded the next
    tile while working on the current one was slower on the H200 (more registers, fewer warps: NOTES v8)."""
    G: tl.constexpr = BLOCK_C // GS
    V: tl.constexpr = GS // VEC
    pos = tl.arange(0, V)[:, None, None, None] * VEC + tl.arange(0, VEC)[None, None, None, :]  # value in its group
    row, group, g_mask = _tile_place(tl.program_id(0), n_col_tiles, n_rows, K, BLOCK_R, G, GS)
    raw = _load_tile(w_ptr, row, group, g_mask, sw_r, sw_c, pos, GS, ROWS_OUTER)
    _quantize_tile(raw, row, group, g_mask, pos, q_ptr, s_ptr, b_ptr, out_ptr, encode_ptr, K, n_words,
                   MODE, BITS, GS, W_DTYPE, HAS_ENCODE, FAKE, OUT_DTYPE, BLOCK_R, G, VEC, ROWS_OUTER, WORDS, INTERPRET)


@triton.jit
def _quantize_tile(g, row, group, g_mask, pos, q_ptr, s_ptr, b_ptr, out_ptr, encode_ptr, K, n_words,
                   MODE: tl.constexpr, BITS: tl.constexpr, GS: tl.constexpr, W_DTYPE: tl.constexpr,
                   HAS_ENCODE: tl.constexpr, FAKE: tl.constexpr, OUT_DTYPE: tl.constexpr,
                   BLOCK_R: tl.constexpr, G: tl.constexpr, VEC: tl.constexpr, ROWS_OUTER: tl.constexpr,
                   WORDS: tl.constexpr,
                   INTERPRET: tl.constexpr):
    """One tile (V, R, G, VEC): BLOCK_R rows by G groups, each group's GS values as V vectors of VEC (16 bytes of
    w). Triton lays the R and G axes across threads and V, VEC in each thread's registers, so a thread owns whole
    groups (or, for large groups, a warp owns part of each): the group reductions, the scale arithmetic and the
    packing need little or no data from other threads. WORDS (mxfp4, nvfp4: see `_words_path`): the codes come
    packed from e2m1_words_bf16."""
    col = (group * GS)[None, None, :, None] + pos
    if W_DTYPE == tl.bfloat16:  # widened from the bits (the interpreter's own conversion flushes subnormals)
        g = (g.to(tl.int16, bitcast=True).to(tl.int32) << 16).to(tl.float32, bitcast=True)
    g = g.to(tl.float32)
    group_offsets = row[:, None] * (K // GS) + group[None, :]  # of the scales and biases
    if MODE != 0:  # the fp formats' block scales come from each group's amax (NaN or inf: a non-finite group)
        amax = _group_max(tl.abs(g))
        finite = amax < float("inf")

    if MODE == 0:  # affine
        lo = group_min_keeping_first_zero(g, pos, GS) if BITS == 1 else _group_min(g)
        hi = _group_max(g)
        finite = (hi < float("inf")) & (lo > -float("inf"))  # (R, G): no NaN (hi is NaN then) and no +-inf
        scale, bias = affine_params(lo, hi, BITS)
        quotient = affine_quotient(g, bias, scale, _spread, INTERPRET)
        codes = tl.where(_spread(finite), affine_codes(quotient, BITS), 0)
        tl.store(s_ptr + group_offsets, _stored_bits(scale, finite, W_DTYPE), mask=g_mask)
        tl.store(b_ptr + group_offsets, _stored_bits(bias, finite, W_DTYPE), mask=g_mask)
    elif MODE == 3:  # nvfp4: e4m3 block scale of amax / 6 (times the tensor scale's encode factor)
        s = _block_scale_target(amax, 6.0, W_DTYPE, INTERPRET)
        if HAS_ENCODE:
            encode = tl.load(encode_ptr)
            scale_byte = e4m3_encode(s * encode, not INTERPRET)
        else:
            scale_byte = e4m3_encode(s, not INTERPRET)
        block_scale = e4m3_value(scale_byte) if INTERPRET else e4m3_value_hardware(scale_byte)
        inv_scale = tl.math.div_rn(tl.full(block_scale.shape, 1.0, tl.float32), block_scale)
        # empty blocks (0 / 0) and NaN scales (s * encode overflowed); a negative tensor scale makes them negative
        unused = ~(tl.abs(block_scale) > 0.0) | ~finite
        if WORDS:  # bf16(g * inv_scale) is bf16(g / block_scale) (e2m1_words_bf16, e2m1_words_bf16_scaled)
            if HAS_ENCODE:
                words = e2m1_words_bf16_scaled(g, _spread(tl.where(unused, 0.0, inv_scale)),
                                               _spread(tl.where(unused, 0.0, encode)))
            else:
                words = e2m1_words_bf16(g, _spread(tl.where(unused, 0.0, inv_scale)))
        else:
            safe = fast_division_safe(amax, block_scale, inv_scale) | unused
            q = divide_tile(g, _spread(block_scale), _spread(inv_scale), safe, INTERPRET)
            q = round_to(q, W_DTYPE, INTERPRET)  # divided in w's dtype, as MLX
            if HAS_ENCODE:
                q = q * encode
            q = tl.where(_spread(unused), 0.0, q)  # code 0, as the codec's NaN -> 0
            codes = e2m1_encode(q)
        scale = tl.where(finite, scale_byte, 0x7F)
    else:  # mxfp4 / mxfp8: the power of two at or above amax / element max
        s = _block_scale_target(amax, 6.0 if MODE == 1 else 448.0, W_DTYPE, INTERPRET)
        exponent = tl.where(finite, e8m0_exponent_ceil(s), 0)
        scale_byte = tl.minimum(tl.maximum(exponent + 127, 0), 254)
        if WORDS:  # (the product is exact, and so is its bf16 rounding)
            words = e2m1_words_bf16(g, _spread(tl.where(finite, power_of_two(127 - scale_byte), 0.0)))
        else:
            q = g * _spread(power_of_two(127 - scale_byte))
            q = tl.where(_spread(finite), q, 0.0)
            codes = e2m1_encode(q) if MODE == 1 else e4m3_encode(q, not INTERPRET)
        scale = tl.where(finite, scale_byte, 0xFF)

    if FAKE:  # quantize-dequantize: code value times the block scale, exact in float32 (dequantize's numerics)
        values = values_of(codes, _spread(scale), _spread(scale), MODE, tl.float32, INTERPRET)
        tl.store(out_ptr + (row * K)[None, :, None, None] + col, _stored_bits(values, values == values, OUT_DTYPE),
                 mask=_spread(g_mask))
    else:
        if MODE != 0:
            tl.store(s_ptr + group_offsets, scale.to(tl.uint8), mask=g_mask)
        WG: tl.constexpr = GS * BITS // 32
        if WORDS:  # (V, R, G): word v of each group; non-finite groups' codes are 0
            words = tl.where(finite[None, :, :], words, 0)
        else:
            WP: tl.constexpr = WG if 32 % BITS == 0 else (8 if BITS > 4 else 4) * (GS // 32)  # (a power of two)
            words = _packed_words(codes, GS, VEC, BLOCK_R, G, BITS, WP)
        _store_group_words(q_ptr, words, row, group, g_mask, n_words, WG, ROWS_OUTER)


# Before Triton 3.7 the coalescing pass breaks ties between equally contiguous axes first-axis-first (see _load_tile).
_COALESCE_TIES_FIRST_AXIS_FIRST = tuple(int(v) for v in triton.__version__.split(".")[:2]) < (3, 7)


# (values a thread, warps) of the default tile, from the H200 tile sweep (benchmarks/quantize_bench.py --sweep):
# 64 values a thread (two or more groups) gives the affine and fp4 encoders more independent work; mxfp8 (whose
# encode is one instruction per two values) does best with 32. nvfp4 with the fp4 words: 16 x 256 with 2 warps
# (45.2 µs, with a tensor scale 55.9) against 8 x 256 (49.7, 61.6), 32 x 256 with 4 warps (45.9, 57.0).
_DEFAULT_TILE = {"affine": (64, 4), "mxfp4": (64, 4), "mxfp8": (32, 4), "nvfp4": (64, 2)}


def _tile(k: int, mode: str, group_size: int, itemsize: int, n_rows: int) -> tuple[int, int, int, int]:
    """(BLOCK_R, BLOCK_C, VEC, num_warps): VEC values of w make a 16-byte load; BLOCK_C covers whole groups (K is a
    multiple of the group size, and of 32 for 3/5/6 bits); BLOCK_R rows give each thread its share of values.
    Under the interpreter the tile is cut to the input (`_interpreter_tile`). LOWBIT_QUANT_TILE="R,C,warps"
    overrides (a benchmark knob)."""
    vec = min(16 // itemsize, group_size)
    override = os.environ.get("LOWBIT_QUANT_TILE")
    if override:
        r, c, warps = (int(v) for v in override.split(","))
        return r, c, vec, warps
    per_thread, warps = _DEFAULT_TILE[mode]
    block_c = min(256, triton.next_power_of_2(max(k, group_size)))
    block_r = max(1, 32 * warps * per_thread // block_c)
    if interpreting():
        block_r, block_c = _interpreter_tile(n_rows, k, group_size, block_r, block_c)
    return block_r, block_c, vec, warps


# The interpreter's cost of a program, in tile values: each value costs about the same (numpy work, and the group
# max's NaN-propagating reduction, which it runs value by value), padding included; a program's fixed cost is about
# 600 values' worth (measured: ~36 ms a program, ~60 us a value).
_INTERPRETER_PROGRAM_COST = 600


def _interpreter_tile(n_rows: int, k: int, group_size: int, block_r: int, block_c: int) -> tuple[int, int]:
    """The interpreter's (BLOCK_R, BLOCK_C): no larger than the GPU's tile in either axis, the one of least cost
    (programs times their fixed cost plus every value of every tile) for n_rows rows of K. The tile does not change
    the bytes: every value's arithmetic is the same in any tile."""
    best = None
    c = group_size
    while c <= block_c:
        r = 1
        while r <= min(block_r, triton.next_power_of_2(max(n_rows, 1))):
            programs = triton.cdiv(n_rows, r) * triton.cdiv(k, c)
            cost = (programs * (_INTERPRETER_PROGRAM_COST + r * c), -r * c)  # ties: the larger tile
            if best is None or cost < best[0]:
                best = (cost, r, c)
            r *= 2
        c *= 2
    return best[1], best[2]


def _words_path(rows, mode, out, block_r, block_c, warps) -> bool:
    """Whether the fp4 codes are made by e2m1_words_bf16 (inline PTX on eight values at a time; nvfp4 with a tensor
    scale: e2m1_words_bf16_scaled): on the GPU, for bfloat16 w, when the codes are stored (not fake_quantize), and
    when each thread's registers hold whole 16-byte vectors of a row in order, as that PTX reads them: the load is
    vectorized (unit column stride, 16-byte aligned start and rows) and a thread has 8 or more values of the tile."""
    return (not interpreting() and rows.dtype == torch.bfloat16 and out is None
            and mode in ("mxfp4", "nvfp4") and rows.stride(-1) == 1 and rows.data_ptr() % 16 == 0
            and rows.stride(0) % 16 == 0 and block_r * block_c >= 8 * 32 * warps)


def _encode_factor(global_scale, device):
    if global_scale is None:
        return None
    return tensor_encode_scale(global_scale.to(device)).reshape(1)  # lowbit.formats.nvfp4's arithmetic


def _bits_view(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int32 if t.dtype == torch.float32 else torch.int16)


def _launch(w, mode, group_size, bits, global_scale, q, scales, biases, out):
    k = w.shape[-1]
    rows = w.reshape(-1, k)
    dtype = out.dtype if out is not None else w.dtype
    n_rows = rows.shape[0]
    if n_rows == 0 or k == 0:
        return
    block_r, block_c, vec, warps = _tile(k, mode, group_size, w.element_size(), n_rows)
    encode = _encode_factor(global_scale, w.device)
    if mode == "affine":  # float outputs are written as their bits (see _stored_bits)
        scales, biases = _bits_view(scales), _bits_view(biases)
    if out is not None:
        out = _bits_view(out)
    dummy = scales if scales is not None else out
    n_col_tiles = triton.cdiv(k, block_c)
    quantize_kernel[(triton.cdiv(n_rows, block_r) * n_col_tiles,)](
        rows, dummy if q is None else q.view(torch.int32), dummy, dummy if biases is None else biases,
        dummy if out is None else out, dummy if encode is None else encode, n_rows, k, k * bits // 32, *rows.stride(),
        n_col_tiles,
        MODE=MODE_IDS[mode], BITS=bits, GS=group_size, W_DTYPE=TL_DTYPES[w.dtype], HAS_ENCODE=encode is not None,
        FAKE=out is not None, OUT_DTYPE=TL_DTYPES[dtype], BLOCK_R=block_r, BLOCK_C=block_c, VEC=vec,
        ROWS_OUTER=_COALESCE_TIES_FIRST_AXIS_FIRST,
        WORDS=_words_path(rows, mode, out, block_r, block_c, warps), INTERPRET=interpreting(),
        num_warps=warps,
    )


def quantize(w, mode, group_size, bits, global_scale):
    """w (..., K) -> the MLX tuple (w_q, scales[, biases]), the bytes of lowbit.formats.quantize_groups."""
    lead, k = w.shape[:-1], w.shape[-1]
    n_rows = w.numel() // k if k else 0
    q = torch.empty(n_rows, k * bits // 32, dtype=torch.uint32, device=w.device)
    scale_dtype = w.dtype if mode == "affine" else torch.uint8
    scales = torch.empty(n_rows, k // group_size, dtype=scale_dtype, device=w.device)
    biases = torch.empty_like(scales) if mode == "affine" else None
    _launch(w, mode, group_size, bits, global_scale, q, scales, biases, None)
    out = (q, scales) if biases is None else (q, scales, biases)
    return tuple(t.reshape(*lead, t.shape[-1]) for t in out)


def fake_quantize(x, mode, group_size, bits, global_scale, dtype):
    """quantize-dequantize of x (..., K) in an fp mode, in `dtype`, without the tensor scale (the caller applies
    it: global_scale / 2688 times the result)."""
    out = torch.empty(x.shape, dtype=dtype, device=x.device)
    _launch(x, mode, group_size, bits, global_scale, None, None, None, out)
    return out
