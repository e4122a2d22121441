"""The Triton backend: GPU kernels (and, with TRITON_INTERPRET=1, the same kernels interpreted on CPU tensors).

quantize runs quantizer.py's kernel (byte-identical to the formats' torch code), which also quantizes qqmm's
activations (`fake_quantize`); dequantize is the formats' torch code, which runs on the GPU as it is; every matmul
runs qmm.py's kernels (decode kernel, or the prefill path of prefill.py for one large product); `bind_product`
and `bind_gather` prepare a plain or gathered decode product for repeated calls (a decode step's linears and
experts).
"""

from ..cpu import dequantize
from .qmm import bind_gather, bind_product, gather_qmm
from .quantizer import fake_quantize, quantize

__all__ = ["quantize", "dequantize", "fake_quantize", "gather_qmm", "bind_product", "bind_gather"]
