"""`lowbit bench`: quantized_matmul speed beside MLX's own kernel and dense torch matmuls, on this machine.

Each row is checked before its speed is reported. lowbit's result must match MLX's within 1e-3 of the output's
largest magnitude (two ulps of the output dtype when that is coarser). Without MLX, the reference is the float64
product with the weight dequantized in float32. A row that fails says MISMATCH and the exit code is 1.
"""

from __future__ import annotations

import datetime
import os
import platform
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

import lowbit
from lowbit.mlx_interop import from_mlx as to_torch
from lowbit.mlx_interop import to_mlx as to_mx

try:
    import mlx.core as mx
except ImportError:
    mx = None

FORMATS = (
    ("affine", 64, 4), ("affine", 64, 8), ("affine", 64, 3), ("mxfp4", 32, 4), ("mxfp8", 32, 8), ("nvfp4", 16, 4),
)
QUICK_FORMATS = (("affine", 64, 4), ("mxfp4", 32, 4), ("nvfp4", 16, 4))
SHAPES = ((1024, 1024), (4096, 4096))  # (N, K)
QUICK_SHAPES = ((1024, 1024), (2048, 2048))
MS = (1, 16, 128)
QUICK_MS = (1, 16)

WEIGHT_DTYPE = torch.bfloat16  # weights are quantized from bf16, so affine scales and biases are bf16 (MLX checkpoints)
X_DTYPES = {"cpu": torch.float32}
RTOL = 1e-3

CPU_BUDGET_S = 0.4  # timed repeats per call after the warm-up call
QUICK_CPU_BUDGET_S = 0.15
MAX_REPEATS = 25
SINGLE_SHOT_S = 2.0  # a warm-up call slower than this is the one sample (first-call overhead is milliseconds)

COLUMNS = ("format", "M", "N", "K", "lowbit µs", "MLX µs", "fp32 µs", "bf16 µs", "GB/s", "GFLOP/s", "vs MLX",
           "vs fp32", "rel err", "check")


@dataclass(frozen=True)
class Format:
    """One quantization format: MLX's (mode, group_size, bits)."""

    mode: str
    group_size: int
    bits: int

    @property
    def label(self) -> str:
        return f"affine{self.bits} g{self.group_size}" if self.mode == "affine" else self.mode


@dataclass(frozen=True)
class Plan:
    """The rows to run (formats x shapes x Ms) and the CPU time budget per timed call."""

    formats: tuple[Format, ...]
    shapes: tuple[tuple[int, int], ...]
    ms: tuple[int, ...]
    budget_s: float

    @property
    def size(self) -> int:
        return len(self.formats) * len(self.shapes) * len(self.ms)


def plan(quick: bool) -> Plan:
    """What to run: the full plan, or the quick one (fewer formats, smaller shapes, no M=128)."""
    if quick:
        return Plan(tuple(Format(*f) for f in QUICK_FORMATS), QUICK_SHAPES, QUICK_MS, QUICK_CPU_BUDGET_S)
    return Plan(tuple(Format(*f) for f in FORMATS), SHAPES, MS, CPU_BUDGET_S)


@dataclass(frozen=True)
class Row:
    """One measured and checked (format, M, N, K)."""

    fmt: Format
    m: int
    n: int
    k: int
    lowbit_us: float
    mlx_us: float | None
    fp32_us: float
    bf16_us: float
    nbytes: int
    err: float
    ok: bool


# --- timing ---------------------------------------------------------------------------------------------------


def timed(call: Callable[[], object]) -> tuple[object, float]:
    """(result, seconds) of one call, by time.perf_counter."""
    start = time.perf_counter()
    result = call()
    return result, time.perf_counter() - start


def cpu_times(call: Callable[[], object], first_s: float, budget_s: float) -> list[float]:
    """Seconds per call of repeats made after a warm-up call that took first_s.

    Repeats until budget_s is spent (at least one, at most MAX_REPEATS). A warm-up slower than SINGLE_SHOT_S is
    itself the only sample.
    """
    if first_s > SINGLE_SHOT_S:
        return [first_s]
    times: list[float] = []
    while not times or (sum(times) < budget_s and len(times) < MAX_REPEATS):
        times.append(timed(call)[1])
    return times


def median_us(call: Callable[[], object], first_s: float, budget_s: float) -> float:
    """Median microseconds per call on the CPU."""
    return statistics.median(cpu_times(call, first_s, budget_s)) * 1e6


def nbytes(*tensors) -> int:
    """Total storage bytes of the tensors (None counts zero)."""
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


# --- the measured calls ------------------------------------------------------------------------------------------


def quantize(w: torch.Tensor, fmt: Format) -> tuple:
    """(w_q, scales, biases) with biases None for the fp modes."""
    out = lowbit.quantize(w, fmt.group_size, fmt.bits, fmt.mode)
    return out if fmt.mode == "affine" else (out[0], out[1], None)


def lowbit_matmul(x: torch.Tensor, w_q, scales, biases, fmt: Format) -> torch.Tensor:
    """The measured call: x @ dequantize(w).T by lowbit."""
    return lowbit.quantized_matmul(x, w_q, scales, biases, True, fmt.group_size, fmt.bits, fmt.mode)


