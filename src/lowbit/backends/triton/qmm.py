"""The quantized matmul kernel: out[i] = x[lhs[i]] @ dequantize(w[rhs[i]]) (.T), every format, any M, N, K.

One kernel serves quantized_matmul (batch broadcasting arrives as index arrays), gather_qmm and qqmm. It reads
MLX's layout in place through strides, so stride-0 (expanded) and non-contiguous w, scales and biases need no
copies, and it dequantizes each weight tile in registers to exactly the values of `lowbit.dequantize` before a
tensor-core dot, with the weights on the MMA's M side and the tokens on its N side (decode pads tokens to 16).

Batch invariance, the canonical reduction: K is cut into blocks (`block_k`: a function of the format); inside a
block the products are accumulated in a fixed order of tensor-core dots; the blocks are grouped into SPLITS
contiguous partials; each partial starts from zero and accumulates its blocks in order; the partials are added left
to right (0 + p0 + p1 + ...). The block and SPLITS depend on (format, N, K) only, never on M or the batch. Small M
runs the partials as separate programs and folds them in a second kernel; large M folds them inside one program;
both perform the same additions, so a row's bits never depend on M. (Tile shapes and warp counts do not change a
tl.dot's bits; the K reduction structure does.)
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from triton.runtime.errors import OutOfResources

from .. import interpreting

from .decode import (
    e2m1_value, e4m3_value, e8m0_value, pack_geometry, pack_group_tile, round_to, slot_codes, slot_codes_runtime,
    unpack_tile,
)

PACKS_PER_BLOCK = 16  # transpose=True: a K block is 16 packs, so each slot's dot has K = 16
BLOCK_K_NN = 128  # transpose=False: K rows per block


def block_k(bits: int, group_size: int, transpose: bool) -> int:
    """The K block of the canonical reduction: a function of the format and layout only (at least 16 packs and
    one whole group)."""
    return max(PACKS_PER_BLOCK * pack_geometry(bits)[0], group_size) if transpose else BLOCK_K_NN


MODE_IDS = {"affine": 0, "mxfp4": 1, "mxfp8": 2, "nvfp4": 3}
TL_DTYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}
TARGET_PROGRAMS = 264  # about two waves on a 132-SM Hopper; a constant, so the split never depends on the device
MAX_SPLITS = 16


@triton.jit
def _values(codes, scale, bias, MODE: tl.constexpr, SCALE_DTYPE: tl.constexpr, INTERPRET: tl.constexpr):
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
def _weight_tile(w_base, s_base, b_base, rows, row_mask, code_start, n_codes,
                 sw_r, sw_c, ss_r, ss_c, sb_r, sb_c,
                 R: tl.constexpr, C: tl.constexpr, MODE: tl.constexpr, BITS: tl.constexpr, GS: tl.constexpr,
                 PER_PACK: tl.constexpr, WORDS: tl.constexpr, WORDS_POW2: tl.constexpr,
                 SCALE_DTYPE: tl.constexpr, DOT_DTYPE: tl.constexpr, INTERPRET: tl.constexpr):
    """Rows `rows` x codes [code_start, code_start + C) of dequantize(w), as an (R, C) tile in DOT_DTYPE.

    Dequantized pack by pack (codes (R, packs, PER_PACK) against one scale per pack), reshaped once at the end."""
    codes = unpack_tile(w_base, rows, row_mask, sw_r, sw_c, code_start, n_codes, R, C, BITS,
                        PER_PACK, WORDS, WORDS_POW2)
    scale = pack_group_tile(s_base, rows, row_mask, ss_r, ss_c, code_start, n_codes, C, GS, PER_PACK)
    if MODE == 0:
        bias = pack_group_tile(b_base, rows, row_mask, sb_r, sb_c, code_start, n_codes, C, GS, PER_PACK)
    else:
        bias = scale
    values = _values(codes, scale, bias, MODE, SCALE_DTYPE, INTERPRET).to(DOT_DTYPE)
    return tl.reshape(values, (R, C))


@triton.jit
def _nt_block(partial, x_base, w_base, s_base, b_base, kb, K, offs_m, m_mask, offs_n, n_mask,
              sx_m, sx_slot, sx_pack, sw_r, sw_c, ss_r, ss_c, sb_r, sb_c,
              MODE: tl.constexpr, BITS: tl.constexpr, GS: tl.constexpr, PER_PACK: tl.constexpr, WORDS: tl.constexpr,
              SCALE_DTYPE: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr, PACKS: tl.constexpr,
              GROUPS: tl.constexpr, UNROLL_SLOTS: tl.constexpr, INTERPRET: tl.constexpr):
    """One K block of a transpose=True product (w is (N, K), codes along K): PACKS packs of every row.

    Every word is loaded once, as 2-D word planes; each of the PER_PACK code slots of a pack is an (N, PACKS)
    weight tile against the same slot of x, which the launcher stored slot-major so the slice is contiguous; one
    tensor-core dot per slot, in slot order. That is this format's K reduction (fixed by format, N and K; never M).
    Scales and biases are loaded once per group and repeated over the group's packs in registers."""
    pack = (kb * PACKS + tl.arange(0, PACKS)).to(tl.int64)
    pack_mask = pack * PER_PACK < K
    mask = n_mask[:, None] & pack_mask[None, :]
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
    group = kb * GROUPS + tl.arange(0, GROUPS)
    g_mask = n_mask[:, None] & (group * GS < K)[None, :]
    scale = tl.load(s_base + offs_n[:, None] * ss_r + group[None, :] * ss_c, mask=g_mask, other=0)
    scale = tl.reshape(tl.broadcast_to(scale[:, :, None], (scale.shape[0], GROUPS, PACKS // GROUPS)),
                       (scale.shape[0], PACKS))
    if MODE == 0:
        bias = tl.load(b_base + offs_n[:, None] * sb_r + group[None, :] * sb_c, mask=g_mask, other=0)
        bias = tl.reshape(tl.broadcast_to(bias[:, :, None], (bias.shape[0], GROUPS, PACKS // GROUPS)),
                          (bias.shape[0], PACKS))
    else:
        bias = scale
    x_tile = x_base + pack[:, None] * sx_pack + offs_m[None, :] * sx_m
    x_mask = pack_mask[:, None] & m_mask[None, :]
    if not UNROLL_SLOTS:  # a run-time slot loop: same arithmetic, much shorter compile for three-pass float32 dots
        for slot in range(PER_PACK):
            codes = slot_codes_runtime(w0, w1, w2, w3, w4, slot, BITS)
            w = _values(codes, scale, bias, MODE, SCALE_DTYPE, INTERPRET).to(DOT_DTYPE)
            x_t = tl.load(x_tile + slot * sx_slot, mask=x_mask, other=0.0)
            partial = tl.dot(w, x_t.to(DOT_DTYPE), partial, input_precision=PRECISION)
    else:
        for slot in tl.static_range(PER_PACK):
            codes = slot_codes(w0, w1, w2, w3, w4, slot, BITS)
            w = _values(codes, scale, bias, MODE, SCALE_DTYPE, INTERPRET).to(DOT_DTYPE)
            x_t = tl.load(x_tile + slot * sx_slot, mask=x_mask, other=0.0)
            partial = tl.dot(w, x_t.to(DOT_DTYPE), partial, input_precision=PRECISION)
    return partial


@triton.jit
def qmm_kernel(
    x_ptr, w_ptr, s_ptr, b_ptr, g_ptr, lhs_ptr, rhs_ptr, out_ptr, part_ptr,
    M, N, K, n_items,
    sx_b, sx_m, sx_k, sx_slot, sw_b, sw_r, sw_c, ss_b, ss_r, ss_c, sb_b, sb_r, sb_c, so_i, so_m, so_n,
    MODE: tl.constexpr, BITS: tl.constexpr, GS: tl.constexpr, TRANSPOSE: tl.constexpr, HAS_GLOBAL: tl.constexpr,
    PER_PACK: tl.constexpr, WORDS: tl.constexpr, WORDS_POW2: tl.constexpr,
    SPLITS: tl.constexpr, SPLIT_IN_GRID: tl.constexpr, SCALE_DTYPE: tl.constexpr, DOT_DTYPE: tl.constexpr,
    PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    INDEXED: tl.constexpr, UNROLL_SLOTS: tl.constexpr, INTERPRET: tl.constexpr,
):
    """One (BLOCK_N weights x BLOCK_M tokens) tile of one gathered item, over all of K or one split of it.

    The weight tile is the MMA's left operand (weights on the M side, tokens on the N side: decode pads tokens to 16,
    not 64); the accumulator is the transposed output tile."""
    pid = tl.program_id(0)
    m_tiles = tl.cdiv(M, BLOCK_M)
    tiles = m_tiles * tl.cdiv(N, BLOCK_N)
    tile = pid % tiles
    rest = pid // tiles
    if SPLIT_IN_GRID:
        split = rest % SPLITS
        item = rest // SPLITS
        first = split
        last = split + 1
    else:
        split = 0
        item = rest
        first = 0
        last = SPLITS
    pid_m = tile % m_tiles  # consecutive programs share a weight tile (L2 reuse)
    pid_n = tile // m_tiles

    if INDEXED:
        x_batch = tl.load(lhs_ptr + item).to(tl.int64)
        w_batch = tl.load(rhs_ptr + item).to(tl.int64)
    else:  # one plain product
        x_batch = item.to(tl.int64)
        w_batch = item.to(tl.int64)
    x_base = x_ptr + x_batch * sx_b
    w_base = w_ptr + w_batch * sw_b
    s_base = s_ptr + w_batch * ss_b
    b_base = b_ptr + w_batch * sb_b
    offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    offs_n = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    m_mask = offs_m < M
    n_mask = offs_n < N

    k_blocks = tl.cdiv(K, BLOCK_K)
    per_split = tl.cdiv(k_blocks, SPLITS)
    total = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    for s in range(first, last):
        partial = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
        for kb in range(s * per_split, tl.minimum((s + 1) * per_split, k_blocks)):
            if TRANSPOSE:
                partial = _nt_block(partial, x_base, w_base, s_base, b_base, kb, K, offs_m, m_mask, offs_n, n_mask,
                                    sx_m, sx_slot, sx_k, sw_r, sw_c, ss_r, ss_c, sb_r, sb_c,
                                    MODE, BITS, GS, PER_PACK, WORDS, SCALE_DTYPE, DOT_DTYPE, PRECISION,
                                    BLOCK_K // PER_PACK, BLOCK_K // GS, UNROLL_SLOTS, INTERPRET)
            else:  # w is (K, N): rows run along K, codes along N
                offs_k = (kb * BLOCK_K + tl.arange(0, BLOCK_K)).to(tl.int64)
                k_mask = offs_k < K
                x_t = tl.load(x_base + offs_k[:, None] * sx_k + offs_m[None, :] * sx_m,
                              mask=k_mask[:, None] & m_mask[None, :], other=0.0)
                w = tl.trans(_weight_tile(w_base, s_base, b_base, offs_k, k_mask, pid_n * BLOCK_N, N,
                                          sw_r, sw_c, ss_r, ss_c, sb_r, sb_c, BLOCK_K, BLOCK_N, MODE, BITS, GS,
                                          PER_PACK, WORDS, WORDS_POW2, SCALE_DTYPE, DOT_DTYPE, INTERPRET))
                partial = tl.dot(w, x_t.to(DOT_DTYPE), partial, input_precision=PRECISION)
        total = total + partial

    mask = n_mask[:, None] & m_mask[None, :]
    if SPLIT_IN_GRID and SPLITS > 1:
        part = part_ptr + ((split * n_items + item) * M + offs_m[None, :]) * N + offs_n[:, None]
        tl.store(part, total, mask=mask)
    else:
        if HAS_GLOBAL:
            total = total * (tl.load(g_ptr + w_batch) / 2688.0)
        out = out_ptr + item * so_i + offs_m[None, :] * so_m + offs_n[:, None] * so_n
        tl.store(out, total.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def fold_splits_kernel(part_ptr, g_ptr, rhs_ptr, out_ptr, MN, total_elems,
                       SPLITS: tl.constexpr, HAS_GLOBAL: tl.constexpr, INDEXED: tl.constexpr, BLOCK: tl.constexpr):
    """out = 0 + p0 + p1 + ... (left to right, float32), times the tensor scale, cast to out's dtype."""
    offs = (tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)).to(tl.int64)
    mask = offs < total_elems
    total = tl.zeros((BLOCK,), dtype=tl.float32)
    for s in tl.static_range(SPLITS):
        total = total + tl.load(part_ptr + s * total_elems + offs, mask=mask, other=0.0)
    if HAS_GLOBAL:
        if INDEXED:
            expert = tl.load(rhs_ptr + offs // MN, mask=mask, other=0)
        else:
            expert = offs // MN
        total = total * (tl.load(g_ptr + expert, mask=mask, other=1.0) / 2688.0)
    tl.store(out_ptr + offs, total.to(out_ptr.dtype.element_ty), mask=mask)


def k_splits(n: int, k: int, block: int) -> int:
    """SPLITS for a weight of N outputs and K inputs in K blocks of `block`: enough programs to fill the GPU at
    M = 1, at least four K blocks per split. A function of (N, K, format) only: this is what makes every M reduce
    the same way."""
    n_tiles = -(-n // 128)
    k_blocks = -(-k // block)
    splits = 1
    while n_tiles * splits < TARGET_PROGRAMS and k_blocks >= 4 * splits and splits < MAX_SPLITS:
        splits *= 2
    return splits


def _tile_config(m: int, transpose: bool):
    """(BLOCK_M tokens, BLOCK_N weights, num_warps, num_stages, split_in_grid) by M; on the GPU any choice gives the
    same bits. The interpreter runs tl.dot as a numpy matmul, whose bits may depend on the tile shape: it keeps one.
    transpose=False tiles N by whole groups and packs: BLOCK_N = 128."""
    if interpreting():
        return 16, 128, 4, 1, True
    override = os.environ.get("LOWBIT_QMM_TILE")  # "BLOCK_M,BLOCK_N,num_warps,num_stages": a tuning knob for benchmarks
    if override:
        bm, bn, warps, stages = (int(v) for v in override.split(","))
        return bm, bn, warps, stages, bm <= 64
    if m <= 16:  # measured on an H200 (benchmarks/tile_sweep.sh): BLOCK_N 128, 3 stages best or near best
        return 16, 128, 4, 3, True
    if m <= 64:
        return 64, 128, 4, 3, True
    return 128, 128, 8, 3, False


def _weight_and_dot_dtypes(mode: str, x_dtype, scales, biases) -> tuple[torch.dtype, torch.dtype]:
    """(dtype the weight values are computed in, tensor-core operand dtype).

    affine: MLX casts x, scales and biases to their promoted dtype and dequantizes there; the dot runs in it.
    fp modes: the values are exact in float32; the dot runs in x's dtype where they are exact in it too (bf16 holds
    every e2m1/e4m3 x 2**e value; f16 holds nvfp4's e2m1 x e4m3 but not mx's 2**e range), else in float32.
    """
    if mode == "affine":
        weight = torch.promote_types(torch.promote_types(x_dtype, scales.dtype), biases.dtype)
        dot = weight
    else:
        weight = torch.float32
        exact = x_dtype == torch.bfloat16 or (x_dtype == torch.float16 and mode == "nvfp4")
        dot = x_dtype if exact else torch.float32
    return weight, dot


_FITTING_STAGES: dict[tuple, int] = {}


def _launch_fitting(grid, stages: int, args: tuple, meta: dict) -> None:
    """Launch qmm_kernel with the deepest software pipeline (num_stages <= stages) that fits in shared memory.

    The pipeline depth changes only when loads are issued, never the arithmetic, so the bits do not depend on it."""
    key = tuple(meta.values())  # the dict is always built in the same order
    stages = _FITTING_STAGES.get(key, stages)
    while True:
        try:
            qmm_kernel[grid](*args, **meta, num_stages=stages)
        except OutOfResources:
            if stages == 1:
                raise
            stages -= 1
            continue
        _FITTING_STAGES[key] = stages
        return


def gather_qmm(x, w_q, scales, biases, global_scale, lhs, rhs, transpose, mode, group_size, bits, out_dtype,
               sorted_indices=False):
    """Backend entry: x (Bx, M, K), w_q (Bw, R, C), lhs/rhs (I,) or both None (one product) -> (I, M, N)."""
    indexed = lhs is not None
    n_items, m, k = lhs.shape[0] if indexed else 1, x.shape[-2], x.shape[-1]
    n = w_q.shape[-2] if transpose else w_q.shape[-1] * 32 // bits
    # (the interpreter truncates float32 -> bfloat16 where the GPU rounds to nearest even: let torch round there)
    kernel_dtype = torch.float32 if out_dtype == torch.bfloat16 and interpreting() else out_dtype
    out = torch.empty(n_items, m, n, dtype=kernel_dtype, device=x.device)
    if out.numel() == 0:
        return out
    if k == 0:
        return out.zero_()
    weight_dtype, dot = _weight_and_dot_dtypes(mode, x.dtype, scales, biases)
    unroll_slots = dot != torch.float32  # float32 (three-pass) dots loop over code slots at run time
    if dot == torch.bfloat16 and interpreting():  # the interpreter's tl.dot misreads bfloat16; float32 is exact
        dot = torch.float32
    bk = block_k(bits, group_size, transpose)
    splits = k_splits(n, k, bk)
    block_m, block_n, warps, stages, split_in_grid = _tile_config(m, transpose)
    per_pack, words, words_pow2 = pack_geometry(bits)
    split_in_grid = split_in_grid and splits > 1
    partials = (torch.empty(splits, n_items, m, n, dtype=torch.float32, device=x.device) if split_in_grid
                else out)
    b = biases if biases is not None else scales
    g = global_scale if global_scale is not None else scales
    lhs32, rhs32 = (lhs.to(torch.int32), rhs.to(torch.int32)) if indexed else (scales, scales)
    grid = (triton.cdiv(m, block_m) * triton.cdiv(n, block_n) * n_items * (splits if split_in_grid else 1),)
    if transpose:  # x stored slot-major, (Bx, M, PER_PACK, K / PER_PACK): each code slot's x is contiguous
        x = x.reshape(*x.shape[:-1], k // per_pack, per_pack).transpose(-1, -2).contiguous()
        x_strides = (x.stride(0), x.stride(1), x.stride(3), x.stride(2))
    else:
        x_strides = (*x.stride(), 0)
    _launch_fitting(grid, stages, (
        x, w_q.view(torch.int32), scales, b, g, lhs32, rhs32, out, partials,
        m, n, k, n_items,
        *x_strides, *w_q.stride(), *scales.stride(), *b.stride(), *out.stride(),
    ), dict(
        MODE=MODE_IDS[mode], BITS=bits, GS=group_size, TRANSPOSE=transpose, HAS_GLOBAL=global_scale is not None,
        PER_PACK=per_pack, WORDS=words, WORDS_POW2=words_pow2,
        SPLITS=splits, SPLIT_IN_GRID=split_in_grid, SCALE_DTYPE=TL_DTYPES[weight_dtype],
        DOT_DTYPE=TL_DTYPES[dot], PRECISION="tf32x3" if dot == torch.float32 else "tf32",
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=bk, INDEXED=indexed, UNROLL_SLOTS=unroll_slots,
        INTERPRET=interpreting(), num_warps=warps,
    ))
    if split_in_grid:
        total = n_items * m * n
        block = 1024
        fold_splits_kernel[(triton.cdiv(total, block),)](
            partials, g, rhs32, out, m * n, total, SPLITS=splits, HAS_GLOBAL=global_scale is not None,
            INDEXED=indexed, BLOCK=block,
        )
    return out.to(out_dtype)
