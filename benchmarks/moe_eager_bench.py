"""Eager MoE decode: one quantized SwitchGLU forward (Qwen3-30B-A3B's expert shapes) per token, host time and GPU
time, beside the same block's float experts.

Usage (GPU machine, repo root): PYTHONPATH=src python benchmarks/moe_eager_bench.py [output.md]
Host µs per forward: the median over 5 batches of 100 forwards enqueued without a sync (each forward's index range
check is a host read, so a forward waits for the GPU work queued before it). GPU µs: the forward replayed in a CUDA
graph."""

import statistics
import sys
import time

import torch

from lowbit.bench_cuda import graph_time_us
from lowbit.nn import SwitchGLU

EXPERTS, TOP_K, HIDDEN, INTERMEDIATE = 128, 8, 2048, 768


def host_us(call, n=500, batches=5) -> float:
    for _ in range(20):
        call()
    torch.cuda.synchronize()
    times = []
    for _ in range(batches):
        start = time.perf_counter()
        for _ in range(n // batches):
            call()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - start) / (n // batches) * 1e6)
    return statistics.median(times)


def main():
    gen = torch.Generator(device="cuda").manual_seed(0)
    rows = []
    with torch.no_grad():
        for mode, gs, bits in (("affine", 64, 4), ("mxfp4", 32, 4)):
            glu = SwitchGLU(HIDDEN, INTERMEDIATE, EXPERTS).to(device="cuda", dtype=torch.bfloat16)
            for name in ("gate_proj", "up_proj", "down_proj"):
                setattr(glu, name, getattr(glu, name).to_quantized(gs, bits, mode))
            for tokens in (1, 4):
                x = torch.randn(tokens, HIDDEN, device="cuda", dtype=torch.bfloat16, generator=gen)
                idx = torch.stack([torch.randperm(EXPERTS, device="cuda", generator=gen)[:TOP_K]
                                   for _ in range(tokens)])
                rows.append((f"{mode} g{gs} b{bits}", tokens, host_us(lambda: glu(x, idx)),
                             graph_time_us([lambda: glu(x, idx)])))
    lines = [f"# Eager MoE decode, SwitchGLU with Qwen3-30B-A3B expert shapes ({torch.cuda.get_device_name()}, "
             f"torch {torch.__version__}, {time.strftime('%Y-%m-%d')})", "",
             "| experts | tokens | host µs / forward (eager, synced per batch) | GPU µs (CUDA graph) |",
             "|---|---|---|---|"]
    lines += [f"| {name} | {tokens} | {host:.1f} | {gpu:.1f} |" for name, tokens, host, gpu in rows]
    text = "\n".join(lines)
    print(text)
    if len(sys.argv) > 1:
        with open(sys.argv[1], "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
