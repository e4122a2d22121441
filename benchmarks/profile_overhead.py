import cProfile, pstats, torch, time
from torch import nn
import lowbit
from lowbit.nn import QuantizedLinear
x = torch.randn(1, 4096, device="cuda", dtype=torch.bfloat16)
lin = nn.Linear(4096, 4096, bias=False, device="cuda", dtype=torch.bfloat16)
q = QuantizedLinear.from_linear(lin, 64, 4, "affine")
with torch.no_grad():
    for _ in range(50): q(x)
    torch.cuda.synchronize()
    pr = cProfile.Profile(); pr.enable()
    for _ in range(500): q(x)
    pr.disable()
    torch.cuda.synchronize()
pstats.Stats(pr).sort_stats("tottime").print_stats(18)
