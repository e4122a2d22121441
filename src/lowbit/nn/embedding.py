"""QuantizedEmbedding: torch.nn.Embedding with a quantized table (MLX's module of the same name)."""

from __future__ import annotations

import torch
from torch import nn

from .. import ops
from .weights import QuantizedWeight


class QuantizedEmbedding(QuantizedWeight):
    """Looks up rows of a quantized (num_embeddings, dims) table and dequantizes only those rows.

    `as_linear(x)` multiplies by the table's transpose (tied output heads). `dtype` is the float dtype the rows come
    back in: from_embedding keeps the embedding's dtype; by default it is MLX's (the affine scales' dtype, bfloat16
    for the fp modes).
    """

    def __init__(self, num_embeddings: int, dims: int, group_size: int | None = None, bits: int | None = None,
                 mode: str = "affine", dtype: torch.dtype | None = None):
        super().__init__(group_size, bits, mode, "QuantizedEmbedding")
        if dims % self.group_size:
            raise ValueError(
                f"[QuantizedEmbedding] dims ({dims}) must be a multiple of the group size {self.group_size}."
            )
        self.set_empty((num_embeddings,), dims)
        self.dtype = dtype

    @classmethod
    def from_embedding(cls, embedding: nn.Embedding, group_size: int | None = None, bits: int | None = None,
                       mode: str = "affine") -> "QuantizedEmbedding":
        num, dims = embedding.weight.shape
        layer = cls(num, dims, group_size, bits, mode, dtype=embedding.weight.dtype)
        layer.quantize_from(embedding.weight.detach())
        return layer

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        if self.dtype is not None:  # .to(dtype) / .half() move the rows' dtype as they would nn.Embedding's
            self.dtype = fn(torch.empty(0, dtype=self.dtype)).dtype
        return self

    @property
    def num_embeddings(self) -> int:
        return self.weight.shape[0]

    def forward(self, indices: torch.Tensor) -> torch.Tensor:
        flat = indices.reshape(-1)
        codes = self.weight.view(torch.int32)[flat].view(torch.uint32)  # CUDA has no uint32 gather
        rows = ops.dequantize(
            codes, self.scales[flat], None if self.biases is None else self.biases[flat],
            self.group_size, self.bits, self.mode, self.global_scale, self.dtype,
        )
        return rows.reshape(*indices.shape, rows.shape[-1])

    def as_linear(self, x: torch.Tensor) -> torch.Tensor:
        """x @ dequantize(table).T: the tied output head."""
        weight, scales, biases, global_scale = self.quantized_tensors()
        return ops.quantized_matmul(x, weight, scales, biases, True, self.group_size, self.bits, self.mode,
                                    global_scale=global_scale)

    def dequantize(self) -> nn.Embedding:
        """A float nn.Embedding holding the dequantized table."""
        w = self.dequantized_weight(self.dtype)
        return nn.Embedding.from_pretrained(w, freeze=False)

    def extra_repr(self) -> str:
        return (f"{self.num_embeddings}, {self.input_dims}, group_size={self.group_size}, bits={self.bits}, "
                f"mode={self.mode}")


class TiedHead(nn.Module):
    """An output head tied to a QuantizedEmbedding: x @ dequantize(table).T through the embedding's own buffers.

    It holds no tensors of its own, so a tied model's state_dict has no head entries, as in mlx-lm checkpoints
    (mlx-lm's tied models call `embed_tokens.as_linear`)."""

    def __init__(self, embedding: QuantizedEmbedding):
        super().__init__()
        self._embedding = [embedding]  # (in a list: not a submodule, so its tensors are listed once, under its path)

    @property
    def embedding(self) -> QuantizedEmbedding:
        return self._embedding[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.embedding.as_linear(x)

    def extra_repr(self) -> str:
        return f"tied to a QuantizedEmbedding of {self.embedding.num_embeddings} rows"
