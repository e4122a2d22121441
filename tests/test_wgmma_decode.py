"""The Gluon decode kernel for 4-bit codes (backends/triton/wgmma_decode.py).

On CPU (CI): its inline PTX, run through the tests' PTX emulator, gives MLX's dequantized values for every code of
both packs, for affine scales and biases across the bfloat16 range and for every mxfp4 code and scale byte; the
kernel choice by default and under the knob. On a Hopper GPU: the plan picks it for 4-bit affine (and, under the
knob, mxfp4) decode tiles, and its outputs equal the Triton kernel's (LOWBIT_QMM_GLUON=0) bit for bit -- plain
products and per-item routing (MoE decode), every affine4 group size, N below and not a multiple of its 64-row tile,
K ending inside a K block, several splits, strided x -- and the float64 oracle within bf16 tolerance.
"""

import pytest
import torch
from conftest import dequantize_f64, quantize3, same_bits
from ptx_emulator import bf16_bits, run_ptx

import lowbit

pytest.importorskip("triton")
from lowbit.backends.triton import qmm, wgmma_decode  # noqa: E402
from lowbit.backends.triton.qmm import forget_plans  # noqa: E402

HOPPER = torch.cuda.is_available() and torch.cuda.get_device_capability()[0] == 9


def _bf16_word(values: torch.Tensor) -> torch.Tensor:
    """bf16 values -> their bits in both 16-bit lanes of an int64 'register'."""
    bits = bf16_bits(values)
    return bits | (bits << 16)


@pytest.mark.parametrize("j", range(4))
def test_byte_decoder_text_gives_mlx_values_for_every_code(j, gen):
    """affine4_byte_asm(j) decodes slots 2j and 2j + 1 of two packs to round(round(code * scale) + bias) in bf16:
    every code of both packs, against scales and biases from subnormal to 2**100, signs mixed."""
    codes = torch.arange(256)
    a_codes, b_codes = codes // 16, codes % 16  # every pair of codes (pack a, pack b)
    n = codes.numel()
    scale = (torch.randn(n, generator=gen) * torch.exp2(torch.randint(-130, 100, (n,), generator=gen).float()))
    scale = scale.to(torch.bfloat16)
    bias = (torch.randn(n, generator=gen) * torch.exp2(torch.randint(-130, 100, (n,), generator=gen).float()))
    bias = bias.to(torch.bfloat16)
    lo_nibble, hi_nibble = 8 * j, 8 * j + 4  # slot 2j and 2j + 1 of a word: byte j's low and high nibble
    filler = torch.randint(0, 2**32, (2, n), generator=gen)  # the other slots hold anything
    keep = ~((0xF << lo_nibble) | (0xF << hi_nibble)) & 0xFFFFFFFF
    word_a = (filler[0] & keep) | (a_codes << lo_nibble) | ((15 - a_codes) << hi_nibble)
    word_b = (filler[1] & keep) | (b_codes << lo_nibble) | ((15 - b_codes) << hi_nibble)
    neg = (scale.float() * -128).to(torch.bfloat16)
    regs = run_ptx(wgmma_decode.affine4_byte_asm(j), {"$4": word_a, "$5": word_b, "$6": _bf16_word(scale),
                                                      "$7": _bf16_word(neg), "$8": _bf16_word(bias)})

    def mlx(code):  # MLX's dequantize in bf16: code * scale rounded, then + bias rounded
        return bf16_bits((code.float() * scale.float()).to(torch.bfloat16).float() + bias.float())

    assert torch.equal(regs["$0"], mlx(a_codes)) and torch.equal(regs["$1"], mlx(b_codes))
    assert torch.equal(regs["$2"], mlx(15 - a_codes)) and torch.equal(regs["$3"], mlx(15 - b_codes))


