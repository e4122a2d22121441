"""`lowbit check`: the conformance sweep. Every op x mode x bits x shape against an independent oracle, on every
available device, with a table of cases passed and the worst error per row.

Oracles: quantize must round-trip within the format's step; matmuls must equal float64 `x @ dequantize(w).T`
(1e-3 relative to the output's scale); rows must be bit-identical whatever batch they come in; on CUDA, quantize and
dequantize must be byte-identical to the CPU reference. When MLX is installed, packed bytes and dequantized values
are compared with MLX itself.
"""

from __future__ import annotations

import itertools
import time
from collections import defaultdict
from dataclasses import dataclass, field

import torch

import lowbit

from .formats import MODES

MATMUL_RTOL = 1e-3


@dataclass
class Row:
    passed: int = 0
    total: int = 0
    worst: float = 0.0
    failures: list[str] = field(default_factory=list)

    def add(self, ok: bool, err: float, label: str) -> None:
        self.total += 1
        self.passed += bool(ok)
        self.worst = max(self.worst, err)
        if not ok and len(self.failures) < 3:
            self.failures.append(label)


def configs(full: bool):
    """(mode, group_size, bits) for every format; the quick sweep takes group size 64 for affine bits."""
    for mode, spec in MODES.items():
        sizes = spec.group_sizes if (full or mode != "affine") else (64,)
        for gs, bits in itertools.product(sizes, spec.bits):
            yield mode, gs, bits
    if not full:
        yield "affine", 32, 4
        yield "affine", 128, 4


def _quantize(w, mode, gs, bits, global_scale=None):
    out = lowbit.quantize(w, gs, bits, mode, global_scale=global_scale)
    return out if mode == "affine" else (out[0], out[1], None)


def _deq(q, mode, gs, bits, dtype=torch.float64, global_scale=None):
    values = lowbit.dequantize(q[0], q[1], q[2], gs, bits, mode, global_scale, torch.float32)
    return values.to(dtype)


def _rel(a: torch.Tensor, ref: torch.Tensor) -> float:
    scale = ref.abs().max().item() or 1.0
    return ((a.double() - ref.double()).abs().max().item()) / scale


def _matmul_cases(full: bool):
    ms = (1, 2, 3, 7, 16, 33) if not full else (1, 2, 3, 5, 8, 9, 16, 17, 31, 33, 64, 65, 129)
    nks = ((7, 128), (64, 256)) if not full else ((1, 128), (7, 128), (67, 256), (130, 512), (256, 1024), (33, 4096))
    return ms, nks


