"""quantize on CUDA vs the CPU: bytes of every format, dtype and a wide range of magnitudes must be identical."""

import torch

import lowbit
from lowbit.formats import MODES

bad = total = 0
gen = torch.Generator().manual_seed(0)
for mode, spec in MODES.items():
    for gs in spec.group_sizes:
        for bits in spec.bits:
            for dtype in (torch.float32, torch.bfloat16, torch.float16):
                w = torch.randn(512, 8 * gs, generator=gen) * torch.exp2(torch.randint(-12, 12, (512, 1), generator=gen))
                w = w.to(dtype)
                on_cpu = lowbit.quantize(w, gs, bits, mode)
                on_gpu = lowbit.quantize(w.cuda(), gs, bits, mode)
                same = all(torch.equal(a.view(torch.uint8) if a.dtype == torch.uint32 else a,
                                       b.cpu().view(torch.uint8) if b.dtype == torch.uint32 else b.cpu())
                           for a, b in zip(on_cpu, on_gpu))
                total += 1
                bad += not same
                if not same:
                    print("MISMATCH", mode, gs, bits, dtype)
print(f"quantize bytes, CUDA vs CPU: {total - bad} / {total} identical")
