"""Where the prefill and decode time goes (a development probe, GPU machine, repo root):
PYTHONPATH=src python benchmarks/prefill_probe.py
1. the tile dequantizer alone, by tile config (GB/s over packed in + 16-bit out);
2. the whole prefill path by GEMM tile config, M = 256 / 1024 / 4096, beside torch bf16;
3. the decode kernel at M = 1 and 128 by tile config."""


import torch
import triton

import lowbit
from lowbit.backends.triton import launch, prefill
from lowbit.backends.triton.decode import pack_geometry
from lowbit.backends.triton.qmm import tuned
from lowbit.backends.triton.reduction import block_k
from lowbit.bench_cuda import _nbytes, _weights, bf16_tflops, copy_bandwidth, graph_time_us

N = K = 8192


def env_time(env, calls):
    with tuned(**env):
        calls[0]()
        return graph_time_us(calls)


def main():
    bw, peak = copy_bandwidth(), bf16_tflops()
    print(f"{torch.cuda.get_device_name(0)} copy {bw / 1e12:.2f} TB/s bf16 {peak:.0f} TFLOP/s", flush=True)
    gen = torch.Generator(device="cuda").manual_seed(0)
    lines = []
    for mode, gs, bits in (("affine", 64, 4), ("mxfp4", 32, 4)):
        qs = _weights(mode, gs, bits, N, K, 4, gen)
        bk = block_k(bits, gs, True)
        per_pack, words, _ = pack_geometry(bits)
        tiles = torch.empty(N, K, dtype=torch.bfloat16, device="cuda")
        w, s, b = qs[0]
        b = b if b is not None else s
        for bn, warps in ((64, 4), (128, 4), (128, 8), (256, 8), (32, 4)):
            def deq(w=w, s=s, b=b, bn=bn, warps=warps):
                prefill.dequantize_nt_kernel[(triton.cdiv(N, bn), K // bk)](
                    w.view(torch.int32), s, b, tiles, N, K, *w.stride(), *s.stride(), *b.stride(), tiles.stride(0),
                    MODE=launch.MODE_IDS[mode], BITS=bits, GS=gs, PER_PACK=per_pack, WORDS=words,
                    SCALE_DTYPE=launch.TL_DTYPES[torch.bfloat16], DOT_DTYPE=launch.TL_DTYPES[torch.bfloat16],
                    INTERPRET=False, BLOCK_N=bn, BLOCK_K=bk, PACKED=True, num_warps=warps)
            us = graph_time_us([deq])
            moved = _nbytes(w, s, qs[0][2]) + tiles.numel() * 2
            lines.append(f"dequant {mode}{bits} BLOCK_N={bn} warps={warps}: {us:.1f} us, {100 * moved / (us * 1e-6) / bw:.0f}% BW")
            print(lines[-1], flush=True)
        w_bf16 = [torch.randn(N, K, device="cuda", dtype=torch.bfloat16) for _ in range(2)]
        for m in (256, 1024, 4096):
            x = torch.randn(m, K, device="cuda", dtype=torch.bfloat16, generator=gen)
            base = graph_time_us([lambda w=w, x=x: x @ w.T for w in w_bf16])
            for tile in ("", "64,128,64,4,4", "128,128,64,8,4", "128,128,64,8,3", "128,128,128,8,3", "64,256,64,8,3",
                         "128,64,64,4,4"):
                env = {"LOWBIT_QMM_PREFILL_M": "1"}
                if tile:
                    env["LOWBIT_GEMM_TILE"] = tile
                try:
                    us = env_time(env, [lambda q=q, x=x: lowbit.quantized_matmul(x, *q, True, gs, bits, mode) for q in qs])
                except Exception as e:
                    print(f"  {tile}: {type(e).__name__} {str(e)[:200]}", flush=True)
                    continue
                lines.append(f"prefill {mode}{bits} M={m} tile={tile or 'default'}: {us:.1f} us "
                             f"({100 * 2 * m * N * K / (us * 1e-6) / 1e12 / peak:.0f}% bf16 peak; bf16 {base:.1f} us, {base / us:.2f}x)")
                print(lines[-1], flush=True)
        for m, tile in ((1, ""), (1, "16,64,4,3"), (1, "16,128,4,4"), (1, "16,256,8,3"), (1, "16,128,8,3"),
                        (1, "16,64,2,4"), (128, ""), (128, "64,128,4,3"), (128, "128,128,4,3")):
            x = torch.randn(m, K, device="cuda", dtype=torch.bfloat16, generator=gen)
            env = {"LOWBIT_QMM_PREFILL_M": str(10**9)}
            if tile:
                env["LOWBIT_QMM_TILE"] = tile
            us = env_time(env, [lambda q=q, x=x: lowbit.quantized_matmul(x, *q, True, gs, bits, mode) for q in qs])
            moved = _nbytes(*qs[0]) + m * K * 2 + m * N * 2
            lines.append(f"decode {mode}{bits} M={m} tile={tile or 'default'}: {us:.1f} us {100 * moved / (us * 1e-6) / bw:.0f}% BW")
            print(lines[-1], flush=True)
    print("\n".join(["", "SUMMARY"] + lines))


if __name__ == "__main__":
    main()
