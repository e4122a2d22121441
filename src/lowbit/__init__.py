"""lowbit: MLX's low-bit quantization on torch tensors, bit-compatible with MLX 0.32.4.

MLX code ports by replacing `mx.` with `lowbit.`:

    w_q, scales, biases = lowbit.quantize(w, group_size=64, bits=4)
    y = lowbit.quantized_matmul(x, w_q, scales, biases)        # == x @ lowbit.dequantize(w_q, scales, biases).T
"""

from .formats import (
    MODES,
    bits_per_weight,
    global_scale_from_compressed_tensors,
    global_scale_from_modelopt,
    global_scale_to_modelopt,
)
from .ops import dequantize, from_fp8, gather_qmm, gather_qqmm, qqmm, quantize, quantized_matmul, to_fp8
from . import nn  # noqa: E402  (modules build on the ops)
from .nn import quantize_model  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "quantize", "dequantize", "quantized_matmul", "gather_qmm", "qqmm", "gather_qqmm", "to_fp8", "from_fp8",
    "MODES", "bits_per_weight", "global_scale_from_modelopt", "global_scale_from_compressed_tensors",
    "global_scale_to_modelopt", "nn", "quantize_model",
]
