"""Mixture-of-experts layers on `lowbit.gather_qmm`: mlx-lm's SwitchLinear / QuantizedSwitchLinear / SwitchGLU, and
QuantizedExperts for Hugging Face transformers' stacked expert weights.

Expert weights are stacked (E, N, K). Each routed token's output depends only on its own input and experts (the
kernel is batch-invariant), and from 64 routed rows on, rows are sorted by expert first (`sorted_indices`) as
mlx-lm does, with results identical to unsorted.
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops
from ..ops.matmul import routing_checked
from .weights import QuantizedWeight

SORT_FROM_ROWS = 64  # mlx-lm sorts the routed rows by expert from this many on


def gather_sort(x: torch.Tensor, indices: torch.Tensor):
    """Rows of x (..., 1, 1, D) repeated per routed expert and sorted by expert: (x_sorted, idx_sorted, inverse)."""
    k = indices.shape[-1]
    flat = indices.reshape(-1)
    order = torch.argsort(flat, stable=True)
    inverse = torch.argsort(order)
    return x.flatten(0, -3)[order // k], flat[order], inverse


def scatter_unsort(y: torch.Tensor, inverse: torch.Tensor, shape) -> torch.Tensor:
    return y[inverse].unflatten(0, tuple(shape))


class SwitchLinear(nn.Module):
    """A float stack of expert linears: out = x @ weight[indices].T (+ bias[indices]); `to_quantized` converts it."""

    def __init__(self, input_dims: int, output_dims: int, num_experts: int, bias: bool = True):
        super().__init__()
        scale = math.sqrt(1 / input_dims)
        self.weight = nn.Parameter(torch.empty(num_experts, output_dims, input_dims).uniform_(-scale, scale))
        self.bias = nn.Parameter(torch.zeros(num_experts, output_dims)) if bias else None

    def forward(self, x: torch.Tensor, indices: torch.Tensor, sorted_indices: bool = False) -> torch.Tensor:
        y = x @ self.weight[indices].transpose(-1, -2)
        return y if self.bias is None else y + self.bias[indices].unsqueeze(-2)

    def to_quantized(self, group_size: int | None = None, bits: int | None = None, mode: str = "affine",
                     global_scale: bool = False) -> "QuantizedSwitchLinear":
        return QuantizedSwitchLinear.from_weights(self.weight, self.bias, group_size, bits, mode, global_scale)


class QuantizedSwitchLinear(QuantizedWeight):
    """A quantized stack of expert linears (E, N, K): out = gather_qmm(x, w, rhs_indices=indices) (+ bias).

    `global_scale=True` (nvfp4) gives each expert its own tensor scale, its weight's amax, as mlx-lm does."""

    def __init__(self, input_dims: int, output_dims: int, num_experts: int, bias: bool = True,
                 group_size: int | None = None, bits: int | None = None, mode: str = "affine",
                 global_scale: bool = False):
        super().__init__(group_size, bits, mode, "QuantizedSwitchLinear")
        if input_dims % self.group_size:
            raise ValueError(f"[QuantizedSwitchLinear] input_dims ({input_dims}) must be a multiple of the group "
                             f"size {self.group_size}.")
        self.set_empty((num_experts, output_dims), input_dims)
        if global_scale:
            self.global_scale = torch.ones(num_experts, dtype=torch.float32)
        self.bias = nn.Parameter(torch.zeros(num_experts, output_dims)) if bias else None

    @classmethod
    def from_weights(cls, weight: torch.Tensor, bias: torch.Tensor | None, group_size=None, bits=None,
                     mode: str = "affine", global_scale: bool = False) -> "QuantizedSwitchLinear":
        """Quantize stacked expert weights (E, N, K) (and keep their float bias (E, N))."""
        experts, out_dims, in_dims = weight.shape
        layer = cls(in_dims, out_dims, experts, bias is not None, group_size, bits, mode)
        w = weight.detach()
        if global_scale:
            if mode != "nvfp4":
                raise ValueError(f"[QuantizedSwitchLinear] A global scale needs mode 'nvfp4' but got {mode!r}.")
            amax = w.abs().amax(dim=(-2, -1)).float()
            parts = [ops.quantize(w[e], layer.group_size, layer.bits, mode, global_scale=amax[e])
                     for e in range(experts)]
            layer.set_quantized((torch.stack([p[0] for p in parts]), torch.stack([p[1] for p in parts])), amax)
        else:
            layer.quantize_from(w)
        if bias is not None:
            layer.bias = nn.Parameter(bias.detach().clone(), requires_grad=bias.requires_grad)
        return layer

    @property
    def num_experts(self) -> int:
        return self.weight.shape[0]

    def forward(self, x: torch.Tensor, indices: torch.Tensor, sorted_indices: bool = False) -> torch.Tensor:
        weight, scales, biases, global_scale = self.quantized_tensors()
        y = ops.gather_qmm(x, weight, scales, biases, rhs_indices=indices, transpose=True, group_size=self.group_size,
                           bits=self.bits, mode=self.mode, global_scale=global_scale, sorted_indices=sorted_indices)
        bias = self.bias
        return y if bias is None else y + bias[indices].unsqueeze(-2)

    def dequantize(self) -> SwitchLinear:
        w = self.dequantized_weight()
        layer = SwitchLinear(self.input_dims, self.output_dims, self.num_experts, bias=self.bias is not None)
        layer.weight = nn.Parameter(w)
        if self.bias is not None:
            layer.bias = nn.Parameter(self.bias.detach().clone())
        return layer

    def quantization(self) -> dict:
        entry = super().quantization()
        return {**entry, "global_scale": True} if self.global_scale is not None else entry

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, " + super().extra_repr() + f", bias={self.bias is not None}"


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up


