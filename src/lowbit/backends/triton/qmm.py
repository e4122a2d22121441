"""The decode kernel: out[i] = x[lhs[i]] @ dequantize(w[rhs[i]]) (.T), every format, any M, N, K.

One kernel serves quantized_matmul (batch broadcasting arrives as index arrays), gather_qmm and qqmm. It reads
MLX's layout in place through strides, so stride-0 (expanded) and non-contiguous w, scales and biases need no
copies, and it dequantizes each weight tile in registers to exactly the values of `lowbit.dequantize` before a
tensor-core dot, with the weights on the MMA's M side and the tokens on its N side (decode pads tokens to 16).
Large single products go to prefill.py (dequantize tiles once, then a bf16 GEMM); both follow the canonical
reduction of reduction.py, so a row's bits never depend on M or on which path served it.
"""

from __future__ import annotations

import contextlib
import functools
import os

import torch
import triton
import triton.language as tl

from .. import BOUND_PRODUCTS, interpreting, workspace_per_call
from .decode import pack_geometry
from .launch import MODE_IDS, TL_DTYPES, BoundLaunch, launcher
from .prefill import prefill_qmm
from .reduction import block_k, k_splits, slot_major, slot_major_launch
from .schedule import fits_one_program, schedule, schedule_bound
from . import wgmma_decode
from .tiles import (
    affine_eight_planes, block_scales, block_words, nn_weight_tile, pack_pair_operands, pack_pairs, packed_decoding,
    packed_planes, per_pack, slot_major_tile, slot_plane, slot_plane_runtime,
)

@triton.jit
def _plane_dot(partial, plane, x_block, m_mask, SLOT: tl.constexpr, PACKS: tl.constexpr,
               DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr):
    """partial += plane (N, PACKS) @ the block's slot SLOT of x (PACKS, M); x_block points at slot 0."""
    x_t = tl.load(x_block + SLOT * PACKS, mask=m_mask[None, :], other=0.0)
    return tl.dot(plane, x_t.to(DOT_DTYPE), partial, input_precision=PRECISION)


@triton.jit
def _x_slots(x_ptr, x_rows, sx_k, kb, K, m_mask, FIRST: tl.constexpr, SLOTS: tl.constexpr, PER_PACK: tl.constexpr,
             BLOCK_K: tl.constexpr, X_SLOT_MAJOR: tl.constexpr):
    """x's slots FIRST .. FIRST + SLOTS - 1 of K block kb, slot-major: (SLOTS * PACKS, M), the operand of those
    planes' dot. From the slot-major copy (a contiguous run) or from x as given (a run of SLOTS per pack, reordered
    here); past K: zeros."""
    PACKS: tl.constexpr = BLOCK_K // PER_PACK
    if X_SLOT_MAJOR:  # (zero-padded to whole blocks)
        k = kb * BLOCK_K + FIRST * PACKS + tl.arange(0, SLOTS * PACKS)
        return tl.load(x_ptr + x_rows[None, :] + k[:, None], mask=m_mask[None, :], other=0.0)
    pack = kb * PACKS + tl.arange(0, PACKS)
    k = tl.reshape((pack * PER_PACK + FIRST)[:, None] + tl.arange(0, SLOTS)[None, :], (PACKS * SLOTS,))
    in_k = tl.max_constancy(tl.reshape(tl.broadcast_to((pack * PER_PACK < K)[:, None], (PACKS, SLOTS)),
                                       (PACKS * SLOTS,)), [SLOTS])
    x_t = tl.load(x_ptr + x_rows[None, :] + k[:, None] * sx_k, mask=in_k[:, None] & m_mask[None, :], other=0.0)
    x_t = tl.permute(tl.reshape(x_t, (PACKS, SLOTS, x_t.shape[1])), (1, 0, 2))
    return tl.reshape(x_t, (SLOTS * PACKS, x_t.shape[2]))


