"""Decode-kernel launch configurations at M = 1 (a development probe): tile, warps, stages and split target.

Usage (GPU machine, repo root): PYTHONPATH=src python benchmarks/decode_sweep.py
Prints per (format, N, K) the default configuration's time and the best ones found, as % of copy bandwidth over
the weight bytes. Configurations that change the split count change the canonical reduction (and so the bits):
each result is checked against the float64 oracle instead.
"""

import itertools

import torch

import lowbit
from lowbit.backends.triton.qmm import tuned
from lowbit.bench_cuda import _nbytes, _weights, copy_bandwidth, graph_time_us

SHAPES = ((4096, 4096), (14336, 4096), (4096, 14336))
FORMATS = (("affine", 64, 4),)
TILES = ("16,32,4,{s}", "16,32,2,{s}", "16,64,4,{s}", "16,16,1,{s}")
STAGES = (4, 8, 12)
TARGETS = ("16", "64", "132")


def main():
    bw = copy_bandwidth()
    print(f"{torch.cuda.get_device_name()} copy {bw / 1e12:.2f} TB/s", flush=True)
    gen = torch.Generator(device="cuda").manual_seed(0)
    summary = []
    for (mode, gs, bits), (n, k) in itertools.product(FORMATS, SHAPES):
        qs = _weights(mode, gs, bits, n, k, 8, gen)
        x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16, generator=gen)
        w_hat = lowbit.dequantize(*qs[0], gs, bits, mode, dtype=torch.float32).double()
        ref = x.double() @ w_hat.T
        moved = _nbytes(*qs[0])
        results = []
        for tile, stages, target in [(None, None, None)] + list(itertools.product(TILES, STAGES, TARGETS)):
            env = {} if tile is None else {"LOWBIT_QMM_TILE": tile.format(s=stages),
                                           "LOWBIT_QMM_TARGET_PROGRAMS": target}
            name = "default" if tile is None else f"tile={env['LOWBIT_QMM_TILE']} target={target}"
            try:
                with tuned(**env):
                    y = lowbit.quantized_matmul(x, *qs[0], True, gs, bits, mode)
                    err = ((y.double() - ref).abs().max() / ref.abs().max()).item()
                    us = graph_time_us([lambda q=q: lowbit.quantized_matmul(x, *q, True, gs, bits, mode)
                                        for q in qs])
            except Exception as e:  # a probe: report and go on
                print(f"  {name}: {type(e).__name__} {str(e)[:120]}", flush=True)
                continue
            results.append((us, name, err))
        results.sort()
        default = next(r for r in results if r[1] == "default")
        lines = [f"{mode}{bits} N={n} K={k}: default {default[0]:.1f} us "
                 f"({100 * moved / (default[0] * 1e-6) / bw:.0f}% BW)"]
        for us, name, err in results[:5]:
            lines.append(f"   {us:6.1f} us {100 * moved / (us * 1e-6) / bw:3.0f}% BW err {err:.1e}  {name}")
        print("\n".join(lines), flush=True)
        summary += lines
    print("\nSUMMARY\n" + "\n".join(summary))


if __name__ == "__main__":
    main()