@pytest.mark.parametrize("j", range(4))
def test_fp4_byte_decoder_text_gives_the_codec_values_for_every_code_and_scale(j, gen):
    """fp4_byte_asm(j) decodes slots 2j and 2j + 1 of two packs to e2m1 value * block scale rounded once to bf16
    (lowbit's codec product): every byte of pack a (both nibbles) beside a random byte of pack b, under every e8m0
    scale byte as the kernel forms it (bits e << 7, byte 0 the subnormal 2**-127); NaN where the codec gives NaN.
    (nvfp4's e4m3 scales are bf16 values of the same kind: test_e4m3_word_text, and the GPU tests.)"""
    from lowbit.formats.codecs import e2m1_decode, e8m0_decode

    byte_a = torch.arange(256)
    byte_b = torch.randint(0, 256, (256,), generator=gen)
    filler = torch.randint(0, 2**32, (2, 256), generator=gen)
    keep = ~(0xFF << (8 * j)) & 0xFFFFFFFF
    word_a = (filler[0] & keep) | (byte_a << (8 * j))
    word_b = (filler[1] & keep) | (byte_b << (8 * j))
    for e in range(256):
        bits = 0x40 if e == 0 else e << 7
        regs = run_ptx(wgmma_decode.fp4_byte_asm(j), {"$4": word_a, "$5": word_b, "$6": torch.tensor(bits * 0x10001)})
        scale = e8m0_decode(torch.tensor([e], dtype=torch.uint8), torch.float32)
        for lane, code in (("$0", byte_a & 0xF), ("$1", byte_b & 0xF), ("$2", byte_a >> 4), ("$3", byte_b >> 4)):
            got = regs[lane].to(torch.int16).view(torch.bfloat16)
            want = (e2m1_decode(code.to(torch.uint8), torch.float32) * scale).to(torch.bfloat16)
            assert same_bits(got[~want.isnan()], want[~want.isnan()]), (e, lane)
            assert got[want.isnan()].isnan().all(), (e, lane)


def test_e4m3_word_text_gives_the_codec_value_of_every_byte():
    """e4m3_word_asm (nvfp4's block scales in the Gluon kernel): every e4m3 byte, given in both lanes, comes back as
    its codec value in bf16 in both lanes (exact: e4m3 values are bf16 values); the NaN bytes 0x7F / 0xFF as NaN."""
    from lowbit.formats.codecs import e4m3_decode

    byte = torch.arange(256)
    regs = run_ptx(wgmma_decode.e4m3_word_asm(), {"$1": byte * 0x10001, "$2": torch.tensor(0x3F803F80)})
    want = e4m3_decode(byte.to(torch.uint8), torch.float32).to(torch.bfloat16)
    for lane in (regs["$0"] & 0xFFFF, regs["$0"] >> 16):
        got = lane.to(torch.int16).view(torch.bfloat16)
        assert same_bits(got[~want.isnan()], want[~want.isnan()]) and got[want.isnan()].isnan().all()


def test_scale_pair_text(gen):
    """SCALE_PAIR_ASM: a bf16 scale in both lanes, and -128 times it (exact) in both lanes."""
    scale = (torch.randn(4096, generator=gen) * torch.exp2(torch.randint(-133, 120, (4096,), generator=gen).float()))
    scale = scale.to(torch.bfloat16)
    regs = run_ptx(wgmma_decode.SCALE_PAIR_ASM, {"$2": bf16_bits(scale)})
    assert torch.equal(regs["$0"], _bf16_word(scale))
    assert torch.equal(regs["$1"], _bf16_word((scale.double() * -128).to(torch.bfloat16)))


@pytest.mark.skipif(wgmma_decode.gluon is None, reason="this Triton has no Gluon")
def test_default_serves_plain_products_of_a_few_rows_only(monkeypatch):
    """The kernel choice (no GPU needed): by default plain products of up to 8 rows of 4-bit affine bf16, mxfp4 and
    nvfp4 weights (16 rows of nvfp4) on Hopper; LOWBIT_QMM_GLUON=1 widens it to every tile the kernel admits (routed
    products too), 0 turns it off; never off Hopper or for other formats."""
    def choice(rows=1, routing=0, mode="affine", bits=4, capability=(9, 0)):
        weight = torch.bfloat16 if mode == "affine" else torch.float32  # (qmm.weight_and_dot_dtypes)
        return wgmma_decode.serves(mode, bits, True, torch.bfloat16, weight, torch.bfloat16, True, (16, 64, 4),
                                   routing, rows, capability)

    monkeypatch.delenv("LOWBIT_QMM_GLUON", raising=False)
    assert choice() and choice(rows=8) and not choice(rows=9) and not choice(rows=16) and not choice(routing=1)
    assert choice(mode="mxfp4", rows=8) and not choice(mode="mxfp4", rows=9) and not choice(mode="mxfp4", routing=2)
    assert choice(mode="nvfp4", rows=16) and not choice(mode="nvfp4", rows=17)
    assert not choice(bits=8) and not choice(mode="mxfp8", bits=8) and not choice(capability=(8, 0))
    assert not choice(capability=(10, 0)) and not choice(capability=None)
    monkeypatch.setenv("LOWBIT_QMM_GLUON", "1")
    assert choice(rows=16) and choice(routing=1) and choice(routing=2) and choice(mode="mxfp4") and choice(mode="nvfp4")
    assert not choice(mode="mxfp8", bits=8) and not choice(bits=3)
    monkeypatch.setenv("LOWBIT_QMM_GLUON", "0")
    assert not choice()


