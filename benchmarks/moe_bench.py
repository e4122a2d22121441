"""MoE expert matmuls (gather_qmm) on the GPU beside torch's bf16 grouped matmul, in one run.

Usage (GPU machine, repo root): PYTHONPATH=src python benchmarks/moe_bench.py [output.md]
(TOKENS="1,4,16" and FORMATS="affine4g64 mxfp4" limit the rows, for quick A/B runs)
Shapes of real models (issue 4): Qwen3-30B-A3B experts (128 experts, top-8, hidden 2048, intermediate 768: the
gate/up projection N=768 K=2048 and the down projection N=2048 K=768), gpt-oss-20b (32 experts, top-4, 2880 x 2880).
Decode (1, 4, 16 tokens): bytes = the experts actually touched (packed weights + scales/biases) + x + y, against the
copy bandwidth of this run. Prefill (4096 tokens): against torch._grouped_mm in bf16 over tokens sorted by expert
(the fastest bf16 way torch has; the sort is not timed for torch, while lowbit's time includes its own grouping).
"""

import os
import sys

import torch

import lowbit
from lowbit.backends.triton.qmm import tuned
from lowbit.bench_cuda import _label, _nbytes, bf16_tflops, copy_bandwidth, graph_time_us

MODELS = (  # name, experts, top-k, N, K, formats
    ("qwen3-30b-a3b gate/up", 128, 8, 768, 2048, (("affine", 64, 4), ("mxfp4", 32, 4))),
    ("qwen3-30b-a3b down", 128, 8, 2048, 768, (("affine", 64, 4), ("mxfp4", 32, 4))),
    ("gpt-oss-20b", 32, 4, 2880, 2880, (("mxfp4", 32, 4),)),
)


def kernels_of(call):
    """Print the GPU kernels one call launches and their times (torch.profiler)."""
    call()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        call()
        torch.cuda.synchronize()
    events = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    print(f"  {len(events)} GPU ops: " + ", ".join(f"{e.name[:40]} {e.device_time:.1f}us" for e in events), flush=True)


def grouped_bf16(x_sorted, w_t, offsets):
    return torch._grouped_mm(x_sorted, w_t, offs=offsets)


def main():
    output = sys.argv[1] if len(sys.argv) > 1 else None
    bw, peak = copy_bandwidth(), bf16_tflops()
    gen = torch.Generator(device="cuda").manual_seed(0)
    lines = [f"# gather_qmm (MoE) on {torch.cuda.get_device_name(0)}", "",
             f"- torch {torch.__version__}; copy bandwidth {bw / 1e12:.2f} TB/s, bf16 {peak:.0f} TFLOP/s (this run)",
             "- decode: % of copy bandwidth over the bytes of the experts touched; prefill: time of torch bf16 "
             "`_grouped_mm` / lowbit time", "",
             "| model | format | tokens | experts touched | µs | µs grouped by expert | GB/s | % copy BW | "
             "bf16 grouped µs | vs bf16 | rel err |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    print("\n".join(lines), flush=True)
    for name, experts, top_k, n, k, formats in MODELS:
        w_bf16 = (torch.randn(experts, n, k, device="cuda", generator=gen) / k**0.5).to(torch.bfloat16)
        w_t = w_bf16.transpose(-2, -1)
        only = os.environ.get("FORMATS")
        for mode, gs, bits in formats:
            if only and f"{mode}{bits}g{gs}" not in only.split() and mode not in only.split():
                continue
            q = lowbit.quantize(w_bf16, gs, bits, mode)
            q = q if mode == "affine" else (q[0], q[1], None)
            per_expert = _nbytes(*q) // experts
            for tokens in (int(t) for t in os.environ.get("TOKENS", "1,4,16,4096").split(",")):
                x = torch.randn(tokens, 1, 1, k, device="cuda", dtype=torch.bfloat16, generator=gen)
                idx = torch.stack([torch.randperm(experts, device="cuda", generator=gen)[:top_k]
                                   for _ in range(tokens)])

                def call(x=x, idx=idx, q=q, mode=mode, gs=gs, bits=bits):
                    return lowbit.gather_qmm(x, *q, rhs_indices=idx, transpose=True, group_size=gs, bits=bits,
                                             mode=mode)

                y = call()
                w_hat = lowbit.dequantize(*q, gs, bits, mode, dtype=torch.float32)
                every = (x.reshape(tokens, k).float() @ w_hat.reshape(-1, k).T).reshape(tokens, experts, n)
                ref = torch.gather(every, 1, idx[:, :, None].expand(-1, -1, n)).double()
                err = ((y[:, :, 0].double() - ref).abs().max() / ref.abs().max()).item()
                us = graph_time_us([call])
                grouped_us = float("nan")
                if tokens <= 16:  # the same call with rows grouped by expert (the schedule) instead of per-item tiles
                    with tuned(LOWBIT_GATHER_GROUP_ROWS="1"):
                        grouped_us = graph_time_us([call])
                if tokens == 1 and mode == "mxfp4":
                    kernels_of(call)
                flat = idx.reshape(-1)
                order = torch.argsort(flat, stable=True)
                x_sorted = x.reshape(tokens, k)[order // top_k].contiguous()
                offsets = torch.cumsum(torch.bincount(flat, minlength=experts), 0).to(torch.int32)
                try:
                    base = graph_time_us([lambda: grouped_bf16(x_sorted, w_t, offsets)])
                except Exception as e:  # noqa: BLE001  (report and go on)
                    print(f"_grouped_mm failed: {type(e).__name__}: {str(e)[:200]}", flush=True)
                    base = float("nan")
                touched = int(torch.unique(flat).numel())
                moved = touched * per_expert + _nbytes(x) + tokens * top_k * n * 2
                gbs = moved / (us * 1e-6) / 1e9
                row = (f"| {name} | {_label(mode, gs, bits)} | {tokens} | {touched} | {us:.1f} | {grouped_us:.1f} | "
                       f"{gbs:.0f} | {100 * gbs * 1e9 / bw:.0f}% | {base:.1f} | {base / us:.2f}x | {err:.1e} |")
                lines.append(row)
                print(row, flush=True)
    if output:
        with open(output, "w") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
