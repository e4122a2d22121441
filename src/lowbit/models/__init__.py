"""Models on top of lowbit.nn: MLX-format checkpoint IO."""

from .checkpoint import load_quantized, load_tensors, read_config, save_quantized

__all__ = ["save_quantized", "load_quantized", "load_tensors", "read_config"]