@pytest.mark.skipif(wgmma_decode.gluon is None, reason="this Triton has no Gluon")
def test_plans_on_hopper_pick_the_kernel_tile_and_x_order(monkeypatch):
    """The qmm plan of a Hopper call (made on CPU: nothing is compiled or launched): the Gluon kernel's 8-token tile
    with x reordered in the kernel for up to 8 tokens of 4-bit affine bf16 (where this Triton is one it was compiled
    with), the Triton kernel with x copied slot-major for 9; mxfp4 takes the 16-token tile unless
    LOWBIT_GLUON_BLOCK_M=8; =16 keeps affine's 16-token tile too, and the tile sets the plan's row tiles, grid and
    arrival counters."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.delenv("LOWBIT_QMM_GLUON", raising=False)
    monkeypatch.delenv("LOWBIT_GLUON_BLOCK_M", raising=False)

    def plan(m, mode="affine"):
        forget_plans()
        gs, scales = (64, torch.bfloat16) if mode == "affine" else (32, torch.uint8)
        return qmm._plan(mode, gs, 4, True, torch.bfloat16, scales, scales if mode == "affine" else None, False,
                         torch.bfloat16, m, 4096, 4096, 1, 1, False, (9, 0))

    eight, nine = plan(8), plan(9)
    if wgmma_decode._COMPILED_WITH_THIS_TRITON:
        assert eight.qmm.kernel is wgmma_decode.packed4_decode_kernel and not eight.x_slot_major
        assert eight.block_m == 8 and eight.qmm.constexprs["BLOCK_M"] == 8
        assert eight.row_tiles == 1 and eight.tiles == 4096 // 64
    assert nine.qmm.kernel is qmm.qmm_kernel and nine.x_slot_major and nine.block_m == 16
    if wgmma_decode._COMPILED_WITH_THIS_TRITON:  # fp4: the 16-token tile unless LOWBIT_GLUON_BLOCK_M=8
        fp4 = plan(5, "mxfp4")
        assert fp4.qmm.kernel is wgmma_decode.packed4_decode_kernel and fp4.block_m == 16
        monkeypatch.setenv("LOWBIT_GLUON_BLOCK_M", "8")
        assert plan(5, "mxfp4").block_m == 8
    monkeypatch.setenv("LOWBIT_QMM_GLUON", "1")
    monkeypatch.setenv("LOWBIT_GLUON_BLOCK_M", "16")
    five, wide = plan(5), plan(16)
    assert five.qmm.kernel is wgmma_decode.packed4_decode_kernel and five.block_m == 16
    assert five.qmm.constexprs["BLOCK_M"] == 16 and five.row_tiles == 1
    assert wide.block_m == 16 and wide.qmm.constexprs["BLOCK_M"] == 16
    forget_plans()


@pytest.fixture
def hopper(monkeypatch):
    if not HOPPER:
        pytest.skip("the Gluon decode kernel runs on Hopper GPUs")
    monkeypatch.setenv("LOWBIT_BACKEND", "triton")
    monkeypatch.setenv("LOWBIT_QMM_GLUON", "1")
    forget_plans()  # (plans made before without the knob must not serve these tests)
    yield
    forget_plans()


def _both_kernels(monkeypatch, call):
    """call()'s outputs through the Gluon kernel and through the Triton kernel (LOWBIT_QMM_GLUON=0)."""
    outputs = []
    for gluon in ("1", "0"):
        monkeypatch.setenv("LOWBIT_QMM_GLUON", gluon)
        forget_plans()
        outputs.append(call())
    monkeypatch.setenv("LOWBIT_QMM_GLUON", "1")
    forget_plans()
    return outputs