def _routed_by(indices: torch.Tensor, experts: nn.Module):
    """Within: the expert products that route by `indices` share one range check (ops.matmul.routing_checked: one
    host sync per block instead of one per product) where `experts` is quantized; float experts index their weight
    directly, and a compiled graph's op checks per call."""
    if not isinstance(experts, QuantizedSwitchLinear) or torch.compiler.is_compiling():
        return contextlib.nullcontext()
    return routing_checked(indices, experts.num_experts)


class SwitchGLU(nn.Module):
    """mlx-lm's SwitchGLU: out = down(act(gate(x), up(x))) over each token's top-k experts, (..., D) -> (..., k, D)."""

    def __init__(self, input_dims: int, hidden_dims: int, num_experts: int, activation=swiglu, bias: bool = False):
        super().__init__()
        self.gate_proj = SwitchLinear(input_dims, hidden_dims, num_experts, bias=bias)
        self.up_proj = SwitchLinear(input_dims, hidden_dims, num_experts, bias=bias)
        self.down_proj = SwitchLinear(hidden_dims, input_dims, num_experts, bias=bias)
        self.activation = activation

    def forward(self, x: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        x = x.unsqueeze(-2).unsqueeze(-2)
        do_sort = indices.numel() >= SORT_FROM_ROWS
        idx, inverse = indices, None
        if do_sort:
            x, idx, inverse = gather_sort(x, indices)
        with _routed_by(idx, self.up_proj):
            up = self.up_proj(x, idx, sorted_indices=do_sort)
            gate = self.gate_proj(x, idx, sorted_indices=do_sort)
            y = self.down_proj(self.activation(gate, up), idx, sorted_indices=do_sort)
        if do_sort:
            y = scatter_unsort(y, inverse, indices.shape)
        return y.squeeze(-2)


def is_stacked_experts(module: nn.Module) -> bool:
    """A transformers experts module with stacked (E, 2I, H) `gate_up_proj` and (E, H, I) `down_proj` and no
    biases (Qwen2/3-MoE, Mixtral, DeepSeek layouts); others (gpt-oss's interleaved, biased layout) are not."""
    gate_up, down = getattr(module, "gate_up_proj", None), getattr(module, "down_proj", None)
    if not (isinstance(gate_up, torch.Tensor) and isinstance(down, torch.Tensor)):
        return False
    if gate_up.ndim != 3 or down.ndim != 3 or getattr(module, "gate_up_proj_bias", None) is not None:
        return False
    experts, two_inter, hidden = gate_up.shape
    return down.shape == (experts, hidden, two_inter // 2) and two_inter % 2 == 0 and hasattr(module, "act_fn")


class QuantizedExperts(nn.Module):
    """Quantized stand-in for a transformers experts module: forward(hidden (T, H), top_k_index (T, k),
    top_k_weights (T, k)) -> (T, H), the routed experts' outputs weighted and summed, through gather_qmm."""

    def __init__(self, gate_up_proj: QuantizedSwitchLinear, down_proj: QuantizedSwitchLinear, act_fn):
        super().__init__()
        self.gate_up_proj = gate_up_proj
        self.down_proj = down_proj
        self.act_fn = act_fn

    @classmethod
    def from_experts(cls, experts: nn.Module, group_size=None, bits=None, mode: str = "affine",
                     global_scale: bool = False) -> "QuantizedExperts":
        return cls(QuantizedSwitchLinear.from_weights(experts.gate_up_proj, None, group_size, bits, mode, global_scale),
                   QuantizedSwitchLinear.from_weights(experts.down_proj, None, group_size, bits, mode, global_scale),
                   experts.act_fn)

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        x = hidden_states.unsqueeze(-2).unsqueeze(-2)  # (T, 1, 1, H)
        do_sort = top_k_index.numel() >= SORT_FROM_ROWS
        idx, inverse = top_k_index, None
        if do_sort:
            x, idx, inverse = gather_sort(x, top_k_index)
        with _routed_by(idx, self.gate_up_proj):
            gate, up = self.gate_up_proj(x, idx, sorted_indices=do_sort).chunk(2, dim=-1)
            y = self.down_proj(self.act_fn(gate) * up, idx, sorted_indices=do_sort)
        if do_sort:
            y = scatter_unsort(y, inverse, top_k_index.shape)
        y = y.squeeze(-2) * top_k_weights.unsqueeze(-1).to(y.dtype)  # (T, k, H)
        return y.sum(dim=-2).to(hidden_states.dtype)
