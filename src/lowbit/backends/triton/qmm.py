"""The decode kernel: out[i] = x[lhs[i]] @ dequantize(w[rhs[i]]) (.T), every format, any M, N, K.

One kernel serves quantized_matmul (batch broadcasting arrives as index arrays), gather_qmm and qqmm. It reads
MLX's layout in place through strides, so stride-0 (expanded) and non-contiguous w, scales and biases need no
copies, and it dequantizes each weight tile in registers to exactly the values of `lowbit.dequantize` before a
tensor-core dot, with the weights on the MMA's M side and the tokens on its N side (decode pads tokens to 16).
Large single products go to prefill.py (dequantize tiles once, then a bf16 GEMM); both follow the canonical
reduction of reduction.py, so a row's bits never depend on M or on which path served it.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from triton.runtime.errors import OutOfResources

from .. import interpreting
from .decode import pack_geometry
from .reduction import block_k, k_splits, slot_major
from .tiles import (
    block_groups, block_words, nn_weight_tile, packed_decoding, packed_planes, per_pack, slot_plane,
    slot_plane_runtime,
)

MODE_IDS = {"affine": 0, "mxfp4": 1, "mxfp8": 2, "nvfp4": 3}
TL_DTYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}


@triton.jit
def _plane_dot(partial, plane, x_block, m_mask, SLOT: tl.constexpr, PACKS: tl.constexpr,
               DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr):
    """partial += plane (N, PACKS) @ the block's slot SLOT of x (PACKS, M); x_block points at slot 0."""
    x_t = tl.load(x_block + SLOT * PACKS, mask=m_mask[None, :], other=0.0)
    return tl.dot(plane, x_t.to(DOT_DTYPE), partial, input_precision=PRECISION)


