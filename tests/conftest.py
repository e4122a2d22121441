"""Shared test helpers: conversion between torch and MLX (the oracle), quantize/dequantize shorthands."""

from __future__ import annotations

import os

import pytest
import torch

# Without a GPU the Triton kernels run in Triton's interpreter on CPU tensors (must be set before triton.jit runs).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import lowbit  # noqa: E402
from lowbit.mlx_interop import from_mlx, to_mlx  # noqa: E402

try:  # MLX 0.32.4 is the oracle; the GPU machine has no MLX and runs only the tests that need none
    import mlx.core as mx
except ImportError:
    mx = None

TORCH_TO_MX = {} if mx is None else {torch.float32: mx.float32, torch.float16: mx.float16, torch.bfloat16: mx.bfloat16}
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


to_mx, to_torch = to_mlx, from_mlx  # bit-exact torch <-> MLX (lowbit.mlx_interop)


def quantize3(w, group_size=None, bits=None, mode="affine", **kw):
    """lowbit.quantize padded to (w_q, scales, biases) with biases None for fp modes."""
    out = lowbit.quantize(w, group_size, bits, mode, **kw)
    return out if mode == "affine" else (out[0], out[1], None)


def dequantize_f64(q, group_size=None, bits=None, mode="affine", global_scale=None):
    """The oracle weight: lowbit.dequantize (bit-exact with MLX) in float32, as float64."""
    return lowbit.dequantize(q[0], q[1], q[2], group_size, bits, mode, global_scale, torch.float32).double()


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equality (NaN payloads included) for any dtype."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    return torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))


ALL_CONFIGS = [("affine", gs, b) for gs in (32, 64, 128) for b in (1, 2, 3, 4, 5, 6, 8)] + [
    ("mxfp4", 32, 4),
    ("mxfp8", 32, 8),
    ("nvfp4", 16, 4),
]


@pytest.fixture(autouse=True, scope="session")
def _one_thread_per_xdist_worker():
    """Under pytest-xdist each worker gets one torch thread: oversubscribed OpenMP is several times slower."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        torch.set_num_threads(1)
    yield


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(1234)
