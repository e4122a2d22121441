"""Backend selection: the one place that decides which implementation serves a call.

`LOWBIT_BACKEND` chooses: `auto` (default) runs the Triton kernels on CUDA tensors and the vectorized torch
reference on CPU tensors; `cpu` forces the torch reference (it runs on any device); `triton` forces the Triton
kernels, on CUDA tensors or, with `TRITON_INTERPRET=1`, on CPU tensors, and raises if they cannot serve the call:
never a silent fallback.
"""

from __future__ import annotations

import functools
import os
import threading
from types import ModuleType

from . import cpu, meta

BACKENDS = ("auto", "cpu", "triton")

# os.environ's own storage (POSIX: bytes -> bytes), which it keeps in step with every change made through it: a
# lookup there costs tens of nanoseconds where os.environ.get costs a microsecond (it encodes the key and goes through
# the Mapping protocol in Python), and the selection below is read on every call.
_ENVIRON = getattr(os.environ, "_data", None) if os.name == "posix" else None


def _stored(name: bytes) -> bytes | str | None:
    """The variable's value as os.environ stores it (bytes on POSIX), read cheaply (see _ENVIRON)."""
    return os.environ.get(name.decode()) if _ENVIRON is None else _ENVIRON.get(name)


def environment(name: bytes) -> str | None:
    """os.environ.get(name) for an ASCII variable name given as bytes."""
    value = _stored(name)
    return value if value is None or isinstance(value, str) else os.fsdecode(value)


def selection() -> tuple:
    """What backend_for's choice depends on besides the device: LOWBIT_BACKEND, TRITON_INTERPRET (as stored) and the
    tracing flag (a cache of per-call decisions keys on it)."""
    return _stored(b"LOWBIT_BACKEND"), _stored(b"TRITON_INTERPRET"), _TRACING.up


# The matmul op's prepared products (ops.matmul), by the static facts of the calls they serve. They hold backend
# decisions (plans, binaries), so they live here, where a backend that forgets its decisions clears them too.
BOUND_PRODUCTS: dict[tuple, object] = {}


def requested_backend() -> str:
    name = (environment(b"LOWBIT_BACKEND") or "auto").strip().lower() or "auto"
    if name not in BACKENDS:
        raise ValueError(f"LOWBIT_BACKEND must be one of {', '.join(BACKENDS)} but got {name!r}.")
    return name


@functools.cache
def _triton_module() -> ModuleType | None:
    try:
        from . import triton as triton_backend
    except ImportError:
        return None
    return triton_backend


def interpreting() -> bool:
    """True when Triton kernels run in its interpreter (TRITON_INTERPRET=1), on CPU tensors."""
    return environment(b"TRITON_INTERPRET") == "1"


class _ThreadFlag(threading.local):
    """A per-thread flag, raised within `with flag.raised():`."""

    up = False

    def raised(self) -> "_Raised":
        return _Raised(self)


class _Raised:
    """Raises a _ThreadFlag for the body of a `with` and restores it after. A plain class rather than a
    contextlib generator: registered ops enter one on every call (a generator costs microseconds)."""

    __slots__ = ("flag", "before")

    def __init__(self, flag: _ThreadFlag):
        self.flag = flag

    def __enter__(self) -> None:
        self.before, self.flag.up = self.flag.up, True

    def __exit__(self, *exc) -> None:
        self.flag.up = self.before


_TRACING, _PER_CALL_WORKSPACE = _ThreadFlag(), _ThreadFlag()


def shapes_only():
    """Within: every op runs the meta backend (fake tensors, torch.compile's tracing) and skips the checks that
    read data (index ranges, non-finite weights); the real call checks them."""
    return _TRACING.raised()


def tracing_shapes() -> bool:
    return _TRACING.up


def per_call_workspace():
    """Within: kernels allocate their scratch memory per call and keep none between calls. The registered ops run
    so: a compiled graph calls them, and torch.compile's CUDA graphs (cudagraph trees) run their warm-up calls with
    every allocation routed into the graph's memory pool, which must hold nothing that outlives the graph."""
    return _PER_CALL_WORKSPACE.raised()


def workspace_per_call() -> bool:
    return _PER_CALL_WORKSPACE.up


def backend_for(op: str, device) -> ModuleType:
    """The backend module that serves `op` on `device`."""
    if tracing_shapes():
        return meta
    name = requested_backend()
    device = getattr(device, "type", device)
    if name == "cpu":
        return cpu
    if name == "triton":
        module = _triton_module()
        if module is None:
            raise ValueError(f"[{op}] LOWBIT_BACKEND=triton but triton cannot be imported.")
        if device != "cuda" and not interpreting():
            raise ValueError(
                f"[{op}] LOWBIT_BACKEND=triton needs CUDA tensors (or TRITON_INTERPRET=1 for CPU tensors); "
                f"got tensors on {device}."
            )
        return module
    if device == "cuda" and _triton_module() is not None:
        return _triton_module()
    return cpu
