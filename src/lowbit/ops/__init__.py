"""The op surface (MLX 0.32.4 names, arguments and defaults): validation, then dispatch to a backend."""

from .matmul import gather_qmm, gather_qqmm, qqmm, quantized_matmul
from .quantization import dequantize, from_fp8, quantize, to_fp8

__all__ = ["quantize", "dequantize", "quantized_matmul", "gather_qmm", "qqmm", "gather_qqmm", "to_fp8", "from_fp8"]
