"""cProfile of eager QuantizedLinear calls at decode (M = 1, 4096 x 4096) per format: where host time goes.

Usage (GPU machine, repo root): PYTHONPATH=src python benchmarks/profile_overhead.py"""

import cProfile
import pstats

import torch
from torch import nn

from lowbit.nn import QuantizedLinear

x = torch.randn(1, 4096, device="cuda", dtype=torch.bfloat16)
lin = nn.Linear(4096, 4096, bias=False, device="cuda", dtype=torch.bfloat16)
for mode, gs in (("affine", 64), ("mxfp4", 32)):
    q = QuantizedLinear.from_linear(lin, gs, 4, mode)
    with torch.no_grad():
        for _ in range(50):
            q(x)
        torch.cuda.synchronize()
        profile = cProfile.Profile()
        profile.enable()
        for _ in range(500):
            q(x)
        profile.disable()
        torch.cuda.synchronize()
    print(f"=== {mode}")
    pstats.Stats(profile).sort_stats("tottime").print_stats(14)
