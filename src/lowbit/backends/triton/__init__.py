"""The Triton backend: GPU kernels (and, with TRITON_INTERPRET=1, the same kernels interpreted on CPU tensors).

quantize and dequantize are the formats' torch code, which runs on the GPU as it is (Triton kernels for them are
planned); every matmul runs qmm.py's kernels (decode kernel, or the prefill path of prefill.py for one large
product).
"""

from ..cpu import dequantize, quantize
from .qmm import gather_qmm

__all__ = ["quantize", "dequantize", "gather_qmm"]