def _assert_same_bits_as_triton(monkeypatch, x, q, gs, mode, g, ms, oracle):
    """The plan of a 1-row call picks the Gluon kernel; quantized_matmul of x's first m rows (each of ms) through it
    equals the Triton kernel bit for bit, and (oracle) the float64 product within bf16 tolerance."""
    plan = qmm._plan_for(x[None, :1], q[0], q[1], q[2], g, None, True, mode, gs, 4, torch.bfloat16)[0]
    assert plan.qmm.kernel is wgmma_decode.packed4_decode_kernel
    for m in ms:
        gluon, triton = _both_kernels(monkeypatch, lambda: lowbit.quantized_matmul(x[:m], *q, True, gs, 4, mode,
                                                                                   global_scale=g))
        assert same_bits(gluon, triton), (x.shape[-1], m)
        if oracle:
            ref = x[:m].double() @ dequantize_f64(q, gs, 4, mode, g).to("cuda").T
            assert ((gluon.double() - ref).abs().max() / ref.abs().max()).item() < 1e-2


@pytest.mark.parametrize("gs", [32, 64, 128])
@pytest.mark.parametrize("n, k_blocks", [(4096, 32), (4096, 9), (4096, 17), (100, 13), (7, 3), (256, 1)])
def test_plain_products_equal_the_triton_kernels_bits(monkeypatch, hopper, gs, n, k_blocks, gen):
    """quantized_matmul at M = 1..16 (x strided), K a whole number of blocks or one group short of it; 9 and 17
    blocks over 4096 rows leave the last splits empty (K // 128 blocks per split rounded up), and the split that
    holds the partial last block runs it once."""
    ks = [128 * k_blocks] + ([128 * k_blocks - gs] if k_blocks > 1 else [])
    for k in ks:
        w = torch.randn(n, k, generator=gen).mul(k**-0.5).to("cuda", torch.bfloat16)
        q = quantize3(w, gs, 4, "affine")
        x = torch.randn(16, 2 * k, generator=gen).to("cuda", torch.bfloat16)[:, ::2]
        _assert_same_bits_as_triton(monkeypatch, x, q, gs, "affine", None, (1, 3, 16), oracle=True)


@pytest.mark.parametrize("n, k_blocks", [(4096, 32), (4096, 9), (100, 13), (7, 3)])
@pytest.mark.parametrize("scales", ["quantized", "every byte"])
@pytest.mark.parametrize("mode, gs, tensor_scale", [("mxfp4", 32, False), ("nvfp4", 16, False), ("nvfp4", 16, True)])
def test_fp4_products_equal_the_triton_kernels_bits(monkeypatch, hopper, n, k_blocks, scales, mode, gs, tensor_scale,
                                                    gen):
    """mxfp4 and nvfp4 weights (LOWBIT_QMM_GLUON=1): the Gluon kernel's e2m1 decode and block scales (and nvfp4's
    tensor scale) give the Triton kernel's bits at M = 1..16, K whole blocks or one group short; with quantized scales,
    and with scale bytes mostly of moderate size but one in 16 drawn from all 256 (subnormal and huge scales, mxfp4's
    byte 255 (+inf, as MLX's e8m0), nvfp4's NaN bytes); the float64 oracle within bf16 tolerance for the former."""
    for k in (128 * k_blocks, 128 * k_blocks - gs):
        w = torch.randn(n, k, generator=gen).mul(k**-0.5).to("cuda", torch.bfloat16)
        g = w.abs().amax().float().reshape(1) if tensor_scale else None
        q = quantize3(w, gs, 4, mode, global_scale=g)
        if scales == "every byte":  # (moderate: e8m0 2**-12..2**3, e4m3 1/64..15)
            moderate = torch.randint(115, 131, q[1].shape, generator=gen) if mode == "mxfp4" else \
                torch.randint(0x08, 0x58, q[1].shape, generator=gen)
            anything = torch.randint(0, 256, q[1].shape, generator=gen)
            pick = torch.randint(0, 16, q[1].shape, generator=gen) == 0
            q = (q[0], torch.where(pick, anything, moderate).to("cuda", torch.uint8), None)
        x = torch.randn(16, k, generator=gen).to("cuda", torch.bfloat16)
        _assert_same_bits_as_triton(monkeypatch, x, q, gs, mode, g, (1, 5, 16), oracle=scales == "quantized")


