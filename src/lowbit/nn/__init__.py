"""Quantized modules and quantize_model: the layer users touch (MLX's nn.QuantizedLinear & co. on torch).

Data flows one way: these modules call `lowbit.ops`; checkpoints (`lowbit.models`) build on them.
"""

from .embedding import QuantizedEmbedding, TiedHead
from .linear import QQLinear, QuantizedLinear
from .quantize_model import ROUTER_PARAMS, model_bits_per_weight, quantize_model
from .router import QuantizedRouter
from .switch import QuantizedExperts, QuantizedSwitchLinear, SwitchGLU, SwitchLinear
from .weights import QuantizedWeight

__all__ = [
    "QuantizedLinear", "QQLinear", "QuantizedEmbedding", "TiedHead", "QuantizedSwitchLinear", "SwitchLinear",
    "SwitchGLU", "QuantizedExperts", "QuantizedRouter", "QuantizedWeight", "quantize_model", "model_bits_per_weight",
    "ROUTER_PARAMS",
]
