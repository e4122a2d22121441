"""quantize on the device: one Triton kernel for every format, byte-identical to lowbit.formats (the CPU path).

Each program reads a tile of BLOCK_R rows by BLOCK_C values once, finds each group's scale (and bias), encodes the
codes and writes the packed words and the scales. The same kernel can instead write the quantize-dequantize of its
input (`fake_quantize`): the activations of qqmm, quantized on the fly, in one pass.
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
    affine_codes, affine_params, divide_tile, e2m1_encode, e4m3_encode, e8m0_exponent_ceil, fast_division_safe,
    group_min_keeping_first_zero, power_of_two,
)
from .launch import MODE_IDS, TL_DTYPES
from .tiles import values_of


@triton.jit
def _store_packed(q_ptr, codes, rows, r_mask, col0, K, n_words,
                  BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, BITS: tl.constexpr):
    """Pack int32 codes (BLOCK_R, BLOCK_C) of columns col0.. into MLX's little-endian bit stream and store the words."""
    if 32 % BITS == 0:  # whole codes per word
        PER: tl.constexpr = 32 // BITS
        NW: tl.constexpr = BLOCK_C // PER
        shifts = tl.arange(0, PER) * BITS
        words = tl.sum(tl.reshape(codes, (BLOCK_R, NW, PER)) << shifts[None, None, :], axis=2)
        word = col0 // PER + tl.arange(0, NW)
        mask = r_mask[:, None] & (word * PER < K)[None, :]
        tl.store(q_ptr + rows[:, None] * n_words + word[None, :], words, mask=mask)
    else:  # 3, 5, 6 bits: every 32 codes fill BITS words, codes straddle words
        SP: tl.constexpr = BLOCK_C // 32
        c = tl.reshape(codes, (BLOCK_R, SP, 32)).to(tl.uint32)
        superpack = col0 // 32 + tl.arange(0, SP)
        mask = r_mask[:, None] & (superpack * 32 < K)[None, :]
        j = tl.arange(0, 32)
        for i in tl.static_range(BITS):
            shift = j * BITS - 32 * i  # where code j starts relative to word i's bit 0
            left = c << tl.minimum(tl.maximum(shift, 0), 31).to(tl.uint32)[None, None, :]
            right = c >> tl.minimum(tl.maximum(-shift, 0), 31).to(tl.uint32)[None, None, :]
            part = tl.where((shift >= 0)[None, None, :], left, right)
            part = tl.where(((shift < 32) & (shift > -BITS))[None, None, :], part, 0)
            words = tl.sum(part.to(tl.int32, bitcast=True), axis=2)  # disjoint bits: the sum is an OR
            tl.store(q_ptr + rows[:, None] * n_words + (superpack * BITS + i)[None, :], words, mask=mask)


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


@triton.jit
def _amax_over(g, element_max, DTYPE: tl.constexpr, INTERPRET: tl.constexpr):
    """Each group's amax / element_max: a true division rounded to w's dtype (as MLX), kept in float32."""
    amax = tl.max(tl.abs(g), axis=2)
    return round_to(tl.math.div_rn(amax, tl.full(amax.shape, element_max, tl.float32)), DTYPE, INTERPRET)