@pytest.mark.parametrize("mode, gs, tensor_scale", [("mxfp4", 32, False), ("nvfp4", 16, True)])
def test_fp4_eight_token_tile_equals_the_triton_kernels_bits(monkeypatch, hopper, mode, gs, tensor_scale, gen):
    """mxfp4 and nvfp4 in the 8-token tile (LOWBIT_GLUON_BLOCK_M=8, not their default until this passes on a GPU):
    the Triton kernel's bits at M = 1, 5 and 8, K whole blocks or one group short."""
    monkeypatch.setenv("LOWBIT_GLUON_BLOCK_M", "8")
    for k in (128 * 9, 128 * 9 - gs):
        w = torch.randn(1000, k, generator=gen).mul(k**-0.5).to("cuda", torch.bfloat16)
        g = w.abs().amax().float().reshape(1) if tensor_scale else None
        q = quantize3(w, gs, 4, mode, global_scale=g)
        x = torch.randn(8, k, generator=gen).to("cuda", torch.bfloat16)
        plan = qmm._plan_for(x[None, :5], q[0], q[1], q[2], g, None, True, mode, gs, 4, torch.bfloat16)[0]
        assert plan.qmm.kernel is wgmma_decode.packed4_decode_kernel and plan.block_m == 8
        _assert_same_bits_as_triton(monkeypatch, x, q, gs, mode, g, (1, 5, 8), oracle=True)


@pytest.mark.parametrize("tokens", [1, 4, 7])
def test_routed_decode_equals_the_triton_kernels_bits(monkeypatch, hopper, tokens, gen):
    """gather_qmm with few routed rows (per-item routing: MoE decode), Qwen3-MoE-like experts."""
    experts, top_k, n, k = 16, 4, 768, 2048
    w = torch.randn(experts, n, k, generator=gen).mul(k**-0.5).to("cuda", torch.bfloat16)
    q = quantize3(w, 64, 4, "affine")
    x = torch.randn(tokens, 1, 1, k, generator=gen).to("cuda", torch.bfloat16)
    idx = torch.stack([torch.randperm(experts, generator=gen)[:top_k] for _ in range(tokens)]).to("cuda")
    gluon, triton = _both_kernels(monkeypatch, lambda: lowbit.gather_qmm(
        x, *q, rhs_indices=idx, transpose=True, group_size=64, bits=4, mode="affine"))
    assert same_bits(gluon, triton)
    ref = torch.einsum("tk,tenk->ten", x[:, 0, 0].double(), dequantize_f64(q, 64, 4, "affine").to("cuda")[idx])
    assert ((gluon[:, :, 0].double() - ref).abs().max() / ref.abs().max()).item() < 1e-2


@pytest.mark.parametrize("tokens, knobs", [
    (32, {}),  # 2 rows x 4 experts a token over 16 experts: 16-row tiles, splits in the grid
    (256, {"LOWBIT_GLUON_MAX_M": "128"}),  # 128-row tiles, every split in one program's loop
    (256, {"LOWBIT_GLUON_MAX_M": "128", "LOWBIT_GLUON_X_AHEAD_M": "128"}),  # and x loaded a block ahead
    (256, {"LOWBIT_GLUON_MAX_M": "128", "LOWBIT_GLUON_X_ASYNC": "1"}),  # x by cp.async into two buffers
    (256, {"LOWBIT_GLUON_MAX_M": "128", "LOWBIT_GLUON_X_ASYNC": "1", "LOWBIT_QMM_TILE": "64,128,8,3",
           "LOWBIT_QMM_SPLIT_IN_GRID": "0"}),  # 64-row tiles of 128 weight rows, splits in the loop
])
@pytest.mark.parametrize("k_blocks, partial", [(16, True), (23, True), (64, False)])
@pytest.mark.parametrize("mode, gs", [("affine", 64), ("mxfp4", 32), ("nvfp4", 16)])
def test_grouped_routing_equals_the_triton_kernels_bits(monkeypatch, hopper, tokens, knobs, k_blocks, partial, mode, gs,
                                                        gen):
    """gather_qmm with many routed rows (grouped routing: rows sorted by expert, MoE prefill) and two rows per item
    (x (tokens, 2, K): item and row strides differ): the Gluon kernel's row tiles from the schedule -- each tile one
    expert's rows, tiles past the schedule with no rows -- give the Triton kernel's bits. K of 16 or 23 whole blocks
    plus one group (the masked last block) over 8 splits of 3 blocks (a two-block step and an odd block): the last
    split holding 1 or 2 whole blocks before the partial one, empty splits after it; or of 64 whole blocks (none
    masked) over 16 splits of 4 (two two-block steps: the loops' back edges); nvfp4 with one tensor scale per
    expert."""
    for knob, value in knobs.items():
        monkeypatch.setenv(knob, value)
    experts, top_k, n, k = 16, 4, 200, 128 * k_blocks + (gs if partial else 0)
    w = torch.randn(experts, n, k, generator=gen).mul(k**-0.5).to("cuda", torch.bfloat16)
    g = w.abs().amax(dim=(1, 2)).float() if mode == "nvfp4" else None
    q = quantize3(w, gs, 4, mode, global_scale=g)
    x = torch.randn(tokens, 1, 2, k, generator=gen).to("cuda", torch.bfloat16)
    idx = torch.stack([torch.randperm(experts, generator=gen)[:top_k] for _ in range(tokens)]).to("cuda")

    def call():
        return lowbit.gather_qmm(x, *q, rhs_indices=idx, transpose=True, group_size=gs, bits=4, mode=mode,
                                 global_scale=g)

    gluon, triton = _both_kernels(monkeypatch, call)
    plan = qmm._plan_for(x.reshape(tokens, 2, k), q[0], q[1], q[2], g, idx.reshape(-1), True, mode, gs, 4,
                         torch.bfloat16)[0]
    assert plan.routing == qmm.GROUPED and plan.qmm.kernel is wgmma_decode.packed4_decode_kernel
    assert plan.split_in_grid == (tokens == 32) and plan.splits == (16 if k_blocks == 64 else 8)
    assert same_bits(gluon, triton)
    w_hat = dequantize_f64(q, gs, 4, mode, g).to("cuda")
    ref = torch.einsum("tmk,tenk->temn", x[:, 0].double(), w_hat[idx])
    assert ((gluon.double() - ref).abs().max() / ref.abs().max()).item() < 1e-2


