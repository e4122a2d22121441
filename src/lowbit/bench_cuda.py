"""`lowbit bench --device cuda`: quantized_matmul on the GPU against the physical limits, measured in the same run.

For each (format, M, N, K): microseconds (median of CUDA-graph replays, weights rotated through enough copies to
exceed L2), achieved bytes/s counting packed weights + scales (+ biases) + x + y, its share of the device copy
bandwidth measured in this run, TFLOP/s, and the speedup over torch's bf16 `x @ w.T` (cuBLAS) timed the same way.
Every row is checked against the float64 oracle before its time is reported.
"""

from __future__ import annotations

import datetime
import math
import platform
import statistics

import torch

import lowbit

FORMATS = (("affine", 64, 4), ("mxfp4", 32, 4), ("nvfp4", 16, 4), ("affine", 64, 8), ("mxfp8", 32, 8),
           ("affine", 64, 3), ("affine", 64, 2))
SHAPES = ((4096, 4096), (8192, 8192), (14336, 4096), (4096, 14336), (28672, 8192))  # (N, K)
MS = (1, 2, 4, 8, 16, 32, 64, 256, 1024, 4096)
QUICK = {"formats": FORMATS[:3], "shapes": SHAPES[:3], "ms": (1, 16, 256, 4096)}
UNTRANSPOSED = {"formats": FORMATS[:2], "shapes": SHAPES[1:2], "ms": (1, 16, 256, 4096)}  # x @ w rows
L2_FLUSH_BYTES = 256 << 20  # rotate weights so each replay reads at least this much distinct memory


def _events_ms(fn, repeats: int) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(repeats):
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def copy_bandwidth() -> float:
    """Device-to-device copy of 2 GiB, bytes read plus written per second."""
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda").random_()
    dst = torch.empty_like(src)
    dst.copy_(src)
    ms = _events_ms(lambda: dst.copy_(src), 20)
    return 2 * src.numel() / (ms * 1e-3)


def bf16_tflops(n: int = 8192) -> float:
    a = torch.randn(n, n, dtype=torch.bfloat16, device="cuda")
    b = torch.randn(n, n, dtype=torch.bfloat16, device="cuda")
    a @ b
    ms = _events_ms(lambda: a @ b, 10)
    return 2 * n**3 / (ms * 1e-3) / 1e12


def graph_time_us(calls, per_replay: int = 20) -> float:
    """Median time of one call: `calls` (a list of zero-argument closures over rotated inputs) captured in a CUDA
    graph, `per_replay` calls per replay."""
    for c in calls:
        c()
    torch.cuda.synchronize()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for c in calls:  # warm up on the capture stream (allocator, autotuning, compilation)
            c()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(per_replay):
            calls[i % len(calls)]()
    graph.replay()
    torch.cuda.synchronize()
    return _events_ms(graph.replay, 15) * 1e3 / per_replay


def _label(mode, gs, bits):
    return f"affine{bits} g{gs}" if mode == "affine" else mode


def _weights(mode, gs, bits, n, k, copies, gen, transpose=True):
    out = []
    for _ in range(copies):
        shape = (n, k) if transpose else (k, n)
        w = (torch.randn(*shape, device="cuda", generator=gen) / math.sqrt(k)).to(torch.bfloat16)
        q = lowbit.quantize(w, gs, bits, mode)
        out.append(q if mode == "affine" else (q[0], q[1], None))
    return out


