"""Host-side launch helpers shared by the Triton kernels' launchers (qmm.py, prefill.py)."""

from __future__ import annotations

import torch
import triton.language as tl
from triton.runtime.errors import OutOfResources

MODE_IDS = {"affine": 0, "mxfp4": 1, "mxfp8": 2, "nvfp4": 3}
TL_DTYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}

_FITTING_STAGES: dict[tuple, int] = {}


def launch_fitting(kernel, grid, stages: int, args: tuple, meta: dict) -> None:
    """Launch `kernel` with the deepest software pipeline (num_stages <= stages) that fits in shared memory.

    The pipeline depth changes only when loads are issued, never the arithmetic, so the bits do not depend on it."""
    key = (kernel.fn.__name__, *meta.values())  # the dict is always built in the same order
    stages = _FITTING_STAGES.get(key, stages)
    while True:
        try:
            kernel[grid](*args, **meta, num_stages=stages)
        except OutOfResources:
            if stages == 1:
                raise
            stages -= 1
            continue
        _FITTING_STAGES[key] = stages
        return
