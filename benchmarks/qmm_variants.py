"""Decode vs prefill vs packed-decode variants of the Triton qmm on one GPU, in one run (a development probe).

Usage (GPU machine, repo root): PYTHONPATH=src python benchmarks/qmm_variants.py [N K]
Prints one table: format, M, variant, microseconds, % of copy bandwidth, % of the bf16 matmul rate, bf16 time.
"""

import sys

import torch

import lowbit
from lowbit.backends.triton.qmm import tuned
from lowbit.bench_cuda import L2_FLUSH_BYTES, _nbytes, _weights, bf16_tflops, copy_bandwidth, graph_time_us

FORMATS = (("affine", 64, 4), ("mxfp4", 32, 4), ("nvfp4", 16, 4), ("affine", 64, 8))
MS = (1, 16, 64, 128, 256, 1024, 4096)
VARIANTS = {  # name -> environment
    "decode": {"LOWBIT_QMM_PREFILL_M": str(10**9)},
    "decode-unpacked": {"LOWBIT_QMM_PREFILL_M": str(10**9), "LOWBIT_QMM_PACKED": "0"},
    "prefill": {"LOWBIT_QMM_PREFILL_M": "1"},
}


def with_env(env, fn):
    with tuned(**env):
        return fn()


def main():
    n, k = (int(v) for v in sys.argv[1:3]) if len(sys.argv) > 2 else (8192, 8192)
    bw, peak = copy_bandwidth(), bf16_tflops()
    print(f"{torch.cuda.get_device_name(0)}: copy {bw / 1e12:.2f} TB/s, bf16 {peak:.0f} TFLOP/s; N={n} K={k}", flush=True)
    gen = torch.Generator(device="cuda").manual_seed(0)
    w_bf16 = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) for _ in range(2)]
    rows = []
    for transpose in (True, False):
        for mode, gs, bits in FORMATS if transpose else FORMATS[:2]:
            one = _nbytes(*_weights(mode, gs, bits, 16, k, 1, gen)[0]) * n // 16
            copies = max(1, min(8, -(-L2_FLUSH_BYTES // one)))
            if transpose:
                qs = _weights(mode, gs, bits, n, k, copies, gen)
            else:  # (K, N) weights for x @ w
                qs = [lowbit.quantize(torch.randn(k, n, device="cuda", generator=gen).to(torch.bfloat16) / k**0.5,
                                      gs, bits, mode) for _ in range(copies)]
                qs = [q if mode == "affine" else (q[0], q[1], None) for q in qs]
            for m in (MS if transpose else (1, 16, 256, 4096)):
                x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16, generator=gen)
                base = graph_time_us([lambda w=w, x=x: x @ w.T for w in w_bf16])
                ref = None
                for name, env in VARIANTS.items():
                    if name == "prefill" and m < 16 or name == "decode-unpacked" and m > 16:
                        continue

                    def call(q, x=x, transpose=transpose, mode=mode, gs=gs, bits=bits):
                        return lowbit.quantized_matmul(x, *q, transpose, gs, bits, mode)

                    try:
                        y = with_env(env, lambda: call(qs[0]))
                        if ref is None:
                            ref = y
                        same = torch.equal(y, ref)
                        us = with_env(env, lambda: graph_time_us([lambda q=q: call(q) for q in qs]))
                    except Exception as e:  # report and go on: a probe
                        print(f"{mode} {bits} m={m} {name}: {type(e).__name__}: {str(e)[:300]}", flush=True)
                        continue
                    moved = _nbytes(*qs[0]) + _nbytes(x) + m * n * 2
                    row = (f"| {'T' if transpose else 'N'} | {mode}{bits} g{gs} | {m} | {name} | {us:.1f} | "
                           f"{100 * moved / (us * 1e-6) / bw:.0f}% | {100 * 2 * m * n * k / (us * 1e-6) / 1e12 / peak:.0f}% | "
                           f"{base:.1f} | {base / us:.2f}x | {'same' if same else 'DIFF'} |")
                    rows.append(row)
                    print(row, flush=True)
            qs = None  # (free the weights before the next format)
    print("\n| T | format | M | variant | µs | %BW | %bf16 | bf16 µs | vs bf16 | bits vs first |")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
