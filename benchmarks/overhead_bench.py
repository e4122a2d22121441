"""Per-call host overhead of a quantized linear at decode (M = 1), eager and compiled, beside torch's nn.Linear.

Usage (GPU machine, repo root): PYTHONPATH=src python benchmarks/overhead_bench.py [output.md] [--eager]
(--eager: only the eager rows, for quick A/B runs of two trees)
Host time per call: the median over 5 batches of N/5 calls enqueued back to back without a sync, per call
(the GPU queue is deep enough that the host never waits on it, so this is the time Python + dispatch + launch cost
the CPU). The launch floor is the output's allocation and the kernels' launches through Triton's C launcher alone:
the part of a call no Python layer can remove; a call's host time minus it is lowbit's Python overhead. The stubbed
rows time the same call with the bound product's C launches made no-ops: lowbit's Python (plus the output's
torch.empty) alone, free of the launch and the GPU queue. GPU time per call: the same calls replayed in a CUDA
graph (bench_cuda.graph_time_us). A call whose host time exceeds its GPU time is host-bound at decode; that
difference is what CUDA graphs (`mode="reduce-overhead"`) remove.
"""

import statistics
import sys
import time

import torch
from torch import nn

import lowbit
from lowbit.backends import BOUND_PRODUCTS
from lowbit.bench_cuda import graph_time_us
from lowbit.nn import QuantizedLinear

N_CALLS = 2000


def host_us(call, n=N_CALLS, batches=5, warmup=50, drained=False) -> float:
    """Median over `batches` of the host time per call of n / batches calls enqueued without a sync (`drained`: the
    batch's time runs until the GPU has finished it)."""
    for _ in range(warmup):
        call()
    torch.cuda.synchronize()
    times = []
    for _ in range(batches):
        start = time.perf_counter()
        for _ in range(n // batches):
            call()
        if drained:
            torch.cuda.synchronize()
        times.append((time.perf_counter() - start) / (n // batches) * 1e6)
        torch.cuda.synchronize()
    return statistics.median(times)


def bound_product(call):
    """The product lowbit binds to `call` (one quantized_matmul): the memo emptied, the call made twice (the second
    binds it), its one entry."""
    BOUND_PRODUCTS.clear()
    for _ in range(2):
        call()
    (bound,) = BOUND_PRODUCTS.values()
    return bound


def launch_floor(x, q, call):
    """A closure that does only what no implementation of `call` can skip: allocate the output and launch the
    kernels through Triton's C launcher with the addresses fixed (the bound product's own launches, no Python of
    lowbit around them). Host time of a call minus this floor is lowbit's Python overhead."""
    bound = bound_product(call)
    out = torch.empty(bound.out_shape, dtype=bound.plan.kernel_dtype, device=x.device)
    tensors = [x, q.weight, q.scales, out]
    if bound.plan.split_in_grid:
        tensors += [torch.zeros(bound.partials, device=x.device), torch.zeros(bound.tiles, dtype=torch.int32,
                                                                              device=x.device)]
    if q.biases is not None:
        tensors.append(q.biases)
    copy = None
    if bound.slot_major is not None:
        copy = torch.empty(bound.copy_numel, dtype=x.dtype, device=x.device)
        tensors[0] = copy
    shape, dtype, device = bound.out_shape, bound.plan.kernel_dtype, x.device

    def floor():
        torch.empty(shape, dtype=dtype, device=device)
        if copy is not None:
            bound.slot_major(x, copy)
        bound.qmm(*tensors)

    return floor


def _no_launch(*args):
    pass


def python_only(call):
    """`call` with the bound product's C launches made no-ops: lowbit's own per-call host work (the Python, the
    output's allocation) measured without the launches or the GPU queue."""
    bound = bound_product(call)
    launches = [b for b in (bound.qmm, bound.slot_major) if b is not None]
    saved = [dict(b._by_alignment) for b in launches]

    def stubbed():
        for b in launches:
            b._by_alignment = {key: (_no_launch, head, tail) for key, (_, head, tail) in b._by_alignment.items()}
        try:
            return host_us(call)
        finally:
            for b, entries in zip(launches, saved):
                b._by_alignment = entries

    return stubbed


def main():
    eager_only = "--eager" in sys.argv
    output = next((a for a in sys.argv[1:] if not a.startswith("--")), None)
    torch.manual_seed(0)
    rows = []
    x = torch.randn(1, 4096, device="cuda", dtype=torch.bfloat16)
    linear = nn.Linear(4096, 4096, bias=False, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        rows.append(("torch nn.Linear bf16", host_us(lambda: linear(x)), graph_time_us([lambda: linear(x)])))
        rows.append(("torch.empty of the output alone (this host's speed)",
                     host_us(lambda: torch.empty(1, 4096, device="cuda", dtype=torch.bfloat16)), float("nan")))
        for mode, gs, bits in (("affine", 64, 4), ("mxfp4", 32, 4), ("nvfp4", 16, 4)):
            q = QuantizedLinear.from_linear(linear, gs, bits, mode)
            label = f"{mode} g{gs} b{bits}"
            gpu = graph_time_us([lambda q=q: q(x)])
            rows.append((f"QuantizedLinear {label}, eager", host_us(lambda q=q: q(x)), gpu))

            def call(q=q, gs=gs, bits=bits, mode=mode):
                return lowbit.quantized_matmul(x, q.weight, q.scales, q.biases, True, gs, bits, mode)

            rows.append((f"lowbit.quantized_matmul {label}, eager", host_us(call), gpu))
            rows.append((f"launch floor {label}: torch.empty + the same kernels' C launches",
                         host_us(launch_floor(x, q, call)), gpu))
            rows.append((f"lowbit.quantized_matmul {label}, launches stubbed (lowbit's Python + torch.empty)",
                         python_only(call)(), float("nan")))
            rows.append((f"QuantizedLinear {label}, launches stubbed", python_only(lambda q=q: q(x))(), float("nan")))
            if eager_only:
                continue
            rows.append((f"torch.ops.lowbit.quantized_matmul {label} (the op a compiled graph calls)",
                         host_us(lambda q=q: torch.ops.lowbit.quantized_matmul(x, q.weight, q.scales, q.biases, True,
                                                                              gs, bits, mode, None)), gpu))
            torch._dynamo.reset()
            compiled = torch.compile(q, fullgraph=True)
            rows.append((f"QuantizedLinear {label}, torch.compile", host_us(lambda c=compiled: c(x)), gpu))
            torch._dynamo.reset()
            graphed = torch.compile(q, mode="reduce-overhead", fullgraph=True)
            rows.append((f"QuantizedLinear {label}, torch.compile reduce-overhead (CUDA graphs)",
                         host_us(lambda c=graphed: c(x)), gpu))
    lines = [
        f"# Per-call overhead at decode, M = 1, 4096 x 4096 ({torch.cuda.get_device_name()}, "
        f"torch {torch.__version__}, "
        f"triton {__import__('triton').__version__}, {time.strftime('%Y-%m-%d')})",
        "",
        "| call | host µs / call | GPU µs / call (CUDA graph) |",
        "|---|---|---|",
    ] + [f"| {name} | {h:.1f} | {g:.1f} |" for name, h, g in rows]
    text = "\n".join(lines)
    print(text)
    if output:
        with open(output, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
