"""The decode kernel for 4-bit codes (affine; mxfp4 and nvfp4 behind a knob) written in Gluon (Triton's layout-explicit
dialect), Hopper only.

Why a second decode kernel: at M <= 16 the Triton kernel (qmm.py) issues about 5.3 instructions per weight, of which
the decode proper is 2.4; the rest is code Triton builds around the dot (the scale tiles exchanged into the MMA's
layout through shared memory with barriers, descriptor arithmetic per wgmma, address arithmetic) and the kernel is
bound by instruction issue (benchmarks/NOTES.md, v12). Here the layouts are stated instead of inferred:

- a weight tile (BLOCK_N rows x 16 packs of a K block) is loaded straight into the layout of the wgmma's register
  A operand for one k16 step: a thread holds packs 2t, 2t + 1, 2t + 8, 2t + 9 of rows r and r + 8 -- two 8-byte
  loads a row -- and the A operand of code slot s of those packs is exactly what the pack-pair decoder makes of
  them (slot s of two neighbouring packs in one register's two lanes);
- scales and biases are loaded per row and group, in a layout whose broadcast over a group's pack pairs is the
  pair layout: no exchange between threads;
- x's K block is staged once in shared memory (slot-major) as the B operand of the block's eight wgmmas.

The arithmetic is the Triton kernel's: the same decoded values (the same exact steps, one rounding where it has
one), the same k16 wgmmas over the same canonical K order (reduction.py: block by block, slot-major inside a block,
split partials folded in split order, by the tile's last program or in one program's loop), so the bits are the
same (tested against LOWBIT_QMM_GLUON=0). Serves (see `serves`): 4-bit affine (bfloat16 scales and biases), mxfp4
and nvfp4 (with or without the tensor scale) weights, transposed, with bfloat16 x; by default the plain products of
up to 8 token rows (16 for nvfp4), where it is the faster of the two; with LOWBIT_QMM_GLUON=1 also up to 16 tokens
(32-128 behind LOWBIT_GLUON_MAX_M) and per-item and grouped routing (MoE decode and prefill). Everything else runs
qmm.py's kernel.
"""

from __future__ import annotations

import os

import torch
import triton

from .decode import E4M3_PAIR_ASM

try:  # Gluon ships with Triton 3.5 on; what it needs here was checked on 3.6
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.ampere import async_copy
    from triton.experimental.gluon.language.nvidia.hopper import fence_async_shared, warpgroup_mma, warpgroup_mma_wait
except ImportError:  # pragma: no cover - an older Triton: the Triton kernel serves every call
    gluon = None


# The plain products this kernel serves by default: up to this many token rows per format, where it was measured
# faster than the Triton kernel and bit-identical to it (H100, benchmarks/NOTES.md v17: Llama-3-8B shapes).
DEFAULT_MAX_ROWS = {"affine": 8, "mxfp4": 8, "nvfp4": 16}


def serves(mode: str, bits: int, transpose: bool, x_dtype, weight_dtype, dot_dtype, packed: bool, tile: tuple,
           routing: int, rows: int, device_capability) -> bool:
    """Whether this kernel serves a call the qmm plan describes (tile: BLOCK_M, BLOCK_N, num_warps; routing: qmm's
    PLAIN 0, PER_ITEM 1 or GROUPED 2; rows: token rows per weight). By default it serves the plain products of
    4-bit affine, mxfp4 and nvfp4 weights of up to DEFAULT_MAX_ROWS rows; at 16 rows of affine and mxfp4 it was not
    faster. LOWBIT_QMM_GLUON=1 serves every tile it admits (routed products and, with LOWBIT_GLUON_MAX_M, the MoE
    prefill's wide tiles), and 0 none. Either kernel gives the same bits, so the choice never changes a result."""
    choice = os.environ.get("LOWBIT_QMM_GLUON")
    if gluon is None or choice == "0":
        return False
    if choice != "1" and not (routing == 0 and rows <= DEFAULT_MAX_ROWS.get(mode, 0) and _COMPILED_WITH_THIS_TRITON):
        return False
    block_m, block_n, warps = tile
    max_m = int(os.environ.get("LOWBIT_GLUON_MAX_M", "16"))  # a knob: token tiles up to 128 are supported
    affine4 = mode == "affine" and bits == 4 and weight_dtype == torch.bfloat16
    fp4 = mode in ("mxfp4", "nvfp4") and bits == 4
    return ((affine4 or fp4) and transpose and packed and block_m in (8, 16, 32, 64, 128) and block_m <= max_m
            and (block_n, warps) in ((64, 4), (128, 8)) and routing in (0, 1, 2)
            and x_dtype == dot_dtype == torch.bfloat16
            and device_capability is not None and device_capability[0] == 9 and torch.version.hip is None)


def _triton_version() -> tuple[int, int]:
    major, minor = triton.__version__.split(".")[:2]
    return int(major), int(minor)


# The Triton versions this kernel was compiled with (Gluon's API still moves between releases): 3.6, the GPU machine's,
# where it was measured, and 3.7-3.9 offline (benchmarks/sass_probe.py). Others take it only when asked for
# (LOWBIT_QMM_GLUON=1): by default a newer Triton runs the Triton kernel rather than risk a compile error.
_COMPILED_WITH_THIS_TRITON = (3, 6) <= _triton_version() <= (3, 9)


