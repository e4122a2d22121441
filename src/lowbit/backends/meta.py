"""The shapes-only backend: outputs of the right shape, dtype and device, no data.

torch.compile traces the ops on fake tensors (`lowbit.ops.library`'s fake implementations); they run the ops'
own Python (validation, broadcasting, index arrays) with this backend in place of a real one, so the traced shapes
are the real code's shapes by construction.
"""

from __future__ import annotations

import torch

from ..formats import MODES


def quantize(w, mode, group_size, bits, global_scale):
    *batch, k = w.shape
    codes = w.new_empty((*batch, k * bits // 32), dtype=torch.uint32)
    if MODES[mode].has_biases:
        groups = (*batch, k // group_size)
        return codes, w.new_empty(groups), w.new_empty(groups)
    return codes, w.new_empty((*batch, k // group_size), dtype=torch.uint8)


def dequantize(w_q, scales, biases, mode, group_size, bits, dtype, global_scale):
    *batch, words = w_q.shape
    return w_q.new_empty((*batch, words * 32 // bits), dtype=dtype)


def fake_quantize(x, mode, group_size, bits, global_scale, dtype):
    return x.new_empty(x.shape, dtype=dtype)


def gather_qmm(x, w_q, scales, biases, global_scale, lhs, rhs, transpose, mode, group_size, bits, out_dtype,
               sorted_indices=False):
    items = 1 if lhs is None else lhs.shape[0]  # (one product: x (1, M, K) and a 2-D w)
    n = w_q.shape[-2] if transpose else w_q.shape[-1] * 32 // bits
    return x.new_empty((items, x.shape[-2], n), dtype=out_dtype)
