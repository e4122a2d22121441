"""One MoE prefill call (gather_qmm, Qwen3-30B-A3B gate/up: 128 experts, top-8, 4096 tokens, N 768, K 2048) for
`ncu` to profile, after a warm-up, with the GPU kernels it launches and their times printed first (torch.profiler).

What it is for (NOTES v17): the prefill tile reaches about half of bf16 `_grouped_mm`; the warp stall reasons say
whether memory latency (long scoreboard: one block of words and x in flight a CTA), the wgmmas (wait / math pipe)
or the barriers bound it, before a deeper-pipelined tile is written.

Usage (GPU machine, repo root; FORMAT=mxfp4 for mxfp4, LOWBIT_* knobs as usual):
  PYTHONPATH=src python benchmarks/ncu_moe_prefill.py          # the kernels and their times
  PYTHONPATH=src ncu --nvtx --nvtx-include profiled/ --section WarpStateStats --section SchedulerStats \
      --section MemoryWorkloadAnalysis python benchmarks/ncu_moe_prefill.py --ncu
"""
import os
import sys

import torch
from moe_bench import kernels_of  # (benchmarks/, the script's directory)

import lowbit

experts, top_k, n, k, tokens = 128, 8, 768, 2048, 4096
mode, gs = ("mxfp4", 32) if os.environ.get("FORMAT") == "mxfp4" else ("affine", 64)
gen = torch.Generator(device="cuda").manual_seed(0)
w = (torch.randn(experts, n, k, device="cuda", generator=gen) / k**0.5).to(torch.bfloat16)
q = lowbit.quantize(w, gs, 4, mode)
q = q if mode == "affine" else (q[0], q[1], None)
x = torch.randn(tokens, 1, 1, k, device="cuda", dtype=torch.bfloat16, generator=gen)
idx = torch.stack([torch.randperm(experts, device="cuda", generator=gen)[:top_k] for _ in range(tokens)])


def call():
    return lowbit.gather_qmm(x, *q, rhs_indices=idx, transpose=True, group_size=gs, bits=4, mode=mode)


if "--ncu" in sys.argv:  # under ncu: warm up only (torch.profiler and ncu both want CUPTI)
    for _ in range(3):
        call()
else:
    print(f"{mode}:", flush=True)
    kernels_of(call)
torch.cuda.nvtx.range_push("profiled")
call()
torch.cuda.synchronize()
torch.cuda.nvtx.range_pop()
