"""quantize and qqmm on the GPU beside the limits and torch's own ways, in one run.

Usage (GPU machine, repo root): PYTHONPATH=src python benchmarks/quantize_bench.py [output.md] [--sweep]

1. quantize of a 14336 x 4096 bfloat16 weight (issue 4: >= 60% of copy bandwidth): the Triton kernel alone
   (CUDA graph), the op end to end (validation, finite check), and the same formats' torch code on the GPU
   (LOWBIT_BACKEND=cpu, which runs on CUDA tensors). Bytes = w read + packed words, scales (and biases) written.
   Every kernel result is checked byte for byte against the torch code in the same run.
2. qqmm (activations quantized on the fly) on 8192 x 8192 beside bf16 `x @ w.T` and fp8 `torch._scaled_mm`
   (e4m3 operands already quantized, one scale per tensor: the peer's best case, its quantize not timed).
"""

import os
import sys

import torch

import lowbit
from lowbit.backends.triton import quantizer
from lowbit.bench_cuda import _events_ms, _nbytes, bf16_tflops, copy_bandwidth, graph_time_us

QUANTIZE_FORMATS = (("affine", 64, 4), ("affine", 64, 8), ("affine", 64, 3), ("affine", 32, 2), ("mxfp4", 32, 4),
                    ("mxfp8", 32, 8), ("nvfp4", 16, 4), ("nvfp4+tensor scale", 16, 4))
QQMM_FORMATS = ("nvfp4", "nvfp4+tensor scale", "mxfp4", "mxfp8")
QQMM_MS = (1, 16, 256, 4096)


def _mode(label):
    return label.split("+")[0]


def _same_bytes(a, b):
    return all(torch.equal(x.view(torch.uint8), y.view(torch.uint8)) for x, y in zip(a, b))


def quantize_table(bw):
    rows, k = 14336, 4096
    w = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16)
    copies = [w.clone() for _ in range(3)]  # 3 x 117 MB: each replay reads past L2
    lines = ["| format | kernel µs | GB/s | % copy BW | op µs (checks incl.) | torch code µs | kernel vs torch "
             "| bytes equal |",
             "|---|---|---|---|---|---|---|---|"]
    print("\n".join(lines), flush=True)
    for label, gs, bits in QUANTIZE_FORMATS:
        mode = _mode(label)
        g = w.abs().amax().float() if "tensor" in label else None
        out = quantizer.quantize(w, mode, gs, bits, g)
        moved = _nbytes(w, *out)
        kernel_us = graph_time_us([lambda c=c: quantizer.quantize(c, mode, gs, bits, g) for c in copies], 6)
        op_us = _events_ms(lambda: lowbit.quantize(w, gs, bits, mode, global_scale=g), 10) * 1e3
        os.environ["LOWBIT_BACKEND"] = "cpu"
        reference = lowbit.quantize(w, gs, bits, mode, global_scale=g)
        torch_us = _events_ms(lambda: lowbit.quantize(w, gs, bits, mode, global_scale=g), 5) * 1e3
        os.environ["LOWBIT_BACKEND"] = "auto"
        line = (f"| {label} g{gs} {bits}-bit | {kernel_us:.1f} | {moved / kernel_us / 1e3:.0f} | "
                f"{100 * moved / kernel_us / 1e-6 / bw:.0f}% | {op_us:.1f} | {torch_us:.0f} | "
                f"{torch_us / kernel_us:.0f}x | {_same_bytes(out, reference)} |")
        lines.append(line)
        print(line, flush=True)
    return lines


# (rows, columns, warps): groups of GS columns; the default gives each thread 32 values (16 x 256, 4 warps)
SWEEP_TILES = ((16, 256, 4), (8, 256, 4), (32, 256, 4), (32, 256, 8), (16, 512, 4), (8, 256, 2), (16, 128, 2),
               (8, 512, 4))