@triton.jit
def _nt_block(partial, x_ptr, x_rows, sx_k, w_base, scale, bias, kb, K, m_mask, offs_n, n_mask, sw_r, sw_c,
              MODE: tl.constexpr, BITS: tl.constexpr, GS: tl.constexpr, PER_PACK: tl.constexpr, WORDS: tl.constexpr,
              SCALE_DTYPE: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr, BLOCK_K: tl.constexpr,
              BLOCKS: tl.constexpr, PACKED: tl.constexpr, UNROLL_SLOTS: tl.constexpr, X_SLOT_MAJOR: tl.constexpr,
              INTERPRET: tl.constexpr):
    """K blocks kb .. kb + BLOCKS - 1 of a transpose=True product (w is (N, K), codes along K), in canonical order.

    Every word is loaded once. x arrives slot-major (reduction.slot_major), so each plane's x is contiguous, or
    (X_SLOT_MAJOR false: PACKED only) as given, reordered per block in the kernel (no pass over x before the
    launch: at decode that pass is a launch of its own); x_rows holds each token column's offset into x. scale and
    bias are the blocks' (N, BLOCKS * GROUPS) tiles, loaded one step ahead by the caller. K here ends the caller's
    split: blocks past it read as zeros (BLOCKS > 1 only with PACKED)."""
    PACKS: tl.constexpr = BLOCK_K // PER_PACK
    GROUPS: tl.constexpr = BLOCK_K // GS
    w0, w1, w2, w3, w4 = block_words(w_base, kb * PACKS, K, offs_n, n_mask, sw_r, sw_c, GS, PER_PACK, WORDS,
                                     BLOCKS * PACKS)
    if PACKED and BITS != 4 and BITS != 8:  # affine 1/2/3/5/6-bit (BLOCKS 1): eight planes a dot, in slot order
        a0, b0 = pack_pairs(w0)
        a1, b1 = pack_pairs(w1)
        a2, b2 = pack_pairs(w2)
        a3, b3 = pack_pairs(w3)
        a4, b4 = pack_pairs(w4)
        scale2, neg2, bias2 = pack_pair_operands(scale, bias, GROUPS, PACKS, DOT_DTYPE)
        for first in tl.static_range(0, PER_PACK, 8):
            p0, p1, p2, p3, p4, p5, p6, p7 = affine_eight_planes(a0, a1, a2, a3, a4, b0, b1, b2, b3, b4, scale2,
                                                                 neg2, bias2, first, BITS, DOT_DTYPE)
            tile = slot_major_tile(p0, p1, p2, p3, p4, p5, p6, p7, 8, 1)
            x_t = _x_slots(x_ptr, x_rows, sx_k, kb, K, m_mask, first, 8, PER_PACK, BLOCK_K, X_SLOT_MAJOR)
            partial = tl.dot(tile, x_t.to(DOT_DTYPE), partial, input_precision=PRECISION)
    elif PACKED:  # the blocks' planes side by side, slot-major: one (N, BLOCKS * BLOCK_K) operand, one dot
        p0, p1, p2, p3, p4, p5, p6, p7 = packed_planes(w0, scale, bias, MODE, BITS, BLOCKS * GROUPS, BLOCKS * PACKS,
                                                       DOT_DTYPE)
        tile = slot_major_tile(p0, p1, p2, p3, p4, p5, p6, p7, 8 if BITS == 4 else 4, BLOCKS)
        k = kb * BLOCK_K + tl.arange(0, BLOCKS * BLOCK_K)
        if X_SLOT_MAJOR:  # zero-padded to whole blocks: only blocks past the split's last one are masked
            x_mask = tl.max_constancy((k < tl.cdiv(K, BLOCK_K) * BLOCK_K)[:, None] & m_mask[None, :], [BLOCK_K, 1])
            x_t = tl.load(x_ptr + x_rows[None, :] + k[:, None], mask=x_mask, other=0.0)
        else:  # x as given, in natural order: each block is reordered slot-major here (pack, slot -> slot, pack)
            x_mask = tl.max_constancy((k < K)[:, None] & m_mask[None, :], [GS, 1])
            x_t = tl.load(x_ptr + x_rows[None, :] + k[:, None] * sx_k, mask=x_mask, other=0.0)
            x_t = tl.reshape(x_t, (BLOCKS, PACKS, PER_PACK, x_t.shape[1]))
            x_t = tl.reshape(tl.permute(x_t, (0, 2, 1, 3)), (BLOCKS * BLOCK_K, x_t.shape[3]))
        partial = tl.dot(tile, x_t.to(DOT_DTYPE), partial, input_precision=PRECISION)
    else:  # plane by plane in slot order, each against its contiguous slice of x
        x_block = x_ptr + x_rows[None, :] + kb * BLOCK_K + tl.arange(0, PACKS)[:, None]
        scale = per_pack(scale, GROUPS, PACKS)
        bias = per_pack(bias, GROUPS, PACKS)
        if UNROLL_SLOTS:
            for slot in tl.static_range(PER_PACK):
                plane = slot_plane(w0, w1, w2, w3, w4, scale, bias, slot, MODE, BITS, SCALE_DTYPE, DOT_DTYPE,
                                   INTERPRET)
                partial = _plane_dot(partial, plane, x_block, m_mask, slot, PACKS, DOT_DTYPE, PRECISION)
        else:  # a run-time slot loop: same arithmetic, much shorter compile for three-pass float32 dots
            for slot in range(PER_PACK):
                plane = slot_plane_runtime(w0, w1, w2, w3, w4, scale, bias, slot, MODE, BITS, SCALE_DTYPE,
                                           DOT_DTYPE, INTERPRET)
                x_t = tl.load(x_block + slot * PACKS, mask=m_mask[None, :], other=0.0)
                partial = tl.dot(plane, x_t.to(DOT_DTYPE), partial, input_precision=PRECISION)
    return partial


