"""One decode call (affine4 g64, 8192 x 8192, M = 1) for `ncu` to profile: warm-up first, then one marked call."""
import torch

import lowbit

w = (torch.randn(8192, 8192, device="cuda") / 90).to(torch.bfloat16)
q = lowbit.quantize(w, 64, 4)
x = torch.randn(1, 8192, device="cuda", dtype=torch.bfloat16)
for _ in range(3):
    lowbit.quantized_matmul(x, *q)
torch.cuda.synchronize()
torch.cuda.nvtx.range_push("profiled")
lowbit.quantized_matmul(x, *q)
torch.cuda.synchronize()