def mlx_matmul(x, w_q, scales, biases, fmt: Format):
    """The same product by MLX on its CPU stream, evaluated."""
    out = mx.quantized_matmul(x, w_q, scales, biases, transpose=True, group_size=fmt.group_size, bits=fmt.bits,
                              mode=fmt.mode, stream=mx.cpu)
    mx.eval(out)
    return out


def fallback_reference(x: torch.Tensor, q: tuple, fmt: Format) -> torch.Tensor:
    """float64 x @ w.T, w dequantized in float32 (affine scales and biases promoted, as MLX does); used without MLX."""
    w_q, scales, biases = q
    if fmt.mode == "affine":
        scales, biases = scales.float(), biases.float()
    w = lowbit.dequantize(w_q, scales, biases, fmt.group_size, fmt.bits, fmt.mode, None, torch.float32)
    return x.double() @ w.double().T


def relative_error(y: torch.Tensor, ref: torch.Tensor) -> float:
    """max |y - ref| / max |ref|."""
    ref = ref.double().cpu()
    return (y.double().cpu() - ref).abs().max().item() / (ref.abs().max().item() or 1.0)


def tolerance(dtype: torch.dtype) -> float:
    """RTOL, or two ulps of the output dtype when that is coarser (bf16 outputs on CUDA)."""
    return max(RTOL, 2 * torch.finfo(dtype).eps)


def time_dense(x: torch.Tensor, w: torch.Tensor, dtype: torch.dtype, budget_s: float) -> float:
    """Median µs of torch's x @ w.T with both in dtype."""
    xd, wd = x.to(dtype), w.to(dtype)
    _, first_s = timed(lambda: xd @ wd.T)
    return median_us(lambda: xd @ wd.T, first_s, budget_s)


def run_mlx(x: torch.Tensor, mlx_q: tuple, fmt: Format, time_it: bool, budget_s: float):
    """(MLX's result as a torch tensor, its median µs or None when not time_it)."""
    xm = to_mx(x)
    out, first_s = timed(lambda: mlx_matmul(xm, *mlx_q, fmt))
    if not time_it:
        return to_torch(out), None
    return to_torch(out), median_us(lambda: mlx_matmul(xm, *mlx_q, fmt), first_s, budget_s)


def bench_row(fmt: Format, x: torch.Tensor, q: tuple, mlx_q: tuple | None, dense_us: tuple[float, float],
              budget_s: float) -> Row:
    """Time and check one (format, M, N, K) against MLX (or the fallback reference) and the dense baselines."""
    (m, k), n = x.shape, q[0].shape[0]
    y, first_s = timed(lambda: lowbit_matmul(x, *q, fmt))
    lowbit_us = median_us(lambda: lowbit_matmul(x, *q, fmt), first_s, budget_s)
    if mlx_q is None:
        ref, mlx_us = fallback_reference(x, q, fmt), None
    else:
        ref, mlx_us = run_mlx(x, mlx_q, fmt, x.device.type == "cpu", budget_s)  # MLX's CPU beside a GPU: no time
    err = relative_error(y, ref)
    return Row(fmt, m, n, k, lowbit_us, mlx_us, *dense_us, nbytes(x, *q, y), err, err <= tolerance(y.dtype))


def run(device: torch.device, todo: Plan, progress: Callable[[], None]) -> list[Row]:
    """Every row of the plan, shape by shape; the weight of a shape is quantized once per format."""
    gen = torch.Generator().manual_seed(0)
    rows = []
    for n, k in todo.shapes:
        w = (torch.randn(n, k, generator=gen) / k**0.5).to(device, WEIGHT_DTYPE)
        xs = {m: torch.randn(m, k, generator=gen).to(device, X_DTYPES[device.type]) for m in todo.ms}
        dense = {m: (time_dense(x, w, torch.float32, todo.budget_s), time_dense(x, w, torch.bfloat16, todo.budget_s))
                 for m, x in xs.items()}
        for fmt in todo.formats:
            q = quantize(w, fmt)
            mlx_q = None if mx is None else tuple(to_mx(t) for t in q)
            for m, x in xs.items():
                rows.append(bench_row(fmt, x, q, mlx_q, dense[m], todo.budget_s))
                progress()
    return rows


# --- report ------------------------------------------------------------------------------------------------------


def fmt_us(us: float | None) -> str:
    """Microseconds to 3-4 significant digits, '-' when not measured."""
    if us is None:
        return "-"
    return f"{us:,.0f}" if us >= 100 else f"{us:.1f}"


def fmt_ratio(num: float | None, den: float) -> str:
    """num / den as a speed ratio to two significant digits, '-' when num was not measured."""
    return "-" if num is None else f"{num / den:.2g}x"