@triton.jit
def qmm_kernel(
    x_ptr, w_ptr, s_ptr, b_ptr, g_ptr, lhs_ptr, rhs_ptr, rows_ptr, tile_w_ptr, tile_start_ptr, tile_rows_ptr, out_ptr,
    part_ptr, arrivals_ptr,
    M, N, K, n_rows, n_weights, sg,
    sx_b, sx_m, sx_k, sw_b, sw_r, sw_c, ss_b, ss_r, ss_c, sb_b, sb_r, sb_c, so_i, so_m, so_n,
    MODE: tl.constexpr, BITS: tl.constexpr, GS: tl.constexpr, TRANSPOSE: tl.constexpr, HAS_GLOBAL: tl.constexpr,
    PER_PACK: tl.constexpr, WORDS: tl.constexpr, WORDS_POW2: tl.constexpr,
    SPLITS: tl.constexpr, SPLIT_IN_GRID: tl.constexpr, SCALE_DTYPE: tl.constexpr, DOT_DTYPE: tl.constexpr,
    PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ROUTING: tl.constexpr, PACKED: tl.constexpr, BLOCKS: tl.constexpr, UNROLL_SLOTS: tl.constexpr,
    X_SLOT_MAJOR: tl.constexpr, INTERPRET: tl.constexpr,
):
    """One tile of (BLOCK_N weights of one weight matrix) x (up to BLOCK_M output rows that use it), over all of K
    or one split of it.

    Output rows are numbered item * M + m. ROUTING says how row tiles find their rows and weight:
    - PLAIN: one product, one weight, rows 0..M-1;
    - PER_ITEM: row tile i is gathered item i (its M <= BLOCK_M rows, weight rhs[i], x batch lhs[i]); no schedule
      to build, for the few routed rows of decoding, where an expert is rarely shared;
    - GROUPED: a schedule made by the launcher: rows sorted by the weight they use (`rows_ptr`), and per tile the
      weight, the first sorted row and the row count (tiles past the schedule have weight n_weights and do nothing).
      So a weight tile is decoded once for all the rows that use it, whoever else was routed with them.
    Every mode runs the same arithmetic per row: a row's bits do not depend on the mode.

    The weight tile is the MMA's left operand (weights on the M side, rows on the N side: decode pads rows to 16,
    not 64); the accumulator is the transposed output tile."""
    pid = tl.program_id(0)
    if ROUTING == 2:
        row_tiles = tl.cdiv(n_rows, BLOCK_M) + tl.minimum(n_weights, n_rows)  # the launcher's bound
    elif ROUTING == 1:
        row_tiles = n_rows // M
    else:
        row_tiles = tl.cdiv(n_rows, BLOCK_M)
    tiles = row_tiles * tl.cdiv(N, BLOCK_N)
    tile = pid % tiles
    split = pid // tiles  # (0 unless SPLIT_IN_GRID)
    row_tile = tile % row_tiles  # consecutive programs share a weight tile (L2 reuse)
    pid_n = tile // row_tiles
    local = tl.arange(0, BLOCK_M)
    if ROUTING == 2:
        weight = tl.load(tile_w_ptr + row_tile).to(tl.int64)
        m_mask = local < tl.load(tile_rows_ptr + row_tile)  # (0 rows in tiles past the schedule)
        rows = tl.load(rows_ptr + tl.load(tile_start_ptr + row_tile) + local, mask=m_mask, other=0).to(tl.int64)
        item = rows // M
        x_rows = tl.load(lhs_ptr + item, mask=m_mask, other=0).to(tl.int64) * sx_b + (rows % M) * sx_m
        weight = tl.minimum(weight, n_weights - 1)
    elif ROUTING == 1:
        item = row_tile.to(tl.int64)
        m_mask = local < M
        rows = item * M + local
        weight = tl.load(rhs_ptr + item).to(tl.int64)
        x_rows = tl.load(lhs_ptr + item).to(tl.int64) * sx_b + local * sx_m
    else:  # one plain product
        weight = 0
        rows = (row_tile * BLOCK_M + local).to(tl.int64)
        m_mask = rows < n_rows
        item = rows * 0
        x_rows = rows * sx_m
    out_rows = item * so_i + (rows % M) * so_m
    w_base = w_ptr + weight * sw_b
    s_base = s_ptr + weight * ss_b
    b_base = b_ptr + weight * sb_b
    offs_n = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    n_mask = offs_n < N

    k_blocks = tl.cdiv(K, BLOCK_K)
    per_split = tl.cdiv(k_blocks, SPLITS)
    k_end = tl.where(tl.max(m_mask.to(tl.int32), 0) > 0, k_blocks, 0)  # a tile with no rows does no work
    total = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    # SPLIT_IN_GRID: this program's split; else every split, in one pipelined loop (a loop per split would fill and
    # drain the pipeline each time). (A one-trip outer loop: with the bounds computed inside it, ptxas keeps the MMAs
    # asynchronous; computed outside, it serializes them.)
    for s in range(split, split + 1):
        lo = s * per_split
        hi = tl.minimum((s + 1) * per_split, k_end) if SPLIT_IN_GRID else k_end
        partial = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
        if TRANSPOSE:  # BLOCKS blocks a step; each step's scales are loaded one step ahead, to hide their latency
            k_stop = tl.minimum(K, hi * BLOCK_K)  # (a whole number of groups: so is K)
            scale, bias = block_scales(s_base, b_base, lo, k_stop, offs_n, n_mask, ss_r, ss_c, sb_r, sb_c,
                                       MODE, GS, BLOCK_K, BLOCKS)
        for kb in range(lo, hi, BLOCKS):
            if TRANSPOSE:
                next_scale, next_bias = block_scales(s_base, b_base, kb + BLOCKS, k_stop, offs_n, n_mask, ss_r, ss_c,
                                                     sb_r, sb_c, MODE, GS, BLOCK_K, BLOCKS)
                partial = _nt_block(partial, x_ptr, x_rows, sx_k, w_base, scale, bias, kb, k_stop, m_mask,
                                    offs_n, n_mask, sw_r, sw_c, MODE, BITS, GS, PER_PACK, WORDS, SCALE_DTYPE,
                                    DOT_DTYPE, PRECISION, BLOCK_K, BLOCKS, PACKED, UNROLL_SLOTS, X_SLOT_MAJOR,
                                    INTERPRET)
                scale = next_scale
                bias = next_bias
            else:  # w is (K, N): rows run along K, codes along N
                offs_k = (kb * BLOCK_K + tl.arange(0, BLOCK_K)).to(tl.int64)
                k_mask = offs_k < K
                x_t = tl.load(x_ptr + offs_k[:, None] * sx_k + x_rows[None, :],
                              mask=k_mask[:, None] & m_mask[None, :], other=0.0)
                w = tl.trans(nn_weight_tile(w_base, s_base, b_base, offs_k, k_mask, pid_n * BLOCK_N, N,
                                          sw_r, sw_c, ss_r, ss_c, sb_r, sb_c, BLOCK_K, BLOCK_N, MODE, BITS, GS,
                                          PER_PACK, WORDS, WORDS_POW2, SCALE_DTYPE, DOT_DTYPE, INTERPRET))
                partial = tl.dot(w, x_t.to(DOT_DTYPE), partial, input_precision=PRECISION)
            if not SPLIT_IN_GRID and SPLITS > 1:  # a split ends: its partial joins the total (BLOCKS is then 1)
                if (kb + 1) % per_split == 0:
                    total = total + partial
                    partial = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
        total = total + partial  # (after a split's end the partial is +0, and the total never -0: no change)

    mask = n_mask[:, None] & m_mask[None, :]
    if SPLIT_IN_GRID and SPLITS > 1:
        # Each split stores its partial; the tile's last program to arrive adds them, in split order, from memory.
        part = part_ptr + (rows[None, :] * N + offs_n[:, None])
        tl.store(part + split * n_rows * N, total, mask=mask)
        tl.debug_barrier()  # every thread's partial is stored before the arrival is counted (release)
        arrived = tl.atomic_add(arrivals_ptr + tile, 1, sem="acq_rel", scope="gpu")
        if arrived == SPLITS - 1:
            total = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
            for piece in tl.static_range(SPLITS):
                total = total + tl.load(part + piece * n_rows * N, mask=mask, other=0.0, cache_modifier=".cg")
            tl.atomic_xchg(arrivals_ptr + tile, 0, sem="relaxed", scope="gpu")  # ready for the next launch
            if HAS_GLOBAL:
                total = total * (tl.load(g_ptr + weight * sg) / 2688.0)
            tl.store(out_ptr + out_rows[None, :] + offs_n[:, None] * so_n, total.to(out_ptr.dtype.element_ty),
                     mask=mask)
    else:
        if HAS_GLOBAL:
            total = total * (tl.load(g_ptr + weight * sg) / 2688.0)
        tl.store(out_ptr + out_rows[None, :] + offs_n[:, None] * so_n, total.to(out_ptr.dtype.element_ty), mask=mask)


