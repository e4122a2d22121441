"""One decode call for `ncu` to profile: warm-up first, then one marked call.

Usage: ncu --nvtx --nvtx-include profiled/ ... python benchmarks/ncu_decode.py [N K [mode group_size bits]]
(default: affine4 g64, 8192 x 8192, M = 1)."""
import sys

import torch

import lowbit

n, k = (int(v) for v in sys.argv[1:3]) if len(sys.argv) > 2 else (8192, 8192)
mode, gs, bits = (sys.argv[3], int(sys.argv[4]), int(sys.argv[5])) if len(sys.argv) > 5 else ("affine", 64, 4)
w = (torch.randn(n, k, device="cuda") / 90).to(torch.bfloat16)
q = lowbit.quantize(w, gs, bits, mode)
if mode != "affine":
    q = (q[0], q[1], None)
x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
for _ in range(3):
    lowbit.quantized_matmul(x, *q, True, gs, bits, mode)
torch.cuda.synchronize()
torch.cuda.nvtx.range_push("profiled")
lowbit.quantized_matmul(x, *q, True, gs, bits, mode)
torch.cuda.synchronize()