def test_rows_bit_identical_across_batch_sizes_and_paths(hopper, gen):
    """A row's bits do not depend on M across the Gluon decode tiles (M <= 16), the Triton tiles (M 17..159) and
    the prefill path (M >= 160)."""
    n, k = 1000, 4096
    q = quantize3(torch.randn(n, k, generator=gen).mul(k**-0.5).to("cuda", torch.bfloat16), 64, 4, "affine")
    x = torch.randn(300, k, generator=gen).to("cuda", torch.bfloat16)
    full = lowbit.quantized_matmul(x, *q, True, 64, 4, "affine")
    for m in (1, 2, 15, 16, 17, 64, 159, 160, 299):
        assert same_bits(lowbit.quantized_matmul(x[-m:], *q, True, 64, 4, "affine"), full[-m:]), m


@pytest.mark.parametrize("knobs", [{"LOWBIT_QMM_X_IN_KERNEL": "0"}, {"LOWBIT_GLUON_PREFETCH": "0"},
                                   {"LOWBIT_QMM_TILE": "16,128,8,3"}, {"LOWBIT_GLUON_BLOCK_M": "16"}])
@pytest.mark.parametrize("gs", [32, 64])
def test_kernel_variants_give_the_same_bits(monkeypatch, hopper, knobs, gs, gen):
    """The Gluon kernel's variants -- x copied slot-major before the launch instead of reordered in the kernel, no
    prefetch, 128-row tiles of 8 warps, 16-token tiles at up to 8 rows -- give the Triton kernel's bits too (K one
    group short of whole blocks: the last block is the masked one)."""
    for knob, value in knobs.items():
        monkeypatch.setenv(knob, value)
    n = 1000
    for k in (128 * 9 - gs, 128 * 13 - gs):
        q = quantize3(torch.randn(n, k, generator=gen).mul(k**-0.5).to("cuda", torch.bfloat16), gs, 4, "affine")
        x = torch.randn(16, k, generator=gen).to("cuda", torch.bfloat16)
        for m in (1, 5, 16):
            gluon, triton = _both_kernels(monkeypatch, lambda: lowbit.quantized_matmul(x[:m], *q, True, gs, 4,
                                                                                       "affine"))
            assert same_bits(gluon, triton), (k, m)
            plan = qmm._plan_for(x[None, :m], q[0], q[1], q[2], None, None, True, "affine", gs, 4,
                                 torch.bfloat16)[0]
            assert plan.qmm.kernel is wgmma_decode.packed4_decode_kernel
            assert plan.block_m == (16 if knobs.get("LOWBIT_GLUON_BLOCK_M") == "16" or m > 8 else 8)