def token_tile(mode: str, block_m: int, rows: int) -> int:
    """The token tile (BLOCK_M) this kernel runs for the plan's `block_m`: 8 for up to 8 rows of affine weights
    (wgmmas of N = 8, half the x staged and half the accumulator: measured faster at 1 and 4 rows and bit-identical,
    NOTES v17), else the plan's. LOWBIT_GLUON_BLOCK_M=8 gives mxfp4 and nvfp4 the 8-token tile too (mxfp4 measured
    faster; their bits in that tile not yet checked on a GPU), =16 gives no call the 8-token tile."""
    narrow = os.environ.get("LOWBIT_GLUON_BLOCK_M", "8" if mode == "affine" else "16") == "8"
    return 8 if narrow and rows <= 8 and block_m == 16 else block_m


def constexprs(x_slot_major: bool, block_m: int) -> dict:
    """The kernel's compile-time parameters beyond qmm_kernel's. Tuning knobs: LOWBIT_GLUON_PREFETCH (0 or 1: the
    blocks whose loads are in flight in registers ahead of the one being decoded; two ahead measured slower, NOTES
    v17), LOWBIT_GLUON_X_AHEAD_M (the widest token tile whose x is loaded ahead too; 16), LOWBIT_GLUON_X_ASYNC=1
    (token tiles above 16 rows with x copied slot-major: x by cp.async into two shared buffers, each split's blocks in
    a two-block loop)."""
    return {"PREFETCH": int(os.environ.get("LOWBIT_GLUON_PREFETCH", "1")),
            "X_AHEAD_M": int(os.environ.get("LOWBIT_GLUON_X_AHEAD_M", "16")),
            "X_ASYNC": x_slot_major and block_m > 16 and os.environ.get("LOWBIT_GLUON_X_ASYNC") == "1"}


def affine4_byte_asm(j: int) -> str:
    """The inline PTX that decodes code slots 2j and 2j + 1 of two neighbouring packs (words $4, $5) into their bf16
    values, in the lanes of two registers ({$0, $1}: slot 2j, {$2, $3}: slot 2j + 1). prmt puts byte j of each word
    in both bytes of its lane; the low / high nibble masked under the magic exponent (one lop3: (t & mask) | magic)
    reads as 128 + code; (128 + code) * scale - 128 * scale rounds once to round(code * scale), + bias rounds again:
    MLX's two roundings, as decode.affine4_pack_pair. ($6: scale, $7: -128 * scale, $8: bias, each in both
    lanes.)"""
    selector = j | (j << 4) | ((4 + j) << 8) | ((4 + j) << 12)
    return f"""{{ .reg .b32 t, lo, hi;
    prmt.b32 t, $4, $5, {selector:#x};
    lop3.b32 lo, t, 0x000F000F, 0x43004300, 0xEA;
    shr.u32 hi, t, 4;
    lop3.b32 hi, hi, 0x000F000F, 0x43004300, 0xEA;
    fma.rn.bf16x2 lo, lo, $6, $7;
    add.rn.bf16x2 lo, lo, $8;
    fma.rn.bf16x2 hi, hi, $6, $7;
    add.rn.bf16x2 hi, hi, $8;
    mov.b32 {{$0, $1}}, lo;
    mov.b32 {{$2, $3}}, hi; }}"""


def fp4_byte_asm(j: int) -> str:
    """affine4_byte_asm's counterpart for e2m1 codes (mxfp4, nvfp4): slots 2j and 2j + 1 of two neighbouring packs
    (words $4, $5) -> value * block scale in bf16 ({$0, $1}: slot 2j, {$2, $3}: slot 2j + 1; $6: the block scale,
    e8m0 or e4m3, as bf16 in both lanes). After the same prmt, each nibble's magnitude bits move to bf16 bits 6-8 and
    its sign to bit 15 (a shift and a mask each); read as bf16 that is the value times 2**-126 (0.5 the subnormal
    2**-127), times 2**126 and the scale: exact products, one rounding, as decode.e2m1_slot."""
    selector = j | (j << 4) | ((4 + j) << 8) | ((4 + j) << 12)
    return f"""{{ .reg .b32 t, lo, hi, s, c;
    prmt.b32 t, $4, $5, {selector:#x};
    shl.b32 lo, t, 6;
    and.b32 lo, lo, 0x01C001C0;
    shl.b32 s, t, 12;
    and.b32 s, s, 0x80008000;
    or.b32 lo, lo, s;
    shl.b32 hi, t, 2;
    and.b32 hi, hi, 0x01C001C0;
    shl.b32 s, t, 8;
    and.b32 s, s, 0x80008000;
    or.b32 hi, hi, s;
    mov.b32 c, 0x7E807E80;
    mul.rn.bf16x2 lo, lo, c;
    mul.rn.bf16x2 lo, lo, $6;
    mul.rn.bf16x2 hi, hi, c;
    mul.rn.bf16x2 hi, hi, $6;
    mov.b32 {{$0, $1}}, lo;
    mov.b32 {{$2, $3}}, hi; }}"""


def e4m3_word_asm() -> str:
    """An e4m3 byte in both 16-bit lanes of $1 -> its value in bf16 in both lanes of $0 ($2: bf16 1.0 in both lanes):
    decode.E4M3_PAIR_ASM with its operands renumbered and its two halves left packed (nvfp4's block scales)."""
    text = E4M3_PAIR_ASM.value.replace("$2", "$1").replace("$3", "$2")
    return text.replace("mov.b32 {$0, $1}, v;", "mov.b32 $0, v;")


