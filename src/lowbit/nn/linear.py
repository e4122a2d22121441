"""QuantizedLinear and QQLinear: torch.nn.Linear with a quantized weight (MLX's modules of the same names)."""

from __future__ import annotations

import torch
from torch import nn

from .. import ops
from .weights import QuantizedWeight

ACTIVATION_MODES = ("nvfp4", "mxfp8", "mxfp4")


def _empty_linear(module: QuantizedWeight, input_dims: int, output_dims: int, op: str) -> None:
    """Zero buffers of a checkpoint's shapes (from_linear or a state_dict fills them)."""
    if input_dims % module.group_size:
        raise ValueError(
            f"[{op}] input_dims ({input_dims}) must be a multiple of the group size {module.group_size}."
        )
    module.set_empty((output_dims,), input_dims)


class QuantizedLinear(QuantizedWeight):
    """y = x @ dequantize(weight).T + bias, through `lowbit.quantized_matmul` (any M, batch-invariant).

    Build one with `QuantizedLinear.from_linear(linear, group_size, bits, mode)`, or empty (zero codes) with the
    shapes of a checkpoint to load. `global_scale=True` (nvfp4) quantizes with the weight's amax as tensor scale.
    """

    def __init__(self, input_dims: int, output_dims: int, bias: bool = True, group_size: int | None = None,
                 bits: int | None = None, mode: str = "affine", global_scale: bool = False):
        super().__init__(group_size, bits, mode, "QuantizedLinear")
        _empty_linear(self, input_dims, output_dims, "QuantizedLinear")
        if global_scale:
            self.global_scale = torch.ones((), dtype=torch.float32)
        self.bias = nn.Parameter(torch.zeros(output_dims)) if bias else None

    @classmethod
    def from_linear(cls, linear: nn.Linear, group_size: int | None = None, bits: int | None = None,
                    mode: str = "affine", global_scale: bool = False) -> "QuantizedLinear":
        out_dims, in_dims = linear.weight.shape
        layer = cls(in_dims, out_dims, linear.bias is not None, group_size, bits, mode)
        w = linear.weight.detach()
        layer.quantize_from(w, w.abs().amax().float() if global_scale else None)
        if linear.bias is not None:
            layer.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=linear.bias.requires_grad)
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight, scales, biases, global_scale = self.quantized_tensors()
        y = ops.quantized_matmul(x, weight, scales, biases, True, self.group_size, self.bits, self.mode,
                                 global_scale=global_scale)
        bias = self.bias
        return y if bias is None else y + bias

    def dequantize(self) -> nn.Linear:
        """A float nn.Linear holding the dequantized weight (the weight's float dtype, or bfloat16 for fp modes)."""
        w = self.dequantized_weight()
        linear = nn.Linear(self.input_dims, self.output_dims, bias=self.bias is not None, device=w.device,
                           dtype=w.dtype)
        with torch.no_grad():
            linear.weight.copy_(w)
            if self.bias is not None:
                linear.bias.copy_(self.bias)
        return linear

    def extra_repr(self) -> str:
        return super().extra_repr() + f", bias={self.bias is not None}"


class QQLinear(QuantizedWeight):
    """y = quantize-dequantize(x) @ dequantize(weight).T (+ bias): activations quantized on the fly in the
    weight's mode (nvfp4, mxfp8, mxfp4), through `lowbit.qqmm`.

    Each row's activations are quantized in its own groups, so the result stays batch-invariant. No tensor scales:
    a per-call activation amax would make a row depend on its batch. The bias is a lowbit extension (MLX's QQLinear
    has none).

    As MLX's: `train()` turns the weight into a float parameter (dequantized, MLX's dtype) that the forward
    quantizes on the fly, with straight-through gradients for x and the weight (quantization-aware training);
    `eval()` quantizes it again. Unlike MLX's, a new layer starts quantized (as eval) whatever the linear's mode,
    so quantize_model never leaves float weights behind.
    """

    def train(self, mode: bool = True) -> "QQLinear":
        super().train(mode)
        if mode and self.weight.dtype == torch.uint32:
            w = self.dequantized_weight()
            del self.weight
            self.scales = None
            self.weight = nn.Parameter(w)
        elif not mode and self.weight.dtype != torch.uint32:
            w = self.weight.detach()
            del self.weight
            self.register_buffer("weight", None)
            self.quantize_from(w)
        return self

    @property
    def input_dims(self) -> int:
        return self.weight.shape[-1] if self.weight.is_floating_point() else super().input_dims

    def __init__(self, input_dims: int, output_dims: int, group_size: int | None = None, bits: int | None = None,
                 mode: str = "nvfp4", bias: bool = False):
        if mode not in ACTIVATION_MODES:
            raise ValueError(
                f"[QQLinear] Activation quantization supports modes {', '.join(ACTIVATION_MODES)} but got {mode!r}."
            )
        super().__init__(group_size, bits, mode, "QQLinear")
        _empty_linear(self, input_dims, output_dims, "QQLinear")
        self.bias = nn.Parameter(torch.zeros(output_dims)) if bias else None
        self.training = False  # (quantized: the eval form; train() makes the weight float)

    @classmethod
    def from_linear(cls, linear: nn.Linear, group_size: int | None = None, bits: int | None = None,
                    mode: str = "nvfp4") -> "QQLinear":
        out_dims, in_dims = linear.weight.shape
        layer = cls(in_dims, out_dims, group_size, bits, mode, bias=linear.bias is not None)
        layer.quantize_from(linear.weight.detach())
        if linear.bias is not None:
            layer.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=linear.bias.requires_grad)
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = ops.qqmm(x, self.weight, self.scales, self.group_size, self.bits, self.mode)  # (a float weight: training)
        return y if self.bias is None else y + self.bias

    def dequantize(self) -> nn.Linear:
        """A float nn.Linear with the dequantized weight (activations are no longer quantized)."""
        return QuantizedLinear.dequantize(self)

    def dequantized_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        if self.weight.is_floating_point():  # training: the float weight (its forward quantizes it)
            return self.weight.detach().to(dtype or self.weight.dtype)
        return super().dequantized_weight(dtype)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", bias={self.bias is not None}"
