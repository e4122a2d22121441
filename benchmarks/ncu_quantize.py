"""One quantize call for `ncu` to profile: warm-up first, then one marked call.

Usage: ncu --nvtx --nvtx-include profiled/ ... python benchmarks/ncu_quantize.py [mode group_size bits]
(default: affine 4-bit g64 of a 14336 x 4096 bfloat16 weight)."""
import sys

import torch

from lowbit.backends.triton import quantizer

mode, gs, bits = (sys.argv[1], int(sys.argv[2]), int(sys.argv[3])) if len(sys.argv) > 3 else ("affine", 64, 4)
w = torch.randn(14336, 4096, device="cuda", dtype=torch.bfloat16)
for _ in range(3):
    quantizer.quantize(w, mode, gs, bits, None)
torch.cuda.synchronize()
torch.cuda.nvtx.range_push("profiled")
quantizer.quantize(w, mode, gs, bits, None)
torch.cuda.synchronize()
