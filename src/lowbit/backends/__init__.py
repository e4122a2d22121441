"""Backend selection: the one place that decides which implementation serves a call.

`LOWBIT_BACKEND` chooses: `auto` (default) runs the fastest backend available for the tensors' device, `cpu` forces
the vectorized torch reference (it runs on any device), `triton` forces the Triton kernels and raises if they cannot
serve the call (never a silent fallback).
"""

from __future__ import annotations

import os
from types import ModuleType

from . import cpu

BACKENDS = ("auto", "cpu", "triton")


def requested_backend() -> str:
    name = os.environ.get("LOWBIT_BACKEND", "auto").strip().lower() or "auto"
    if name not in BACKENDS:
        raise ValueError(f"LOWBIT_BACKEND must be one of {', '.join(BACKENDS)} but got {name!r}.")
    return name


def backend_for(op: str, device) -> ModuleType:
    """The backend module that serves `op` on `device`."""
    name = requested_backend()
    if name == "triton":
        raise NotImplementedError(f"[{op}] LOWBIT_BACKEND=triton: the Triton backend has no kernel for this op yet.")
    return cpu