def tile_sweep(bw):
    """Kernel time of each (BLOCK_R, BLOCK_C, warps) for a few formats (LOWBIT_QUANT_TILE)."""
    w = torch.randn(14336, 4096, device="cuda", dtype=torch.bfloat16)
    copies = [w.clone() for _ in range(3)]
    formats = (("affine", 64, 4), ("mxfp4", 32, 4), ("nvfp4", 16, 4), ("mxfp8", 32, 8))
    lines = ["", "| tile (R, C, warps) | " + " | ".join(f"{m} {b}-bit µs" for m, _, b in formats) + " |",
             "|---|" + "---|" * len(formats)]
    print("\n".join(lines), flush=True)
    for tile in SWEEP_TILES:
        os.environ["LOWBIT_QUANT_TILE"] = ",".join(map(str, tile))
        cells = []
        for mode, gs, bits in formats:
            try:
                us = graph_time_us([lambda c=c: quantizer.quantize(c, mode, gs, bits, None) for c in copies], 6)
                cells.append(f"{us:.1f}")
            except Exception as e:  # a tile that does not compile or fit
                cells.append(type(e).__name__)
        lines.append(f"| {tile} | " + " | ".join(cells) + " |")
        print(lines[-1], flush=True)
    del os.environ["LOWBIT_QUANT_TILE"]
    return lines


def qqmm_table(peak):
    n = k = 8192
    gen = torch.Generator(device="cuda").manual_seed(0)
    w = torch.randn(n, k, device="cuda", generator=gen) / k**0.5
    w_bf16 = w.to(torch.bfloat16)
    w_fp8 = w.to(torch.float8_e4m3fn)
    one = torch.ones((), device="cuda")
    lines = ["", "| format | M | qqmm µs | bf16 x @ w.T µs | fp8 _scaled_mm µs | vs bf16 | vs fp8 | TFLOP/s "
             "| rel err |",
             "|---|---|---|---|---|---|---|---|---|"]
    print("\n".join(lines), flush=True)
    for label in QQMM_FORMATS:
        mode = _mode(label)
        gw = w.abs().amax().reshape(1) if "tensor" in label else None
        w_q, scales = lowbit.quantize(w, mode=mode, global_scale=gw)
        w_hat = lowbit.dequantize(w_q, scales, mode=mode, global_scale=gw, dtype=torch.float32)
        for m in QQMM_MS:
            x = torch.randn(m, k, device="cuda", generator=gen).to(torch.bfloat16)
            gx = x.abs().amax().float().reshape(1) if gw is not None else None
            x_fp8 = torch.nn.functional.pad(x, (0, 0, 0, (-m) % 16)).to(torch.float8_e4m3fn)  # _scaled_mm: M % 16

            def call(x=x, gx=gx):
                return lowbit.qqmm(x, w_q, scales, mode=mode, global_scale_x=gx, global_scale_w=gw)

            xq, xs = lowbit.quantize(x, mode=mode, global_scale=gx)
            ref = lowbit.dequantize(xq, xs, mode=mode, global_scale=gx, dtype=torch.float32).double() @ w_hat.double().T
            err = ((call().double() - ref).abs().max() / ref.abs().max()).item()
            ours = graph_time_us([call])
            bf16 = graph_time_us([lambda x=x: x @ w_bf16.T])
            fp8 = graph_time_us([lambda x_fp8=x_fp8: torch._scaled_mm(x_fp8, w_fp8.T, one, one,
                                                                      out_dtype=torch.bfloat16)])
            line = (f"| {label} | {m} | {ours:.1f} | {bf16:.1f} | {fp8:.1f} | {bf16 / ours:.2f}x | {fp8 / ours:.2f}x | "
                    f"{2 * m * n * k / ours / 1e6:.1f} | {err:.1e} |")
            lines.append(line)
            print(line, flush=True)
    return lines


def main():
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    output = args[0] if args else None
    bw, peak = copy_bandwidth(), bf16_tflops()
    import triton
    head = [f"# quantize and qqmm on {torch.cuda.get_device_name(0)}", "",
            f"- torch {torch.__version__}, triton {triton.__version__}; copy bandwidth {bw / 1e12:.2f} TB/s, "
            f"bf16 {peak:.0f} TFLOP/s (this run)", ""]
    print("\n".join(head), flush=True)
    if "--sweep" in sys.argv:
        lines = head + tile_sweep(bw)
    else:
        lines = head + quantize_table(bw) + qqmm_table(peak)
    if output:
        with open(output, "w") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
