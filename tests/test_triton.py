"""The Triton kernels: on the GPU when there is one, else interpreted on CPU tensors (TRITON_INTERPRET=1, small
shapes). Every path against the float64 oracle `x @ dequantize(w).T`, and rows bit-identical across batch sizes.
Under the interpreter the weights are quantized by the torch reference (see `reference_quantize`)."""

import contextlib
import os

import pytest
import torch
from conftest import dequantize_f64, same_bits
from conftest import quantize3 as quantize3_by_backend

import lowbit
from lowbit.formats import dequantize_groups, quantize_groups

triton = pytest.importorskip("triton")
from lowbit.backends.triton.qmm import forget_plans, tuned  # noqa: E402
from lowbit.backends.triton.reduction import block_k  # noqa: E402
GPU = torch.cuda.is_available()
DEVICE = "cuda" if GPU else "cpu"
if not GPU and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("no GPU and TRITON_INTERPRET is not set", allow_module_level=True)

FORMATS = [("affine", 64, 4), ("affine", 32, 3), ("affine", 128, 6), ("affine", 32, 1), ("affine", 64, 8),
           ("affine", 64, 2), ("affine", 32, 5),
           ("mxfp4", 32, 4), ("mxfp8", 32, 8), ("nvfp4", 16, 4)]
FP_MODES = [f for f in FORMATS if f[0] != "affine"]


@pytest.fixture(autouse=True)
def triton_backend(monkeypatch):
    monkeypatch.setenv("LOWBIT_BACKEND", "triton")
    yield
    forget_plans()  # (a test's tuning knobs must not outlive it)


def reference_quantize():
    """Within, under the interpreter, lowbit.quantize runs the torch reference; on the GPU, the quantize kernel.
    These tests' subject is the matmul kernels, whose oracle dequantizes the same weights whoever quantized them;
    the quantize kernel's bytes equal the reference's (test_triton_quantize: every format, dtype and edge case),
    and the interpreter runs that kernel at ~60 us a value (its NaN-propagating group max is a value-by-value
    Python loop): it was over half of this file's interpreted time. Activations (qqmm) still go through the
    kernel, against an oracle of their own."""
    return contextlib.nullcontext() if GPU else tuned(LOWBIT_BACKEND="cpu")


def quantize3(*args, **kwargs):
    """conftest.quantize3 for the weights of these tests (see `reference_quantize`)."""
    with reference_quantize():
        return quantize3_by_backend(*args, **kwargs)


def quantize(*args, **kwargs):
    """lowbit.quantize for the weights of these tests (see `reference_quantize`)."""
    with reference_quantize():
        return lowbit.quantize(*args, **kwargs)


def tune(monkeypatch, name, value):
    """Set a LOWBIT_* tuning knob; the kernels' cached plans read it again."""
    if value is None:
        monkeypatch.delenv(name)
    else:
        monkeypatch.setenv(name, value)
    forget_plans()


def randn(*shape, gen, dtype=torch.float32, scale=1.0):
    return (torch.randn(*shape, generator=gen) * scale).to(device=DEVICE, dtype=dtype)