@triton.jit
def quantize_kernel(w_ptr, q_ptr, s_ptr, b_ptr, out_ptr, encode_ptr, n_rows, K, sw_r, sw_c,
                    MODE: tl.constexpr, BITS: tl.constexpr, GS: tl.constexpr, W_DTYPE: tl.constexpr,
                    HAS_ENCODE: tl.constexpr, FAKE: tl.constexpr, OUT_DTYPE: tl.constexpr,
                    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, INTERPRET: tl.constexpr):
    """Quantize rows of w (n_rows, K) in groups of GS: packed words to q, scales (and biases) to s (and b); with
    FAKE, write the dequantized values (float32 products of code and scale, without the tensor scale) to out."""
    G: tl.constexpr = BLOCK_C // GS
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    col0 = tl.program_id(1) * BLOCK_C
    cols = col0 + tl.arange(0, BLOCK_C)
    r_mask = rows < n_rows
    mask = r_mask[:, None] & (cols < K)[None, :]
    w = tl.load(w_ptr + rows[:, None] * sw_r + cols[None, :] * sw_c, mask=mask, other=0.0)
    if W_DTYPE == tl.bfloat16:  # widened from the bits (the interpreter's own conversion flushes subnormals)
        w = (w.to(tl.int16, bitcast=True).to(tl.int32) << 16).to(tl.float32, bitcast=True)
    g = tl.reshape(w.to(tl.float32), (BLOCK_R, G, GS))
    group = col0 // GS + tl.arange(0, G)
    g_mask = r_mask[:, None] & (group * GS < K)[None, :]
    finite = tl.max(tl.where(tl.abs(g) < float("inf"), 0, 1), axis=2) == 0  # (R, G): no NaN / Inf in the group
    n_groups = K // GS
    scale_ptrs = s_ptr + rows[:, None] * n_groups + group[None, :]

    if MODE == 0:  # affine
        lo = group_min_keeping_first_zero(g, GS) if BITS == 1 else tl.min(g, axis=2)
        hi = tl.max(g, axis=2)
        scale, bias = affine_params(lo, hi, BITS)
        inv_scale = tl.math.div_rn(tl.full(scale.shape, 1.0, tl.float32), scale)
        reach = tl.maximum(tl.abs(hi - bias), tl.abs(lo - bias))  # bounds |g - bias|
        safe = fast_division_safe(reach, scale, inv_scale) | ~finite  # (non-finite groups: codes 0 below)
        codes = affine_codes(divide_tile(g - bias[:, :, None], scale, inv_scale, safe, INTERPRET), BITS)
        codes = tl.where(finite[:, :, None], codes, 0)
        tl.store(scale_ptrs, _stored_bits(scale, finite, W_DTYPE), mask=g_mask)
        tl.store(b_ptr + rows[:, None] * n_groups + group[None, :], _stored_bits(bias, finite, W_DTYPE),
                 mask=g_mask)
    elif MODE == 3:  # nvfp4: e4m3 block scale of amax / 6 (times the tensor scale's encode factor)
        s = _amax_over(g, 6.0, W_DTYPE, INTERPRET)
        if HAS_ENCODE:
            encode = tl.load(encode_ptr)
            scale_byte = e4m3_encode(s * encode)
        else:
            scale_byte = e4m3_encode(s)
        block_scale = e4m3_value(scale_byte)
        q = round_to(tl.math.div_rn(g, block_scale[:, :, None]), W_DTYPE, INTERPRET)  # divided in w's dtype, as MLX
        if HAS_ENCODE:
            q = q * encode
        q = tl.where((block_scale == 0.0)[:, :, None] | ~finite[:, :, None], 0.0, q)
        codes = e2m1_encode(q)
        scale = tl.where(finite, scale_byte, 0x7F)
    else:  # mxfp4 / mxfp8: the power of two at or above amax / element max
        s = _amax_over(g, 6.0 if MODE == 1 else 448.0, W_DTYPE, INTERPRET)
        exponent = tl.where(finite, e8m0_exponent_ceil(s), 0)
        scale_byte = tl.minimum(tl.maximum(exponent + 127, 0), 254)
        q = g * power_of_two(127 - scale_byte)[:, :, None]
        q = tl.where(finite[:, :, None], q, 0.0)
        codes = e2m1_encode(q) if MODE == 1 else e4m3_encode(q)
        scale = tl.where(finite, scale_byte, 0xFF)

    if FAKE:  # quantize-dequantize: code value times the block scale, exact in float32 (dequantize's numerics)
        values = values_of(codes, scale[:, :, None], scale[:, :, None], MODE, tl.float32, INTERPRET)
        values = tl.reshape(values, (BLOCK_R, BLOCK_C))
        tl.store(out_ptr + rows[:, None] * K + cols[None, :], _stored_bits(values, values == values, OUT_DTYPE),
                 mask=mask)
    else:
        if MODE != 0:
            tl.store(scale_ptrs, scale.to(tl.uint8), mask=g_mask)
        _store_packed(q_ptr, tl.reshape(codes, (BLOCK_R, BLOCK_C)), rows, r_mask, col0, K, K * BITS // 32,
                      BLOCK_R, BLOCK_C, BITS)


def _tile(k: int) -> tuple[int, int, int]:
    """(BLOCK_R, BLOCK_C, num_warps); BLOCK_C covers whole groups and whole 32-code runs (K is a multiple of both
    the group size and, for 3/5/6 bits, 32). LOWBIT_QUANT_TILE="R,C,warps" overrides (a benchmark knob)."""
    override = os.environ.get("LOWBIT_QUANT_TILE")
    if override:
        r, c, warps = (int(v) for v in override.split(","))
        return r, c, warps
    return 16, min(256, triton.next_power_of_2(max(k, 128))), 4


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
    block_r, block_c, warps = _tile(k)
    encode = _encode_factor(global_scale, w.device)
    if mode == "affine":  # float outputs are written as their bits (see _stored_bits)
        scales, biases = _bits_view(scales), _bits_view(biases)
    if out is not None:
        out = _bits_view(out)
    dummy = scales if scales is not None else out
    grid = (triton.cdiv(n_rows, block_r), triton.cdiv(k, block_c))
    quantize_kernel[grid](
        rows, dummy if q is None else q.view(torch.int32), dummy, dummy if biases is None else biases,
        dummy if out is None else out, dummy if encode is None else encode, n_rows, k, *rows.stride(),
        MODE=MODE_IDS[mode], BITS=bits, GS=group_size, W_DTYPE=TL_DTYPES[w.dtype], HAS_ENCODE=encode is not None,
        FAKE=out is not None, OUT_DTYPE=TL_DTYPES[dtype], BLOCK_R=block_r, BLOCK_C=block_c, INTERPRET=interpreting(),
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