def _tile_config(rows_per_weight: int, interpret: bool):
    """(BLOCK_M rows, BLOCK_N weights, num_warps, num_stages, split_in_grid) by the rows that share a weight; on the
    GPU any choice of 4 or more warps (wgmma) gives the same bits (fewer run mma.sync: other bits, see reduction.py).
    The interpreter runs tl.dot as a numpy matmul, whose bits may depend on the tile shape: it keeps one."""
    if interpret:
        return 16, 128, 4, 1, True
    override = os.environ.get("LOWBIT_QMM_TILE")  # "BLOCK_M,BLOCK_N,num_warps,num_stages": a tuning knob for benchmarks
    if override:
        bm, bn, warps, stages = (int(v) for v in override.split(","))
        return bm, bn, warps, stages, bm <= 64
    if rows_per_weight <= 16:  # measured on an H200 (benchmarks/prefill_probe.py): 64 weight rows, 4 warps, 3 stages
        return 16, 64, 4, 3, True
    if rows_per_weight <= 128:  # all the rows in one tile of 64 weight rows: measured on an H100 at M = 32 / 64 / 128
        # (benchmarks/mid_m_sweep.py, results/h100-2026-12-07-mid-m.md), 1.07-2.2x faster than 64 x 128 tiles for
        # affine3/4 and mxfp4 in 17 of 18 cases (affine3 4096^2 at M = 128: 56.0 against 47.7 us); as measured, the
        # 128-token tile runs its splits in one program's loop (no partials of 128 rows through memory)
        block = triton.next_power_of_2(rows_per_weight)
        return block, 64, 4, 3, block <= 64
    return 128, 128, 8, 3, False  # (large M that the prefill path does not take: gathers, float32)


def weight_and_dot_dtypes(mode: str, x_dtype, scales_dtype, biases_dtype) -> tuple[torch.dtype, torch.dtype]:
    """(dtype the weight values are computed in, tensor-core operand dtype).

    affine: MLX casts x, scales and biases to their promoted dtype and dequantizes there; the dot runs in it.
    fp modes: the values are exact in float32; the dot runs in x's dtype where they are exact in it too (bf16 holds
    every e2m1/e4m3 x 2**e value; f16 holds nvfp4's e2m1 x e4m3 but not mx's 2**e range), else in float32.
    """
    if mode == "affine":
        weight = torch.promote_types(torch.promote_types(x_dtype, scales_dtype), biases_dtype)
        dot = weight
    else:
        weight = torch.float32
        exact = x_dtype == torch.bfloat16 or (x_dtype == torch.float16 and mode == "nvfp4")
        dot = x_dtype if exact else torch.float32
    return weight, dot


PREFILL_MIN_M = 160  # H200, 8192^2: decode 116-125 us at M = 128, prefill 135-144 us at M = 256


def _prefill_min_m(interpret: bool) -> int | None:
    """The M from which a single product takes the prefill path (None: never). The interpreter's dots round by tile
    shape, so there the path runs only when asked for (LOWBIT_QMM_PREFILL_M, also a benchmark knob)."""
    override = os.environ.get("LOWBIT_QMM_PREFILL_M")
    if override:
        return int(override)
    return None if interpret else PREFILL_MIN_M


