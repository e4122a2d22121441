"""A/B probe of the decode kernel (development): times M = 1 / 4 / 16 products of every packed format on
Llama-3-8B shapes under CUDA graphs, and saves the outputs so two source trees can be compared bit for bit.

Usage (GPU machine, repo root):
  PYTHONPATH=<tree>/src python benchmarks/decode_ab.py TAG [--sweep]   # writes $OUT/TAG.pt, prints a table
  python benchmarks/decode_ab.py --compare A B                          # bitwise comparison of two runs
--sweep adds tile/stage variants (LOWBIT_QMM_TILE[:LOWBIT_QMM_BLOCKS];
SWEEP="16,64,4,4 16,64,4,3:2 ..." to choose) for the tree under test;
FORMATS="affine4g64 mxfp4" limits the formats.
"""

import os
import sys
import zlib

import torch

import lowbit
from lowbit.backends.triton.qmm import tuned
from lowbit.bench_cuda import _nbytes, _weights, copy_bandwidth, graph_time_us

FORMATS = (("affine", 64, 4), ("affine", 32, 4), ("affine", 128, 4), ("affine", 64, 8), ("mxfp4", 32, 4),
           ("nvfp4", 16, 4), ("mxfp8", 32, 8), ("affine", 64, 3), ("affine", 64, 6), ("affine", 64, 2),
           ("affine", 32, 5))
SHAPES = ((4096, 4096), (14336, 4096), (4096, 14336))
MS = (1, 4, 16)
SWEEP = tuple(os.environ.get("SWEEP", "16,64,4,4 16,64,4,6 16,128,8,4 16,64,8,4").split())


def run(tag: str, sweep: bool) -> None:
    bw = copy_bandwidth()
    print(f"{torch.cuda.get_device_name()} copy {bw / 1e12:.2f} TB/s; torch {torch.__version__}", flush=True)
    saved = {}
    rows = []
    only = os.environ.get("FORMATS")  # e.g. "affine4g64 mxfp4"
    for mode, gs, bits in FORMATS:
        if only and f"{mode}{bits}g{gs}" not in only.split() and mode not in only.split():
            continue
        for n, k in SHAPES:
            # inputs seeded per product, so runs over different FORMATS compare bit for bit
            gen = torch.Generator(device="cuda").manual_seed(zlib.crc32(f"{mode}{gs}{bits} {n}x{k}".encode()))
            qs = _weights(mode, gs, bits, n, k, 6, gen)
            moved = _nbytes(*qs[0])
            x = torch.randn(256, k, device="cuda", dtype=torch.bfloat16, generator=gen)
            xs = {m: x[:m] for m in (*MS, 256)}
            for m in (*MS, 256):
                saved[(mode, gs, bits, n, k, m)] = lowbit.quantized_matmul(xs[m], *qs[0], True, gs, bits, mode).cpu()
            for m in MS:
                configs = [None] + (list(SWEEP) if sweep and m == 1 else [])
                for tile in configs:
                    env = {} if tile is None else {"LOWBIT_QMM_TILE": tile.split(":")[0],
                                                   "LOWBIT_QMM_BLOCKS": (tile.split(":") + ["1"])[1]}
                    with tuned(**env):
                        us = graph_time_us([lambda q=q: lowbit.quantized_matmul(xs[m], *q, True, gs, bits, mode)
                                            for q in qs])
                    rows.append((f"{mode}{bits} g{gs}", n, k, m, tile or "default", us,
                                 100 * moved / (us * 1e-6) / bw))
            w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16, generator=gen)
            us = graph_time_us([lambda: xs[1] @ w.T])
            rows.append(("bf16 x @ w.T", n, k, 1, "", us, 100 * w.numel() * 2 / (us * 1e-6) / bw))
            print("\n".join(f"{r[0]:14s} N={r[1]:5d} K={r[2]:5d} M={r[3]:2d} {r[4]:11s} {r[5]:7.1f} us {r[6]:5.1f}% BW"
                            for r in rows[-(len(MS) + (len(SWEEP) if sweep else 0) + 1):]), flush=True)
    out = os.environ.get("OUT", "/tmp")
    torch.save(saved, f"{out}/{tag}.pt")
    # A row's bits never depend on M or the path: each product's first rows at M = 1, 4, 16, 256 agree.
    mismatched = [key for key, y in saved.items() if key[-1] != 1
                  and not torch.equal(y[:1], saved[(*key[:-1], 1)])]
    print(f"\n{tag}: rows of M = 4 / 16 / 256 products equal to M = 1: "
          f"{'all' if not mismatched else f'NOT {mismatched[:4]}'}")


def compare(a: str, b: str) -> None:
    out = os.environ.get("OUT", "/tmp")
    ya, yb = torch.load(f"{out}/{a}.pt"), torch.load(f"{out}/{b}.pt")
    both = [key for key in ya if key in yb]  # (runs may cover different formats)
    differ = [key for key in both if not torch.equal(ya[key], yb[key])]
    print(f"{a} vs {b}: {len(both) - len(differ)} of {len(both)} outputs bit-identical; differ: {differ[:6]}")


if __name__ == "__main__":
    if sys.argv[1] == "--compare":
        compare(sys.argv[2], sys.argv[3])
    else:
        run(sys.argv[1], "--sweep" in sys.argv)
