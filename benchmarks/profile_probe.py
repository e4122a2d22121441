"""Probe: device time per kernel (torch.profiler) of quantized_matmul for a few formats and M, and graph time."""

import sys

import torch
from torch.profiler import ProfilerActivity, profile

import lowbit
from lowbit.bench_cuda import graph_time_us

gen = torch.Generator(device="cuda").manual_seed(0)
N = K = int(sys.argv[1]) if len(sys.argv) > 1 else 4096
FORMATS = {"affine4": ("affine", 64, 4), "mxfp4": ("mxfp4", 32, 4), "nvfp4": ("nvfp4", 16, 4), "affine8": ("affine", 64, 8),
           "mxfp8": ("mxfp8", 32, 8), "affine3": ("affine", 64, 3), "affine2": ("affine", 64, 2)}
for name in (sys.argv[2].split(",") if len(sys.argv) > 2 else ["affine4", "mxfp4", "affine8"]):
    mode, gs, bits = FORMATS[name]
    w = (torch.randn(N, K, device="cuda", generator=gen) / 64).to(torch.bfloat16)
    q = lowbit.quantize(w, gs, bits, mode)
    q = q if mode == "affine" else (q[0], q[1], None)
    ms = [int(v) for v in sys.argv[3].split(",")] if len(sys.argv) > 3 else [1, 16, 256]
    for m in ms:
        x = torch.randn(m, K, device="cuda", generator=gen).to(torch.bfloat16)
        y = lowbit.quantized_matmul(x, *q, True, gs, bits, mode)
        ref = x.double() @ lowbit.dequantize(*q, gs, bits, mode, dtype=torch.float32).double().T
        err = ((y.double() - ref).abs().max() / ref.abs().max()).item()
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
        ideal = (q[0].numel() * 4 + q[1].numel() * q[1].element_size() * (2 if q[2] is not None else 1)) / 4.3e6
        print(f"{name} M={m} N=K={N}: graph {us:.1f} us (ideal at 4.3 TB/s {ideal:.1f}) err {err:.1e} | {summary}",
              flush=True)
