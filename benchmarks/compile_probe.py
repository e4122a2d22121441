"""Probe: first-call (compile) time and correctness of the qmm kernel per format and tile path, printed as it goes."""

import sys
import time

import torch

import lowbit

formats = [("affine", 64, 4), ("mxfp4", 32, 4), ("nvfp4", 16, 4), ("affine", 64, 8), ("mxfp8", 32, 8),
           ("affine", 64, 2), ("affine", 64, 3), ("affine", 32, 5), ("affine", 128, 6), ("affine", 32, 1)]
only = sys.argv[1:] or None
gen = torch.Generator(device="cuda").manual_seed(0)
for mode, gs, bits in formats:
    if only and (f"{mode}{bits}" if mode == "affine" else mode) not in only:
        continue
    w = (torch.randn(4096, 4096, device="cuda", generator=gen) / 64).to(torch.bfloat16)
    q = lowbit.quantize(w, gs, bits, mode)
    q = q if mode == "affine" else (q[0], q[1], None)
    w_hat = lowbit.dequantize(*q, gs, bits, mode, dtype=torch.float32).double()
    for m, transpose in [(1, True), (256, True), (1, False)]:
        x = torch.randn(m, 4096, device="cuda", generator=gen).to(torch.bfloat16)
        t0 = time.perf_counter()
        y = lowbit.quantized_matmul(x, *q, transpose, gs, bits, mode)
        torch.cuda.synchronize()
        first = time.perf_counter() - t0
        ref = x.double() @ (w_hat.T if transpose else w_hat)
        err = ((y.double() - ref).abs().max() / ref.abs().max()).item()
        t0 = time.perf_counter()
        for _ in range(10):
            lowbit.quantized_matmul(x, *q, transpose, gs, bits, mode)
        torch.cuda.synchronize()
        print(f"{mode}{bits} g{gs} M={m} T={transpose}: first call {first:.1f}s, err {err:.1e}, "
              f"eager {(time.perf_counter() - t0) / 10 * 1e6:.0f} us/call", flush=True)
