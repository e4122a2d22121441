"""Host-side launching of the Triton kernels.

`JITFunction.run` re-derives a kernel's specialization from every argument on every call (tens of microseconds
of host time per launch, more than a decode matmul's GPU time). A `Launcher` fixes a kernel's compile-time
parameters once; it launches the first call of each argument signature through Triton (which compiles, and here
finds the deepest software pipeline that fits in shared memory) and every later call of that signature straight
through the compiled binary's launcher. The signature holds what Triton specializes on -- every integer argument's
value, every tensor's dtype and 16-byte alignment -- and the current device, so the binary reused is the one
Triton would pick.
"""

from __future__ import annotations

import inspect
import operator

import torch
import triton.language as tl
from triton import knobs
from triton.runtime import driver
from triton.runtime.errors import OutOfResources
from triton.runtime.jit import JITFunction

MODE_IDS = {"affine": 0, "mxfp4": 1, "mxfp8": 2, "nvfp4": 3}
TL_DTYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}

_MAX_SIGNATURES = 4096  # per launcher; past it the table starts over (each entry is a reference to a binary)


def _launch_hooks() -> bool:
    """Whether a profiler (e.g. Proton) hooks kernel launches: then every launch goes through Triton, which calls
    them. (Triton 3.6 on keeps the hooks in a HookChain, empty when unused; older ones use None.)"""
    hook = knobs.runtime.launch_enter_hook
    return hook is not None and bool(getattr(hook, "calls", True))


class Launcher:
    """One @triton.jit kernel with its constexprs, num_warps, (at most) num_stages and register cap fixed."""

    def __init__(self, kernel, num_warps: int, num_stages: int, constexprs: dict, max_registers: int | None = None):
        self.kernel = kernel
        self.num_warps = num_warps
        self.num_stages = num_stages  # lowered, once, to what fits in shared memory
        self.constexprs = constexprs
        self.options = {"maxnreg": max_registers} if max_registers else {}  # (compile options beside the above)
        self.compiled = isinstance(kernel, JITFunction)  # (with TRITON_INTERPRET=1, Triton's interpreted function)
        self._binaries: dict[tuple, object] = {}
        self._tail: tuple | None = None  # the constexpr values, in the kernel's parameter order after the runtime args

    def __call__(self, grid: tuple, *args) -> None:
        """Launch on `grid` (a tuple of up to 3 ints) with the kernel's runtime arguments, positionally."""
        if not self.compiled:
            self.kernel[grid](*args, **self.constexprs, num_warps=self.num_warps, num_stages=self.num_stages)
            return
        device = torch.cuda.current_device()
        signature = (device, *[(a.dtype, a.data_ptr() % 16 == 0) if isinstance(a, torch.Tensor) else a
                               for a in args])
        binary = self._binaries.get(signature)
        if binary is None or _launch_hooks():
            self._first_launch(grid, args, signature)
            return
        grid_1 = grid[1] if len(grid) > 1 else 1
        grid_2 = grid[2] if len(grid) > 2 else 1
        binary.run(grid[0], grid_1, grid_2, driver.active.get_current_stream(device), binary.function,
                   binary.packed_metadata, None, None, None, *args, *self._tail)

    def binary(self, signature: tuple):
        """The compiled binary that a launch of this signature (see __call__) runs, None before its first launch."""
        return self._binaries.get(signature)

    def _first_launch(self, grid, args, signature) -> None:
        while True:
            try:
                binary = self.kernel[grid](*args, **self.constexprs, num_warps=self.num_warps,
                                           num_stages=self.num_stages, **self.options)
                break
            except OutOfResources:  # the pipeline depth changes when loads are issued, never the arithmetic
                if self.num_stages == 1:
                    raise
                self.num_stages -= 1
        if self._tail is None:
            names = self.kernel.arg_names[len(args):]
            self._tail = tuple(self.constexprs[name] for name in names)
        if len(self._binaries) >= _MAX_SIGNATURES:
            self._binaries.clear()
        self._binaries[signature] = binary


