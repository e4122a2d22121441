"""The grouped decode kernel's work list (qmm.py, ROUTING = GROUPED), built on the device without a host sync.

Output rows (item * M + m) are listed sorted by the weight they use, and the list is cut into row tiles of at most
BLOCK_M rows of one weight. A stable argsort of the weight indices and their counts, then one kernel for the rest
(prefix sums, each tile's weight, first row and row count, the sorted row list), in parallel slices: a torch version
of the same took about thirty small kernels, 50-70 µs on an H200, as long as a decode step's matmul. For the few
items of decoding, one program does it all (small_schedule_kernel): the sort and the counts were five of the dozen
small kernels around a 16-token MoE product (H100, benchmarks/results/h100-2026-12-07-v15.md).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch import launcher

CHUNK = 4096  # rows of the sorted list per program
# The one-program path (small_schedule_kernel) takes up to SMALL_ITEMS items (16 tokens of top-8 routing), its
# compare matrices (items x items, items x weights) up to SMALL_WORK elements: a program of 8 warps holds them in
# registers (Triton 3.6, sm_90: 254-255 registers at 128 x 128 and 128 x 256, no spills; 256 x 128 spills).
SMALL_ITEMS = 128
SMALL_WORK = 1 << 15


@triton.jit
def _tile_table(counts, w, tile, n_items, M, n_weights, bound, tile_w_ptr, tile_start_ptr, tile_rows_ptr,
                BLOCK_M: tl.constexpr):
    """Write the tile table's entries for tiles `tile` (TILE_CHUNK of them) from the items of each weight (`counts`,
    over weights `w`, WEIGHTS of them: a power of two at or above n_weights, zero past it)."""
    n_rows = n_items * M
    rows = counts * M
    tiles = (rows + BLOCK_M - 1) // BLOCK_M
    tile_end = tl.cumsum(tiles, 0)
    tile_first = tile_end - tiles
    row_start = tl.cumsum(rows, 0) - rows
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


@triton.jit
def schedule_kernel(counts_ptr, order_ptr, rows_ptr, tile_w_ptr, tile_start_ptr, tile_rows_ptr,
                    n_items, M, n_weights, bound, tile_programs,
                    BLOCK_M: tl.constexpr, WEIGHTS: tl.constexpr, CHUNK: tl.constexpr, TILE_CHUNK: tl.constexpr):
    """Program p < tile_programs writes tiles [p * TILE_CHUNK, ...) of the tile table from the items of each weight
    (counts); the others write slices of CHUNK rows of the sorted row list (order: the items' stable argsort by
    weight). WEIGHTS: a power of two at or above n_weights."""
    n_rows = n_items * M
    pid = tl.program_id(0)
    if pid >= tile_programs:
        row = (pid - tile_programs) * CHUNK + tl.arange(0, CHUNK)
        item = tl.load(order_ptr + row // M, mask=row < n_rows, other=0).to(tl.int32)
        tl.store(rows_ptr + row, item * M + row % M, mask=row < n_rows)
    else:
        w = tl.arange(0, WEIGHTS)
        counts = tl.load(counts_ptr + w, mask=w < n_weights, other=0)
        tile = pid * TILE_CHUNK + tl.arange(0, TILE_CHUNK)
        _tile_table(counts, w, tile, n_items, M, n_weights, bound, tile_w_ptr, tile_start_ptr, tile_rows_ptr,
                    BLOCK_M)


@triton.jit
def small_schedule_kernel(rhs_ptr, rows_ptr, tile_w_ptr, tile_start_ptr, tile_rows_ptr, n_items, M, n_weights, bound,
                          BLOCK_M: tl.constexpr, ITEMS: tl.constexpr, WEIGHTS: tl.constexpr,
                          TILE_CHUNK: tl.constexpr):
    """The whole work list in one program, for up to ITEMS items (decoding: a few tokens' routed experts): the
    per-weight counts and each item's place in the stable sort by weight come from comparing the items with every
    weight and with each other, where the general path takes a radix argsort, a histogram and schedule_kernel."""
    i = tl.arange(0, ITEMS)
    w = tl.arange(0, WEIGHTS)
    item_w = tl.load(rhs_ptr + i, mask=i < n_items, other=WEIGHTS).to(tl.int32)  # (padding items: no weight)
    is_w = item_w[:, None] == w[None, :]  # (ITEMS, WEIGHTS)
    counts = tl.sum(is_w.to(tl.int32), axis=0)
    first_item = tl.cumsum(counts, 0) - counts  # the sorted list's first item of each weight
    # stable: an item's place among its weight's items is the number of earlier items of that weight
    earlier = (item_w[None, :] == item_w[:, None]) & (i[None, :] < i[:, None])
    place = tl.sum(tl.where(is_w, first_item[None, :], 0), axis=1) + tl.sum(earlier.to(tl.int32), axis=1)
    for m in range(0, M):
        tl.store(rows_ptr + place * M + m, i * M + m, mask=i < n_items)
    for first in range(0, bound, TILE_CHUNK):
        _tile_table(counts, w, first + tl.arange(0, TILE_CHUNK), n_items, M, n_weights, bound, tile_w_ptr,
                    tile_start_ptr, tile_rows_ptr, BLOCK_M)


def schedule_bound(n_rows: int, n_weights: int, block_m: int) -> int:
    """Row tiles enough for any routing of n_rows rows over n_weights weights: ceil(rows / BLOCK_M) full tiles plus
    at most one partial tile per weight used."""
    return -(-n_rows // block_m) + min(n_weights, n_rows)


def fits_one_program(n_items: int, n_weights: int) -> bool:
    """Whether small_schedule_kernel can make the work list of n_items items over n_weights weights."""
    items, weights = triton.next_power_of_2(n_items), triton.next_power_of_2(n_weights)
    return items <= SMALL_ITEMS and items * max(items, weights) <= SMALL_WORK


def schedule(rhs: torch.Tensor, m: int, n_weights: int, block_m: int, bound: int, one_program: bool):
    """rhs (I,) weight indices, M rows per item -> (rows, tile_weight, tile_start, tile_rows), int32: the output rows
    sorted (stably) by weight, and for each of `bound` row tiles its weight (n_weights: unused), first position in
    `rows` and row count. one_program: by small_schedule_kernel (where fits_one_program), else by the general path;
    the same list either way."""
    device = rhs.device
    n_items = rhs.shape[0]
    rows = torch.empty(n_items * m, dtype=torch.int32, device=device)
    tile_w, tile_start, tile_rows = (torch.empty(bound, dtype=torch.int32, device=device) for _ in range(3))
    weights = triton.next_power_of_2(n_weights)
    tile_chunk = max(1, min(32, 4096 // weights))  # row tiles per program, each compared with every weight
    if one_program:  # one launch instead of five or more
        launch = launcher(small_schedule_kernel, 8, 1, BLOCK_M=block_m, ITEMS=triton.next_power_of_2(n_items),
                          WEIGHTS=weights, TILE_CHUNK=tile_chunk)
        launch((1,), rhs, rows, tile_w, tile_start, tile_rows, n_items, m, n_weights, bound)
        return rows, tile_w, tile_start, tile_rows
    keys = rhs.to(torch.int16 if n_weights < 2**15 else torch.int32)  # fewer radix passes than int64
    order = torch.argsort(keys, stable=True)
    # (atomic adds: a histogram inside the kernel costs items x weights operations)
    counts = torch.zeros(n_weights, dtype=torch.int32, device=device).index_add_(
        0, rhs, torch.ones((), dtype=torch.int32, device=device).expand(n_items))
    tile_programs = triton.cdiv(bound, tile_chunk)
    grid = (tile_programs + triton.cdiv(n_items * m, CHUNK),)  # the tile table, then the row list, in slices
    launch = launcher(schedule_kernel, 4, 3, BLOCK_M=block_m, WEIGHTS=weights, CHUNK=CHUNK, TILE_CHUNK=tile_chunk)
    launch(grid, counts, order, rows, tile_w, tile_start, tile_rows, n_items, m, n_weights, bound, tile_programs)
    return rows, tile_w, tile_start, tile_rows
