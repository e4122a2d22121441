"""QuantizedRouter: a transformers MoE router that holds a bare weight (Qwen2/3-MoE's, Mixtral's, OLMoE's `gate`),
computing with that weight quantized, as mlx-lm's quantized `gate` linear does.

Such a router is no nn.Linear: it holds a (num_experts, hidden) `weight` Parameter and projects with
`F.linear(x, self.weight)` inside its own forward (softmax, top-k, normalization). QuantizedRouter keeps that forward
as it is: the router becomes its child, and the router's `weight` becomes a stand-in whose `F.linear` is
`lowbit.quantized_matmul` with the quantized weight (x @ dequantize(w).T, batch-invariant). The quantized tensors are
buffers of QuantizedRouter itself, so the state_dict holds `<router path>.weight`, `.scales`, `.biases`: mlx-lm's
names for its quantized gate.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops
from .linear import _empty_linear
from .weights import QuantizedWeight


def is_bare_router(module: nn.Module) -> bool:
    """A module whose only tensor is a 2-D float `weight` Parameter and that has no children (transformers'
    Qwen3MoeTopKRouter and its likes). Routers holding more (DeepSeek-V3's e_score_correction_bias, gpt-oss's bias;
    mlx-lm keeps DeepSeek's float too) are not; neither are linears and embeddings."""
    if isinstance(module, (nn.Linear, nn.Embedding, QuantizedWeight)) or next(module.children(), None) is not None:
        return False
    tensors = [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]
    if len(tensors) != 1 or tensors[0][0] != "weight":
        return False
    weight = tensors[0][1]
    return isinstance(weight, nn.Parameter) and weight.ndim == 2 and weight.is_floating_point()


class _RouterWeight:
    """What the router sees as `weight`: `F.linear(x, weight, bias)` runs the owner's quantized matmul. Float casts
    (`.float()`, `.to(dtype)`, `.type(dtype)`, as in Ernie's or DeepSeek-V2's routers) return it unchanged: the matmul
    uses the exact dequantized values and its output dtype follows x's, which those routers cast alike."""

    def __init__(self, owner: "QuantizedRouter"):
        self.owner = owner

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear and len(args) >= 2 and isinstance(args[1], cls) and not isinstance(args[0], cls):
            bias = args[2] if len(args) > 2 else kwargs.get("bias")
            y = args[1].owner.linear(args[0])
            return y if bias is None else y + bias
        name = getattr(func, "__name__", func)
        raise ValueError(f"[QuantizedRouter] The router uses its quantized weight in {name}; only "
                         f"F.linear(x, weight) and float casts of the weight are served.")

    @property
    def dtype(self) -> torch.dtype:
        return self.owner.dequantized_dtype

    def _cast(self, dtype) -> "_RouterWeight":
        if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise ValueError(f"[QuantizedRouter] The quantized router weight can only be cast to a float dtype; got "
                             f"{dtype!r}.")
        return self

    def to(self, dtype) -> "_RouterWeight":
        return self._cast(dtype)

    def type(self, dtype) -> "_RouterWeight":
        return self._cast(dtype)

    def float(self) -> "_RouterWeight":
        return self


class QuantizedRouter(QuantizedWeight):
    """A bare-weight router (see `is_bare_router`) whose projection is `lowbit.quantized_matmul`: forward is the
    router's own (same arguments and outputs), with logits equal to `F.linear(x, dequantize(weight))`.

    `QuantizedRouter(router, ...)` holds zero codes of the router's shape (a checkpoint fills them);
    `from_router(router, ...)` quantizes the router's weight. Either takes the router over: it becomes the child
    `router`, its weight Parameter replaced by the stand-in that computes with this module's buffers.
    """

    def __init__(self, router: nn.Module, group_size: int | None = None, bits: int | None = None,
                 mode: str = "affine", global_scale: bool = False):
        super().__init__(group_size, bits, mode, "QuantizedRouter")
        if not is_bare_router(router):
            raise ValueError(f"[QuantizedRouter] Expected a module holding only a 2-D float weight Parameter, got "
                             f"{type(router).__name__}.")
        output_dims, input_dims = router.weight.shape
        _empty_linear(self, input_dims, output_dims, "QuantizedRouter")
        if global_scale:
            self.global_scale = torch.ones((), dtype=torch.float32)
        del router.weight
        router.weight = _RouterWeight(self)
        self.router = router

    @classmethod
    def from_router(cls, router: nn.Module, group_size: int | None = None, bits: int | None = None,
                    mode: str = "affine", global_scale: bool = False) -> "QuantizedRouter":
        w = router.weight.detach()
        layer = cls(router, group_size, bits, mode)
        layer.quantize_from(w, w.abs().amax().float() if global_scale else None)
        return layer

    @property
    def dequantized_dtype(self) -> torch.dtype:
        """The float dtype of the dequantized weight: the affine scales', bfloat16 for the fp modes (as MLX)."""
        return self.scales.dtype if self.scales.is_floating_point() else torch.bfloat16

    def linear(self, x: torch.Tensor) -> torch.Tensor:
        """The router's projection: x @ dequantize(weight).T."""
        return ops.quantized_matmul(x, self.weight, self.scales, self.biases, True, self.group_size, self.bits,
                                    self.mode, global_scale=self.global_scale)

    def forward(self, *args, **kwargs):
        return self.router(*args, **kwargs)

    def dequantize(self) -> nn.Module:
        """A copy of the float router holding the dequantized weight."""
        stand_in = self.router.weight
        router = copy.deepcopy(self.router, {id(stand_in): stand_in})  # (the copy would otherwise copy self too)
        del router.weight
        router.weight = nn.Parameter(self.dequantized_weight())
        return router

    def extra_repr(self) -> str:
        return super().extra_repr() + f", router={type(self.router).__name__}"
