"""The canonical K reduction, in code: what every Triton path (decode, prefill, gather, interpreted) computes.

K is cut into blocks of `block_k` (a function of the format and layout); the blocks are grouped into `k_splits`
contiguous partials (a function of N, K and the format); inside a block the products are accumulated by tensor-core
dots in a fixed order (transposed weights: slot-major, see tiles.py; untransposed: natural K order); each partial
starts from zero and takes its blocks in order; the partials are added left to right, 0 + p0 + p1 + ... Nothing
depends on M or the batch, so a row's bits never do. (Tile shapes, warp counts and the MMA instruction family do not
change a dot's bits on Hopper -- measured; the K structure does.)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .decode import pack_geometry

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


def slot_major(x: torch.Tensor, bits: int, block: int) -> torch.Tensor:
    """x (..., K) -> (..., K padded to whole blocks), each block reordered slot-major: element p * PER_PACK + s of a
    block moves to s * PACKS + p, the order in which transposed kernels consume K. Padding is zeros."""
    per_pack = pack_geometry(bits)[0]
    k = x.shape[-1]
    blocks = -(-k // block)
    if blocks * block != k:
        x = F.pad(x, (0, blocks * block - k))
    x = x.reshape(*x.shape[:-1], blocks, block // per_pack, per_pack).transpose(-1, -2)
    return x.reshape(*x.shape[:-3], blocks * block)
