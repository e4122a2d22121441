"""A/B probe of the grouped (MoE prefill) kernel (development): times gather_qmm at 4096 tokens on the MoE shapes of
moe_bench.py under CUDA graphs, lists the GPU kernels of one call, and saves the outputs so that two source trees
(or tile choices) can be compared bit for bit.

Usage (GPU machine, repo root):
  PYTHONPATH=<tree>/src python benchmarks/moe_prefill_ab.py TAG [--sweep]   # writes $OUT/TAG.pt, prints a table
  python benchmarks/moe_prefill_ab.py --compare A B                          # bitwise comparison of two runs
--sweep adds LOWBIT_QMM_TILE variants (SWEEP="128,64,4,3 64,128,4,3 ..." to choose); every tile's output must equal
the default's bit for bit (checked and printed).
"""

import os
import sys

import torch

import lowbit
from lowbit.backends.triton.qmm import tuned
from lowbit.bench_cuda import graph_time_us
from decode_ab import compare  # (benchmarks/ is on the path when run as a script)
from moe_bench import kernels_of

MODELS = (  # name, experts, top-k, N, K, format
    ("qwen3-30b-a3b gate/up", 128, 8, 768, 2048, ("affine", 64, 4)),
    ("qwen3-30b-a3b down", 128, 8, 2048, 768, ("affine", 64, 4)),
    ("qwen3-30b-a3b gate/up", 128, 8, 768, 2048, ("mxfp4", 32, 4)),
    ("gpt-oss-20b", 32, 4, 2880, 2880, ("mxfp4", 32, 4)),
)
TOKENS = 4096
SWEEP = tuple(os.environ.get("SWEEP", "128,128,8,3 128,64,4,3 128,64,4,4 64,128,4,3 64,64,4,4").split())


def run(tag: str, sweep: bool) -> None:
    print(f"{torch.cuda.get_device_name()}; torch {torch.__version__}", flush=True)
    gen = torch.Generator(device="cuda").manual_seed(0)
    saved = {}
    for name, experts, top_k, n, k, (mode, gs, bits) in MODELS:
        w = (torch.randn(experts, n, k, device="cuda", generator=gen) / k**0.5).to(torch.bfloat16)
        q = lowbit.quantize(w, gs, bits, mode)
        q = q if mode == "affine" else (q[0], q[1], None)
        x = torch.randn(TOKENS, 1, 1, k, device="cuda", dtype=torch.bfloat16, generator=gen)
        idx = torch.stack([torch.randperm(experts, device="cuda", generator=gen)[:top_k] for _ in range(TOKENS)])

        def call():
            return lowbit.gather_qmm(x, *q, rhs_indices=idx, transpose=True, group_size=gs, bits=bits, mode=mode)

        y = call()
        key = f"{name} {mode}{bits}g{gs}"
        saved[key] = y.cpu()
        one = lowbit.gather_qmm(x[:1], *q, rhs_indices=idx[:1], transpose=True, group_size=gs, bits=bits, mode=mode)
        invariant = torch.equal(one, y[:1])
        x_sorted = x.reshape(TOKENS, k)[torch.argsort(idx.reshape(-1), stable=True) // top_k].contiguous()
        offsets = torch.cumsum(torch.bincount(idx.reshape(-1), minlength=experts), 0).to(torch.int32)
        w_t = w.transpose(-2, -1)
        base = graph_time_us([lambda: torch._grouped_mm(x_sorted, w_t, offs=offsets)])
        print(f"\n{key}: token 0 alone == in the batch: {invariant}; bf16 _grouped_mm {base:.1f} us", flush=True)
        kernels_of(call)
        for tile in [None] + (list(SWEEP) if sweep else []):
            with tuned(LOWBIT_QMM_TILE=tile):
                us = graph_time_us([call])
                same = torch.equal(call().cpu(), saved[key])
            bits_note = "equal" if same else "DIFFER"
            print(f"  {tile or 'default':12s} {us:8.1f} us  {base / us:5.2f}x bf16  bits {bits_note}", flush=True)
    torch.save(saved, f"{os.environ.get('OUT', '/tmp')}/{tag}.pt")


if __name__ == "__main__":
    if sys.argv[1] == "--compare":
        compare(sys.argv[2], sys.argv[3])
    else:
        run(sys.argv[1], "--sweep" in sys.argv)
