"""The op surface (MLX 0.32.4 names, arguments and defaults): validation, then dispatch to a backend.

The public functions live in library.py, which also registers each op as `torch.ops.lowbit.<name>`."""

from .library import dequantize, gather_qmm, gather_qqmm, qqmm, quantize, quantized_matmul
from .quantization import from_fp8, to_fp8

__all__ = ["quantize", "dequantize", "quantized_matmul", "gather_qmm", "qqmm", "gather_qqmm", "to_fp8", "from_fp8"]