def _nbytes(*tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def _measure(mode, gs, bits, n, k, ms, transpose, w_bf16, gen, bandwidth, peak):
    """Rows for one format and shape: oracle check, then lowbit and torch bf16 timed with CUDA graphs."""
    one = _nbytes(*_weights(mode, gs, bits, 16 if transpose else k, k if transpose else 128, 1, gen)[0])
    one = one * n // 16 if transpose else one * n // 128
    copies = max(1, min(8, -(-L2_FLUSH_BYTES // one)))
    qs = _weights(mode, gs, bits, n, k, copies, gen, transpose)
    rows, failures = [], 0
    for m in ms:
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16, generator=gen)
        y = lowbit.quantized_matmul(x, *qs[0], transpose, gs, bits, mode)
        w_hat = lowbit.dequantize(*qs[0], gs, bits, mode, dtype=torch.float32).double()
        ref = x.double() @ (w_hat.T if transpose else w_hat)
        err = ((y.double() - ref).abs().max() / ref.abs().max()).item()
        ok = err < 1e-2 and bool(torch.isfinite(y).all())
        failures += not ok
        us = graph_time_us([lambda q=q, x=x: lowbit.quantized_matmul(x, *q, transpose, gs, bits, mode) for q in qs])
        base_us = graph_time_us([lambda w=w, x=x: x @ w.T for w in w_bf16])
        moved = _nbytes(*qs[0]) + _nbytes(x) + m * n * 2
        gbs = moved / (us * 1e-6) / 1e9
        tflops = 2 * m * n * k / (us * 1e-6) / 1e12
        label = _label(mode, gs, bits) + ("" if transpose else " (x @ w)")
        row = (f"| {label} | {m} | {n} | {k} | {us:.1f} | {gbs:.0f} | "
               f"{100 * gbs * 1e9 / bandwidth:.0f}% | {tflops:.1f} | {100 * tflops / peak:.0f}% | "
               f"{base_us:.1f} | {base_us / us:.2f}x | {err:.1e}{'' if ok else ' FAIL'} |")
        rows.append(row)
        print(row, flush=True)
    return rows, failures


def run(formats=FORMATS, shapes=SHAPES, ms=MS, output: str | None = None, untransposed=UNTRANSPOSED) -> int:
    """The table: every (format, shape, M) with x @ w.T, then `untransposed`'s plan with x @ w (transpose=False)."""
    props = torch.cuda.get_device_properties(0)
    bandwidth = copy_bandwidth()
    peak = bf16_tflops()
    gen = torch.Generator(device="cuda").manual_seed(0)
    header = [
        f"# lowbit quantized_matmul on {props.name}",
        "",
        f"- date: {datetime.date.today()}, torch {torch.__version__}, triton {_triton_version()}, "
        f"python {platform.python_version()}",
        f"- {props.multi_processor_count} SMs, L2 {props.L2_cache_size >> 20} MiB; copy bandwidth measured in this "
        f"run: {bandwidth / 1e12:.2f} TB/s (read + write); torch bf16 8192^3 matmul: {peak:.0f} TFLOP/s",
        "- times: median of CUDA-graph replays, weights rotated to exceed L2; x and y bfloat16; bytes = packed "
        "weight + scales (+ biases) + x + y; `vs bf16` = torch bf16 `x @ w.T` time / lowbit time; "
        "`(x @ w)` rows: transpose=False",
        "",
        "| format | M | N | K | µs | GB/s | % copy BW | TFLOP/s | % bf16 peak | bf16 µs | vs bf16 | rel err |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    print("\n".join(header), flush=True)
    rows, failures = [], 0
    plans = [(formats, shapes, ms, True)]
    if untransposed:
        plans.append((untransposed["formats"], untransposed["shapes"], untransposed["ms"], False))
    for plan_formats, plan_shapes, plan_ms, transpose in plans:
        for n, k in plan_shapes:
            w_bf16 = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) for _ in
                      range(max(1, min(4, L2_FLUSH_BYTES // (2 * n * k))))]
            for mode, gs, bits in plan_formats:
                new_rows, new_failures = _measure(mode, gs, bits, n, k, plan_ms, transpose, w_bf16, gen, bandwidth,
                                                  peak)
                rows += new_rows
                failures += new_failures
                if output:  # written as it goes: a run cut short keeps its rows
                    with open(output, "w") as f:
                        f.write("\n".join(header + rows) + "\n")
    return 1 if failures else 0


def _triton_version() -> str:
    try:
        import triton

        return triton.__version__
    except ImportError:
        return "not installed"


def main(quick: bool = False, output: str | None = None) -> int:
    if not torch.cuda.is_available():
        raise SystemExit("lowbit bench --device cuda: no CUDA device")
    return run(**QUICK, output=output) if quick else run(output=output)