def cells(row: Row) -> list[str]:
    """The table cells of one row, in COLUMNS order."""
    seconds = row.lowbit_us / 1e6
    return [
        row.fmt.label, str(row.m), str(row.n), str(row.k), fmt_us(row.lowbit_us), fmt_us(row.mlx_us),
        fmt_us(row.fp32_us), fmt_us(row.bf16_us), f"{row.nbytes / seconds / 1e9:.3g}",
        f"{2 * row.m * row.n * row.k / seconds / 1e9:.3g}", fmt_ratio(row.mlx_us, row.lowbit_us),
        fmt_ratio(row.fp32_us, row.lowbit_us), f"{row.err:.1e}", "ok" if row.ok else "MISMATCH",
    ]


def header(device: torch.device, quick: bool, started: datetime.datetime, load_before: float) -> list[str]:
    """Start time, machine, load, versions, threads and what each column means."""
    x_dtype, w_dtype = (str(t).removeprefix("torch.") for t in (X_DTYPES[device.type], WEIGHT_DTYPE))
    machine = platform.processor() or platform.machine()
    gpu = ""
    mlx_note = "MLX's CPU kernel on the same packed bytes" if mx is not None else "MLX not installed: no MLX columns"
    if mx is not None and device.type != "cpu":
        mlx_note = "MLX runs on the CPU here: its result is the check, its time is not reported"
    check = "lowbit vs MLX" if mx is not None else "lowbit vs float64 x @ dequantize(w).T (no MLX)"
    timing = f"perf_counter, median after one warm-up call (a call over {SINGLE_SHOT_S:.0f} s is timed once)"
    return [
        f"started: {started.isoformat(timespec='seconds')}; device: {device}; "
        f"plan: {'quick' if quick else 'full'}",
        f"machine: {machine}, {os.cpu_count()} CPUs, {platform.system()} {platform.release()}{gpu}; "
        f"1-min load average before the run: {load_before:.2f} (well above 0 means other work shared the CPUs)",
        f"versions: lowbit {lowbit.__version__}, torch {torch.__version__}, mlx {mx.__version__ if mx else 'absent'}; "
        f"torch threads: {torch.get_num_threads()}",
        f"x: {x_dtype} for lowbit and MLX; weights quantized from {w_dtype}, so affine scales and biases are "
        f"{w_dtype}; transpose=True",
        f"MLX: {mlx_note}",
        "fp32 / bf16: torch's dense x @ w.T with x and w both float32 / both bfloat16",
        f"timing: {timing}",
        "GB/s: (packed w + scales + biases + x + y) bytes / lowbit time; GFLOP/s: 2*M*N*K / lowbit time",
        "vs MLX, vs fp32: their time / lowbit time (>1 means lowbit is faster)",
        f"check: {check}; rel err = max abs diff / max |ref|, ok when <= {RTOL:g}",
    ]


def markdown(title: str, lines: list[str], table: list[list[str]]) -> str:
    """The header and the table as a markdown document."""
    out = [f"# {title}", "", *(f"- {line}" for line in lines), "", "| " + " | ".join(COLUMNS) + " |",
           "|" + "|".join("---" if c in ("format", "check") else "---:" for c in COLUMNS) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in table]
    return "\n".join(out) + "\n"


def print_report(title: str, lines: list[str], rows: list[Row], table: list[list[str]]) -> None:
    """The header and a rich table on a 140-column console; MISMATCH rows in red."""
    from rich.console import Console
    from rich.table import Table

    console = Console(width=140)
    for line in lines:
        console.print(line, highlight=False)
    rich_table = Table(title=title)
    for col in COLUMNS:
        rich_table.add_column(col, justify="left" if col in ("format", "check") else "right", no_wrap=True)
    for row, row_cells in zip(rows, table):
        rich_table.add_row(*row_cells, style=None if row.ok else "bold red")
    console.print(rich_table)


def main(device: str = "cpu", quick: bool = False, output: str | None = None) -> int:
    """Run the bench, print it, optionally write it as markdown; 1 if any row mismatched."""
    from tqdm import tqdm

    dev = torch.device(device)
    if dev.type == "cuda":
        from .bench_cuda import main as cuda_main

        return cuda_main(quick=quick, output=output)
    if dev.type != "cpu":
        print(f"lowbit bench: device {device!r} is not supported (cpu, or cuda with a GPU).")
        return 1
    todo = plan(quick)
    started, load_before, start = datetime.datetime.now(), os.getloadavg()[0], time.perf_counter()
    with tqdm(total=todo.size, desc=f"lowbit bench [{dev}]", unit="row", leave=False) as bar:
        rows = run(dev, todo, lambda: bar.update(1))
    title = f"lowbit quantized_matmul on {dev} ({time.perf_counter() - start:.0f} s)"
    lines, table = header(dev, quick, started, load_before), [cells(r) for r in rows]
    print_report(title, lines, rows, table)
    if output:
        Path(output).parent.mkdir(parents=True, exist_ok=True)
        Path(output).write_text(markdown(title, lines, table))
    mismatches = sum(not r.ok for r in rows)
    if mismatches:
        print(f"{mismatches} of {len(rows)} rows MISMATCH: their timings are of wrong results.")
    return 1 if mismatches else 0