# a bf16 scale ($2) -> (scale, scale) and (-128 * scale, -128 * scale) as bf16x2 words (the product is exact)
SCALE_PAIR_ASM = """{ .reg .b32 t, c;
    mov.b32 t, {$2, $2};
    mov.b32 $0, t;
    mov.b32 c, 0xC300C300;
    mul.rn.bf16x2 $1, t, c; }"""


if gluon is not None:
    _barrier = getattr(gl, "thread_barrier", None) or gl.barrier  # (renamed after Triton 3.6)
    _async_load = getattr(async_copy, "async_load", None) or async_copy.async_copy_global_to_shared  # (likewise)
    _byte_asm = gluon.constexpr_function(affine4_byte_asm)
    _fp4_byte_asm = gluon.constexpr_function(fp4_byte_asm)
    _E4M3_WORD_ASM = gl.constexpr(e4m3_word_asm())
    _SCALE_PAIR_ASM = gl.constexpr(SCALE_PAIR_ASM)

    @gluon.jit
    def _pairs(t):
        """(R, 2C) -> its even and odd columns, (R, C) each (register moves: a thread holds both of a pair)."""
        return gl.split(gl.reshape(t, (t.shape[0], t.shape[1] // 2, 2)))

    @gluon.jit
    def _slot_planes(even, odd, scale2, neg2, bias2, J: gl.constexpr, MODE: gl.constexpr, a_layout: gl.constexpr):
        """Code slots 2J and 2J + 1 of the block: two (BLOCK_N, PACKS) bf16 A operands (MODE 0, affine: codes with
        scale2, neg2 and bias2; mxfp4 and nvfp4: e2m1 codes times the block scale scale2)."""
        if MODE != 0:
            s0a, s0b, s1a, s1b = gl.inline_asm_elementwise(
                _fp4_byte_asm(J), "=h,=h,=h,=h,r,r,r", [even, odd, scale2],
                dtype=(gl.bfloat16, gl.bfloat16, gl.bfloat16, gl.bfloat16), is_pure=True, pack=1)
        else:
            s0a, s0b, s1a, s1b = gl.inline_asm_elementwise(
                _byte_asm(J), "=h,=h,=h,=h,r,r,r,r,r", [even, odd, scale2, neg2, bias2],
                dtype=(gl.bfloat16, gl.bfloat16, gl.bfloat16, gl.bfloat16), is_pure=True, pack=1)
        n: gl.constexpr = even.shape[0]
        packs: gl.constexpr = 2 * even.shape[1]
        slot0 = gl.convert_layout(gl.reshape(gl.join(s0a, s0b), (n, packs)), a_layout, assert_trivial=True)
        slot1 = gl.convert_layout(gl.reshape(gl.join(s1a, s1b), (n, packs)), a_layout, assert_trivial=True)
        return slot0, slot1

    @gluon.jit
    def _weight_rows(pid_n, N, BLOCK_N: gl.constexpr, layout: gl.constexpr):
        """The tile's weight rows along a layout's dim 0, int64; rows past N read row N - 1 (their outputs are
        dropped)."""
        return gl.minimum(pid_n * BLOCK_N + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, layout)), N - 1).to(gl.int64)

    @gluon.constexpr_function
    def _group_layout(groups, warps):
        """The (BLOCK_N, GROUPS, pairs per group) layout whose broadcast over its last dim, reshaped to
        (BLOCK_N, pairs), is the pack-pair layout of the words' even columns (rows r and r + 8 in registers,
        pairs t and t + 4 of lane t % 4). Its slice over the last dim holds the scales of a thread's two rows and the
        groups of its pairs (all of a row's groups at group sizes 64 and 128: one vector load a row; at 32 and 16 the
        pair layout gives a thread groups g and g + 2, or t and t + 4: one load each)."""
        per_group = 8 // groups
        pair_bits = [[0, (1 << b) // per_group, (1 << b) % per_group] for b in range(3)]  # pair i = g * per_group + j
        return gl.DistributedLinearLayout(
            reg_bases=[pair_bits[2], [8, 0, 0]], lane_bases=[pair_bits[0], pair_bits[1], [1, 0, 0], [2, 0, 0],
                                                             [4, 0, 0]],
            warp_bases=[[16 << w, 0, 0] for w in range(warps.bit_length() - 1)], block_bases=[],
            shape=[16 * warps, groups, per_group])

    @gluon.jit
    def _per_pair(tile, pair_layout: gl.constexpr):
        """(BLOCK_N, GROUPS) values in _group_layout's slice -> (BLOCK_N, 8), one per pack pair, in the pair layout:
        a broadcast over the pairs of each group, so no value moves between threads (assert_trivial proves it)."""
        l3: gl.constexpr = _group_layout(tile.shape[1], tile.shape[0] // 16)
        tile = gl.expand_dims(tile, 2)
        tile, _fill = gl.broadcast(tile, gl.zeros((tile.shape[0], tile.shape[1], 8 // tile.shape[1]), gl.int8,
                                                  layout=l3))
        return gl.convert_layout(gl.reshape(tile, (tile.shape[0], 8)), pair_layout, assert_trivial=True)

    @gluon.jit
    def _load_weights(w_ptrs, s_ptrs, b_ptrs, kb, K, groups, packs2d, sw_c, ss_c, sb_c, GS: gl.constexpr,
                      PACKS: gl.constexpr, MASKED: gl.constexpr):
        """K block kb's words (BLOCK_N, PACKS), scales and biases (BLOCK_N, GROUPS; `groups` their group indices).
        MASKED: the block runs past K (the last one): words, scales and biases past K read as zero, so their
        weights are zero (as x is). mxfp4 (uint8 scales) has no biases: its scales stand in for them."""
        BLOCK_K: gl.constexpr = PACKS * 8
        GROUPS: gl.constexpr = BLOCK_K // GS
        HAS_BIASES: gl.constexpr = s_ptrs.dtype.element_ty != gl.uint8
        if MASKED:
            words = gl.load(w_ptrs + kb * PACKS * sw_c, mask=(kb * PACKS + packs2d) * 8 < K, other=0)
            g_ok = (kb * BLOCK_K + groups * GS) < K
            scale = gl.load(s_ptrs + kb * GROUPS * ss_c, mask=g_ok, other=0)
            bias = gl.load(b_ptrs + kb * GROUPS * sb_c, mask=g_ok, other=0) if HAS_BIASES else scale
        else:
            words = gl.load(w_ptrs + kb * PACKS * sw_c)
            scale = gl.load(s_ptrs + kb * GROUPS * ss_c)
            bias = gl.load(b_ptrs + kb * GROUPS * sb_c) if HAS_BIASES else scale
        return words, scale, bias

    @gluon.jit
    def _load_x(x_ptrs, kb, K, m_ok, sx_k, PACKS: gl.constexpr, X_SLOT_MAJOR: gl.constexpr):
        """x's K block kb (BLOCK_M, BLOCK_K), slot-major; rows past the tile's and columns past K zero."""
        BLOCK_K: gl.constexpr = PACKS * 8
        if X_SLOT_MAJOR:  # (zero-padded to whole blocks)
            xb = gl.load(x_ptrs + kb * BLOCK_K, mask=m_ok[:, None], other=0.0)
        else:  # x in natural order: column p * 8 + s of the block moves to s * PACKS + p
            k_ok = (kb * BLOCK_K + gl.arange(0, BLOCK_K, layout=gl.SliceLayout(0, x_ptrs.type.layout))) < K
            xb = gl.load(x_ptrs + kb * BLOCK_K * sx_k, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
            xb = gl.reshape(gl.permute(gl.reshape(xb, (xb.shape[0], PACKS, 8)), (0, 2, 1)), (xb.shape[0], BLOCK_K))
        return xb

    @gluon.jit
    def _load_state(src, kb, GS: gl.constexpr, PACKS: gl.constexpr, X_AHEAD: gl.constexpr,
                    X_SLOT_MAJOR: gl.constexpr):
        """What block kb needs loaded ahead: its weights, and its x where X_AHEAD (else a stand-in). src: the
        tile's sources (see _k_range)."""
        w_ptrs, s_ptrs, b_ptrs, x_ptrs, K, groups, packs2d, m_ok, sw_c, ss_c, sb_c, sx_k = src
        words, scale, bias = _load_weights(w_ptrs, s_ptrs, b_ptrs, kb, K, groups, packs2d, sw_c, ss_c, sb_c, GS,
                                           PACKS, False)
        if X_AHEAD:
            xb = _load_x(x_ptrs, kb, K, m_ok, sx_k, PACKS, X_SLOT_MAJOR)
        else:
            xb = words
        return words, scale, bias, xb

    @gluon.jit
    def _run_block(acc, state, kb, src, x_smem, MODE: gl.constexpr, PACKS: gl.constexpr, X_AHEAD: gl.constexpr,
                   X_SLOT_MAJOR: gl.constexpr, a_layout: gl.constexpr):
        """_mma_block on a state _load_state loaded; x loaded now unless it came with the state."""
        words, scale, bias, xb = state
        w_ptrs, s_ptrs, b_ptrs, x_ptrs, K, groups, packs2d, m_ok, sw_c, ss_c, sb_c, sx_k = src
        if X_AHEAD:
            return _mma_block(acc, words, scale, bias, xb, x_smem, MODE, PACKS, a_layout)
        else:
            return _mma_block(acc, words, scale, bias, _load_x(x_ptrs, kb, K, m_ok, sx_k, PACKS, X_SLOT_MAJOR),
                              x_smem, MODE, PACKS, a_layout)

    @gluon.jit
    def _mma_block(acc, words, scale, bias, xb, x_smem, MODE: gl.constexpr, PACKS: gl.constexpr,
                   a_layout: gl.constexpr):
        """acc += one K block's products: x (registers) staged in shared memory as the B operand, then _dot_block."""
        _barrier()  # every warp is past the previous block's wgmmas, which read x_smem
        x_smem.store(xb)
        fence_async_shared()
        _barrier()
        return _dot_block(acc, words, scale, bias, x_smem, MODE, PACKS, a_layout)

    @gluon.jit
    def _dot_block(acc, words, scale, bias, x_smem, MODE: gl.constexpr, PACKS: gl.constexpr,
                   a_layout: gl.constexpr):
        """acc += one K block's products, in the canonical order: the words decoded slot by slot into register A
        operands, one k16 wgmma per code slot against x's slot in shared memory."""
        words = words.to(gl.uint32, bitcast=True)
        even, odd = _pairs(words)
        pairs: gl.constexpr = even.type.layout
        if MODE == 0:  # affine: scale, -128 * scale and bias, each in both lanes
            scale2, neg2 = gl.inline_asm_elementwise(_SCALE_PAIR_ASM, "=r,=r,h", [scale],
                                                     dtype=(gl.uint32, gl.uint32), is_pure=True, pack=1)
            bias2 = gl.inline_asm_elementwise("mov.b32 $0, {$1, $1};", "=r,h", [bias], dtype=gl.uint32,
                                              is_pure=True, pack=1)
            scale2 = _per_pair(scale2, pairs)
            neg2 = _per_pair(neg2, pairs)
            bias2 = _per_pair(bias2, pairs)
        else:  # mxfp4 / nvfp4: the block scale in bf16 in both lanes (neg2 and bias2 unused by the e2m1 decoder)
            if MODE == 1:  # e8m0 byte e -> 2**(e - 127): bits e << 7 (0: the subnormal 2**-127)
                e = scale.to(gl.int32)
                bits = gl.where(e == 0, 0x40, e << 7)
                scale2 = (bits | (bits << 16)).to(gl.uint32, bitcast=True)
            else:  # e4m3, exact in bf16
                byte = scale.to(gl.int32) & 0xFF
                one = gl.full(byte.shape, 0x3F803F80, gl.uint32, layout=byte.type.layout)
                scale2 = gl.inline_asm_elementwise(_E4M3_WORD_ASM, "=r,r,r",
                                                   [(byte | (byte << 16)).to(gl.uint32, bitcast=True), one],
                                                   dtype=gl.uint32, is_pure=True, pack=1)
            scale2 = _per_pair(scale2, pairs)
            neg2 = scale2
            bias2 = scale2
        for j in gl.static_range(4):
            slot0, slot1 = _slot_planes(even, odd, scale2, neg2, bias2, j, MODE, a_layout)
            acc = warpgroup_mma(slot0, x_smem.slice(2 * j * PACKS, PACKS, dim=1).permute((1, 0)), acc,
                                is_async=True)
            acc = warpgroup_mma(slot1, x_smem.slice((2 * j + 1) * PACKS, PACKS, dim=1).permute((1, 0)), acc,
                                is_async=True)
        return warpgroup_mma_wait(num_outstanding=0, deps=(acc,))

    @gluon.jit
    def _tile_rows(row_tile, local, M, n_rows, n_weights, lhs_ptr, rhs_ptr, rows_ptr, tile_w_ptr, tile_start_ptr,
                   tile_rows_ptr, sx_b, sx_m, so_i, so_m, ROUTING: gl.constexpr, BLOCK_M: gl.constexpr):
        """A row tile's rows as qmm_kernel finds them (see its ROUTING), for the local row numbers `local` (in the
        layout they are wanted in): (output row numbers, which exist, x row offsets, output row offsets, weight)."""
        if ROUTING == 2:  # the schedule's tile: its weight, its first sorted row and its row count
            ok = local < gl.load(tile_rows_ptr + row_tile)  # (no rows in tiles past the schedule)
            rows = gl.load(rows_ptr + gl.load(tile_start_ptr + row_tile) + local, mask=ok, other=0).to(gl.int64)
            item = rows // M
            x_rows = gl.load(lhs_ptr + item, mask=ok, other=0).to(gl.int64) * sx_b + (rows % M) * sx_m
            weight = gl.minimum(gl.load(tile_w_ptr + row_tile).to(gl.int64), n_weights - 1)
        elif ROUTING == 1:  # row tile i is routed item i: its M rows, weight rhs[i], x batch lhs[i]
            item = row_tile.to(gl.int64)
            ok = local < M
            rows = item * M + local
            x_rows = gl.load(lhs_ptr + item).to(gl.int64) * sx_b + local.to(gl.int64) * sx_m
            weight = gl.load(rhs_ptr + item).to(gl.int64)
        else:  # one plain product
            rows = (row_tile * BLOCK_M + local).to(gl.int64)
            ok = rows < n_rows
            item = rows * 0
            x_rows = rows * sx_m
            weight = 0
        return rows, ok, x_rows, item * so_i + (rows % M) * so_m, weight

    @gluon.jit
    def _k_range(src, lo, hi, x_smem, MODE: gl.constexpr, GS: gl.constexpr, PACKS: gl.constexpr, BLOCK_M: gl.constexpr,
                 BLOCK_N: gl.constexpr, X_AHEAD: gl.constexpr, X_SLOT_MAJOR: gl.constexpr, PREFETCH: gl.constexpr,
                 mma: gl.constexpr, a_layout: gl.constexpr):
        """The products of the blocks of lo .. hi - 1 (one split) that lie wholly inside K, from zero, in order,
        each one's loads issued a block ahead (PREFETCH 1: two blocks a step) or not (0). src: the tile's sources
        (the kernel's tuple)."""
        w_ptrs, s_ptrs, b_ptrs, x_ptrs, K, groups, packs2d, m_ok, sw_c, ss_c, sb_c, sx_k = src
        BLOCK_K: gl.constexpr = PACKS * 8
        whole = gl.maximum(lo, gl.minimum(hi, K // BLOCK_K))  # the split's blocks lying wholly inside K end here
        acc = gl.zeros((BLOCK_N, BLOCK_M), gl.float32, layout=mma)
        if PREFETCH == 1:  # two blocks a step, each one's loads issued one block ahead (no register copies)
            if lo < whole:
                a = _load_state(src, lo, GS, PACKS, X_AHEAD, X_SLOT_MAJOR)
                for pair in range(0, (whole - lo) // 2):
                    kb = lo + 2 * pair
                    b = _load_state(src, kb + 1, GS, PACKS, X_AHEAD, X_SLOT_MAJOR)
                    acc = _run_block(acc, a, kb, src, x_smem, MODE, PACKS, X_AHEAD, X_SLOT_MAJOR, a_layout)
                    # (past the split's end: its last block again, unused)
                    a = _load_state(src, gl.minimum(kb + 2, whole - 1), GS, PACKS, X_AHEAD, X_SLOT_MAJOR)
                    acc = _run_block(acc, b, kb + 1, src, x_smem, MODE, PACKS, X_AHEAD, X_SLOT_MAJOR, a_layout)
                if (whole - lo) % 2 == 1:  # the split's last block, loaded by the last step (or before the loop)
                    acc = _run_block(acc, a, whole - 1, src, x_smem, MODE, PACKS, X_AHEAD, X_SLOT_MAJOR, a_layout)
        else:
            for kb in range(lo, whole):
                words, scale, bias = _load_weights(w_ptrs, s_ptrs, b_ptrs, kb, K, groups, packs2d, sw_c, ss_c,
                                                   sb_c, GS, PACKS, False)
                acc = _mma_block(acc, words, scale, bias, _load_x(x_ptrs, kb, K, m_ok, sx_k, PACKS, X_SLOT_MAJOR),
                                 x_smem, MODE, PACKS, a_layout)
        return acc

    @gluon.jit
    def _copy_x(x_buf, x_ptrs, kb, m_ok, PACKS: gl.constexpr):
        """cp.async of K block kb of the slot-major x copy into x_buf (rows past the tile's: zeros), one group."""
        _async_load(x_buf, x_ptrs + kb * PACKS * 8, mask=m_ok[:, None])
        async_copy.commit_group()

    @gluon.jit
    def _x_landed(x_bufs, x_ptrs, kb_next, m_ok, PACKS: gl.constexpr, NEXT: gl.constexpr):
        """Start the copy of block kb_next's x into buffer NEXT (free: every warp is past the wgmmas of the block that
        used it), then wait until the other buffer's copy, issued one block before, has landed for every thread."""
        _barrier()
        _copy_x(x_bufs.index(NEXT), x_ptrs, kb_next, m_ok, PACKS)
        async_copy.wait_group(1)
        fence_async_shared()
        _barrier()

    @gluon.jit
    def _k_range_x_async(src, lo, hi, x_bufs, MODE: gl.constexpr, GS: gl.constexpr, PACKS: gl.constexpr,
                         BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, mma: gl.constexpr, a_layout: gl.constexpr):
        """_k_range for wide token tiles with x copied slot-major (LOWBIT_GLUON_X_ASYNC): each block's x lands in
        one of two shared buffers by cp.async while the block before it is decoded and multiplied; words, scales and
        biases are loaded one block ahead in registers (two blocks a step, no register copies)."""
        w_ptrs, s_ptrs, b_ptrs, x_ptrs, K, groups, packs2d, m_ok, sw_c, ss_c, sb_c, sx_k = src
        BLOCK_K: gl.constexpr = PACKS * 8
        whole = gl.maximum(lo, gl.minimum(hi, K // BLOCK_K))
        acc = gl.zeros((BLOCK_N, BLOCK_M), gl.float32, layout=mma)
        if lo < whole:
            _barrier()  # every warp is past the previous split's wgmmas (its last block may have read buffer 0)
            _copy_x(x_bufs.index(0), x_ptrs, lo, m_ok, PACKS)
            w_a, s_a, b_a = _load_weights(w_ptrs, s_ptrs, b_ptrs, lo, K, groups, packs2d, sw_c, ss_c, sb_c, GS, PACKS,
                                          False)
            for pair in range(0, (whole - lo) // 2):
                kb = lo + 2 * pair
                w_b, s_b, b_b = _load_weights(w_ptrs, s_ptrs, b_ptrs, kb + 1, K, groups, packs2d, sw_c, ss_c, sb_c,
                                              GS, PACKS, False)
                _x_landed(x_bufs, x_ptrs, kb + 1, m_ok, PACKS, 1)
                acc = _dot_block(acc, w_a, s_a, b_a, x_bufs.index(0), MODE, PACKS, a_layout)
                ahead = gl.minimum(kb + 2, whole - 1)  # (past the range: its last block again, unused)
                w_a, s_a, b_a = _load_weights(w_ptrs, s_ptrs, b_ptrs, ahead, K, groups, packs2d, sw_c, ss_c, sb_c,
                                              GS, PACKS, False)
                _x_landed(x_bufs, x_ptrs, ahead, m_ok, PACKS, 0)
                acc = _dot_block(acc, w_b, s_b, b_b, x_bufs.index(1), MODE, PACKS, a_layout)
            async_copy.wait_group(0)
            if (whole - lo) % 2 == 1:  # the range's last whole block: its words and x (buffer 0) loaded last
                fence_async_shared()
                _barrier()
                acc = _dot_block(acc, w_a, s_a, b_a, x_bufs.index(0), MODE, PACKS, a_layout)
        return acc

    @gluon.jit
    def _split_partial(src, x_bufs, x_smem, lo, hi, MODE: gl.constexpr, GS: gl.constexpr, PACKS: gl.constexpr,
                       BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, X_AHEAD: gl.constexpr, X_SLOT_MAJOR: gl.constexpr,
                       X_ASYNC: gl.constexpr, PREFETCH: gl.constexpr, mma: gl.constexpr, a_layout: gl.constexpr):
        """One split's partial (K blocks lo .. hi - 1, from zero): the blocks wholly inside K with x staged through
        registers or by cp.async, then the last block of K if it is partly past K and in the split (x through
        registers, into x_smem: with X_ASYNC that is buffer 0)."""
        w_ptrs, s_ptrs, b_ptrs, x_ptrs, K, groups, packs2d, m_ok, sw_c, ss_c, sb_c, sx_k = src
        if X_ASYNC:
            acc = _k_range_x_async(src, lo, hi, x_bufs, MODE, GS, PACKS, BLOCK_M, BLOCK_N, mma, a_layout)
        else:
            acc = _k_range(src, lo, hi, x_smem, MODE, GS, PACKS, BLOCK_M, BLOCK_N, X_AHEAD, X_SLOT_MAJOR, PREFETCH,
                           mma, a_layout)
        BLOCK_K: gl.constexpr = PACKS * 8
        whole = gl.maximum(lo, gl.minimum(hi, K // BLOCK_K))
        if whole < hi:  # (empty splits have none; _mma_block's barriers order it after the range's wgmmas)
            words, scale, bias = _load_weights(w_ptrs, s_ptrs, b_ptrs, whole, K, groups, packs2d, sw_c, ss_c, sb_c,
                                               GS, PACKS, True)
            acc = _mma_block(acc, words, scale, bias, _load_x(x_ptrs, whole, K, m_ok, sx_k, PACKS, X_SLOT_MAJOR),
                             x_smem, MODE, PACKS, a_layout)
        return acc

    @gluon.jit
    def packed4_decode_kernel(
        x_ptr, w_ptr, s_ptr, b_ptr, g_ptr, lhs_ptr, rhs_ptr, rows_ptr, tile_w_ptr, tile_start_ptr, tile_rows_ptr,
        out_ptr, part_ptr, arrivals_ptr,
        M, N, K, n_rows, n_weights, sg,
        sx_b, sx_m, sx_k, sw_b, sw_r, sw_c, ss_b, ss_r, ss_c, sb_b, sb_r, sb_c, so_i, so_m, so_n,
        MODE: gl.constexpr, BITS: gl.constexpr, GS: gl.constexpr, TRANSPOSE: gl.constexpr,
        HAS_GLOBAL: gl.constexpr, PER_PACK: gl.constexpr, WORDS: gl.constexpr, WORDS_POW2: gl.constexpr,
        SPLITS: gl.constexpr, SPLIT_IN_GRID: gl.constexpr, SCALE_DTYPE: gl.constexpr, DOT_DTYPE: gl.constexpr,
        PRECISION: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, BLOCK_K: gl.constexpr,
        ROUTING: gl.constexpr, PACKED: gl.constexpr, BLOCKS: gl.constexpr, UNROLL_SLOTS: gl.constexpr,
        X_SLOT_MAJOR: gl.constexpr, INTERPRET: gl.constexpr, PREFETCH: gl.constexpr, X_AHEAD_M: gl.constexpr,
        X_ASYNC: gl.constexpr,
    ):
        """qmm.qmm_kernel's contract (the same arguments, the same program grid and split fold) for the calls
        `serves` admits; the weight tile is the wgmma's register A operand, x the shared-memory B operand.
        PREFETCH: each block's weight loads (and x's, for tiles of up to X_AHEAD_M tokens) are issued one block
        ahead, before the previous blocks' decode."""
        WARPS: gl.constexpr = BLOCK_N // 16  # (each warp's m16 rows of the wgmma's M side)
        gl.static_assert(BLOCK_K == 128 and BLOCK_M <= 128 and gl.num_warps() == WARPS)
        PACKS: gl.constexpr = BLOCK_K // 8
        mma: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[WARPS, 1],
                                                      instr_shape=[16, BLOCK_M, 16])
        a_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=mma, k_width=2)
        x_layout: gl.constexpr = gl.BlockedLayout([1, 8], [2, 16], [WARPS, 1], [1, 0])
        x_smem_layout: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=16, rank=2)

        pid = gl.program_id(0)
        if ROUTING == 2:
            row_tiles = gl.cdiv(n_rows, BLOCK_M) + gl.minimum(n_weights, n_rows)  # the launcher's bound
        elif ROUTING == 1:
            row_tiles = n_rows // M
        else:
            row_tiles = gl.cdiv(n_rows, BLOCK_M)
        tiles = row_tiles * gl.cdiv(N, BLOCK_N)
        tile = pid % tiles
        split = pid // tiles
        row_tile = tile % row_tiles  # consecutive programs share a weight tile (L2 reuse)
        pid_n = tile // row_tiles

        # token rows of this tile: x rows (x_layout) and output rows (the accumulator's layout)
        local = gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, x_layout))
        local_out = gl.arange(0, BLOCK_M, layout=gl.SliceLayout(0, mma))
        _rows, m_ok, x_rows, _out, weight = _tile_rows(
            row_tile, local, M, n_rows, n_weights, lhs_ptr, rhs_ptr, rows_ptr, tile_w_ptr, tile_start_ptr,
            tile_rows_ptr, sx_b, sx_m, so_i, so_m, ROUTING, BLOCK_M)
        rows_out, rows_ok, _x, out_rows, _weight = _tile_rows(
            row_tile, local_out, M, n_rows, n_weights, lhs_ptr, rhs_ptr, rows_ptr, tile_w_ptr, tile_start_ptr,
            tile_rows_ptr, sx_b, sx_m, so_i, so_m, ROUTING, BLOCK_M)
        offs_k = gl.arange(0, BLOCK_K, layout=gl.SliceLayout(0, x_layout))
        if X_SLOT_MAJOR:
            x_ptrs = x_ptr + x_rows[:, None] + offs_k[None, :]
        else:
            x_ptrs = x_ptr + x_rows[:, None] + offs_k[None, :] * sx_k
        if X_ASYNC:  # two buffers: one block's x lands by cp.async while the other's feeds the wgmmas
            x_bufs = gl.allocate_shared_memory(gl.bfloat16, [2, BLOCK_M, BLOCK_K], x_smem_layout)
            x_smem = x_bufs.index(0)
        else:
            x_bufs = None
            x_smem = gl.allocate_shared_memory(gl.bfloat16, [BLOCK_M, BLOCK_K], x_smem_layout)

        # weight rows of this tile in the A operand's layout
        offs_p = gl.arange(0, PACKS, layout=gl.SliceLayout(0, a_layout))
        w_rows = _weight_rows(pid_n, N, BLOCK_N, a_layout)
        w_ptrs = w_ptr + weight * sw_b + w_rows[:, None] * sw_r + offs_p[None, :] * sw_c
        packs2d = offs_p[None, :] + 0 * w_rows[:, None].to(gl.int32)
        # scales and biases: a thread loads its two rows' groups of a block (the layout _per_pair broadcasts)
        GROUPS: gl.constexpr = BLOCK_K // GS
        g_layout: gl.constexpr = gl.SliceLayout(2, _group_layout(GROUPS, WARPS))
        rows_g = _weight_rows(pid_n, N, BLOCK_N, g_layout)
        groups = gl.arange(0, GROUPS, layout=gl.SliceLayout(0, g_layout))[None, :] + 0 * rows_g[:, None].to(gl.int32)
        s_ptrs = s_ptr + weight * ss_b + rows_g[:, None] * ss_r + groups * ss_c
        b_ptrs = b_ptr + weight * sb_b + rows_g[:, None] * sb_r + groups * sb_c

        k_blocks = gl.cdiv(K, BLOCK_K)
        per_split = gl.cdiv(k_blocks, SPLITS)
        if ROUTING == 2:  # a tile with no rows (past the schedule) does no work
            k_end = gl.where(gl.load(tile_rows_ptr + row_tile) > 0, k_blocks, 0)
        else:
            k_end = k_blocks
        X_AHEAD: gl.constexpr = PREFETCH > 0 and BLOCK_M <= X_AHEAD_M  # (wider x blocks hold many registers)
        src = (w_ptrs, s_ptrs, b_ptrs, x_ptrs, K, groups, packs2d, m_ok, sw_c, ss_c, sb_c, sx_k)
        if SPLIT_IN_GRID or SPLITS == 1:  # this program's split
            lo = split * per_split
            acc = _split_partial(src, x_bufs, x_smem, lo, gl.minimum(lo + per_split, k_end), MODE, GS, PACKS, BLOCK_M,
                                 BLOCK_N, X_AHEAD, X_SLOT_MAJOR, X_ASYNC, PREFETCH, mma, a_layout)
        else:  # every split in turn, each from zero, added in split order (as qmm_kernel's one-program loop)
            acc = gl.zeros((BLOCK_N, BLOCK_M), gl.float32, layout=mma)
            for s in range(0, SPLITS):
                lo = s * per_split
                acc = acc + _split_partial(src, x_bufs, x_smem, lo, gl.minimum(lo + per_split, k_end), MODE, GS,
                                           PACKS, BLOCK_M, BLOCK_N, X_AHEAD, X_SLOT_MAJOR, X_ASYNC, PREFETCH, mma,
                                           a_layout)

        offs_out = pid_n * BLOCK_N + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, mma))
        mask = (offs_out < N)[:, None] & rows_ok[None, :]
        out = out_ptr + out_rows[None, :] + offs_out.to(gl.int64)[:, None] * so_n
        if SPLIT_IN_GRID and SPLITS > 1:
            # each split stores its partial; the tile's last program to arrive adds them, in split order
            part = part_ptr + (rows_out[None, :] * N + offs_out[:, None])
            gl.store(part + split * n_rows * N, acc, mask=mask)
            _barrier()  # every thread's partial is stored before the arrival is counted (release)
            arrived = gl.atomic_add(arrivals_ptr + tile, 1, sem="acq_rel", scope="gpu")
            if arrived == SPLITS - 1:
                total = gl.zeros((BLOCK_N, BLOCK_M), gl.float32, layout=mma)
                for piece in gl.static_range(SPLITS):
                    total = total + gl.load(part + piece * n_rows * N, mask=mask, other=0.0, cache_modifier=".cg")
                gl.atomic_xchg(arrivals_ptr + tile, 0, sem="relaxed", scope="gpu")  # ready for the next launch
                if HAS_GLOBAL:  # nvfp4's tensor scale, applied to the sum as qmm_kernel does
                    total = total * (gl.load(g_ptr + weight * sg) / 2688.0)
                gl.store(out, total.to(out_ptr.dtype.element_ty), mask=mask)
        else:
            if HAS_GLOBAL:
                acc = acc * (gl.load(g_ptr + weight * sg) / 2688.0)
            gl.store(out, acc.to(out_ptr.dtype.element_ty), mask=mask)