def rel_err(got, ref):
    return ((got.double() - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()


def tol(dtype):
    return 1e-3 if dtype == torch.float32 else 1e-2


def odd_k(gs):
    """A K that is a multiple of the group size and, where the group size allows, not of the 64-wide K block."""
    return gs * 9 if gs < 128 else gs * 3


@pytest.mark.parametrize("mode, gs, bits", FORMATS)
@pytest.mark.parametrize("n", [1, 3, 5, 7] if not GPU else [1, 2, 3, 5, 7, 67, 4096])
def test_small_n_and_odd_k(mode, gs, bits, n, gen):
    """Bug report 1 (N < 8 used the raw scale byte) and K-tail bugs (K % 64 != 0), M = 1 and 2."""
    k = odd_k(gs)
    q = quantize3(randn(n, k, gen=gen, scale=k**-0.5), gs, bits, mode)
    w_hat = dequantize_f64(q, gs, bits, mode).to(DEVICE)
    for m in (1, 2):
        x = randn(m, k, gen=gen, dtype=torch.bfloat16)
        y = lowbit.quantized_matmul(x, *q, True, gs, bits, mode)
        assert y.device.type == DEVICE
        assert rel_err(y, x.double() @ w_hat.T) < tol(x.dtype)


@pytest.mark.parametrize("mode, gs, bits", FORMATS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_transpose_false_and_dtypes(mode, gs, bits, dtype, gen):
    k, n = 2 * gs + 64, 3 * gs
    q = quantize3(randn(k, n, gen=gen, scale=k**-0.5), gs, bits, mode)
    x = randn(3, k, gen=gen, dtype=dtype)
    y = lowbit.quantized_matmul(x, *q, False, gs, bits, mode)
    assert rel_err(y, x.double() @ dequantize_f64(q, gs, bits, mode).to(DEVICE)) < tol(dtype)


@pytest.mark.parametrize("mode, gs, bits", FORMATS)
def test_stride0_batched_weight_small_m(mode, gs, bits, gen):
    """Bug report 4: expand()ed (stride-0) weight batch dims with M = 2..3, and a non-contiguous x."""
    k = 2 * gs
    q = quantize3(randn(2, 1, 24, k, gen=gen, scale=k**-0.5), gs, bits, mode)
    expanded = tuple(None if t is None else t.expand(2, 3, *t.shape[2:]) for t in q)
    w_hat = dequantize_f64(q, gs, bits, mode).to(DEVICE)
    for m in (2, 3):
        x = randn(2, 3, m, 2 * k, gen=gen)[..., ::2]
        y = lowbit.quantized_matmul(x, *expanded, True, gs, bits, mode)
        assert rel_err(y, x.double() @ w_hat.transpose(-1, -2)) < 1e-3


INVARIANCE_LENGTHS = (1, 2, 3, 8, 15, 16, 17, 33) if not GPU else (
    1, 2, 3, 4, 5, 6, 7, 8, 9, 15, 16, 17, 31, 32, 33, 63, 64, 65, 127, 128, 129, 255, 256, 257, 1024, 4096)


@pytest.mark.parametrize("mode, gs, bits", FORMATS)
def test_rows_bit_identical_across_batch_sizes(mode, gs, bits, gen):
    """Batch invariance: rows of qmm(x[-L:]) equal rows of qmm(x)[-L:] bit for bit, across every dispatch
    boundary, and a row alone equals the same row inside the batch."""
    n, k = (40, 256) if not GPU else (1000, 4096)
    q = quantize3(randn(n, k, gen=gen, scale=k**-0.5, dtype=torch.bfloat16), gs, bits, mode)
    x = randn(max(INVARIANCE_LENGTHS) + 7, k, gen=gen, dtype=torch.bfloat16)
    whole = lowbit.quantized_matmul(x, *q, True, gs, bits, mode)
    for length in INVARIANCE_LENGTHS:
        part = lowbit.quantized_matmul(x[-length:], *q, True, gs, bits, mode)
        assert torch.equal(part, whole[-length:]), length
    assert rel_err(whole, x.double() @ dequantize_f64(q, gs, bits, mode).to(DEVICE).T) < 1e-2


PACKED_FORMATS = [("affine", 64, 4, torch.bfloat16), ("affine", 32, 4, torch.float16),
                  ("affine", 64, 8, torch.bfloat16), ("affine", 128, 8, torch.float16),
                  ("mxfp4", 32, 4, torch.bfloat16), ("nvfp4", 16, 4, torch.bfloat16),
                  ("affine", 64, 3, torch.bfloat16), ("mxfp8", 32, 8, torch.bfloat16),
                  ("affine", 32, 3, torch.float16), ("affine", 32, 5, torch.bfloat16),
                  ("affine", 128, 6, torch.bfloat16), ("affine", 64, 6, torch.float16),
                  ("affine", 64, 2, torch.bfloat16), ("affine", 32, 1, torch.bfloat16)]


@pytest.mark.parametrize("mode, gs, bits, dtype", PACKED_FORMATS)
@pytest.mark.parametrize("transpose", [True, False])
def test_kernels_use_exactly_the_dequantized_values(monkeypatch, mode, gs, bits, dtype, transpose, gen):
    """One-hot rows of x pick single weights: the output is dequantize(w) itself, bit for bit, on the decode path
    (M = 8) and on the prefill path (M = K), which decode weights with the packed (inline PTX) decoders on the GPU."""
    k, n = 256, 128
    w = randn(n, k, gen=gen, dtype=dtype) if transpose else randn(k, n, gen=gen, dtype=dtype)
    q = quantize3(w, gs, bits, mode)
    w_hat = lowbit.dequantize(*q, gs, bits, mode, dtype=dtype)
    eye = torch.eye(k, dtype=dtype, device=DEVICE)
    expected = w_hat if transpose else w_hat.T
    tune(monkeypatch, "LOWBIT_QMM_PREFILL_M", "128")
    assert same_bits(lowbit.quantized_matmul(eye[40:48], *q, transpose, gs, bits, mode), expected[:, 40:48].T)
    assert same_bits(lowbit.quantized_matmul(eye, *q, transpose, gs, bits, mode), expected.T)


def test_mxfp8_pair_decoder_text_gives_the_codec_values_for_every_code_and_scale(gen):
    """The packed mxfp8 decoder's PTX (decode.E4M3_PAIR_ASM), run by the tests' PTX emulator (no GPU needed): every
    pair of e4m3 codes, with other codes in the bytes between, times every e8m0 scale (in bf16 as packed_planes
    forms it: bits e << 7, byte 0 the subnormal 2**-127) gives the bits of lowbit's codec product e4m3 * 2**(e - 127)
    rounded once to bf16 in both lanes; the NaN codes 0x7F / 0xFF give NaN, and so does code 0 times the infinite
    scale 255."""
    from ptx_emulator import run_ptx

    from lowbit.backends.triton.decode import E4M3_PAIR_ASM
    from lowbit.formats.codecs import e4m3_decode, e8m0_decode

    codes = torch.arange(256, dtype=torch.int64)
    lo, hi = codes.repeat_interleave(256), codes.repeat(256)  # every (low lane, high lane) pair
    between = torch.randint(0, 256, (2, len(lo)), generator=gen)
    words = lo | (between[0] << 8) | (hi << 16) | (between[1] << 24)
    for e in range(256):
        bits = 0x40 if e == 0 else e << 7
        out = run_ptx(E4M3_PAIR_ASM.value, {"$2": words, "$3": torch.tensor(bits | (bits << 16))})
        scale = e8m0_decode(torch.tensor([e], dtype=torch.uint8), torch.float32)
        for lane, code in (("$0", lo), ("$1", hi)):
            got = out[lane].to(torch.int16).view(torch.bfloat16)
            want = (e4m3_decode(code.to(torch.uint8), torch.float32) * scale).to(torch.bfloat16)
            assert same_bits(got[~want.isnan()], want[~want.isnan()]), e
            assert got[want.isnan()].isnan().all(), e
    assert e4m3_decode(torch.tensor([0x7F, 0xFF], dtype=torch.uint8), torch.float32).isnan().all()


@pytest.mark.parametrize("slot", range(4))
def test_fp4_slot_decoder_text_gives_the_codec_values_for_every_code_and_scale(slot, gen):
    """The packed e2m1 decoder's PTX for code slot `slot` (decode.e2m1_slot_asm), run by the tests' PTX emulator (no
    GPU needed): every pair of e2m1 codes in slots `slot` and `slot` + 4 of a word, with random codes in the other
    slots, times every mxfp4 scale (e8m0 in bf16 as packed_planes forms it: bits e << 7, byte 0 the subnormal
    2**-127) and every finite nvfp4 block scale (the e4m3 value in bf16) gives the bits of lowbit's codec product
    rounded once to bf16 in both lanes (NaN scales: NaN)."""
    from ptx_emulator import run_ptx

    from lowbit.backends.triton.decode import e2m1_slot_asm
    from lowbit.formats.codecs import e2m1_decode, e4m3_decode, e8m0_decode

    text = e2m1_slot_asm(slot)
    codes = torch.arange(16, dtype=torch.int64)
    lo, hi = codes.repeat_interleave(16), codes.repeat(16)  # every (slot, slot + 4) pair
    others = torch.randint(0, 2**32, (len(lo),), generator=gen)
    at = 4 * slot
    words = (others & ~((0xF << at) | (0xF << (at + 16)))) | (lo << at) | (hi << (at + 16))
    e8m0 = e8m0_decode(torch.arange(256, dtype=torch.int64).to(torch.uint8), torch.float32)
    e4m3 = e4m3_decode(torch.arange(256, dtype=torch.int64).to(torch.uint8), torch.float32)
    scales = [(scale, 0x40 if e == 0 else e << 7) for e, scale in enumerate(e8m0.tolist())]
    scales += [(scale, int(torch.tensor([scale]).to(torch.bfloat16).view(torch.int16)) & 0xFFFF)
               for scale in e4m3.tolist() if scale == scale]
    for scale, bits in scales:
        out = run_ptx(text, {"$2": words, "$3": torch.tensor(bits | (bits << 16))})
        for lane, code in (("$0", lo), ("$1", hi)):
            got = out[lane].to(torch.int16).view(torch.bfloat16)
            want = (e2m1_decode(code.to(torch.uint8), torch.float32) * scale).to(torch.bfloat16)
            assert same_bits(got[~want.isnan()], want[~want.isnan()]), (slot, scale)
            assert got[want.isnan()].isnan().all(), (slot, scale)


@pytest.mark.skipif(not GPU, reason="the packed decoders are inline PTX (the CPU test above runs their text)")
@pytest.mark.parametrize("path", ["decode", "prefill"])
def test_mxfp8_kernels_decode_every_code_and_scale(monkeypatch, path, gen):
    """mxfp8 weights holding every e4m3 code under every e8m0 scale byte (row r: scale byte r), plus rows with one
    NaN code, through the decode kernel (16 rows of x a call) and the prefill kernel: one-hot rows of x pick single
    weights, so each output is the weight's value exactly, and rows holding a NaN code or an infinite value come out
    NaN (0 * NaN) or infinite exactly where the float64 product of the same one-hot x and dequantized w does."""
    k = 256
    finite = torch.tensor([c for c in range(256) if c & 0x7F != 0x7F] + [0, 0])
    codes = torch.stack([finite[torch.randperm(k, generator=gen)] for _ in range(264)])
    codes[256 + torch.arange(8), torch.randint(0, k, (8,), generator=gen)] = torch.tensor([0x7F, 0xFF] * 4)
    w_q = codes.to(torch.uint8).view(torch.int32).view(torch.uint32).to(DEVICE)
    scale_bytes = torch.cat([torch.arange(256), torch.randint(100, 140, (8,), generator=gen)])
    scales = scale_bytes[:, None].expand(264, k // 32).to(torch.uint8).contiguous().to(DEVICE)
    eye = torch.eye(k, dtype=torch.bfloat16, device=DEVICE)
    tune(monkeypatch, "LOWBIT_QMM_PREFILL_M", "1" if path == "prefill" else str(10**9))
    if path == "prefill":
        out = lowbit.quantized_matmul(eye, w_q, scales, None, True, 32, 8, "mxfp8")
    else:
        out = torch.cat([lowbit.quantized_matmul(eye[j:j + 16], w_q, scales, None, True, 32, 8, "mxfp8")
                         for j in range(0, k, 16)])
    w_hat = lowbit.dequantize(w_q, scales, None, 32, 8, "mxfp8", dtype=torch.bfloat16).double().cpu()
    expected = eye.cpu().double() @ w_hat.T
    assert expected[:, 256:].isnan().all() and expected[:, :255].isfinite().any()
    torch.testing.assert_close(out.cpu().double(), expected, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("magnitude", [1e-30, 1e-3, 1e30])
@pytest.mark.parametrize("bits", [4, 3, 6, 1])
def test_packed_affine_exact_at_extreme_scales(magnitude, bits, gen):
    """The bf16 affine decoders round code * scale with one fma on (128 + code) * scale - 128 * scale: exact for
    subnormal and huge scales too (the dequantized values themselves come out of an identity product)."""
    k, n = 256, 64
    w = (randn(n, k, gen=gen, dtype=torch.float32) * magnitude).to(torch.bfloat16)
    q = quantize3(w, 64, bits, "affine")
    w_hat = lowbit.dequantize(*q, 64, bits, "affine", dtype=torch.bfloat16)
    eye = torch.eye(k, dtype=torch.bfloat16, device=DEVICE)
    assert same_bits(lowbit.quantized_matmul(eye[:8], *q, True, 64, bits, "affine"), w_hat[:, :8].T)
    assert same_bits(lowbit.quantized_matmul(eye[100:116], *q, True, 64, bits, "affine"), w_hat[:, 100:116].T)


@pytest.mark.skipif(not GPU, reason="the packed decoders are inline PTX")
@pytest.mark.parametrize("bits", [1, 2, 3, 5, 6])
@pytest.mark.parametrize("gs, dtype", [(32, torch.bfloat16), (64, torch.float16), (128, torch.bfloat16)])
def test_pack_pair_decoders_give_the_float32_decoders_bits(monkeypatch, bits, gs, dtype, gen):
    """Affine 1/2/3/5/6-bit weights decode by pack pairs (inline PTX), or, under LOWBIT_QMM_PACKED=0, by the float32
    decoders: the same values in the same canonical order, so the same bits. Decode tiles (M = 1 and 16, x reordered
    before the launch or in the kernel), the prefill path and gathered products; K ends one group short of a K
    block's end and runs over two splits; x is strided."""
    k = 13 * block_k(bits, gs, True) - gs
    w = quantize3(randn(3, 96, k, gen=gen, scale=k**-0.5, dtype=dtype), gs, bits, "affine")
    w0 = tuple(t[0] for t in w)
    x = randn(300, 2 * k, gen=gen, dtype=dtype)[:, ::2]
    idx = torch.randint(0, 3, (5, 2), generator=gen).to(DEVICE)

    def products():
        tune(monkeypatch, "LOWBIT_QMM_PREFILL_M", str(10**9))
        outputs = [lowbit.quantized_matmul(x[:m], *w0, True, gs, bits, "affine") for m in (1, 16)]
        outputs.append(lowbit.gather_qmm(x[:5, None, None], *w, rhs_indices=idx, transpose=True, group_size=gs,
                                         bits=bits, mode="affine"))
        tune(monkeypatch, "LOWBIT_QMM_X_IN_KERNEL", "1")
        outputs += [lowbit.quantized_matmul(x[:m], *w0, True, gs, bits, "affine") for m in (1, 16)]
        tune(monkeypatch, "LOWBIT_QMM_X_IN_KERNEL", None)
        tune(monkeypatch, "LOWBIT_QMM_PREFILL_M", "1")
        outputs.append(lowbit.quantized_matmul(x, *w0, True, gs, bits, "affine"))
        return outputs

    packed = products()
    tune(monkeypatch, "LOWBIT_QMM_PACKED", "0")
    float32 = products()
    assert rel_err(packed[1], x[:16].double() @ dequantize_f64(w0, gs, bits, "affine").to(DEVICE).T) < 1e-2
    assert all(same_bits(a, b) for a, b in zip(packed, float32, strict=True))


@pytest.mark.parametrize("mode, gs, bits, dtype", PACKED_FORMATS)
@pytest.mark.parametrize("transpose", [True, False])
def test_prefill_path_matches_oracle_and_decode(monkeypatch, mode, gs, bits, dtype, transpose, gen):
    """The prefill path (dequantized tiles + canonical GEMM) against the oracle and, bit for bit on the GPU, against
    the decode kernel, with K not a multiple of the K block and split partials."""
    k, m = (odd_k(gs) * 4, 40) if GPU else (odd_k(gs), 20)
    n = (200 if GPU else 40) if transpose else 256
    shape = (n, k) if transpose else (k, n)
    q = quantize3(randn(*shape, gen=gen, scale=k**-0.5, dtype=dtype), gs, bits, mode)
    w_hat = dequantize_f64(q, gs, bits, mode).to(DEVICE)
    x = randn(m, k, gen=gen, dtype=dtype)
    tune(monkeypatch, "LOWBIT_QMM_PREFILL_M", "1")
    prefill = lowbit.quantized_matmul(x, *q, transpose, gs, bits, mode)
    tune(monkeypatch, "LOWBIT_QMM_PREFILL_M", str(10**9))
    decode = lowbit.quantized_matmul(x, *q, transpose, gs, bits, mode)
    assert rel_err(prefill, x.double() @ (w_hat.T if transpose else w_hat)) < 1e-2
    if GPU:
        assert torch.equal(prefill, decode)
    else:  # the interpreter's numpy dots round by tile shape
        assert rel_err(prefill, decode.double()) < 1e-2


@pytest.mark.skipif(not GPU, reason="the packed decoders are inline PTX")
@pytest.mark.parametrize("mode, gs, bits, dtype", PACKED_FORMATS[:6])
@pytest.mark.parametrize("k_blocks", [13, 22])
def test_blocks_per_step_do_not_change_bits(monkeypatch, mode, gs, bits, dtype, k_blocks, gen):
    """The decode kernel may take several K blocks a step (one wider dot): the same k16 MMAs in the same order, so
    the same bits; steps that cross a split's end or K's end read zeros there. 13 blocks make two splits of 7 and
    6 blocks; K ends one group short of the last block's end."""
    k = k_blocks * block_k(bits, gs, True) - gs
    q = quantize3(randn(512, k, gen=gen, scale=k**-0.5, dtype=dtype), gs, bits, mode)
    w_hat = dequantize_f64(q, gs, bits, mode).to(DEVICE)
    x = randn(3, k, gen=gen, dtype=dtype)
    outputs = []
    for blocks in ("1", "2", "4"):
        tune(monkeypatch, "LOWBIT_QMM_BLOCKS", blocks)
        outputs.append(lowbit.quantized_matmul(x, *q, True, gs, bits, mode))
    assert rel_err(outputs[0], x.double() @ w_hat.T) < 1e-2
    assert same_bits(outputs[1], outputs[0]) and same_bits(outputs[2], outputs[0])


@pytest.mark.skipif(not GPU, reason="the packed decoders are inline PTX")
@pytest.mark.parametrize("mode, gs, bits, dtype", PACKED_FORMATS[:6])
@pytest.mark.parametrize("blocks", ["1", "2"])
def test_x_reordered_in_the_kernel_or_before_gives_the_same_bits(monkeypatch, mode, gs, bits, dtype, blocks, gen):
    """Decode tiles read x slot-major from a reordered copy or reorder x's natural order per K block in the kernel:
    the same operand, so the same bits. K ends one group short of a block's end; x is strided (every other
    column of a wider tensor) and its rows are gathered, for plain and gathered products."""
    k = 13 * block_k(bits, gs, True) - gs
    w = quantize3(randn(3, 192, k, gen=gen, scale=k**-0.5, dtype=dtype), gs, bits, mode)
    x = randn(5, 2 * k, gen=gen, dtype=dtype)[:, ::2]
    idx = torch.randint(0, 3, (5, 2), generator=gen).to(DEVICE)
    tune(monkeypatch, "LOWBIT_QMM_BLOCKS", blocks)
    outputs = []
    for in_kernel in ("1", "0"):
        tune(monkeypatch, "LOWBIT_QMM_X_IN_KERNEL", in_kernel)
        plain = lowbit.quantized_matmul(x, *(t if t is None else t[0] for t in w), True, gs, bits, mode)
        gathered = lowbit.gather_qmm(x[:, None, None], *w, rhs_indices=idx, transpose=True, group_size=gs, bits=bits,
                                     mode=mode)
        outputs.append((plain, gathered))
    w_hat = dequantize_f64(w, gs, bits, mode).to(DEVICE)
    assert rel_err(outputs[0][0], x.double() @ w_hat[0].T) < 1e-2
    assert same_bits(outputs[0][0], outputs[1][0]) and same_bits(outputs[0][1], outputs[1][1])


@pytest.mark.parametrize("mode, gs, bits", [("affine", 64, 4), ("mxfp4", 32, 4), ("affine", 64, 8), ("nvfp4", 16, 4)])
@pytest.mark.parametrize("transpose", [True, False])
def test_splits_in_the_grid_or_in_one_program_give_the_same_bits(monkeypatch, mode, gs, bits, transpose, gen):
    """A product's canonical split partials are either separate programs (folded by the tile's last one) or one
    program's single K loop, which adds each split's partial to the total at the split's end; the bits are the
    same. Gathered (grouped by expert) and plain products; 13 K blocks make splits of 4, 4, 4 and 1."""
    k = 13 * block_k(bits, gs, transpose)
    n = 64
    w = quantize3(randn(3, *((n, k) if transpose else (k, n)), gen=gen, scale=k**-0.5, dtype=torch.bfloat16),
                  gs, bits, mode)
    x = randn(70, 1, 1, k, gen=gen, dtype=torch.bfloat16)
    idx = torch.randint(0, 3, (70, 2), generator=gen).to(DEVICE)
    outputs = []
    for in_grid in ("1", "0"):
        tune(monkeypatch, "LOWBIT_QMM_SPLIT_IN_GRID", in_grid)
        gathered = lowbit.gather_qmm(x, *w, rhs_indices=idx, transpose=transpose, group_size=gs, bits=bits,
                                     mode=mode)
        plain = lowbit.quantized_matmul(x[:, 0, 0], *(t if t is None else t[0] for t in w), transpose, gs, bits, mode)
        outputs.append((gathered, plain))
    w_hat = dequantize_f64(w, gs, bits, mode).to(DEVICE)
    w_hat = w_hat if transpose else w_hat.transpose(-2, -1)
    ref = torch.einsum("tk,tenk->ten", x[:, 0, 0].double(), w_hat[idx])
    assert rel_err(outputs[0][0][:, :, 0], ref) < 1e-2
    assert same_bits(outputs[1][0], outputs[0][0]) and same_bits(outputs[1][1], outputs[0][1])


@pytest.mark.parametrize("mode, gs, bits", [("affine", 64, 4), ("mxfp4", 32, 4), ("affine", 64, 8)])
def test_untransposed_rows_bit_identical_across_batch_sizes(mode, gs, bits, gen):
    """transpose=False (x @ w): rows of qmm(x[-L:]) equal rows of qmm(x)[-L:] across the dispatch boundaries."""
    n, k = (64, 256) if not GPU else (1024, 4096)
    q = quantize3(randn(k, n, gen=gen, scale=k**-0.5, dtype=torch.bfloat16), gs, bits, mode)
    x = randn(max(INVARIANCE_LENGTHS) + 3, k, gen=gen, dtype=torch.bfloat16)
    whole = lowbit.quantized_matmul(x, *q, False, gs, bits, mode)
    for length in INVARIANCE_LENGTHS:
        assert torch.equal(lowbit.quantized_matmul(x[-length:], *q, False, gs, bits, mode), whole[-length:]), length


@pytest.mark.parametrize("mode, gs, bits", [("affine", 64, 4), ("mxfp4", 32, 4), ("nvfp4", 16, 4)])
def test_gather_qmm_matches_oracle_and_is_invariant(mode, gs, bits, gen):
    k = 128
    experts = quantize3(randn(4, 32, k, gen=gen, scale=k**-0.5), gs, bits, mode)
    x = randn(6, 1, k, gen=gen)
    rhs = torch.tensor([3, 0, 0, 1, 3, 2], device=DEVICE)
    out = lowbit.gather_qmm(x, *experts, torch.arange(6, device=DEVICE), rhs, True, gs, bits, mode)
    w_hat = dequantize_f64(experts, gs, bits, mode).to(DEVICE)
    ref = torch.stack([x[i, 0].double() @ w_hat[j].T for i, j in enumerate(rhs.tolist())])
    assert rel_err(out.reshape(6, -1), ref) < 1e-3
    subset = lowbit.gather_qmm(x, *experts, torch.tensor([4, 1], device=DEVICE), rhs[[4, 1]], True, gs, bits, mode)
    assert torch.equal(subset, out[[4, 1]])


@pytest.mark.parametrize("mode, gs, bits", [("affine", 64, 4), ("mxfp4", 32, 4), ("nvfp4", 16, 4), ("affine", 64, 8)])
def test_moe_routing_grouped_by_expert(monkeypatch, mode, gs, bits, gen):
    """mlx-lm's SwitchGLU call: x (T, 1, 1, K), top-k expert indices (T, k). Rows are grouped by expert inside the
    kernel (or, for few routed rows, run one tile per item); a token's output is bit-identical whoever else is
    routed with it, sorted or not, grouped or not."""
    experts, tokens, top_k, k, n = (8, 24, 2, 128, 64) if not GPU else (32, 300, 4, 512, 256)
    w = quantize3(randn(experts, n, k, gen=gen, scale=k**-0.5, dtype=torch.bfloat16), gs, bits, mode)
    x = randn(tokens, 1, 1, k, gen=gen, dtype=torch.bfloat16)
    idx = torch.stack([torch.randperm(experts, generator=gen)[:top_k] for _ in range(tokens)]).to(DEVICE)
    out = lowbit.gather_qmm(x, *w, rhs_indices=idx, transpose=True, group_size=gs, bits=bits, mode=mode)
    assert out.shape == (tokens, top_k, 1, n)
    w_hat = dequantize_f64(w, gs, bits, mode).to(DEVICE)
    ref = torch.einsum("tk,tenk->ten", x[:, 0, 0].double(), w_hat[idx])
    assert rel_err(out[:, :, 0], ref) < 1e-2
    few = lowbit.gather_qmm(x[5:9], *w, rhs_indices=idx[5:9], transpose=True, group_size=gs, bits=bits, mode=mode)
    assert torch.equal(few, out[5:9])
    one = lowbit.gather_qmm(x[7:8], *w, rhs_indices=idx[7:8], transpose=True, group_size=gs, bits=bits, mode=mode)
    assert torch.equal(one, out[7:8])  # one token: its index arrays are broadcast (stride-0) views
    for group_min_rows in ("1", "100000"):  # every call grouped by expert / every call one tile per item
        tune(monkeypatch, "LOWBIT_GATHER_GROUP_ROWS", group_min_rows)
        assert torch.equal(lowbit.gather_qmm(x[5:9], *w, rhs_indices=idx[5:9], transpose=True, group_size=gs,
                                             bits=bits, mode=mode), few)
    tune(monkeypatch, "LOWBIT_GATHER_GROUP_ROWS", None)
    flat = idx.reshape(-1)
    order = torch.argsort(flat, stable=True)
    sorted_out = lowbit.gather_qmm(x.reshape(tokens, 1, k), *w, lhs_indices=(order // top_k), rhs_indices=flat[order],
                                   transpose=True, group_size=gs, bits=bits, mode=mode, sorted_indices=True)
    assert torch.equal(sorted_out[:, 0], out.reshape(-1, n)[order])


@pytest.mark.parametrize("bits, gs", [(4, 64), (3, 32), (8, 128), (2, 16)])
def test_slot_major_copy_matches_reference(bits, gs, gen):
    """The kernels' x layout (reduction.slot_major): blocks reordered slot-major and zero-padded, from a
    non-contiguous, broadcast x in one pass; the reference is the permutation written with torch views."""
    from lowbit.backends.triton.decode import pack_geometry
    from lowbit.backends.triton.reduction import slot_major
    per_pack = pack_geometry(bits)[0]
    block = block_k(bits, gs, True)
    k = 2 * block + gs  # a padded last block
    x = randn(3, k, 5, gen=gen).transpose(1, 2)[:, 1:2].expand(3, 3, k)  # K stride 5, M stride 0
    padded = torch.nn.functional.pad(x, (0, 3 * block - k))
    reference = padded.reshape(3, 3, 3, block // per_pack, per_pack).transpose(-1, -2).reshape(3, 3, 3 * block)
    assert torch.equal(slot_major(x, bits, block), reference)


def _reference_schedule(rhs, m, n_weights, block_m, bound):
    """The grouped kernel's work list from torch ops (the schedule kernel's first version)."""
    order = torch.argsort(rhs, stable=True)
    rows = (order[:, None] * m + torch.arange(m, device=rhs.device)).reshape(-1)
    counts = torch.bincount(rhs, minlength=n_weights) * m
    tiles = (counts + block_m - 1) // block_m
    tile_end = torch.cumsum(tiles, 0)
    tile = torch.arange(bound, device=rhs.device)
    weight = torch.searchsorted(tile_end, tile, right=True)
    valid = weight < n_weights
    owner = weight.clamp(max=n_weights - 1)
    local = tile - (tile_end - tiles)[owner]
    start = (torch.cumsum(counts, 0) - counts)[owner] + local * block_m
    count = torch.where(valid, (counts[owner] - local * block_m).clamp(0, block_m), 0)
    return rows, weight, start.clamp(max=max(rhs.numel() * m - 1, 0)), count


@pytest.mark.parametrize("n_items, m, n_weights, block_m", [(1, 1, 1, 16), (37, 1, 5, 16), (300, 3, 128, 64),
                                                           (2500, 1, 3, 128), (64, 2, 700, 16), (128, 1, 128, 16),
                                                           (96, 2, 256, 16), (5, 3, 32, 16)])
@pytest.mark.parametrize("one_program", [True, False])
def test_schedule_kernel_matches_reference(n_items, m, n_weights, block_m, one_program, gen):
    """The grouped kernel's work list (schedule.py), by the one-program path for few items (where it applies) and by
    the general one (argsort, counts, schedule_kernel): rows sorted by weight, tiles of one weight each; unused
    weights, weights past every index and more weights than items included."""
    from lowbit.backends.triton.schedule import fits_one_program, schedule, schedule_bound
    if one_program and not fits_one_program(n_items, n_weights):
        pytest.skip("too many items or weights for one program")
    used = max(1, n_weights // 2)
    rhs = torch.randint(0, used, (n_items,), generator=gen).to(DEVICE)
    bound = schedule_bound(n_items * m, n_weights, block_m)
    got = schedule(rhs, m, n_weights, block_m, bound, one_program)
    for g, r in zip(got, _reference_schedule(rhs, m, n_weights, block_m, bound)):
        assert torch.equal(g.long().cpu(), r.long().cpu())


@pytest.mark.skipif(not GPU, reason="the interpreter has no compiled binaries")
def test_repeated_calls_launch_the_cached_binary(monkeypatch, gen):
    """After a signature's first call, launches skip Triton's JITFunction.run (its per-call specialization costs
    more host time than a decode matmul's GPU time) and give the same bits, split partials folded in the kernel."""
    from lowbit.backends.triton import qmm, wgmma_decode

    q = quantize3(randn(256, 2048, gen=gen, dtype=torch.bfloat16), 64, 4, "affine")
    x = randn(3, 2048, gen=gen, dtype=torch.bfloat16)
    first = lowbit.quantized_matmul(x, *q)
    jit_runs = []
    kernels = [qmm.qmm_kernel] + ([wgmma_decode.packed4_decode_kernel] if wgmma_decode.gluon is not None else [])
    for kernel in kernels:  # (on Hopper the Gluon kernel serves this call)
        monkeypatch.setattr(kernel, "run", lambda *a, original=kernel.run, **k: jit_runs.append(1) or original(*a, **k))
    for _ in range(5):
        assert torch.equal(lowbit.quantized_matmul(x.clone(), *q), first)
    assert not jit_runs
    assert rel_err(first, x.double() @ dequantize_f64(q, 64, 4).to(DEVICE).T) < 1e-2


@pytest.mark.skipif(not GPU, reason="CUDA graphs need the GPU")
def test_gather_qmm_captured_in_a_cuda_graph(gen):
    """MoE decode runs under CUDA graphs: gather_qmm (index checks, grouping schedule, kernels) captures and its
    replay equals the eager call for new routing written into the same index tensor."""
    experts, k, n = 16, 256, 128
    w = quantize3(randn(experts, n, k, gen=gen, scale=k**-0.5, dtype=torch.bfloat16), 64, 4)
    x = randn(4, 1, 1, k, gen=gen, dtype=torch.bfloat16)
    idx = torch.randint(0, experts, (4, 2), generator=gen).to(DEVICE)
    lowbit.gather_qmm(x, *w, rhs_indices=idx, transpose=True)  # warm-up: compiles, checks the indices
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = lowbit.gather_qmm(x, *w, rhs_indices=idx, transpose=True)
    idx.copy_(torch.randint(0, experts, (4, 2), generator=gen).to(DEVICE))
    graph.replay()
    assert torch.equal(out, lowbit.gather_qmm(x, *w, rhs_indices=idx, transpose=True))


@pytest.mark.parametrize("tensor_scale", [1e-6, 1.0, 1e6])
def test_nvfp4_global_scale_float16_no_overflow(tensor_scale, gen):
    """Bug report 3: a tiny tensor scale applied after an fp16 matmul overflowed; lowbit applies it in float32."""
    k = 1024 if not GPU else 4096
    w = randn(16, k, gen=gen, scale=tensor_scale)
    g = w.abs().max().float().reshape(1)
    q = quantize3(w, mode="nvfp4", global_scale=g)
    x = randn(2, k, gen=gen, scale=tensor_scale**-0.5 / 64, dtype=torch.float16)
    ref = x.double() @ dequantize_f64(q, mode="nvfp4", global_scale=g).to(DEVICE).T
    y = lowbit.quantized_matmul(x, *q, mode="nvfp4", global_scale=g)
    assert torch.isfinite(y).all() and rel_err(y, ref) < 2e-3


@pytest.mark.parametrize("per_expert", [False, True])
def test_gather_qmm_one_tensor_scale_for_all_experts(per_expert, gen):
    """One nvfp4 tensor scale shared by every expert reaches the kernel as a stride-0 view: each expert must read
    it through its stride (it once read past the one element: garbage for every expert but the first), with and
    without split partials."""
    experts, n = 4, 32
    for k in (64, 2048):  # one K split, several
        w = randn(experts, n, k, gen=gen)
        g = (w.abs().amax((1, 2)) if per_expert else w.abs().max().reshape(1)).float()
        q = [quantize(w[e], mode="nvfp4", global_scale=g[e if per_expert else 0]) for e in range(experts)]
        w_q, scales = torch.stack([t[0] for t in q]), torch.stack([t[1] for t in q])
        w_hat = torch.stack([dequantize_f64((w_q[e], scales[e], None), mode="nvfp4",
                                            global_scale=g[e if per_expert else 0]) for e in range(experts)])
        x = randn(6, 1, k, gen=gen, scale=k**-0.5)
        rhs = torch.tensor([3, 0, 1, 2, 3, 1], device=DEVICE)
        y = lowbit.gather_qmm(x, w_q, scales, None, torch.arange(6, device=DEVICE), rhs, mode="nvfp4",
                              global_scale=g)
        ref = torch.stack([x[i, 0].double() @ w_hat[j].to(DEVICE).T for i, j in enumerate(rhs.tolist())])
        assert rel_err(y[:, 0], ref) < 1e-3, k


FP_GROUPS = {mode: (gs, bits) for mode, gs, bits in FP_MODES}


def fake_quantized_f64(x, mode, global_scale=None):
    """The activation oracle from the formats' torch code: quantize-dequantize in float32 (tensor scale applied)."""
    q = quantize_groups(x, mode, *FP_GROUPS[mode], global_scale)
    return dequantize_groups(*q, None, mode, *FP_GROUPS[mode], torch.float32, global_scale).double()


@pytest.mark.parametrize("mode, gs, bits", FP_MODES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_qqmm_matches_the_fake_quantized_oracle(mode, gs, bits, dtype, gen):
    """qqmm = quantize-dequantize(x) @ dequantize(w).T, any M, every x dtype; gather_qqmm per routed expert."""
    n, k = 67, gs * 9
    w = randn(3, n, k, gen=gen, scale=k**-0.5)
    w_q, scales = quantize(w, mode=mode)
    w_hat = dequantize_f64((w_q, scales, None), mode=mode)
    for m in (1, 5):
        x = randn(m, k, gen=gen, dtype=dtype)
        y = lowbit.qqmm(x, w_q[1], scales[1], mode=mode)
        assert y.dtype == dtype and rel_err(y, fake_quantized_f64(x, mode) @ w_hat[1].T) < tol(dtype)
    x = randn(4, 1, k, gen=gen, dtype=dtype)
    idx = torch.tensor([2, 0, 0, 1], device=DEVICE)
    y = lowbit.gather_qqmm(x, w_q, scales, rhs_indices=idx, mode=mode)
    ref = fake_quantized_f64(x, mode) @ w_hat[idx].transpose(-1, -2)
    assert rel_err(y, ref) < tol(dtype)


@pytest.mark.parametrize("tensor_scale", [1e-6, 1.0, 1e6])
def test_qqmm_float16_tensor_scales_no_overflow(tensor_scale, gen):
    """nvfp4 qqmm with float16 activations and tensor scales from 1e-6 to 1e6 on both operands: finite, and within
    tolerance of the float64 oracle (the scales multiply the float32 accumulator before the cast)."""
    k = 1024
    w = randn(16, k, gen=gen, scale=tensor_scale)
    x = randn(3, k, gen=gen, scale=1 / tensor_scale, dtype=torch.float16).clamp(-6e4, 6e4)
    gw, gx = w.abs().max().float().reshape(1), x.abs().max().float().reshape(1)
    w_q, scales = quantize(w, mode="nvfp4", global_scale=gw)
    w_hat = dequantize_f64((w_q, scales, None), mode="nvfp4", global_scale=gw).to(DEVICE)
    y = lowbit.qqmm(x, w_q, scales, mode="nvfp4", global_scale_x=gx, global_scale_w=gw)
    ref = fake_quantized_f64(x, "nvfp4", gx) @ w_hat.T
    assert y.dtype == torch.float16 and torch.isfinite(y).all() and rel_err(y, ref) < 1e-2


def test_triton_matches_cpu_backend(monkeypatch, gen):
    """The kernel and the CPU reference agree on the same inputs (tolerance: different reduction orders)."""
    monkeypatch.setenv("LOWBIT_BACKEND", "cpu")
    q = quantize3(randn(48, 256, gen=gen, scale=1 / 16).cpu(), 64, 4)
    x = randn(5, 256, gen=gen).cpu()
    expected = lowbit.quantized_matmul(x, *q)
    monkeypatch.setenv("LOWBIT_BACKEND", "triton")
    got = lowbit.quantized_matmul(x.to(DEVICE), *(t.to(DEVICE) for t in q))
    assert (got.cpu() - expected).abs().max() < 1e-4


@pytest.mark.skipif(GPU, reason="checks the interpreter's refusal on CPU tensors")
def test_triton_backend_never_falls_back_silently(monkeypatch, gen):
    """LOWBIT_BACKEND=triton on CPU tensors without the interpreter raises instead of running the CPU path."""
    q = quantize3(torch.randn(8, 64), 64, 4)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match=r"\[quantized_matmul\] LOWBIT_BACKEND=triton needs CUDA tensors"):
        lowbit.quantized_matmul(torch.randn(2, 64), *q)


@pytest.mark.skipif(not GPU, reason="large shapes need the GPU")
@pytest.mark.parametrize("m, n, k", [(3, 32840, 128), (33000, 64, 128), (5, 4096, 10944), (17, 4096, 7392),
                                     (1, 4096, 4304)])
def test_large_and_awkward_shapes(m, n, k, gen):
    """N or M beyond 32767 (int16 overflow bugs elsewhere) and real-model K that are not multiples of 128."""
    q = quantize3(randn(n, k, gen=gen, scale=k**-0.5, dtype=torch.bfloat16), 16 if k % 32 else 32, 4,
                  "nvfp4" if k % 32 else "mxfp4")
    mode, gs = ("nvfp4", 16) if k % 32 else ("mxfp4", 32)
    x = randn(m, k, gen=gen, dtype=torch.bfloat16)
    y = lowbit.quantized_matmul(x, *q, True, gs, 4, mode)
    assert rel_err(y, x.double() @ dequantize_f64(q, gs, 4, mode).to(DEVICE).T) < 1e-2
