"""Decode-kernel tiles at M = 32-128 (a development probe): batched decoding, speculative verification.

Usage (GPU machine, repo root): PYTHONPATH=src python benchmarks/mid_m_sweep.py
Per (format, N, K, M): the default tile's time, every tile of TILES (BLOCK_M tokens, BLOCK_N weights, warps,
stages; 3/5/6-bit formats run them with one stage, as their defaults do), and torch bf16 `x @ w.T`, in µs; every
tile's output must equal the default's bit for bit (tile shapes of four or more warps do not change a dot's bits).
"""

import itertools
import os

import torch

import lowbit
from lowbit.backends.triton.qmm import tuned
from lowbit.bench_cuda import _weights, copy_bandwidth, graph_time_us

FORMATS = (("affine", 64, 4), ("mxfp4", 32, 4), ("affine", 64, 3))
SHAPES = ((4096, 4096), (14336, 4096))
MS = (32, 64, 128)
TILES = tuple(os.environ.get("TILES", "16,64,4,3 32,64,4,3 64,64,4,3 128,64,4,3 32,128,4,3 64,128,8,3").split())


def main():
    bw = copy_bandwidth()
    print(f"{torch.cuda.get_device_name()} copy {bw / 1e12:.2f} TB/s; torch {torch.__version__}", flush=True)
    gen = torch.Generator(device="cuda").manual_seed(0)
    print("| format | N x K | M | default | " + " | ".join(TILES) + " | bf16 |")
    print("|---" * (len(TILES) + 5) + "|")
    for (mode, gs, bits), (n, k) in itertools.product(FORMATS, SHAPES):
        qs = _weights(mode, gs, bits, n, k, 6, gen)
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16, generator=gen)
        x = torch.randn(max(MS), k, device="cuda", dtype=torch.bfloat16, generator=gen)
        for m in MS:
            xm = x[:m]
            calls = [lambda q=q: lowbit.quantized_matmul(xm, *q, True, gs, bits, mode) for q in qs]
            reference = calls[0]()
            times = [graph_time_us(calls)]
            for tile in TILES:
                if bits in (3, 5, 6):
                    tile = tile.rsplit(",", 1)[0] + ",1"
                with tuned(LOWBIT_QMM_TILE=tile):
                    same = torch.equal(calls[0](), reference)
                    times.append(f"{graph_time_us(calls):.1f}{'' if same else ' (OTHER BITS)'}")
            bf16 = graph_time_us([lambda: xm @ w.T])
            print(f"| {mode}{bits} g{gs} | {n} x {k} | {m} | {times[0]:.1f} | " + " | ".join(times[1:])
                  + f" | {bf16:.1f} |", flush=True)


if __name__ == "__main__":
    main()