# Registers per thread of the decode tiles of 3/5/6-bit packs (see _Plan). Measured on an H200 at M = 1 / 16 against
# no cap: affine3 g64 14336 x 4096 38.5 -> 30.5 us, affine6 g64 45.0 -> 41.3 us and 4096^2 18.7 -> 15.3 us, affine5
# g32 (cap 168) 54.8 -> 49.3 us; affine3 4096^2 13.8 -> 14.5 us is the one shape it slows.
DECODE_MAX_REGISTERS = {3: 128, 5: 168, 6: 128}

PLAIN, PER_ITEM, GROUPED = 0, 1, 2  # qmm_kernel's ROUTING
GROUP_MIN_ROWS = 64  # gathered products with fewer output rows (and M <= 16) run one row tile per item


def _routing(indexed: bool, m: int, n_rows: int) -> int:
    """How the kernel's row tiles find their rows and weights (see qmm_kernel). Grouping by weight reads each
    expert once but costs a sort and the schedule kernel (schedule.py); below GROUP_MIN_ROWS routed rows (decoding) the
    per-item tiles are cheaper. LOWBIT_GATHER_GROUP_ROWS overrides the threshold (a benchmark knob)."""
    if not indexed:
        return PLAIN
    group_min_rows = int(os.environ.get("LOWBIT_GATHER_GROUP_ROWS", GROUP_MIN_ROWS))
    return PER_ITEM if m <= 16 and n_rows < group_min_rows else GROUPED


