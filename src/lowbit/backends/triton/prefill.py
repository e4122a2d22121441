"""The prefill path for one large product: dequantize the weight once into a 16-bit tile buffer, then a tensor-core
GEMM over it that follows the canonical reduction (reduction.py).

Why it is bit-identical to the decode kernel: the buffer holds exactly the values the decode kernel decodes in
registers (the same helpers of tiles.py), in the K order the decode kernel consumes (slot-major blocks for
transposed weights, natural order otherwise); x arrives in that order too; and the GEMM accumulates the same 16-wide
K chunks in the same order, with the same split partials added left to right. Only the tile shapes differ, and those
do not change a dot's bits. Decoding once per weight tile instead of once per (token tile, weight tile) is what makes
large M fast; the buffer is bounded by working through N in slabs.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .. import interpreting
from .decode import pack_geometry
from .launch import MODE_IDS, TL_DTYPES, launcher
from .tiles import (
    affine_plane, block_tiles, nn_weight_tile, pack_pair_operands, pack_pairs, packed_planes, per_pack, slot_plane,
)

SLAB_BYTES = 256 << 20  # at most this much dequantized weight at a time


@triton.jit
def _store_plane(out_block, plane, n_mask, SLOT: tl.constexpr, PACKS: tl.constexpr):
    tl.store(out_block + SLOT * PACKS, plane, mask=n_mask[:, None])


@triton.jit
def dequantize_nt_kernel(w_ptr, s_ptr, b_ptr, out_ptr, N, K, sw_r, sw_c, ss_r, ss_c, sb_r, sb_c, so_r,
                         MODE: tl.constexpr, BITS: tl.constexpr, GS: tl.constexpr, PER_PACK: tl.constexpr,
                         WORDS: tl.constexpr, SCALE_DTYPE: tl.constexpr, DOT_DTYPE: tl.constexpr,
                         BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PACKED: tl.constexpr,
                         INTERPRET: tl.constexpr):
    """dequantize(w) rows [pid_n * BLOCK_N, ...) x K block pid_k of a transposed (N, K) weight, stored slot-major
    (plane s of the block at columns s * PACKS ...). Past K the values are zeros."""
    PACKS: tl.constexpr = BLOCK_K // PER_PACK
    GROUPS: tl.constexpr = BLOCK_K // GS
    kb = tl.program_id(1)
    offs_n = (tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    n_mask = offs_n < N
    w0, w1, w2, w3, w4, scale, bias = block_tiles(w_ptr, s_ptr, b_ptr, kb, K, offs_n, n_mask, sw_r, sw_c, ss_r, ss_c,
                                                  sb_r, sb_c, MODE, GS, PER_PACK, WORDS, BLOCK_K)
    out_block = out_ptr + offs_n[:, None] * so_r + kb * BLOCK_K + tl.arange(0, PACKS)[None, :]
    if PACKED and BITS != 4 and BITS != 8:  # affine 1/2/3/5/6-bit: plane by plane, by pack pairs
        a0, b0 = pack_pairs(w0)
        a1, b1 = pack_pairs(w1)
        a2, b2 = pack_pairs(w2)
        a3, b3 = pack_pairs(w3)
        a4, b4 = pack_pairs(w4)
        scale2, neg2, bias2 = pack_pair_operands(scale, bias, GROUPS, PACKS, DOT_DTYPE)
        for slot in tl.static_range(PER_PACK):
            plane = affine_plane(a0, a1, a2, a3, a4, b0, b1, b2, b3, b4, scale2, neg2, bias2, slot, BITS, DOT_DTYPE)
            _store_plane(out_block, plane, n_mask, slot, PACKS)
    elif PACKED:
        p0, p1, p2, p3, p4, p5, p6, p7 = packed_planes(w0, scale, bias, MODE, BITS, GROUPS, PACKS, DOT_DTYPE)
        _store_plane(out_block, p0, n_mask, 0, PACKS)
        _store_plane(out_block, p1, n_mask, 1, PACKS)
        _store_plane(out_block, p2, n_mask, 2, PACKS)
        _store_plane(out_block, p3, n_mask, 3, PACKS)
        if BITS == 4:
            _store_plane(out_block, p4, n_mask, 4, PACKS)
            _store_plane(out_block, p5, n_mask, 5, PACKS)
            _store_plane(out_block, p6, n_mask, 6, PACKS)
            _store_plane(out_block, p7, n_mask, 7, PACKS)
    else:
        scale = per_pack(scale, GROUPS, PACKS)
        bias = per_pack(bias, GROUPS, PACKS)
        for slot in tl.static_range(PER_PACK):
            plane = slot_plane(w0, w1, w2, w3, w4, scale, bias, slot, MODE, BITS, SCALE_DTYPE, DOT_DTYPE, INTERPRET)
            _store_plane(out_block, plane, n_mask, slot, PACKS)


@triton.jit
def dequantize_nn_kernel(w_ptr, s_ptr, b_ptr, out_ptr, N, K, sw_r, sw_c, ss_r, ss_c, sb_r, sb_c, so_r,
                         MODE: tl.constexpr, BITS: tl.constexpr, GS: tl.constexpr, PER_PACK: tl.constexpr,
                         WORDS: tl.constexpr, WORDS_POW2: tl.constexpr, SCALE_DTYPE: tl.constexpr,
                         DOT_DTYPE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                         INTERPRET: tl.constexpr):
    """dequantize(w) of an untransposed (K, N) weight, K rows [pid_k * BLOCK_K, ...) x columns of pid_n, natural
    order."""
    offs_k = (tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)).to(tl.int64)
    k_mask = offs_k < K
    n0 = tl.program_id(0) * BLOCK_N
    tile = nn_weight_tile(w_ptr, s_ptr, b_ptr, offs_k, k_mask, n0, N, sw_r, sw_c, ss_r, ss_c, sb_r, sb_c,
                          BLOCK_K, BLOCK_N, MODE, BITS, GS, PER_PACK, WORDS, WORDS_POW2, SCALE_DTYPE, DOT_DTYPE,
                          INTERPRET)
    offs_n = n0 + tl.arange(0, BLOCK_N)
    tl.store(out_ptr + offs_k[:, None] * so_r + offs_n[None, :], tile, mask=k_mask[:, None] & (offs_n < N)[None, :])


@triton.jit
def canonical_gemm_kernel(a_ptr, b_ptr, out_ptr, g_ptr, M, N, K, sa_m, sb_k, sb_n, so_m, so_n, steps_per_split,
                          SPLITS: tl.constexpr, HAS_GLOBAL: tl.constexpr, PRECISION: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                          GROUP_M: tl.constexpr):
    """out = a (M, K) @ b (K, N) with the canonical split partials: K steps of BLOCK_K, `steps_per_split` steps per
    partial, partials added left to right into a float32 total; times the tensor scale; cast to out's dtype.
    a's K is contiguous; b is addressed through (sb_k, sb_n)."""
    pid = tl.program_id(0)
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * tiles_n  # tiles grouped along M so that a group shares weight tiles in L2
    first_m = (pid // per_group) * GROUP_M
    rows = tl.minimum(tiles_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % rows
    pid_n = (pid % per_group) // rows
    offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    offs_n = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    offs_k = tl.arange(0, BLOCK_K)
    m_mask = offs_m < M
    n_mask = offs_n < N
    a_tile = a_ptr + offs_m[:, None] * sa_m + offs_k[None, :]
    b_tile = b_ptr + offs_k[:, None] * sb_k + offs_n[None, :] * sb_n
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    total = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for step in range(tl.cdiv(K, BLOCK_K)):
        k_ok = step * BLOCK_K + offs_k < K
        a = tl.load(a_tile + step * BLOCK_K, mask=m_mask[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(b_tile + step * BLOCK_K * sb_k, mask=k_ok[:, None] & n_mask[None, :], other=0.0)
        acc = tl.dot(a.to(b.dtype), b, acc, input_precision=PRECISION)
        if SPLITS > 1:
            if (step + 1) % steps_per_split == 0:
                total = total + acc
                acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    total = total + acc  # (after a split boundary acc is +0: adding it changes nothing)
    if HAS_GLOBAL:
        total = total * (tl.load(g_ptr) / 2688.0)
    out = out_ptr + offs_m[:, None] * so_m + offs_n[None, :] * so_n
    tl.store(out, total.to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


def _gemm_config(m: int, n: int, splits: int):
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages); a tile of 4 or more warps (wgmma) never changes the bits
    (fewer warps run mma.sync: other bits, see reduction.py). Smaller token tiles while M alone would leave SMs idle
    (each program runs all of K)."""
    if interpreting():
        return 16, 32, 64, 4, 1
    override = os.environ.get("LOWBIT_GEMM_TILE")  # "BLOCK_M,BLOCK_N,BLOCK_K,num_warps,num_stages": a benchmark knob
    if override:
        return tuple(int(v) for v in override.split(","))
    if triton.cdiv(m, 128) * triton.cdiv(n, 128) < 264:
        return 64, 128, 64, 4, 4
    return (128, 256, 64, 8, 3) if splits == 1 else (128, 128, 64, 8, 4)


def _dequantize_config() -> tuple[int, int]:
    """(BLOCK_N rows, num_warps) of the tile dequantizer."""
    override = os.environ.get("LOWBIT_DEQ_TILE")  # "BLOCK_N,num_warps": a benchmark knob
    if override:
        bn, warps = (int(v) for v in override.split(","))
        return bn, warps
    return 64, 4


def prefill_qmm(out, x, w_q, scales, biases, global_scale, transpose, mode, group_size, bits, bk, splits,
                weight_dtype, dot, packed):
    """out (M, N) = x @ dequantize(w_q).T (or without .T): x (M, Kx) is slot-major padded (transposed) or natural."""
    m, n = out.shape
    k = x.shape[-1] if not transpose else (w_q.shape[-1] * 32 // bits)
    per_pack, words, words_pow2 = pack_geometry(bits)
    k_blocks = -(-k // bk)
    k_pad = k_blocks * bk
    blocks_per_split = -(-k_blocks // splits)
    block_m, block_n, gemm_k, warps, stages = _gemm_config(m, n, splits)
    deq_n, deq_warps = _dequantize_config()
    assert bk % gemm_k == 0
    steps_per_split = blocks_per_split * (bk // gemm_k)
    b = biases if biases is not None else scales
    g = global_scale if global_scale is not None else scales
    slab = max(128, SLAB_BYTES // (k_pad * torch.finfo(dot).bits // 8) // 128 * 128)
    common = dict(MODE=MODE_IDS[mode], BITS=bits, GS=group_size, PER_PACK=per_pack, WORDS=words,
                  SCALE_DTYPE=TL_DTYPES[weight_dtype], DOT_DTYPE=TL_DTYPES[dot], INTERPRET=interpreting())
    buffer = torch.empty(min(slab, n) * k_pad, dtype=dot, device=x.device)
    for n0 in range(0, n, slab):
        rows = min(slab, n - n0)
        if transpose:
            tiles = buffer[:rows * k_pad].view(rows, k_pad)
            w_s, s_s, b_s = w_q[n0:n0 + rows], scales[n0:n0 + rows], b[n0:n0 + rows]
            dequantize_nt_kernel[(triton.cdiv(rows, deq_n), k_blocks)](
                w_s.view(torch.int32), s_s, b_s, tiles, rows, k, *w_s.stride(), *s_s.stride(), *b_s.stride(),
                tiles.stride(0), **common, BLOCK_N=deq_n, BLOCK_K=bk, PACKED=packed, num_warps=deq_warps)
            b_strides = (tiles.stride(1), tiles.stride(0))  # the GEMM reads the (K, N) transpose of the tiles
        else:
            tiles = buffer[:rows * k_pad].view(k_pad, rows)[:k]
            word0 = n0 * bits // 32
            w_s = w_q[:, word0:word0 + rows * bits // 32]
            s_s, b_s = scales[:, n0 // group_size:], b[:, n0 // group_size:]
            dequantize_nn_kernel[(triton.cdiv(rows, 128), triton.cdiv(k, bk))](
                w_s.view(torch.int32), s_s, b_s, tiles, rows, k, *w_s.stride(), *s_s.stride(), *b_s.stride(),
                tiles.stride(0), **common, WORDS_POW2=words_pow2, BLOCK_N=128, BLOCK_K=bk, num_warps=deq_warps)
            b_strides = (tiles.stride(0), tiles.stride(1))
        target = out[:, n0:n0 + rows]
        grid = (triton.cdiv(m, block_m) * triton.cdiv(rows, block_n),)
        gemm = launcher(canonical_gemm_kernel, warps, stages, SPLITS=splits, HAS_GLOBAL=global_scale is not None,
                        PRECISION="tf32x3" if dot == torch.float32 else "tf32",
                        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=gemm_k, GROUP_M=8)
        gemm(grid, x, tiles, target, g, m, rows, k_pad if transpose else k, x.stride(0), *b_strides, *target.stride(),
             steps_per_split)
