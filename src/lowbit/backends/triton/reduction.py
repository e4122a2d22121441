"""The canonical K reduction, in code: what every Triton path (decode, prefill, gather, interpreted) computes.

K is cut into blocks of `block_k` (a function of the format and layout); the blocks are grouped into `k_splits`
contiguous partials (a function of N, K and the format); inside a block the products are accumulated by tensor-core
dots in a fixed order (transposed weights: slot-major, see tiles.py; untransposed: natural K order); each partial
starts from zero and takes its blocks in order; the partials are added left to right, 0 + p0 + p1 + ... Nothing
depends on M or the batch, so a row's bits never do. (Tile shapes and warp counts do not change a dot's bits on
Hopper while every tile runs wgmma -- measured; the K structure does, and so does the MMA instruction family: with
mma.sync, which Triton emits below four warps or under DISABLE_MMA_V3, 16 of 48 affine decode outputs differed from
wgmma's in one H200 run. Every GPU tile here has four or more warps.)
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .decode import pack_geometry
from .launch import launcher

PACKS_PER_BLOCK = 16  # transpose=True: a K block is at least 16 packs, so each plane's dot has K >= 16
BLOCK_K_NN = 128  # transpose=False: K rows per block
TARGET_PROGRAMS = 264  # about two waves on a 132-SM Hopper; a constant, so the split never depends on the device
MAX_SPLITS = 16


def block_k(bits: int, group_size: int, transpose: bool) -> int:
    """The K block: at least 16 packs and one whole group (transposed), or 128 rows."""
    return max(PACKS_PER_BLOCK * pack_geometry(bits)[0], group_size) if transpose else BLOCK_K_NN


def k_splits(n: int, k: int, block: int, target_programs: int = TARGET_PROGRAMS) -> int:
    """The number of split partials for N outputs and K inputs in K blocks of `block`: enough programs to fill the
    GPU at M = 1, at least four K blocks per split. (target_programs: a benchmark knob; it changes the bits.)"""
    n_tiles = -(-n // 128)
    k_blocks = -(-k // block)
    splits = 1
    while n_tiles * splits < target_programs and k_blocks >= 4 * splits and splits < MAX_SPLITS:
        splits *= 2
    return splits


@triton.jit
def slot_major_kernel(x_ptr, out_ptr, n_rows, M, K, k_pad, sx_b, sx_m, sx_k,
                      PER_PACK: tl.constexpr, PACKS: tl.constexpr, BLOCK_R: tl.constexpr):
    """Rows [pid_r * BLOCK_R, ...) of x (B, M, K) (any strides; row r is x[r // M, r % M]) x K block pid_k, written
    slot-major into out (rows, k_pad)."""
    row = (tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
    k0 = tl.program_id(1) * (PACKS * PER_PACK)
    pack = tl.arange(0, PACKS)
    slot = tl.arange(0, PER_PACK)
    k = k0 + pack[None, :, None] * PER_PACK + slot[None, None, :]  # (1, PACKS, PER_PACK): natural order
    source = x_ptr + ((row // M) * sx_b + (row % M) * sx_m)[:, None, None] + k * sx_k
    values = tl.load(source, mask=(row < n_rows)[:, None, None] & (k < K), other=0.0)
    values = tl.reshape(tl.permute(values, (0, 2, 1)), (BLOCK_R, PER_PACK * PACKS))  # slot-major
    j = k0 + tl.arange(0, PER_PACK * PACKS)
    tl.store(out_ptr + row[:, None] * k_pad + j[None, :], values, mask=(row < n_rows)[:, None])


def slot_major_launch(x: torch.Tensor, bits: int, block: int) -> tuple[tuple, object, tuple, tuple]:
    """(the reordered copy's shape, the launcher, grid and integer arguments of slot_major_kernel for x (B, M, K)
    and that copy)."""
    per_pack = pack_geometry(bits)[0]
    b, m, k = x.shape
    blocks = -(-k // block)
    n_rows = b * m
    block_r = 32
    launch = launcher(slot_major_kernel, 4, 3, PER_PACK=per_pack, PACKS=block // per_pack, BLOCK_R=block_r)
    return (b, m, blocks * block), launch, (triton.cdiv(n_rows, block_r), blocks), (n_rows, m, k, blocks * block,
                                                                                    *x.stride())


def slot_major(x: torch.Tensor, bits: int, block: int) -> torch.Tensor:
    """x (B, M, K) -> (B, M, K padded to whole blocks), contiguous, each block reordered slot-major: element
    p * PER_PACK + s of a block moves to s * PACKS + p, the order in which transposed kernels consume K. Padding is
    zeros. One pass over x (torch's pad, permute and copy took three)."""
    shape, launch, grid, ints = slot_major_launch(x, bits, block)
    out = torch.empty(shape, dtype=x.dtype, device=x.device)
    if out.numel():
        launch(grid, x, out, *ints)
    return out