class _Plan:
    """Everything a call decides from its static facts (formats, dtypes, sizes), made once per distinct set."""

    def __init__(self, mode, group_size, bits, transpose, x_dtype, scales_dtype, biases_dtype, has_global, out_dtype,
                 m, n, k, n_items, n_weights, indexed, capability):
        interpret = interpreting()
        # (the interpreter truncates float32 -> bfloat16 where the GPU rounds to nearest even: let torch round there)
        self.kernel_dtype = torch.float32 if out_dtype == torch.bfloat16 and interpret else out_dtype
        weight_dtype, dot = weight_and_dot_dtypes(mode, x_dtype, scales_dtype, biases_dtype)
        unroll_slots = dot != torch.float32  # float32 (three-pass) dots loop over code slots at run time
        if dot == torch.bfloat16 and interpret:  # the interpreter's tl.dot misreads bfloat16; float32 is exact
            dot = torch.float32
        self.bk = bk = block_k(bits, group_size, transpose)
        target = os.environ.get("LOWBIT_QMM_TARGET_PROGRAMS")  # a benchmark knob: it changes the canonical splits
        self.splits = splits = k_splits(n, k, bk, *([int(target)] if target else []))
        packed = transpose and packed_decoding(mode, bits, scales_dtype, biases_dtype, weight_dtype, dot, interpret)
        prefill_m = _prefill_min_m(interpret)
        self.prefill = (not indexed and prefill_m is not None and m >= prefill_m and dot in (x_dtype, torch.float32)
                        and (dot != torch.float32 or interpret))
        self.prefill_args = (mode, group_size, bits, bk, splits, weight_dtype, dot, packed)
        n_rows = n_items * m
        self.routing = routing = _routing(indexed, m, n_rows)
        block_m, block_n, warps, stages, split_in_grid = _tile_config(
            -(-n_rows // min(n_weights, n_items)) if routing == GROUPED else m, interpret)
        per_pack, words, words_pow2 = pack_geometry(bits)
        if words > 1 and transpose and not os.environ.get("LOWBIT_QMM_TILE"):
            # 3/5/6-bit packs span 3 or 5 words, so a row's words are strided by the pack: software pipelining copies
            # them to shared memory 4 bytes at a time, which saturates the L1/shared pipe (ncu, affine6 on an H200:
            # 77% busy at 11% of DRAM bandwidth). Loaded straight into registers they decode 30-45% faster.
            stages = 1
        # A register cap for the multi-word decode tiles (ptxas otherwise takes 200-240 a thread: 2 programs per SM).
        # LOWBIT_QMM_MAXNREG overrides it (a tuning knob); the cap moves registers, never the arithmetic.
        max_registers = int(os.environ.get("LOWBIT_QMM_MAXNREG", 0)) or (
            DECODE_MAX_REGISTERS.get(bits) if packed and transpose and block_m <= 16 else None)
        self.block_m = block_m
        # the splits run in the grid (partials folded by each tile's last program) or in one program's loop; a knob
        # for tests and benchmarks, which must see the same bits either way
        split_in_grid = bool(int(os.environ.get("LOWBIT_QMM_SPLIT_IN_GRID", int(split_in_grid))))
        self.split_in_grid = split_in_grid = split_in_grid and splits > 1
        # K blocks a step (packed decoders only; LOWBIT_QMM_BLOCKS, a power of two, is a tuning knob). Two where a
        # block holds one group: measured on an H200, affine8 g64 and affine4 g128 decode 20-35% faster; where a block
        # holds several groups two blocks a step are slower (more registers, fewer programs per SM). One where a
        # program runs several splits in one loop (a step must not straddle a split's end).
        blocks = int(os.environ.get("LOWBIT_QMM_BLOCKS", 2 if bk == group_size else 1)) if packed else 1
        blocks = 1 if splits > 1 and not split_in_grid else blocks
        blocks = blocks if bits in (4, 8) else 1  # (other affine widths decode plane by plane: one block a step)
        # Where x is reordered slot-major: by a pass before the launch (a launch of its own), or per K block in the
        # kernel. Measured on an H200 at M = 1-16 (decode tiles, packed decoders): in the kernel, mxfp4 and nvfp4
        # decode 3-21% faster (fewer registers), affine 4-bit 3-15% slower on the Llama MLP shapes; wider row tiles
        # share one reordered copy. LOWBIT_QMM_X_IN_KERNEL (0 / 1) overrides for those decode tiles (a knob).
        # The Gluon decode kernel (wgmma_decode.py) serves 4-bit plain products of a few rows on Hopper, same bits.
        gluon = wgmma_decode.serves(mode, bits, transpose, x_dtype, weight_dtype, dot, packed,
                                    (block_m, block_n, warps), routing, m, capability)
        if gluon:
            block_m = self.block_m = wgmma_decode.token_tile(mode, block_m, m)
        x_in_kernel = packed and block_m <= 16 and not self.prefill
        x_in_kernel = x_in_kernel and bool(int(os.environ.get("LOWBIT_QMM_X_IN_KERNEL",
                                                              int(mode != "affine" or gluon))))
        self.x_slot_major = transpose and not x_in_kernel
        # the grouped work list by one program where it fits (LOWBIT_SCHEDULE_ONE_PROGRAM=0: never; a benchmark knob)
        self.one_program_schedule = (routing == GROUPED and fits_one_program(n_items, n_weights)
                                     and os.environ.get("LOWBIT_SCHEDULE_ONE_PROGRAM", "1") == "1")
        if routing == GROUPED:
            self.row_tiles = schedule_bound(n_rows, n_weights, block_m)
        elif routing == PER_ITEM:
            self.row_tiles = n_items
        else:
            self.row_tiles = triton.cdiv(m, block_m)
        self.tiles = self.row_tiles * triton.cdiv(n, block_n)
        self.grid = (self.tiles * (splits if split_in_grid else 1),)
        self.qmm = launcher(
            wgmma_decode.packed4_decode_kernel if gluon else qmm_kernel, warps, stages, max_registers,
            MODE=MODE_IDS[mode], BITS=bits, GS=group_size, TRANSPOSE=transpose, HAS_GLOBAL=has_global,
            PER_PACK=per_pack, WORDS=words, WORDS_POW2=words_pow2,
            SPLITS=splits, SPLIT_IN_GRID=split_in_grid, SCALE_DTYPE=TL_DTYPES[weight_dtype],
            DOT_DTYPE=TL_DTYPES[dot], PRECISION="tf32x3" if dot == torch.float32 else "tf32",
            BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=bk, ROUTING=routing, PACKED=packed, BLOCKS=blocks,
            UNROLL_SLOTS=unroll_slots, X_SLOT_MAJOR=self.x_slot_major, INTERPRET=interpret,
            **(wgmma_decode.constexprs(self.x_slot_major, block_m) if gluon else {}),
        )


_SCRATCH: dict[tuple, dict] = {}  # (device, stream) -> that stream's kept scratch buffers, by name
_MAX_KEPT = 16 << 20  # bytes: a larger buffer (prefill-sized split partials) is allocated per call


def _stream_scratch(device: torch.device) -> dict | None:
    """The current stream's kept scratch buffers (name -> tensor), or None where scratch must be fresh per call.

    The kernels of one stream run one after the other, so one stream's buffers serve every eager launch on it: a
    buffer is written and read by the launches of one call before any later launch can touch it, and the arrival
    counters are put back to zero by the last program of each tile. A CUDA graph capture and a compiled graph's call
    (see backends.per_call_workspace) get fresh buffers, owned by the graph and shared with nothing else; so does the
    interpreter."""
    if device.type != "cuda" or workspace_per_call() or torch._C._cuda_isCurrentStreamCapturing():
        return None
    key = (device.index, torch._C._cuda_getCurrentRawStream(device.index))
    kept = _SCRATCH.get(key)
    if kept is None:
        kept = _SCRATCH[key] = {}
    return kept


def _scratch(kept: dict | None, name: str, numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A flat buffer of at least `numel` values: the stream's kept one (see _stream_scratch), grown as needed, or a
    fresh one. Arrival counters ("arrivals") start zeroed."""
    make = torch.zeros if name == "arrivals" else torch.empty
    if kept is None or numel * dtype.itemsize > _MAX_KEPT:
        return make(numel, dtype=dtype, device=device)
    buffer = kept.get((name, dtype))
    if buffer is None or buffer.numel() < numel:
        if buffer is not None:  # (kernels queued on this stream may still use the old one)
            buffer.record_stream(torch.cuda.current_stream(device))
        buffer = kept[(name, dtype)] = make(max(numel, 4096), dtype=dtype, device=device)
    return buffer


@functools.lru_cache(maxsize=4096)
def _plan(*facts) -> _Plan:
    return _Plan(*facts)


def forget_plans() -> None:
    """Drop the cached plans (and the products bound to them): call after changing a LOWBIT_* tuning variable in a
    running process."""
    _plan.cache_clear()
    BOUND_PRODUCTS.clear()


@contextlib.contextmanager
def tuned(**variables: str | None):
    """Within: the given LOWBIT_* tuning variables set (None: unset) and read afresh; restored after. For
    benchmarks, e.g. `with tuned(LOWBIT_QMM_TILE="16,64,4,3"): ...`."""
    saved = {name: os.environ.get(name) for name in variables}

    def apply(values):
        for name, value in values.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        forget_plans()

    apply(variables)
    try:
        yield
    finally:
        apply(saved)


def _batch_strides(t: torch.Tensor) -> tuple[int, ...]:
    """t's strides as a batch of matrices: a 2-D t is a batch of one (stride 0)."""
    return t.stride() if t.ndim == 3 else (0, *t.stride())


def _output_features(w_q, transpose: bool, bits: int) -> int:
    """N of x @ W: w_q's rows (transposed) or its unpacked columns."""
    return w_q.shape[-2] if transpose else w_q.shape[-1] * 32 // bits


def _plan_for(x, w_q, scales, biases, global_scale, lhs, transpose, mode, group_size, bits, out_dtype):
    indexed = lhs is not None
    n_items, m, k = lhs.shape[0] if indexed else 1, x.shape[-2], x.shape[-1]
    n = _output_features(w_q, transpose, bits)
    n_weights = w_q.shape[0] if w_q.ndim == 3 else 1
    return _plan(mode, group_size, bits, transpose, x.dtype, scales.dtype, None if biases is None else biases.dtype,
                 global_scale is not None, out_dtype, m, n, k, n_items, n_weights, indexed,
                 _capability(x.device)), n_items, m, n, k, n_weights


_CAPABILITIES: dict = {}


def _capability(device: torch.device) -> tuple[int, int] | None:
    """The CUDA device's compute capability (None on other devices); kept per device."""
    if device.type != "cuda":
        return None
    found = _CAPABILITIES.get(device.index)
    if found is None:
        found = _CAPABILITIES[device.index] = torch.cuda.get_device_capability(device)
    return found


def _qmm_ints(x_strides, w_q, scales, b, global_scale, m, n, k, n_rows, n_weights) -> tuple:
    """qmm_kernel's integer arguments: sizes, then the strides of x, w_q, scales, biases (batches of matrices) and of
    the contiguous (items, M, N) output."""
    return (m, n, k, n_rows, n_weights, global_scale.stride(0) if global_scale is not None else 0, *x_strides,
            *_batch_strides(w_q), *_batch_strides(scales), *_batch_strides(b), m * n, n, 1)


def _qmm_pointers(x, w_q, scales, biases, global_scale, lhs, rhs, schedule, out, partials, arrivals) -> tuple:
    """qmm_kernel's 14 pointer arguments in its order, from a call's tensors (BoundProduct: their positions in a
    call's list). What a call does not have (None) is stood in for, as the kernel never reads it: biases, tensor
    scale, index arrays and the grouped routing's schedule (rows, tile_w, tile_start, tile_rows) by scales; without
    splits in the grid, the partials by out and the arrival counters by scales."""
    def given(t):
        return scales if t is None else t

    return (x, w_q, scales, given(biases), given(global_scale), given(lhs), given(rhs),
            *((scales,) * 4 if schedule is None else schedule), out, out if partials is None else partials,
            given(arrivals))


def gather_qmm(x, w_q, scales, biases, global_scale, lhs, rhs, transpose, mode, group_size, bits, out_dtype,
               sorted_indices=False):
    """Backend entry: x (Bx, M, K), w_q (Bw, R, C), lhs/rhs (I,) -> (I, M, N); or lhs = rhs = None, x (1, M, K) and
    a 2-D w_q (one product)."""
    indexed = lhs is not None
    plan, n_items, m, n, k, n_weights = _plan_for(x, w_q, scales, biases, global_scale, lhs, transpose, mode,
                                                  group_size, bits, out_dtype)
    out = torch.empty(n_items, m, n, dtype=plan.kernel_dtype, device=x.device)
    if n_items * m * n == 0:
        return out
    if k == 0:
        return out.zero_()
    if plan.x_slot_major:
        x = slot_major(x, bits, plan.bk)
    if plan.prefill:
        prefill_qmm(out[0], x[0].contiguous(), w_q, scales, biases, global_scale, transpose, *plan.prefill_args)
        return out.to(out_dtype)
    n_rows = n_items * m
    partials = arrivals = None  # (unless the splits run in the grid)
    if plan.split_in_grid:
        kept = _stream_scratch(x.device)
        partials = _scratch(kept, "partials", plan.splits * n_rows * n, torch.float32, x.device)
        arrivals = _scratch(kept, "arrivals", plan.tiles, torch.int32, x.device)
    if indexed:  # the kernels index them densely; broadcast index arrays arrive as stride-0 views
        lhs, rhs = lhs.contiguous(), rhs.contiguous()
    grouped = None
    if plan.routing == GROUPED:
        grouped = schedule(rhs, m, n_weights, plan.block_m, plan.row_tiles, plan.one_program_schedule)
    b = biases if biases is not None else scales
    plan.qmm(plan.grid, *_qmm_pointers(x, w_q.view(torch.int32), scales, biases, global_scale, lhs, rhs, grouped, out,
                                       partials, arrivals),
             *_qmm_ints(x.stride(), w_q, scales, b, global_scale, m, n, k, n_rows, n_weights))
    return out if plan.kernel_dtype == out_dtype else out.to(out_dtype)


class BoundProduct:
    """One product prepared for every later call whose arguments have the same static facts (shapes, strides, dtypes,
    devices; the caller keys on them): a plain x @ W, or a gathered decode product (per-item routing) whose x batches
    come in a fixed order (`lhs`, kept here) and whose weights are chosen by the call's rhs. The plan, the kernels'
    integer arguments and their binaries are fixed, and the scratch buffers are the stream's, so a call is one
    allocation (the output) and one launch (two where x is copied slot-major first). Calling it gives `out_shape`,
    or None (nothing launched) where a binary is not known yet: the caller then takes the general path
    (gather_qmm), which launches, and so compiles, it."""

    def __init__(self, x3, w_q, scales, biases, global_scale, lhs, out_shape, transpose, mode, group_size, bits,
                 out_dtype):
        """x3: x as gather_qmm sees it, (B, M, K); global_scale as gather_qmm sees it ((1,) or one per weight);
        lhs: the items' x batches (None: one plain product)."""
        plan, n_items, m, n, k, n_weights = _plan_for(x3, w_q, scales, biases, global_scale, lhs, transpose, mode,
                                                      group_size, bits, out_dtype)
        self.plan, self.out_dtype, self.device, self.lhs = plan, out_dtype, x3.device, lhs
        self.out_shape = out_shape
        self.partials, self.tiles = plan.splits * n_items * m * n, plan.tiles
        x_strides = x3.stride()
        self.slot_major = None
        if plan.x_slot_major:  # x goes through a slot-major copy (B, M, K padded), contiguous
            shape, launch, grid, ints = slot_major_launch(x3, bits, plan.bk)
            self.copy_numel = shape[0] * shape[1] * shape[2]
            self.slot_major = BoundLaunch(launch, grid, (x3.dtype, x3.dtype), ints, (0, 1))
            x_strides = (shape[1] * shape[2], shape[2], 1)
        b, g = biases is not None, global_scale is not None
        ints = _qmm_ints(x_strides, w_q, scales, biases if b else scales, global_scale, m, n, k, n_items * m,
                         n_weights)
        # The call's tensors, by position (their dtypes here): x, w_q, scales, out[, partials, arrivals][, lhs, rhs]
        # [, biases][, global_scale], laid out as gather_qmm passes them (_qmm_pointers).
        tensors = [x3.dtype, torch.int32, scales.dtype, plan.kernel_dtype]
        partials_at = arrivals_at = lhs_at = rhs_at = bias_at = g_at = None

        def add(dtype) -> int:
            tensors.append(dtype)
            return len(tensors) - 1

        if plan.split_in_grid:
            partials_at, arrivals_at = add(torch.float32), add(torch.int32)
        if lhs is not None:
            lhs_at, rhs_at = add(torch.int64), add(torch.int64)
        if b:
            bias_at = add(biases.dtype)
        if g:
            g_at = add(global_scale.dtype)
        layout = _qmm_pointers(0, 1, 2, bias_at, g_at, lhs_at, rhs_at, None, 3, partials_at, arrivals_at)
        self.qmm = BoundLaunch(plan.qmm, plan.grid, tuple(tensors[i] for i in layout), ints, layout)

    def __call__(self, x, w_q, scales, biases, global_scale, rhs=None):
        plan, device = self.plan, self.device
        kept = _stream_scratch(device)
        if self.lhs is not None and kept is None and device.type == "cuda":
            return None  # (a capture or a compiled graph: the kept lhs must not be baked into a graph that outlives it)
        out = torch.empty(self.out_shape, dtype=plan.kernel_dtype, device=device)
        if self.slot_major is not None:
            copy = _scratch(kept, "x", self.copy_numel, x.dtype, device)
            if not self.slot_major(x, copy):
                return None
            x = copy
        tensors = [x, w_q, scales, out]
        if plan.split_in_grid:
            tensors += (_scratch(kept, "partials", self.partials, torch.float32, device),
                        _scratch(kept, "arrivals", self.tiles, torch.int32, device))
        if self.lhs is not None:
            tensors += (self.lhs, rhs)
        if biases is not None:
            tensors.append(biases)
        if global_scale is not None:
            tensors.append(global_scale)
        if not self.qmm(*tensors):
            return None
        return out if plan.kernel_dtype == self.out_dtype else out.to(self.out_dtype)


def _view(x, *shape):
    """x.reshape(*shape) where that is a view of x (same first element), else None (reshape would copy)."""
    viewed = x.reshape(*shape)
    return viewed if viewed.data_ptr() == x.data_ptr() else None


def bind_product(x, w_q, scales, biases, global_scale, transpose, mode, group_size, bits, out_dtype):
    """A BoundProduct for plain calls like this one (x (..., K), a 2-D w_q), or None where the product takes another
    path: the prefill path (large M), an empty product, or an x whose rows are not one strided matrix."""
    k = x.shape[-1]
    x3 = _view(x, 1, -1, k)
    if x3 is None or x3.numel() == 0 or k == 0:
        return None
    g = None if global_scale is None else global_scale.reshape(1)  # (as the ops layer passes a plain product's)
    bound = BoundProduct(x3, w_q, scales, biases, g, None, (*x.shape[:-1], _output_features(w_q, transpose, bits)),
                         transpose, mode, group_size, bits, out_dtype)
    return None if bound.plan.prefill else bound


def bind_gather(x3, w_q, scales, biases, global_scale, lhs, out_shape, transpose, mode, group_size, bits,
                out_dtype):
    """A BoundProduct for gathered calls like this one: x3 (B, M, K) a view of the caller's x, w_q (E, R, C),
    global_scale as gather_qmm takes it, lhs the items' x batches (kept: the caller's facts fix it), the call's rhs
    given to each call. None unless decode-sized (per-item routing): grouped products sort their rows per call."""
    if x3.numel() == 0 or x3.shape[-1] == 0 or lhs.numel() == 0:
        return None
    bound = BoundProduct(x3, w_q, scales, biases, global_scale, lhs, out_shape, transpose, mode, group_size, bits,
                         out_dtype)
    return bound if bound.plan.routing == PER_ITEM else None
