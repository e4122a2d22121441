"""Bit-exact conversion between torch tensors and MLX arrays (uint32 codes and bfloat16 included).

For porting code and data between MLX and lowbit, and for testing against MLX. Imports mlx lazily: lowbit itself
does not need it."""

from __future__ import annotations

import numpy as np
import torch


def to_mlx(t: torch.Tensor | None):
    """torch -> mlx.core.array with the same bits (None stays None)."""
    import mlx.core as mx

    if t is None:
        return None
    t = t.detach().cpu().contiguous()
    if t.dtype == torch.bfloat16:
        return mx.array(t.view(torch.int16).numpy()).view(mx.bfloat16)
    if t.dtype == torch.uint32:
        return mx.array(t.view(torch.int32).numpy().view(np.uint32))
    return mx.array(t.numpy())


def from_mlx(a) -> torch.Tensor:
    """mlx.core.array -> torch tensor with the same bits."""
    import mlx.core as mx

    if a.dtype == mx.bfloat16:
        return torch.from_numpy(np.array(a.view(mx.int16))).view(torch.bfloat16)
    if a.dtype == mx.uint32:
        return torch.from_numpy(np.array(a).view(np.int32)).view(torch.uint32)
    return torch.from_numpy(np.array(a))
