"""The CPU backend: vectorized torch over bounded chunks. It is also the reference every other backend is tested
against.

Matmuls dequantize the weight in slabs (so a multi-GB weight never becomes one float32 copy) and accumulate in
float32. They are batch-invariant by construction: every output tile is one float32 matmul call of a fixed shape,
(ROW_TILE, K) @ (K, slab), with the activation rows zero-padded to ROW_TILE. The slab width depends only on the
weight's (N, K), never on M or the batch, so a row's result never depends on the rows it was computed with.
(A single `x @ w` call does not have that property: BLAS picks kernels and K splits from M and from the pointer
alignment of x.)
"""

from __future__ import annotations

import torch

from ..formats import dequantize_groups, quantize_groups

ROW_TILE = 16
SLAB_ELEMENTS = 1 << 22  # float32 elements of dequantized weight held at once (16 MiB)


def _row_chunks(n_rows: int, row_elements: int):
    step = max(1, SLAB_ELEMENTS // max(1, row_elements))
    for start in range(0, n_rows, step):
        yield start, min(n_rows, start + step)


def quantize(w, mode, group_size, bits, global_scale):
    """Quantize row chunks of w (..., K); returns the MLX tuple."""
    lead, k = w.shape[:-1], w.shape[-1]
    rows = w.reshape(-1, k)
    parts = [quantize_groups(rows[a:b], mode, group_size, bits, global_scale) for a, b in _row_chunks(rows.shape[0], k)]
    if not parts:  # zero rows
        parts = [quantize_groups(rows, mode, group_size, bits, global_scale)]
    return tuple(torch.cat(p).reshape(*lead, -1) for p in zip(*parts))


def dequantize(w_q, scales, biases, mode, group_size, bits, dtype, global_scale):
    """Dequantize row chunks of w_q (..., W) to (..., K) in `dtype`."""
    lead = w_q.shape[:-1]
    k = w_q.shape[-1] * 32 // bits
    out = torch.empty(*lead, k, dtype=dtype, device=w_q.device)
    q2, s2 = w_q.reshape(-1, w_q.shape[-1]), scales.reshape(-1, scales.shape[-1])
    b2 = None if biases is None else biases.reshape(-1, biases.shape[-1])
    o2 = out.view(-1, k)
    for a, b in _row_chunks(q2.shape[0], k):
        o2[a:b] = dequantize_groups(
            q2[a:b], s2[a:b], None if b2 is None else b2[a:b], mode, group_size, bits, dtype, global_scale
        )
    return out


def fake_quantize(x, mode, group_size, bits, global_scale, dtype):
    """quantize-dequantize of x (..., K) in an fp mode, in `dtype`, without the tensor scale (the caller applies
    it): each value is a code times its block scale."""
    x_q, scales = quantize(x, mode, group_size, bits, global_scale)
    return dequantize(x_q, scales, None, mode, group_size, bits, dtype, None)


def _weight_slabs(w_q, scales, biases, global_scale, transpose, mode, group_size, bits, weight_dtype):
    """Yield (n0, n1, w_slab) with w_slab = dequantized weight columns n0:n1 as (K, n1 - n0), float32.

    Values are dequantized in `weight_dtype` (affine: MLX casts scales and biases to promote(x, scales, biases)
    first; fp modes: float32, where every value is exact). transpose=True stores w as (N, K) and slabs are row
    ranges; transpose=False stores (K, N) with groups along N and slabs are ranges of whole groups. The slab width
    depends on (N, K) only.
    """
    rows, packed = w_q.shape
    cols = packed * 32 // bits

    def deq(q, s, b):
        if b is not None:
            s, b = s.to(weight_dtype), b.to(weight_dtype)
        values = dequantize_groups(q, s, b, mode, group_size, bits, weight_dtype, global_scale)
        return values.float()

    if transpose:  # (N, K): take rows
        for n0, n1 in _row_chunks(rows, cols):
            b = None if biases is None else biases[n0:n1]
            yield n0, n1, deq(w_q[n0:n1], scales[n0:n1], b).T
    else:  # (K, N): take whole groups of columns
        step = max(1, SLAB_ELEMENTS // max(1, rows * group_size)) * group_size
        for n0 in range(0, cols, step):
            n1 = min(cols, n0 + step)
            w_cols = slice(n0 * bits // 32, n1 * bits // 32)
            g_cols = slice(n0 // group_size, n1 // group_size)
            b = None if biases is None else biases[:, g_cols]
            yield n0, n1, deq(w_q[:, w_cols], scales[:, g_cols], b)


def _tiled_matmul(rows: torch.Tensor, w_slab: torch.Tensor, out: torch.Tensor) -> None:
    """out = rows @ w_slab, one fixed-shape (ROW_TILE, K) @ (K, n) call per tile (batch-invariant)."""
    m, k = rows.shape
    padded = -(-m // ROW_TILE) * ROW_TILE
    tiles = torch.zeros(padded, k, dtype=w_slab.dtype, device=w_slab.device)
    tiles[:m] = rows
    result = torch.empty(padded, w_slab.shape[1], dtype=w_slab.dtype, device=w_slab.device)
    for i in range(0, padded, ROW_TILE):
        torch.matmul(tiles[i : i + ROW_TILE], w_slab, out=result[i : i + ROW_TILE])
    out.copy_(result[:m])


def gather_qmm(x, w_q, scales, biases, global_scale, lhs, rhs, transpose, mode, group_size, bits, out_dtype,
               sorted_indices=False):
    """out[i] = x[lhs[i]] @ dequantize(w[rhs[i]]) (.T if transpose), in float32, then out_dtype.

    x (Bx, M, K), w_q (Bw, R, C), lhs/rhs (I,) int64, or both None for one product of x[0] and a 2-D w -> (I, M, N).
    Each distinct expert is dequantized once (slab by slab). `sorted_indices` is a hint only: results are identical
    either way.
    """
    if w_q.ndim == 2:
        w_q, scales, biases = (None if t is None else t.unsqueeze(0) for t in (w_q, scales, biases))
    if lhs is None:
        lhs = rhs = torch.zeros(1, dtype=torch.int64, device=x.device)
    n_items, m = lhs.shape[0], x.shape[-2]
    n = w_q.shape[-2] if transpose else w_q.shape[-1] * 32 // bits
    out = torch.empty(n_items, m, n, dtype=torch.float32, device=x.device)
    xf = x.float()
    weight_dtype = torch.float32
    if mode == "affine":
        weight_dtype = torch.promote_types(torch.promote_types(x.dtype, scales.dtype), biases.dtype)
    for expert in torch.unique(rhs).tolist():
        items = (rhs == expert).nonzero().squeeze(1)
        rows = xf[lhs[items]].reshape(-1, x.shape[-1])
        gs = None if global_scale is None else global_scale[expert]
        b = None if biases is None else biases[expert]
        flat_out = torch.empty(rows.shape[0], n, dtype=torch.float32, device=x.device)
        for n0, n1, slab in _weight_slabs(w_q[expert], scales[expert], b, gs, transpose, mode, group_size, bits,
                                          weight_dtype):
            _tiled_matmul(rows, slab, flat_out[:, n0:n1])
        out[items] = flat_out.reshape(-1, m, n)
    return out.to(out_dtype)
