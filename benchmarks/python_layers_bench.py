"""lowbit's Python layers above the kernels, on any machine (no GPU needed): QuantizedLinear and quantized_matmul
at decode (M = 1, 4096 x 4096) with the bound product they reach replaced by a function that returns a kept tensor.

What is timed is everything between the caller and the backend's prepared product: nn.Module's call, the module's
forward, the op's layers and the per-call key of static facts with its memo lookup. The bound product itself (the
output's allocation, the launches) is what overhead_bench.py's launch floor times on the GPU machine. Compare the
numbers of two trees on the same machine only (it is the host CPU's speed).

Usage (repo root): PYTHONPATH=src python benchmarks/python_layers_bench.py
"""

import statistics
import timeit

import torch
from torch import nn

import lowbit
from lowbit.backends import BOUND_PRODUCTS
from lowbit.nn import QuantizedLinear

N_CALLS = 50_000


def per_call_us(call) -> float:
    """Median over 7 rounds of N_CALLS calls, in µs per call."""
    return statistics.median(timeit.repeat(call, number=N_CALLS, repeat=7)) / N_CALLS * 1e6


def stub_bound_product(call, out: torch.Tensor) -> None:
    """Make `call` (one quantized_matmul) reach a stub: run it once on an empty memo, then bind its key to a
    function that returns `out`."""
    BOUND_PRODUCTS.clear()
    call()
    (key,) = BOUND_PRODUCTS.keys()
    BOUND_PRODUCTS[key] = lambda *args: out


def main():
    torch.manual_seed(0)
    x = torch.randn(1, 4096, dtype=torch.bfloat16)
    linear = nn.Linear(4096, 4096, bias=False, dtype=torch.bfloat16)
    rows = [("an empty nn.Module's call (torch's share of any module)", per_call_us(lambda e=nn.Identity(): e(x)))]
    with torch.inference_mode():
        for mode, gs in (("affine", 64), ("mxfp4", 32), ("nvfp4", 16)):
            q = QuantizedLinear.from_linear(linear, gs, 4, mode)
            weight, scales, biases = q._buffers["weight"], q._buffers["scales"], q._buffers["biases"]

            def op(weight=weight, scales=scales, biases=biases, gs=gs, mode=mode):
                return lowbit.quantized_matmul(x, weight, scales, biases, True, gs, 4, mode)

            stub_bound_product(op, torch.empty(1, 4096, dtype=torch.bfloat16))
            rows.append((f"QuantizedLinear {mode} g{gs}", per_call_us(lambda q=q: q(x))))
            rows.append((f"lowbit.quantized_matmul {mode} g{gs}", per_call_us(op)))
    print(f"# lowbit's Python per decode call, bound product stubbed (torch {torch.__version__})\n")
    print("| call | µs / call |\n|---|---|")
    for name, us in rows:
        print(f"| {name} | {us:.2f} |")


if __name__ == "__main__":
    main()
