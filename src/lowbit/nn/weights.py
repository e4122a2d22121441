"""The quantized weight every lowbit module holds: packed codes and their scales as plain buffers.

`weight` (uint32 codes), `scales`, `biases` (affine only) and `global_scale` (nvfp4 tensor scale, float32, optional)
are buffers with MLX's names, so `state_dict`, `.to(device)`, `torch.save` and MLX-format checkpoints see exactly
the tensors `lowbit.quantize` returns. Casting a module (`.to(torch.bfloat16)`, `.half()`) casts the affine scales
and biases like any float buffer, as MLX's `set_dtype` does; the tensor scale always stays float32.
"""

from __future__ import annotations

import torch
from torch import nn

from .. import ops
from ..formats import MODES, resolve_params


class QuantizedWeight(nn.Module):
    """Base of the quantized modules: the packed weight, its parameters and the float weight it stands for."""

    def __init__(self, group_size: int | None, bits: int | None, mode: str, op: str):
        super().__init__()
        _, self.group_size, self.bits = resolve_params(op, mode, group_size, bits)
        self.mode = mode
        for name in ("weight", "scales", "biases", "global_scale"):
            self.register_buffer(name, None)

    def set_quantized(self, quantized: tuple[torch.Tensor, ...], global_scale: torch.Tensor | None = None) -> None:
        """Take the tuple `lowbit.quantize` returned (and the tensor scale it was given)."""
        self.weight, self.scales = quantized[0], quantized[1]
        self.biases = quantized[2] if MODES[self.mode].has_biases else None
        self.global_scale = None if global_scale is None else global_scale.detach().float()

    def set_empty(self, batch: tuple[int, ...], input_dims: int, scale_dtype: torch.dtype = torch.float32) -> None:
        """Zero codes and scales for a weight of shape batch + (input_dims,): placeholders of the right shapes and
        dtypes for a checkpoint to fill (affine scales in `scale_dtype`, fp scales as uint8 bytes)."""
        spec = MODES[self.mode]
        self.weight = torch.zeros(*batch, input_dims * self.bits // 32, dtype=torch.uint32)
        groups = (*batch, input_dims // self.group_size)
        self.scales = torch.zeros(groups, dtype=scale_dtype if spec.has_biases else torch.uint8)
        self.biases = torch.zeros(groups, dtype=scale_dtype) if spec.has_biases else None

    def quantize_from(self, w: torch.Tensor, global_scale: torch.Tensor | None = None) -> None:
        """Quantize float weights w (..., K) into this module's buffers."""
        self.set_quantized(ops.quantize(w.detach(), self.group_size, self.bits, self.mode, global_scale=global_scale),
                           global_scale)

    def quantized_tensors(self) -> tuple:
        """(weight, scales, biases, global_scale), read from the buffer table at once: nn.Module's attribute lookup
        of a buffer (its __getattr__ fallback) costs about half a microsecond each, a sizeable part of a decode
        call's Python time. (Assigning a registered buffer's name stores into that table, so it is always current.)"""
        buffers = self._buffers
        return buffers["weight"], buffers["scales"], buffers["biases"], buffers["global_scale"]

    @property
    def input_dims(self) -> int:
        return self.weight.shape[-1] * 32 // self.bits

    @property
    def output_dims(self) -> int:
        return self.weight.shape[-2]

    def dequantized_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The float weight these codes stand for (bit-exact with mx.dequantize); experts with a tensor scale each
        are dequantized one by one."""
        g = self.global_scale
        if g is not None and g.numel() > 1:
            return torch.stack([ops.dequantize(self.weight[e], self.scales[e], None, self.group_size, self.bits,
                                               self.mode, g[e], dtype) for e in range(g.numel())])
        return ops.dequantize(self.weight, self.scales, self.biases, self.group_size, self.bits, self.mode, g, dtype)

    def _apply(self, fn, recurse=True):
        if self.scales is not None and self.scales.is_floating_point():
            cast = fn(torch.empty(0, dtype=self.scales.dtype)).dtype
            if cast not in (torch.float16, torch.bfloat16, torch.float32):
                raise ValueError(f"[{type(self).__name__}] Quantized layers keep their scales in float16, bfloat16 or "
                                 f"float32 (as the ops require); cannot cast them to {cast}.")
        g = self.global_scale
        super()._apply(fn, recurse)
        if g is not None:  # follow the device, never the dtype: the tensor scale is float32 by definition
            self.global_scale = g.to(device=fn(g).device)
        return self

    def quantization(self) -> dict:
        """This module's entry in an mlx-lm `quantization` config block."""
        return {"group_size": self.group_size, "bits": self.bits, "mode": self.mode}

    def extra_repr(self) -> str:
        return (f"input_dims={self.input_dims}, output_dims={self.output_dims}, group_size={self.group_size}, "
                f"bits={self.bits}, mode={self.mode}")