class BoundLaunch:
    """A Launcher's launch with everything fixed but the addresses of its tensors: its pointer arguments come first,
    then integers; `grid`, the integers and the tensors' dtypes are fixed, and `layout` says which of a call's
    tensors each pointer argument is (a tensor passed for several arguments is read once).

    A call passes the tensors' addresses to the compiled binary as integers, which Triton's C launcher takes as they
    are: no signature of thirty arguments, no `data_ptr()` call and driver pointer query per argument. The binary is
    the one the Launcher ran for the same signature (the addresses' 16-byte alignment decides it); a call whose
    signature has not been launched yet returns False without launching, and the caller takes the general path,
    which launches (and compiles) it."""

    def __init__(self, launch: Launcher, grid: tuple, dtypes: tuple, ints: tuple, layout: tuple):
        self.launch = launch
        self.grid = (grid[0], grid[1] if len(grid) > 1 else 1, grid[2] if len(grid) > 2 else 1)
        self.dtypes = dtypes  # per pointer argument
        self.ints = ints
        # the call's tensors (or addresses, or alignments) -> the pointer arguments, a tuple
        self.spread = operator.itemgetter(*layout) if len(layout) > 1 else lambda given: (given[layout[0]],)
        self._by_alignment: dict[tuple, tuple] = {}

    def __call__(self, *tensors: torch.Tensor) -> bool:
        """Launch on the current stream; False (nothing launched) where the binary is not known yet."""
        launch = self.launch
        if not launch.compiled:  # the interpreter: through Triton, every call, with the dtypes a binary is found by
            pointers = [t if t.dtype == d else t.view(d) for t, d in zip(self.spread(tensors), self.dtypes)]
            launch(self.grid, *pointers, *self.ints)
            return True
        addresses = [t.data_ptr() for t in tensors]
        device = torch._C._cuda_getDevice()
        key = (device, *[a % 16 == 0 for a in addresses])
        found = self._by_alignment.get(key)
        if found is None:
            aligned = self.spread(key[1:])
            binary = launch.binary((device, *zip(self.dtypes, aligned), *self.ints))
            if binary is None:
                return False
            found = self._by_alignment[key] = _direct_launch(binary, (*self.ints, *launch._tail))
        if _launch_hooks():
            return False
        c_launch, head, tail = found
        c_launch(*self.grid, torch._C._cuda_getCurrentRawStream(device), *head, *self.spread(addresses), *tail)
        return True


def _plain_c_launcher(wrapper: type) -> bool:
    """Whether a CudaLauncher class passes its arguments on to its C `launch` as Triton 3.5-3.6's does:
    `__call__(gridX, gridY, gridZ, stream, function, *args)` calls `launch(gridX, gridY, gridZ, stream, function,
    cooperative_grid, pdl, global_scratch, profile_scratch, *args)`. Later Triton (3.7 on: kernel metadata and hooks
    named, then the arguments' annotations and signature, the kernel's arguments as one tuple) and others do not."""
    try:
        parameters = list(inspect.signature(wrapper.__call__).parameters.values())
    except (TypeError, ValueError):
        return False
    return len(parameters) == 7 and parameters[-1].kind is inspect.Parameter.VAR_POSITIONAL


def _direct_launch(binary, tail: tuple) -> tuple:
    """(a callable, the arguments before the pointers, those after them) that launch `binary`: Triton's C launcher
    itself where its layout is known (see _plain_c_launcher) and the kernel needs no scratch memory (the Python
    wrapper around it allocates scratch), else that wrapper (`binary.run`, called as Launcher.__call__ calls it)."""
    run = binary.run
    metadata = (binary.packed_metadata, None, None, None)  # (launch metadata and enter / exit hooks: none)
    try:
        if _plain_c_launcher(type(run)) and run.global_scratch_size == 0 and run.profile_scratch_size == 0:
            flags = (run.launch_cooperative_grid, run.launch_pdl, None, None)  # (no scratch buffers)
            return run.launch, (binary.function, *flags, *metadata), tail
    except AttributeError:  # another Triton's launcher: its wrapper
        pass
    return run, (binary.function, *metadata), tail


_LAUNCHERS: dict[tuple, Launcher] = {}


def launcher(kernel, num_warps: int, num_stages: int, max_registers: int | None = None, **constexprs) -> Launcher:
    """The Launcher of `kernel` with these compile-time parameters (one per distinct set, kept for the process);
    max_registers caps ptxas's registers per thread (None: ptxas decides)."""
    key = (kernel, num_warps, num_stages, max_registers, *constexprs.items())
    found = _LAUNCHERS.get(key)
    if found is None:
        found = _LAUNCHERS[key] = Launcher(kernel, num_warps, num_stages, constexprs, max_registers)
    return found
