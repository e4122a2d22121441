"""The Triton quantize kernel: byte-identical to the CPU path (lowbit.formats) for every format, dtype and hard
value (ties, subnormals, constant and zero groups, huge values, non-finite groups), and its device-side encoders
checked one by one against lowbit.formats.codecs over sweeps of every deciding case. On the GPU when there is one,
else interpreted on CPU tensors (TRITON_INTERPRET=1)."""

import os

import pytest
import torch
from conftest import ALL_CONFIGS, same_bits
from ptx_emulator import f32_bits, run_ptx

import lowbit
from lowbit.formats import codecs

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402

from lowbit.backends.triton.encode import (  # noqa: E402
    divide, e2m1_encode, e4m3_encode, e4m3_value_hardware, e8m0_exponent_ceil, fast_division_safe, round_half_even,
)

GPU = torch.cuda.is_available()
DEVICE = "cuda" if GPU else "cpu"
if not GPU and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("no GPU and TRITON_INTERPRET is not set", allow_module_level=True)

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
E2M1_TIES = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)


def hard_weight(rows: int, k: int, gs: int, dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    """Random rows over many magnitudes, then rows of the cases that decide roundings and edges."""
    big = 1e4 if dtype == torch.float16 else 1e30
    magnitudes = torch.logspace(-4, 4, rows, dtype=torch.float64)[:, None]
    w = torch.randn(rows, k, generator=gen, dtype=torch.float64) * magnitudes
    w[0] = 3.0  # constant groups
    w[1] = 0.0
    w[2] = -2.5
    ties = torch.tensor(E2M1_TIES + (6.0,), dtype=torch.float64)
    w[3] = ties.repeat(k // len(ties) + 1)[:k] * torch.where(torch.arange(k) % 3 == 0, -1.0, 1.0)  # e2m1 ties
    w[4] = torch.randn(k, generator=gen, dtype=torch.float64) * 1e-39  # float32 subnormals (0 in float16)
    w[5] = torch.randn(k, generator=gen, dtype=torch.float64) * big
    w[6] = 1.0 + torch.rand(k, generator=gen, dtype=torch.float64)  # one-signed groups
    w[7] = (torch.arange(k) % gs) * 0.5 - 3.0  # affine codes on exact halves
    w[8] = torch.where(torch.arange(k) % gs == 0, big, 1e-3)  # one outlier per group
    return w.to(dtype)


def both_backends(monkeypatch, fn):
    monkeypatch.setenv("LOWBIT_BACKEND", "triton")
    ours = fn()
    monkeypatch.setenv("LOWBIT_BACKEND", "cpu")
    theirs = fn()
    return ours, theirs


@pytest.mark.parametrize("mode, gs, bits", ALL_CONFIGS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_quantize_bytes_equal_the_cpu_path(monkeypatch, mode, gs, bits, dtype, gen):
    w = hard_weight(12, 4 * max(gs, 32), gs, dtype, gen).to(DEVICE)
    ours, theirs = both_backends(monkeypatch, lambda: lowbit.quantize(w, gs, bits, mode))
    assert len(ours) == len(theirs)
    for a, b in zip(ours, theirs):
        assert a.device.type == DEVICE
        assert same_bits(a, b.to(DEVICE))


@pytest.mark.parametrize("mode, gs, bits", [("affine", 64, 4), ("affine", 32, 3), ("mxfp4", 32, 4),
                                            ("mxfp8", 32, 8), ("nvfp4", 16, 4)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_non_finite_groups_bytes_equal_the_cpu_path(monkeypatch, mode, gs, bits, dtype, gen):
    """nonfinite="nan": groups holding NaN or +-inf get the same NaN scale (and bias) bytes and codes 0."""
    w = hard_weight(9, 128, gs, dtype, gen)
    w[0, 5], w[4, 70], w[6, 0] = float("nan"), float("inf"), float("-inf")
    w = w.to(DEVICE)
    ours, theirs = both_backends(monkeypatch, lambda: lowbit.quantize(w, gs, bits, mode, nonfinite="nan"))
    for a, b in zip(ours, theirs):
        assert same_bits(a, b.to(DEVICE))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tensor_scale", [1e-6, 0.37, 1.0, 1e6, -0.37])
def test_nvfp4_tensor_scale_bytes_equal_the_cpu_path(monkeypatch, dtype, tensor_scale, gen):
    w = hard_weight(9, 64, 16, dtype, gen).to(DEVICE)
    g = torch.tensor(tensor_scale, device=DEVICE)
    ours, theirs = both_backends(monkeypatch, lambda: lowbit.quantize(w, mode="nvfp4", global_scale=g))
    for a, b in zip(ours, theirs):
        assert same_bits(a, b.to(DEVICE))


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_affine_extreme_scales_bytes_equal_the_cpu_path(monkeypatch, bits, dtype, gen):
    """Groups whose scale is 2**100 or more (the GPU scales them by 2**-100 before its fast division) or infinite
    (max - min overflows float32: the GPU's factor is 0), beside ordinary ones, ties included."""
    gs, k = 32, 128
    w = torch.randn(8, k, generator=gen, dtype=torch.float64)
    w[0] *= 1e37
    w[1] = (torch.arange(k) % gs) * 0.5 * 2.0**110 - 3 * 2.0**110  # codes on exact halves, scale 2**109
    w[2] = torch.where(torch.arange(k) % 2 == 0, 3.0e38, -3.0e38)  # max - min = inf
    w[3] = torch.where(torch.arange(k) % gs == 0, 3.0e38, 1.0)  # one huge value a group
    w[4] = torch.where(torch.arange(k) % gs == 0, -3.0e38, 1e-30)
    w[5] *= 2.0**124
    w = w.to(dtype).to(DEVICE)
    ours, theirs = both_backends(monkeypatch, lambda: lowbit.quantize(w, gs, bits, "affine"))
    for a, b in zip(ours, theirs):
        assert same_bits(a, b.to(DEVICE))


def test_affine_quotients_are_at_least_minus_half(gen):
    """encode.affine_codes clamps only from above: with lowbit.formats.affine's scale and bias (the same float32
    arithmetic, copied), every finite group's quotient (g - bias) / scale is >= -1/2 (its code rounds to >= 0),
    over groups of every sign pattern, spread and magnitude."""
    n, gs = 20000, 16
    w = torch.randn(n, gs, generator=gen, dtype=torch.float64)
    w = w * torch.logspace(-40, 38, n, dtype=torch.float64)[torch.randperm(n, generator=gen)][:, None]
    w[: n // 4] = w[: n // 4].abs()  # one-signed groups of either sign
    w[n // 4: n // 2] = -w[n // 4: n // 2].abs()
    w[n // 2: n // 2 + 1000] = w[n // 2: n // 2 + 1000, :1] + w[n // 2: n // 2 + 1000] * 1e-7  # narrow ranges
    w[-1000:] = torch.round(w[-1000:] * 4) / 4 / 2.0**torch.randint(-10, 10, (1000, 1), generator=gen)  # halves
    g = w.float()
    g = g[torch.isfinite(g).all(-1)]
    lo, hi = g.amin(-1), g.amax(-1)
    for bits in range(2, 9):
        n_steps = float(2**bits - 1)
        scale = torch.clamp_min((hi - lo) / torch.full_like(hi, n_steps), 1e-7)
        edge_is_min = lo.abs() > hi.abs()
        edge = torch.where(edge_is_min, lo, hi)
        scale = torch.where(edge_is_min, scale, -scale)
        q0 = torch.round(edge / scale)
        scale = torch.where(q0 != 0, edge / q0, scale)
        bias = torch.where(q0 != 0, edge, torch.zeros_like(edge))
        quotient = (g - bias[:, None]) / scale[:, None]
        assert (quotient >= -0.5).all(), bits
    narrow = torch.isfinite(hi - lo)  # (1 bit, an infinite scale: affine_quotient gives 0, the CPU path NaN -> 0)
    assert ((g - lo[:, None]) / torch.clamp_min(hi - lo, 1e-7)[:, None] >= 0)[narrow].all()  # 1 bit


@pytest.mark.parametrize("rows_outer", [True, False])
@pytest.mark.parametrize("mode, gs, bits", [("affine", 64, 4), ("affine", 32, 3), ("mxfp8", 32, 8), ("nvfp4", 16, 4)])
def test_load_axis_order_gives_the_same_bytes(monkeypatch, mode, gs, bits, rows_outer, gen):
    """The tile is loaded as (V, R, G, VEC) or, for Triton < 3.7's coalescing, as (R, G, V, VEC) and permuted back:
    both orders on any Triton (the other one is what a different Triton version runs)."""
    from lowbit.backends.triton import quantizer
    monkeypatch.setattr(quantizer, "_COALESCE_TIES_FIRST_AXIS_FIRST", rows_outer)
    w = hard_weight(40, 384, gs, torch.bfloat16, gen).to(DEVICE)
    ours, theirs = both_backends(monkeypatch, lambda: lowbit.quantize(w, gs, bits, mode))
    for a, b in zip(ours, theirs):
        assert same_bits(a, b.to(DEVICE))


@pytest.mark.parametrize("mode, gs, bits", [("affine", 64, 4), ("affine", 32, 3), ("mxfp8", 32, 8), ("nvfp4", 16, 4)])
def test_every_tile_gives_the_same_bytes(monkeypatch, mode, gs, bits, gen):
    """The tile never changes the bytes: the GPU's default tile (rows and the second column tile masked past the
    input; the interpreter's own tile is cut to the input), small tiles of two groups, and a tile wider than K."""
    from lowbit.backends.triton import quantizer
    per_thread, warps = quantizer._DEFAULT_TILE[mode]
    tiles = [(32 * warps * per_thread // 256, 256, warps), (4, 2 * gs, 4), (16, 512, 4)]
    w = hard_weight(12, 384, gs, torch.bfloat16, gen).to(DEVICE)
    monkeypatch.setenv("LOWBIT_BACKEND", "cpu")
    theirs = lowbit.quantize(w, gs, bits, mode)
    monkeypatch.setenv("LOWBIT_BACKEND", "triton")
    for tile in tiles:
        monkeypatch.setenv("LOWBIT_QUANT_TILE", ",".join(map(str, tile)))
        for a, b in zip(lowbit.quantize(w, gs, bits, mode), theirs):
            assert same_bits(a, b.to(DEVICE)), tile


def test_tile_choice(monkeypatch):
    """The GPU's tile is the mode's default whatever the row count; the interpreter's is cut to the input (its cost
    is every value of every tile, padding included) and never larger than the GPU's in either axis."""
    from lowbit.backends.triton import quantizer
    monkeypatch.delenv("LOWBIT_QUANT_TILE", raising=False)
    interpret = [False]
    monkeypatch.setattr(quantizer, "interpreting", lambda: interpret[0])
    assert quantizer._tile(4096, "affine", 64, 2, 14336) == (32, 256, 8, 4)
    assert quantizer._tile(4096, "affine", 64, 2, 12) == (32, 256, 8, 4)
    assert quantizer._tile(128, "affine", 32, 4, 12) == (64, 128, 4, 4)
    assert quantizer._tile(4096, "mxfp8", 32, 2, 3) == (16, 256, 8, 4)
    assert quantizer._tile(4096, "nvfp4", 16, 4, 3) == (16, 256, 4, 2)
    interpret[0] = True
    assert quantizer._tile(4096, "affine", 64, 2, 14336) == (32, 256, 8, 4)  # large inputs: the GPU's tile
    assert quantizer._tile(128, "affine", 32, 4, 12) == (16, 128, 4, 4)  # 12 rows: 16, not 64
    assert quantizer._tile(384, "affine", 128, 2, 320) == (32, 128, 8, 4)  # K = 3 groups: no masked columns
    for rows, k, gs in [(1, 64, 64), (9, 128, 16), (40, 384, 64), (201, 288, 32), (5000, 64, 64)]:
        for mode in quantizer._DEFAULT_TILE:
            interpret[0] = False
            gpu_r, gpu_c, _, _ = quantizer._tile(k, mode, gs, 2, rows)
            interpret[0] = True
            r, c, _, _ = quantizer._tile(k, mode, gs, 2, rows)
            assert r <= min(gpu_r, triton.next_power_of_2(rows)) and c <= gpu_c and c % gs == 0


def test_quantize_batched_non_contiguous_and_empty(monkeypatch, gen):
    w = torch.randn(3, 64, 10, generator=gen).to(DEVICE).transpose(-1, -2)  # (3, 10, 64), strided rows
    ours, theirs = both_backends(monkeypatch, lambda: lowbit.quantize(w, 32, 4))
    for a, b in zip(ours, theirs):
        assert a.shape == b.shape and same_bits(a, b.to(DEVICE))
    monkeypatch.setenv("LOWBIT_BACKEND", "triton")
    empty = lowbit.quantize(torch.zeros(0, 64, device=DEVICE), 64, 4)
    assert [tuple(t.shape) for t in empty] == [(0, 8), (0, 1), (0, 1)]


# --- the encoders, one at a time -----------------------------------------------------------------------------------

@triton.jit
def _encoder_kernel(x_ptr, out_ptr, n, WHICH: tl.constexpr, HARDWARE: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask, other=0.0)
    if WHICH == 0:
        tl.store(out_ptr + offs, round_half_even(x), mask=mask)
    elif WHICH == 1:
        tl.store(out_ptr + offs, e8m0_exponent_ceil(x).to(tl.float32), mask=mask)
    elif WHICH == 2:
        tl.store(out_ptr + offs, e4m3_encode(x, HARDWARE).to(tl.float32), mask=mask)
    elif WHICH == 4:  # x: e4m3 bytes as float32
        tl.store(out_ptr + offs, e4m3_value_hardware(x.to(tl.int32)), mask=mask)
    else:
        tl.store(out_ptr + offs, e2m1_encode(x).to(tl.float32), mask=mask)


def encode_on_device(x: torch.Tensor, which: int) -> torch.Tensor:
    x = x.float().contiguous().to(DEVICE)
    out = torch.empty_like(x)
    block = 4096
    _encoder_kernel[(triton.cdiv(x.numel(), block),)](x, out, x.numel(), WHICH=which, HARDWARE=GPU, BLOCK=block)
    return out.cpu()


def neighbours(x: torch.Tensor) -> torch.Tensor:
    """x and the float32 values just below and above it."""
    x = x.float()
    return torch.cat([x, torch.nextafter(x, torch.full_like(x, -float("inf"))),
                      torch.nextafter(x, torch.full_like(x, float("inf")))])


def all_finite_float32_samples(gen, n=20000) -> torch.Tensor:
    bits = torch.randint(-(2**31), 2**31 - 1, (n,), generator=gen, dtype=torch.int64).to(torch.int32)
    x = bits.view(torch.float32)
    return x[torch.isfinite(x)]


def test_round_half_even_matches_torch_round(gen):
    """Every tie k + 0.5 and its neighbours, integers, random floats of every magnitude, 2**22..2**24, inf, NaN
    (the sign of a zero result may differ: codes never see it)."""
    ints = torch.cat([torch.arange(-1000, 1000), torch.randint(-(2**23), 2**23, (4000,), generator=gen)]).double()
    x = torch.cat([neighbours(ints + 0.5), neighbours(ints), all_finite_float32_samples(gen),
                   torch.tensor([2.0**22, 2.0**23, 2.0**24, -(2.0**23) - 2, 1e30, -0.0, float("inf"), float("nan")])])
    torch.testing.assert_close(encode_on_device(x, 0), torch.round(x), rtol=0, atol=0, equal_nan=True)


def test_e8m0_exponent_ceil_matches_the_codec(gen):
    """Every exponent with the mantissas that decide the float32 rounding of log2 (k < 64 ulps above a power of two),
    mantissas just below the next power, random ones, and float32 subnormals."""
    e = torch.arange(-149, 128, dtype=torch.float64)
    k = torch.cat([torch.arange(64), torch.tensor([2**23 - 1, 2**22, 12345, 7654321])]).double()
    s = (torch.ldexp(1 + k[None, :] / 2**23, e[:, None])).float().reshape(-1)
    subnormal = torch.randint(1, 2**23, (5000,), generator=gen, dtype=torch.int64).to(torch.int32).view(torch.float32)
    s = torch.cat([s, subnormal, all_finite_float32_samples(gen).abs(), torch.tensor([0.0])])
    s = s[s < float("inf")]
    assert torch.equal(encode_on_device(s, 1), codecs.e8m0_exponent_ceil(s))


def test_e4m3_encode_matches_the_codec(gen):
    """Every bfloat16 value, the midpoints between consecutive e4m3 values and their neighbours, beyond 448,
    signed zeros and non-finite values."""
    every_bf16 = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(torch.bfloat16).float()
    grid = codecs.e4m3_decode(torch.arange(0, 127, dtype=torch.uint8), torch.float32).double()
    midpoints = (grid[1:] + grid[:-1]) / 2
    x = torch.cat([every_bf16, neighbours(midpoints), -neighbours(midpoints), all_finite_float32_samples(gen),
                   torch.tensor([448.0, 449.0, 464.0, 465.0, 1e30, -1e30, 0.0, -0.0, float("inf"), -float("inf"),
                                 float("nan")])])
    assert torch.equal(encode_on_device(x, 2).to(torch.uint8), codecs.e4m3_encode(x))


def test_e2m1_encode_matches_the_codec(gen):
    """Every bfloat16 value but NaN (the kernel never encodes one), each e2m1 tie and value with its float32
    neighbours, both signs, beyond 6, signed zeros and infinities."""
    every_bf16 = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(torch.bfloat16).float()
    deciding = torch.tensor(E2M1_TIES + (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 7.0))
    x = torch.cat([every_bf16[every_bf16 == every_bf16], neighbours(deciding), -neighbours(deciding),
                   all_finite_float32_samples(gen), torch.tensor([1e30, -1e30, -0.0, float("inf"), -float("inf")])])
    assert torch.equal(encode_on_device(x, 3).to(torch.uint8), codecs.e2m1_encode(x))


@pytest.mark.skipif(not GPU, reason="the conversion instruction is the GPU's (the interpreter decodes the bits)")
def test_e4m3_value_hardware_matches_the_codec():
    """nvfp4's block scale on the GPU: every e4m3 byte decoded by cvt.rn.f16x2.e4m3x2 is the codec's value (NaN for
    0x7F and 0xFF, whatever the payload)."""
    codes = torch.arange(256, dtype=torch.int32)
    got = encode_on_device(codes.float(), 4)
    want = codecs.e4m3_decode(codes.to(torch.uint8), torch.float32)
    assert torch.equal(got.isnan(), want.isnan())
    assert same_bits(got[~want.isnan()], want[~want.isnan()])


def test_block_scale_targets_of_bfloat16_from_the_reciprocal():
    """quantizer._block_scale_target for bfloat16 w: bf16(amax * float32(1 / m)) == bf16(amax / m) (MLX's true
    division, rounded to bfloat16) for every bfloat16 amax, m = 6 (nvfp4, mxfp4) and 448 (mxfp8); the kernel's
    constants are float32(1 / m)."""
    bits = torch.arange(0, 2**15, dtype=torch.int32).to(torch.int16)
    amax = bits.view(torch.bfloat16).float()
    amax = amax[torch.isfinite(amax)]
    from lowbit.backends.triton.quantizer import _RECIPROCAL_448, _RECIPROCAL_6
    for m, constant in ((6.0, _RECIPROCAL_6.value), (448.0, _RECIPROCAL_448.value)):
        reciprocal = torch.ones(()) / m
        assert reciprocal.item() == constant
        product = (amax * reciprocal).to(torch.bfloat16).view(torch.int16)
        assert torch.equal(product, (amax / torch.full_like(amax, m)).to(torch.bfloat16).view(torch.int16))


@triton.jit
def _divide_kernel(a_ptr, s_ptr, out_ptr, safe_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    a = tl.load(a_ptr + offs, mask=mask, other=1.0)
    s = tl.load(s_ptr + offs, mask=mask, other=1.0)
    inv_s = tl.math.div_rn(tl.full(s.shape, 1.0, tl.float32), s)
    tl.store(out_ptr + offs, divide(a, s, inv_s, True), mask=mask)
    tl.store(safe_ptr + offs, fast_division_safe(tl.abs(a), s, inv_s).to(tl.int8), mask=mask)


@pytest.mark.skipif(not GPU, reason="the fast division needs the GPU's fused multiply-add (the interpreter divides)")
def test_fast_division_equals_div_rn(gen):
    """The affine quantize kernel's division from the divisor's reciprocal (encode.divide) has div_rn's bits wherever
    fast_division_safe holds: quotients at, and one or two float32 steps beside, every code boundary k + 1/2 of
    8-bit codes (and e2m1's), for divisors of 2**-59 to 2**90 and every mantissa, and random operands (of which
    those with |a| < 2**-100 only need a quotient that rounds to code 0)."""
    n = 200000
    s = torch.ldexp(1 + torch.rand(n, generator=gen, dtype=torch.float64),
                    torch.randint(-59, 90, (n,), generator=gen)).float()
    s = torch.where(torch.rand(n, generator=gen) < 0.5, s, -s)
    s[:1000] = torch.ldexp(torch.tensor(2.0 - 2**-23), torch.arange(1000) % 60 - 30).float()  # all-ones mantissas
    boundary = torch.cat([torch.arange(256) + 0.5, torch.tensor(E2M1_TIES)]).double()
    h = boundary[torch.randint(0, len(boundary), (n,), generator=gen)].float()
    step = torch.randint(-2, 3, (n,), generator=gen)
    quotient = h.clone()
    for _ in range(2):  # walk |step| float32 steps from the boundary
        quotient = torch.where(step > 0, torch.nextafter(quotient, torch.full_like(quotient, 1e9)), quotient)
        quotient = torch.where(step < 0, torch.nextafter(quotient, torch.full_like(quotient, -1e9)), quotient)
        step = step - step.sign()
    a = (quotient.double() * s.double()).float()  # a / s lands at or next to the boundary
    random_a = all_finite_float32_samples(gen, 2 * n)[:n]
    random_s = all_finite_float32_samples(gen, 2 * n)[:n]
    a, s = torch.cat([a, random_a[: len(random_s)]]), torch.cat([s, random_s[: len(random_a)]])
    a, s = a.to(DEVICE), s.to(DEVICE)
    out, safe = torch.empty_like(a), torch.empty(a.shape, dtype=torch.int8, device=DEVICE)
    _divide_kernel[(triton.cdiv(a.numel(), 4096),)](a, s, out, safe, a.numel(), BLOCK=4096)
    safe = safe.bool()
    assert safe[:n].all()  # (the crafted cases are all in range)
    exact = safe & (a.abs() >= 2.0**-100)
    assert same_bits(out[exact], (a / s)[exact])  # torch's float32 division on the GPU is IEEE
    assert (out[safe & ~exact].abs() < 2.0**-40).all()  # tiny quotients: code 0 either way


# --- the GPU's e2m1 word encoder (inline PTX), run by a small interpreter of its own text -------------------------

def e2m1_words_emulated(g: torch.Tensor, multiplier: torch.Tensor, encode: torch.Tensor | None = None) -> torch.Tensor:
    """The words of encode._E2M1_WORD_ASM for g (N, 8) float32 (bfloat16 values) and multiplier (N,) float32; with
    `encode` (N,) float32, those of _E2M1_WORD_SCALED_ASM."""
    from lowbit.backends.triton.encode import _E2M1_WORD_ASM, _E2M1_WORD_SCALED_ASM
    m = f32_bits(multiplier.float().contiguous())
    operands = {f"${8 + i}": f32_bits(g[:, i].float().contiguous()) for i in range(8)}
    operands.update({f"${16 + i}": m for i in range(8)})
    if encode is None:
        return run_ptx(_E2M1_WORD_ASM.value, operands)["$0"]
    e = f32_bits(encode.float().contiguous())
    operands.update({f"${24 + i}": e for i in range(8)})
    return run_ptx(_E2M1_WORD_SCALED_ASM.value, operands)["$0"]


def _words_of_codes(codes: torch.Tensor) -> torch.Tensor:
    """(N, 8) nibbles -> (N,) little-endian words (value j at bits 4j)."""
    return sum(codes[:, j].to(torch.int64) << (4 * j) for j in range(8))


def _every_bfloat16_in_eights(gen) -> torch.Tensor:
    """Every finite bfloat16 value once, in a random order, as rows of 8 (as float32)."""
    bits = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16)
    v = bits.view(torch.bfloat16).float()
    v = v[torch.isfinite(v)]
    v = v[torch.randperm(len(v), generator=gen)]
    return torch.cat([v, v[: (-len(v)) % 8]]).reshape(-1, 8)


def test_e2m1_word_asm_nvfp4_matches_the_codec(gen):
    """nvfp4 (no tensor scale) on the GPU: e2m1(bf16(g * div_rn(1, s))) gives the codes of the CPU path's
    e2m1(bf16(g / s)) for every bfloat16 g and every e4m3 block scale s (the product never crosses an e2m1 decision
    that the quotient does not), and the PTX's lanes, sign and packing are right: its own text, interpreted."""
    g = _every_bfloat16_in_eights(gen)
    scales = _every_e4m3_scale()
    for chunk in scales.split(16):
        gs = g.repeat(len(chunk), 1)
        s = chunk.repeat_interleave(len(g))
        got = e2m1_words_emulated(gs, torch.ones_like(s) / s)
        quotient = (gs.to(torch.bfloat16) / s[:, None].to(torch.bfloat16)).float()  # lowbit.formats.nvfp4's
        assert torch.equal(got, _words_of_codes(codecs.e2m1_encode(quotient)))
    assert torch.equal(e2m1_words_emulated(g, torch.zeros(len(g))), torch.zeros(len(g), dtype=torch.int64))  # unused


def _every_e4m3_scale() -> torch.Tensor:
    return codecs.e4m3_decode(torch.arange(1, 127, dtype=torch.uint8), torch.float32)  # every positive finite


def test_bf16_of_the_reciprocal_product_is_the_bf16_quotient():
    """The claim that nvfp4's GPU words rest on: bf16(g * div_rn(1, s)) == bf16(g / s) (lowbit.formats.nvfp4's
    quotient, rounded to bfloat16) for every bfloat16 g and every e4m3 block scale s of either sign. (A quotient
    rounds differently only within a float32 ulp or so of a bfloat16 midpoint, and g / s, with 8 and 4 significant
    bits, never comes that close to one without being it.) So the tensor scale's product q = bf16(...) * encode is
    the CPU path's q for any float32 encode factor."""
    bits = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16)
    g = bits.view(torch.bfloat16)
    g = g[torch.isfinite(g)]
    for s in torch.cat([_every_e4m3_scale(), -_every_e4m3_scale()]):
        product = (g.float() * (torch.ones(()) / s)).to(torch.bfloat16)
        assert torch.equal(product.view(torch.int16), (g / s.to(torch.bfloat16)).view(torch.int16)), float(s)


def _ties_and_neighbours_of(p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(p, encode) pairs whose float32 product p * encode lands on, or one or two float32 steps beside, every e2m1
    decision point (ties and saturation) of either sign, for each p (float32)."""
    points = torch.tensor(E2M1_TIES + (6.0, 7.0), dtype=torch.float64)
    encodes = (points[None, :] / p.double()[:, None]).float()  # (P, T): p * encode at or next to the point
    out = [encodes]
    for direction in (1e30, -1e30):
        e = encodes
        for _ in range(2):
            e = torch.nextafter(e, torch.full_like(e, direction))
            out.append(e)
    encodes = torch.stack(out, -1).reshape(len(p), -1)
    return p[:, None].expand_as(encodes).reshape(-1), encodes.reshape(-1)


def test_e2m1_word_asm_tensor_scale_matches_the_codec(gen):
    """nvfp4 with a tensor scale on the GPU (e2m1_words_bf16_scaled's PTX text, interpreted): e2m1(bf16(g *
    div_rn(1, s)) * encode) is the CPU path's e2m1(bf16(g / s) * encode), for every bfloat16 g and e4m3 scale with
    a few encode factors (2688 / amax of typical, tiny and huge tensors, negative, and 0 for unused groups), and for
    products on and beside every e2m1 decision point: every bfloat16 p times the encode factors that put p * encode
    there (the round-to-odd step is what keeps those exact)."""
    g = _every_bfloat16_in_eights(gen)
    scales = _every_e4m3_scale()
    for encode in (2688 / 0.37, 1.0, 2688 / 3e-30, 2688 / 7e33, -2688 / 5.0):
        encode = torch.tensor(encode, dtype=torch.float32)
        for chunk in scales.split(32):
            gs = g.repeat(len(chunk), 1)
            s = chunk.repeat_interleave(len(g))
            got = e2m1_words_emulated(gs, torch.ones_like(s) / s, encode.expand(len(s)))
            quotient = (gs.to(torch.bfloat16) / s[:, None].to(torch.bfloat16)).float()  # lowbit.formats.nvfp4's
            assert torch.equal(got, _words_of_codes(codecs.e2m1_encode(quotient * encode))), float(encode)
    zeros = torch.zeros(len(g))
    assert torch.equal(e2m1_words_emulated(g, zeros, zeros), torch.zeros(len(g), dtype=torch.int64))  # unused
    p = g.reshape(-1)
    p = p[p != 0]
    p, encode = _ties_and_neighbours_of(p)
    finite = torch.isfinite(encode)
    p, encode = p[finite], encode[finite]
    p = torch.cat([p, -p, p])
    encode = torch.cat([encode, encode, -encode])
    n = len(p) // 8 * 8
    rows = p[:n].reshape(-1, 8)
    e = encode[:n].reshape(-1, 8)
    for lane in range(8):  # one encode factor per row: each lane's factor in turn
        got = e2m1_words_emulated(rows, torch.ones(len(rows)), e[:, lane])
        assert torch.equal(got, _words_of_codes(codecs.e2m1_encode(rows * e[:, lane : lane + 1]))), lane


def test_e2m1_word_asm_mxfp4_matches_the_codec(gen):
    """mxfp4 on the GPU: every bfloat16 value times every e8m0 scale's 2**(127 - byte), encoded by the PTX's own
    text (interpreted), gives lowbit.formats.mx's codes."""
    from lowbit.formats import mx  # noqa: F401  (the arithmetic mirrored: g.float() * exp2(127 - byte))
    g = _every_bfloat16_in_eights(gen)
    scale_bytes = torch.arange(0, 255, dtype=torch.float32)
    for chunk in scale_bytes.split(32):
        gs = g.repeat(len(chunk), 1)
        m = torch.exp2(-(chunk - 127)).repeat_interleave(len(g))
        got = e2m1_words_emulated(gs, m)
        assert torch.equal(got, _words_of_codes(codecs.e2m1_encode(gs * m[:, None])))


@pytest.mark.parametrize("mode, gs", [("nvfp4", 16), ("mxfp4", 32)])
def test_fp4_word_path_and_its_fallbacks_give_the_same_bytes(monkeypatch, mode, gs, gen):
    """The fp4 formats' bfloat16 weights take e2m1_words_bf16 on the GPU only where a thread holds whole 16-byte
    rows of w (quantizer._words_path); unaligned, strided and small-tile inputs take the portable encoder. Both
    give the CPU path's bytes."""
    from lowbit.backends.triton import quantizer
    base = hard_weight(24, 8 * 64 + 16, gs, torch.bfloat16, gen).to(DEVICE)
    cases = {"contiguous": base[:, : 8 * 64].contiguous(), "unaligned start": base[:, 1: 1 + 8 * 64],
             "row stride not a multiple of 16": base[:, : 8 * 64 + 8].contiguous()[:, : 8 * 64],
             "column stride 2": base[:, : 8 * 64].contiguous()[:, ::2]}
    for name, w in cases.items():
        words = quantizer._words_path(w.reshape(-1, w.shape[-1]), mode, None, 8, 256, 2)
        if name == "contiguous":
            assert words == GPU
        else:
            assert not words
        ours, theirs = both_backends(monkeypatch, lambda: lowbit.quantize(w, gs, 4, mode))
        for a, b in zip(ours, theirs):
            assert same_bits(a, b.to(DEVICE)), name
    assert not quantizer._words_path(base[:, :256].contiguous(), mode, None, 4, 2 * gs, 4)  # 2 values a thread