def run_device(device: str, full: bool, progress) -> dict:
    rows: dict[tuple, Row] = defaultdict(Row)
    gen = torch.Generator().manual_seed(0)

    def randn(*shape, dtype=torch.float32):
        return torch.randn(*shape, generator=gen).to(device=device, dtype=dtype)

    ms, nks = _matmul_cases(full)
    dtypes = (torch.float32, torch.bfloat16, torch.float16)
    for mode, gs, bits in configs(full):
        label = f"{mode} b{bits} g{gs}"
        # quantize / dequantize round trip, every dtype
        for dtype in dtypes:
            w = randn(32, 4 * gs, dtype=dtype)
            q = _quantize(w, mode, gs, bits)
            back = _deq(q, mode, gs, bits)
            err = (back - w.double()).abs()
            if mode == "affine":
                # MLX's test bound (one step) plus the rounding of the dequantized value to w's dtype
                step = q[1].double().abs().repeat_interleave(gs, -1)
                bias = q[2].double().abs().repeat_interleave(gs, -1)
                bound = step + 1e-6 + 2 * torch.finfo(dtype).eps * (w.double().abs() + bias)
            else:  # fp: within one element step of the block scale, relative to the block amax
                amax = w.double().abs().reshape(32, -1, gs).amax(-1).repeat_interleave(gs, -1)
                bound = amax * (0.26 if bits == 4 else 0.07) + 1e-6
            ok = bool((err <= bound).all())
            rows[("quantize", label)].add(ok, (err / bound).max().item(), f"{dtype} round trip")
            progress()
        # matmuls against float64 x @ dequantize(w).T
        for (n, k), m in itertools.product(nks, ms):
            if k % gs:
                continue
            w = randn(n, k) / k**0.5
            q = _quantize(w, mode, gs, bits)
            wd = _deq(q, mode, gs, bits)
            for dtype in (torch.float32, torch.bfloat16):
                x = randn(m, k, dtype=dtype)
                y = lowbit.quantized_matmul(x, *q, True, gs, bits, mode)
                ref = x.double() @ wd.T
                tol = MATMUL_RTOL if dtype == torch.float32 else 1e-2
                e = _rel(y, ref)
                rows[("quantized_matmul", label)].add(e <= tol, e / tol, f"M={m} N={n} K={k} {dtype}")
            progress()
        # transpose=False, batched stride-0 weight, non-contiguous x, gather_qmm, invariance
        k, n = 2 * gs * 2, 3 * gs
        wt = randn(k, n) / k**0.5
        q = _quantize(wt, mode, gs, bits)
        x = randn(5, k)
        e = _rel(lowbit.quantized_matmul(x, *q, False, gs, bits, mode), x.double() @ _deq(q, mode, gs, bits))
        rows[("transpose=False", label)].add(e <= MATMUL_RTOL, e / MATMUL_RTOL, f"M=5 K={k} N={n}")

        w3 = randn(1, 24, k) / k**0.5
        q3 = _quantize(w3, mode, gs, bits)
        qb = tuple(None if t is None else t.expand(4, *t.shape[1:]) for t in q3)  # stride-0 batch (GQA)
        xb = randn(4, 3, 2 * k)[..., ::2]  # non-contiguous x
        ref = xb.double() @ _deq(q3, mode, gs, bits).transpose(-1, -2)
        e = _rel(lowbit.quantized_matmul(xb, *qb, True, gs, bits, mode), ref)
        rows[("broadcast/strided", label)].add(e <= MATMUL_RTOL, e / MATMUL_RTOL, "stride-0 w, strided x")

        we = randn(4, 16, k) / k**0.5
        qe = _quantize(we, mode, gs, bits)
        xe = randn(6, 2, k)
        lhs = torch.tensor([0, 5, 2, 2, 1], device=device)
        rhs = torch.tensor([3, 0, 0, 1, 3], device=device)
        out = lowbit.gather_qmm(xe, *qe, lhs, rhs, True, gs, bits, mode)
        ref = torch.stack([xe[i].double() @ _deq(tuple(None if t is None else t[j] for t in qe), mode, gs, bits).T
                           for i, j in zip(lhs.tolist(), rhs.tolist())])
        e = _rel(out, ref)
        rows[("gather_qmm", label)].add(e <= MATMUL_RTOL, e / MATMUL_RTOL, "5 routed items")

        w = randn(40, k) / k**0.5
        q = _quantize(w, mode, gs, bits)
        xs = randn(40, k, dtype=torch.bfloat16)
        whole = lowbit.quantized_matmul(xs, *q, True, gs, bits, mode)
        for length in (1, 2, 3, 8, 15, 16, 17, 33):
            part = lowbit.quantized_matmul(xs[-length:], *q, True, gs, bits, mode)
            same = torch.equal(part, whole[-length:])
            rows[("batch invariance", label)].add(same, 0.0 if same else 1.0, f"L={length}")
        progress()

    # qqmm: activations quantized on the fly, against quantize-dequantize(x) @ dequantize(w).T
    for mode in ("nvfp4", "mxfp8", "mxfp4"):
        gs = MODES[mode].default_group_size
        for m, use_global in itertools.product((1, 5, 33), (False, True)):
            if use_global and mode != "nvfp4":
                continue
            w, x = randn(24, 128) / 11, randn(m, 128)
            gw = w.abs().max().float().reshape(1) if use_global else None
            gx = x.abs().max().float().reshape(1) if use_global else None
            q = _quantize(w, mode, gs, MODES[mode].default_bits, gw)
            y = lowbit.qqmm(x, q[0], q[1], mode=mode, global_scale_x=gx, global_scale_w=gw)
            qx = _quantize(x, mode, gs, MODES[mode].default_bits, gx)
            ref = _deq(qx, mode, gs, MODES[mode].default_bits, global_scale=gx) @ _deq(
                q, mode, gs, MODES[mode].default_bits, global_scale=gw).T
            e = _rel(y, ref)
            rows[("qqmm", mode + (" +global" if use_global else ""))].add(e <= MATMUL_RTOL, e / MATMUL_RTOL, f"M={m}")
        progress()

    if device != "cpu":  # byte-identical with the CPU reference
        for mode, gs, bits in configs(full):
            w = randn(16, 4 * gs, dtype=torch.bfloat16)
            q_dev = _quantize(w, mode, gs, bits)
            q_cpu = _quantize(w.cpu(), mode, gs, bits)
            same = all(a is None or torch.equal(a.cpu().view(torch.uint8) if a.dtype == torch.uint32 else a.cpu(),
                                                b.view(torch.uint8) if b.dtype == torch.uint32 else b)
                       for a, b in zip(q_dev, q_cpu))
            rows[("vs CPU bytes", f"{mode} b{bits} g{gs}")].add(same, 0.0 if same else 1.0, "quantize bytes")
    return rows


def count_steps(full: bool) -> int:
    n_cfg = sum(1 for _ in configs(full))
    ms, nks = _matmul_cases(full)
    return n_cfg * (3 + len(nks) * len(ms) + 1) + 3


def devices() -> list[str]:
    found = ["cpu"]
    if torch.cuda.is_available():
        found.append("cuda")
    return found


def main(full: bool = False, device: str | None = None) -> int:
    from rich.console import Console
    from rich.table import Table
    from tqdm import tqdm

    console = Console(width=110)
    failed = 0
    for dev in [device] if device else devices():
        start = time.perf_counter()
        with tqdm(total=count_steps(full), desc=f"lowbit check [{dev}]", unit="case", leave=False) as bar:
            rows = run_device(dev, full, lambda: bar.update(1))
        took = time.perf_counter() - start
        table = Table(title=f"lowbit check on {dev} ({'full' if full else 'quick'}, {took:.1f}s)")
        for col in ("op", "format", "passed / total", "worst err / tol", "first failures"):
            table.add_column(col, no_wrap=col != "first failures")
        for (op, fmt), row in rows.items():
            style = None if row.passed == row.total else "bold red"
            table.add_row(op, fmt, f"{row.passed} / {row.total}", f"{row.worst:.3g}", "; ".join(row.failures),
                          style=style)
            failed += row.total - row.passed
        console.print(table)
        total = sum(r.total for r in rows.values())
        console.print(f"{dev}: {total - sum(r.total - r.passed for r in rows.values())} / {total} cases passed")
    return 1 if failed else 0
