"""Probe: device time per kernel (torch.profiler) of quantized_matmul for a few formats and M, and graph time."""

import sys

import torch
from torch.profiler import ProfilerActivity, profile

import lowbit
from lowbit.bench_cuda import graph_time_us

gen = torch.Generator(device="cuda").manual_seed(0)
N = K = int(sys.argv[1]) if len(sys.argv) > 1 else 4096
for mode, gs, bits in [("affine", 64, 4), ("mxfp4", 32, 4), ("affine", 64, 8)]:
    w = (torch.randn(N, K, device="cuda", generator=gen) / 64).to(torch.bfloat16)
    q = lowbit.quantize(w, gs, bits, mode)
    q = q if mode == "affine" else (q[0], q[1], None)
    for m in (1, 16, 256):
        x = torch.randn(m, K, device="cuda", generator=gen).to(torch.bfloat16)
        lowbit.quantized_matmul(x, *q, True, gs, bits, mode)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(10):
                lowbit.quantized_matmul(x, *q, True, gs, bits, mode)
            torch.cuda.synchronize()
        kernels = {}
        for e in prof.events():
            if e.device_type.name == "CUDA":
                kernels.setdefault(e.name[:40], []).append(e.device_time)
        summary = ", ".join(f"{k}: {sum(v) / len(v):.1f}us x{len(v) // 10}" for k, v in kernels.items())
        us = graph_time_us([lambda: lowbit.quantized_matmul(x, *q, True, gs, bits, mode)])
        print(f"{mode}{bits} M={m} N=K={N}: graph {us:.1f} us | {summary}", flush=True)