@triton.jit
def _nt_block(partial, x_base, w_base, s_base, b_base, kb, K, offs_m, m_mask, offs_n, n_mask,
              sx_m, sw_r, sw_c, ss_r, ss_c, sb_r, sb_c,
              MODE: tl.constexpr, BITS: tl.constexpr, GS: tl.constexpr, PER_PACK: tl.constexpr, WORDS: tl.constexpr,
              SCALE_DTYPE: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr, BLOCK_K: tl.constexpr,
              PACKED: tl.constexpr, UNROLL_SLOTS: tl.constexpr, INTERPRET: tl.constexpr):
    """One K block of a transpose=True product (w is (N, K), codes along K), plane by plane in slot order.

    Every word is loaded once; x arrives slot-major (reduction.slot_major), so each plane's x is contiguous."""
    PACKS: tl.constexpr = BLOCK_K // PER_PACK
    GROUPS: tl.constexpr = BLOCK_K // GS
    w0, w1, w2, w3, w4 = block_words(w_base, kb, K, offs_n, n_mask, sw_r, sw_c, PER_PACK, WORDS, PACKS)
    scale = block_groups(s_base, kb, K, offs_n, n_mask, ss_r, ss_c, GS, GROUPS)
    if MODE == 0:
        bias = block_groups(b_base, kb, K, offs_n, n_mask, sb_r, sb_c, GS, GROUPS)
    else:
        bias = scale
    x_block = x_base + offs_m[None, :] * sx_m + kb * BLOCK_K + tl.arange(0, PACKS)[:, None]
    if PACKED:
        p0, p1, p2, p3, p4, p5, p6, p7 = packed_planes(w0, scale, bias, MODE, BITS, GROUPS, PACKS, DOT_DTYPE)
        partial = _plane_dot(partial, p0, x_block, m_mask, 0, PACKS, DOT_DTYPE, PRECISION)
        partial = _plane_dot(partial, p1, x_block, m_mask, 1, PACKS, DOT_DTYPE, PRECISION)
        partial = _plane_dot(partial, p2, x_block, m_mask, 2, PACKS, DOT_DTYPE, PRECISION)
        partial = _plane_dot(partial, p3, x_block, m_mask, 3, PACKS, DOT_DTYPE, PRECISION)
        if BITS == 4:
            partial = _plane_dot(partial, p4, x_block, m_mask, 4, PACKS, DOT_DTYPE, PRECISION)
            partial = _plane_dot(partial, p5, x_block, m_mask, 5, PACKS, DOT_DTYPE, PRECISION)
            partial = _plane_dot(partial, p6, x_block, m_mask, 6, PACKS, DOT_DTYPE, PRECISION)
            partial = _plane_dot(partial, p7, x_block, m_mask, 7, PACKS, DOT_DTYPE, PRECISION)
    else:
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
    x_ptr, w_ptr, s_ptr, b_ptr, g_ptr, lhs_ptr, rhs_ptr, out_ptr, part_ptr,
    M, N, K, n_items,
    sx_b, sx_m, sx_k, sw_b, sw_r, sw_c, ss_b, ss_r, ss_c, sb_b, sb_r, sb_c, so_i, so_m, so_n,
    MODE: tl.constexpr, BITS: tl.constexpr, GS: tl.constexpr, TRANSPOSE: tl.constexpr, HAS_GLOBAL: tl.constexpr,
    PER_PACK: tl.constexpr, WORDS: tl.constexpr, WORDS_POW2: tl.constexpr,
    SPLITS: tl.constexpr, SPLIT_IN_GRID: tl.constexpr, SCALE_DTYPE: tl.constexpr, DOT_DTYPE: tl.constexpr,
    PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    INDEXED: tl.constexpr, PACKED: tl.constexpr, UNROLL_SLOTS: tl.constexpr, INTERPRET: tl.constexpr,
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
                                    sx_m, sw_r, sw_c, ss_r, ss_c, sb_r, sb_c,
                                    MODE, BITS, GS, PER_PACK, WORDS, SCALE_DTYPE, DOT_DTYPE, PRECISION,
                                    BLOCK_K, PACKED, UNROLL_SLOTS, INTERPRET)
            else:  # w is (K, N): rows run along K, codes along N
                offs_k = (kb * BLOCK_K + tl.arange(0, BLOCK_K)).to(tl.int64)
                k_mask = offs_k < K
                x_t = tl.load(x_base + offs_k[:, None] * sx_k + offs_m[None, :] * sx_m,
                              mask=k_mask[:, None] & m_mask[None, :], other=0.0)
                w = tl.trans(nn_weight_tile(w_base, s_base, b_base, offs_k, k_mask, pid_n * BLOCK_N, N,
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


def _tile_config(m: int):
    """(BLOCK_M tokens, BLOCK_N weights, num_warps, num_stages, split_in_grid) by M; on the GPU any choice gives the
    same bits. The interpreter runs tl.dot as a numpy matmul, whose bits may depend on the tile shape: it keeps one."""
    if interpreting():
        return 16, 128, 4, 1, True
    override = os.environ.get("LOWBIT_QMM_TILE")  # "BLOCK_M,BLOCK_N,num_warps,num_stages": a tuning knob for benchmarks
    if override:
        bm, bn, warps, stages = (int(v) for v in override.split(","))
        return bm, bn, warps, stages, bm <= 64
    if m <= 16:  # measured on an H200 (benchmarks/prefill_probe.py): 64 weight rows, 4 warps, 3 stages best
        return 16, 64, 4, 3, True
    if m <= 128:
        return 64, 128, 4, 3, True
    return 128, 128, 8, 3, False  # (large M that the prefill path does not take: gathers, float32)


def weight_and_dot_dtypes(mode: str, x_dtype, scales, biases) -> tuple[torch.dtype, torch.dtype]:
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


def launch_fitting(kernel, grid, stages: int, args: tuple, meta: dict) -> None:
    """Launch `kernel` with the deepest software pipeline (num_stages <= stages) that fits in shared memory.

    The pipeline depth changes only when loads are issued, never the arithmetic, so the bits do not depend on it."""
    key = (kernel.fn.__name__, *meta.values())  # the dict is always built in the same order
    stages = _FITTING_STAGES.get(key, stages)
    while True:
        try:
            kernel[grid](*args, **meta, num_stages=stages)
        except OutOfResources:
            if stages == 1:
                raise
            stages -= 1
            continue
        _FITTING_STAGES[key] = stages
        return


def _prefill_min_m() -> int | None:
    """The M from which a single product takes the prefill path (None: never). The interpreter's dots round by tile
    shape, so there the path runs only when asked for (LOWBIT_QMM_PREFILL_M, also a benchmark knob)."""
    override = os.environ.get("LOWBIT_QMM_PREFILL_M")
    if override:
        return int(override)
    return None if interpreting() else PREFILL_MIN_M


PREFILL_MIN_M = 160  # H200, 8192^2: decode 116-125 us at M = 128, prefill 135-144 us at M = 256


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
    weight_dtype, dot = weight_and_dot_dtypes(mode, x.dtype, scales, biases)
    unroll_slots = dot != torch.float32  # float32 (three-pass) dots loop over code slots at run time
    if dot == torch.bfloat16 and interpreting():  # the interpreter's tl.dot misreads bfloat16; float32 is exact
        dot = torch.float32
    bk = block_k(bits, group_size, transpose)
    splits = k_splits(n, k, bk)
    packed = transpose and packed_decoding(mode, bits, scales.dtype, biases.dtype if biases is not None else None,
                                           weight_dtype, dot, interpreting())
    if transpose:
        x = slot_major(x, bits, bk).contiguous()
    prefill_m = _prefill_min_m()
    if not indexed and prefill_m is not None and m >= prefill_m and dot in (x.dtype, torch.float32) and (
            dot != torch.float32 or interpreting()):
        from .prefill import prefill_qmm

        prefill_qmm(out[0], x[0].contiguous(), w_q[0], scales[0], None if biases is None else biases[0], global_scale,
                    transpose, mode, group_size, bits, bk, splits, weight_dtype, dot, packed)
        return out.to(out_dtype)
    block_m, block_n, warps, stages, split_in_grid = _tile_config(m)
    per_pack, words, words_pow2 = pack_geometry(bits)
    split_in_grid = split_in_grid and splits > 1
    partials = (torch.empty(splits, n_items, m, n, dtype=torch.float32, device=x.device) if split_in_grid
                else out)
    b = biases if biases is not None else scales
    g = global_scale if global_scale is not None else scales
    lhs32, rhs32 = (lhs.to(torch.int32), rhs.to(torch.int32)) if indexed else (scales, scales)
    grid = (triton.cdiv(m, block_m) * triton.cdiv(n, block_n) * n_items * (splits if split_in_grid else 1),)
    launch_fitting(qmm_kernel, grid, stages, (
        x, w_q.view(torch.int32), scales, b, g, lhs32, rhs32, out, partials,
        m, n, k, n_items,
        *x.stride(), *w_q.stride(), *scales.stride(), *b.stride(), *out.stride(),
    ), dict(
        MODE=MODE_IDS[mode], BITS=bits, GS=group_size, TRANSPOSE=transpose, HAS_GLOBAL=global_scale is not None,
        PER_PACK=per_pack, WORDS=words, WORDS_POW2=words_pow2,
        SPLITS=splits, SPLIT_IN_GRID=split_in_grid, SCALE_DTYPE=TL_DTYPES[weight_dtype],
        DOT_DTYPE=TL_DTYPES[dot], PRECISION="tf32x3" if dot == torch.float32 else "tf32",
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=bk, INDEXED=indexed, PACKED=packed, UNROLL_SLOTS=unroll_slots,
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
