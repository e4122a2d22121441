"""The grouped decode kernel's work list (qmm.py, ROUTING = GROUPED), built on the device without a host sync.

Output rows (item * M + m) are listed sorted by the weight they use, and the list is cut into row tiles of at most
BLOCK_M rows of one weight. A stable argsort of the weight indices and their counts, then one kernel for the rest
(prefix sums, each tile's weight, first row and row count, the sorted row list), in parallel slices: a torch version
of the same took about thirty small kernels, 50-70 µs on an H200, as long as a decode step's matmul.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch import launcher

CHUNK = 4096  # rows of the sorted list per program


@triton.jit
def schedule_kernel(counts_ptr, order_ptr, rows_ptr, tile_w_ptr, tile_start_ptr, tile_rows_ptr,
                    n_items, M, n_weights, bound, tile_programs,
                    BLOCK_M: tl.constexpr, WEIGHTS: tl.constexpr, CHUNK: tl.constexpr, TILE_CHUNK: tl.constexpr):
    """Program p < tile_programs writes tiles [p * TILE_CHUNK, ...) of the tile table from the items of each weight
    (counts); the others write slices of CHUNK rows of the sorted row list. WEIGHTS: a power of two at or above
    n_weights."""
    n_rows = n_items * M
    pid = tl.program_id(0)
    if pid >= tile_programs:
        row = (pid - tile_programs) * CHUNK + tl.arange(0, CHUNK)
        item = tl.load(order_ptr + row // M, mask=row < n_rows, other=0).to(tl.int32)
        tl.store(rows_ptr + row, item * M + row % M, mask=row < n_rows)
    else:
        w = tl.arange(0, WEIGHTS)
        rows = tl.load(counts_ptr + w, mask=w < n_weights, other=0) * M
        tiles = (rows + BLOCK_M - 1) // BLOCK_M
        tile_end = tl.cumsum(tiles, 0)
        tile_first = tile_end - tiles
        row_start = tl.cumsum(rows, 0) - rows
        tile = pid * TILE_CHUNK + tl.arange(0, TILE_CHUNK)
        # the tile's weight: how many weights end at or before it (searchsorted, right side)
        owner = tl.minimum(tl.sum((tile_end[None, :] <= tile[:, None]).to(tl.int32), axis=1), n_weights)
        valid = owner < n_weights
        mine = w[None, :] == tl.minimum(owner, n_weights - 1)[:, None]
        local = tile - tl.sum(tl.where(mine, tile_first[None, :], 0), axis=1)
        first_row = tl.sum(tl.where(mine, row_start[None, :], 0), axis=1) + local * BLOCK_M
        count = tl.sum(tl.where(mine, rows[None, :], 0), axis=1) - local * BLOCK_M
        count = tl.where(valid, tl.minimum(tl.maximum(count, 0), BLOCK_M), 0)
        in_bound = tile < bound
        tl.store(tile_w_ptr + tile, owner, mask=in_bound)
        tl.store(tile_start_ptr + tile, tl.minimum(first_row, tl.maximum(n_rows - 1, 0)), mask=in_bound)
        tl.store(tile_rows_ptr + tile, count, mask=in_bound)


def schedule_bound(n_rows: int, n_weights: int, block_m: int) -> int:
    """Row tiles enough for any routing of n_rows rows over n_weights weights: ceil(rows / BLOCK_M) full tiles plus
    at most one partial tile per weight used."""
    return -(-n_rows // block_m) + min(n_weights, n_rows)


def schedule(rhs: torch.Tensor, m: int, n_weights: int, block_m: int, bound: int):
    """rhs (I,) weight indices, M rows per item -> (rows, tile_weight, tile_start, tile_rows), int32: the output rows
    sorted (stably) by weight, and for each of `bound` row tiles its weight (n_weights: unused), first position in
    `rows` and row count."""
    device = rhs.device
    n_items = rhs.shape[0]
    keys = rhs.to(torch.int16 if n_weights < 2**15 else torch.int32)  # fewer radix passes than int64
    order = torch.argsort(keys, stable=True)
    # (atomic adds: a histogram inside the kernel costs items x weights operations)
    counts = torch.zeros(n_weights, dtype=torch.int32, device=device).index_add_(
        0, rhs, torch.ones((), dtype=torch.int32, device=device).expand(n_items))
    rows = torch.empty(n_items * m, dtype=torch.int32, device=device)
    tile_w, tile_start, tile_rows = (torch.empty(bound, dtype=torch.int32, device=device) for _ in range(3))
    weights = triton.next_power_of_2(n_weights)
    tile_chunk = max(1, min(32, 4096 // weights))  # row tiles per program, each compared with every weight
    tile_programs = triton.cdiv(bound, tile_chunk)
    grid = (tile_programs + triton.cdiv(n_items * m, CHUNK),)  # the tile table, then the row list, in slices
    launch = launcher(schedule_kernel, 4, 3, BLOCK_M=block_m, WEIGHTS=weights, CHUNK=CHUNK, TILE_CHUNK=tile_chunk)
    launch(grid, counts, order, rows, tile_w, tile_start, tile_rows, n_items, m, n_weights, bound, tile_programs)
    return rows, tile_w, tile_start, tile_rows
