"""Eager MoE decode: one quantized SwitchGLU forward (Qwen3-30B-A3B's expert shapes), host time and GPU time.

Usage (GPU machine, repo root): PYTHONPATH=src python benchmarks/moe_eager_bench.py [output.md]
Host µs per forward: the median over 5 batches of 100 forwards enqueued without a sync, each batch timed until the
GPU has finished it (overhead_bench.host_us, drained; each forward's index range check is a host read, so a forward
waits for the GPU work queued before it anyway). GPU µs: the forward replayed in a CUDA graph."""

import sys
import time

import torch
from overhead_bench import host_us  # (benchmarks/ is on the path when run as a script)

from lowbit.bench_cuda import graph_time_us
from lowbit.nn import SwitchGLU

EXPERTS, TOP_K, HIDDEN, INTERMEDIATE = 128, 8, 2048, 768


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
                rows.append((f"{mode} g{gs} b{bits}", tokens,
                             host_us(lambda: glu(x, idx), n=500, warmup=20, drained=True),
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
