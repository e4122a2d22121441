"""One decode step of a Llama-shaped model, eager vs torch.compile vs a CUDA graph, float vs quantized.

Usage (GPU machine, repo root): PYTHONPATH=src python benchmarks/decode_step_bench.py [layers] [output.md] [--eager]
(--eager: no torch.compile rows, for quick A/B runs of two trees)
The model: `layers` blocks of Llama-3-8B's shapes (hidden 4096, 32 query / 8 key-value heads, MLP 14336), RMSNorm,
attention of one new token over a 512-token cache (torch SDPA), SwiGLU MLP, bfloat16. Its 7 linears per block are
nn.Linear (bf16) or lowbit QuantizedLinear (lowbit.quantize_model). For each variant, one row:
- step ms: wall time per step of 50 steps enqueued back to back, then one sync (what a generation loop pays);
- GPU ms: the same step replayed from a CUDA graph (no host work at all);
- host-bound: step / GPU time (1.0: the GPU never waits for Python).
"""

import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

import lowbit
from lowbit.bench_cuda import copy_bandwidth

HIDDEN, HEADS, KV_HEADS, FFN, CACHE = 4096, 32, 8, 14336, 512
HEAD = HIDDEN // HEADS


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        kv = KV_HEADS * HEAD
        self.attn_norm, self.mlp_norm = nn.RMSNorm(HIDDEN), nn.RMSNorm(HIDDEN)
        self.q_proj, self.k_proj, self.v_proj = (nn.Linear(HIDDEN, d, bias=False) for d in (HIDDEN, kv, kv))
        self.o_proj = nn.Linear(HIDDEN, HIDDEN, bias=False)
        self.gate_proj, self.up_proj = nn.Linear(HIDDEN, FFN, bias=False), nn.Linear(HIDDEN, FFN, bias=False)
        self.down_proj = nn.Linear(FFN, HIDDEN, bias=False)
        self.register_buffer("k_cache", torch.randn(1, KV_HEADS, CACHE, HEAD) * 0.5)
        self.register_buffer("v_cache", torch.randn(1, KV_HEADS, CACHE, HEAD))

    def forward(self, x):  # x (1, 1, HIDDEN): one new token
        h = self.attn_norm(x)
        q = self.q_proj(h).view(1, 1, HEADS, HEAD).transpose(1, 2)
        k = torch.cat([self.k_cache, self.k_proj(h).view(1, 1, KV_HEADS, HEAD).transpose(1, 2)], dim=2)
        v = torch.cat([self.v_cache, self.v_proj(h).view(1, 1, KV_HEADS, HEAD).transpose(1, 2)], dim=2)
        a = F.scaled_dot_product_attention(q, k, v, enable_gqa=True).transpose(1, 2).reshape(1, 1, HIDDEN)
        x = x + self.o_proj(a)
        h = self.mlp_norm(x)
        return x + self.down_proj(F.silu(self.gate_proj(h)) * self.up_proj(h))


def model(layers: int) -> nn.Module:
    torch.manual_seed(0)
    with torch.device("cuda"):
        m = nn.Sequential(*(Block() for _ in range(layers))).to(torch.bfloat16)
    for p in m.parameters():
        p.requires_grad_(False)
        if p.dim() == 2:
            p.mul_(0.02 / p.std())
    return m.eval()


def step_ms(step, x, n=50) -> float:
    for _ in range(3):
        step(x)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(n):
        step(x)
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / n * 1e3


def graph_ms(step, x, n=50) -> float:
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            step(x)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step(x)
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(n):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / n


def main():
    eager_only = "--eager" in sys.argv
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    layers = int(args[0]) if args else 8
    bandwidth = copy_bandwidth()
    x = torch.randn(1, 1, HIDDEN, device="cuda", dtype=torch.bfloat16)
    rows = []
    variants = [("bf16 nn.Linear", None)] + [(f"lowbit {m} g{g} b{b}", (g, b, m))
                                               for m, g, b in (("affine", 64, 4), ("mxfp4", 32, 4), ("nvfp4", 16, 4))]
    with torch.no_grad():
        for name, fmt in variants:
            net = model(layers)
            if fmt is not None:
                lowbit.quantize_model(net, *fmt)
            weight_bytes = sum(t.numel() * t.element_size() for t in list(net.parameters()) + list(net.buffers())
                               if t.dim() == 2 or t.dtype == torch.uint32 or t.dtype == torch.uint8)
            eager = step_ms(net, x)
            gpu = graph_ms(net, x)
            runs = [("eager", eager, gpu)]
            if not eager_only:
                torch._dynamo.reset()
                compiled = torch.compile(net, fullgraph=True)
                runs.append(("torch.compile", step_ms(compiled, x), graph_ms(compiled, x)))
                torch._dynamo.reset()
                del compiled
            runs.append(("CUDA graph of the eager step", gpu, gpu))
            for label, ms, g in runs:
                rows.append(f"| {name} | {label} | {ms:.3f} | {g:.3f} | {ms / g:.2f} | "
                            f"{100 * weight_bytes / (g * 1e-3) / bandwidth:.0f}% |")
                print(rows[-1], flush=True)
            del net
            torch.cuda.empty_cache()
    text = "\n".join([
        f"# One decode step, {layers} Llama-3-8B-shaped blocks, bf16 activations, 512-token cache "
        f"({torch.cuda.get_device_name()}, torch {torch.__version__}, triton {__import__('triton').__version__}, "
        f"{time.strftime('%Y-%m-%d')}; copy bandwidth {bandwidth / 1e12:.2f} TB/s measured in this run)",
        "",
        "| weights | run | step ms | GPU ms (CUDA graph replay) | host-bound | weight bytes / GPU time, % of copy BW |",
        "|---|---|---|---|---|---|",
        *rows,
    ])
    print(text)
    if len(args) > 1:
        with open(args[1], "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
