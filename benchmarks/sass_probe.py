"""Read a decode kernel's machine code without a GPU (development): compile qmm_kernel (Triton) and the Gluon decode
kernel (wgmma_decode.py) for sm_90 with a decode call's specializations (and the MoE prefill's grouped 128 x 128
tile), and print registers, shared memory and the K loop's instruction count by opcode. Counting instructions per K
block first, then timing, is how the decode kernels were tuned (benchmarks/NOTES.md): at M = 1 they are bound by
instruction issue.

Usage (any machine with Triton, repo root): PYTHONPATH=src python benchmarks/sass_probe.py [--listing]
The codegen is the installed Triton's; the GPU machine runs Triton 3.6 (`pip install triton==3.6.0` in a venv of its
own reproduces it).
"""

import collections
import os
import re
import subprocess
import sys
import tempfile

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler.compiler import ASTSource

from lowbit.backends.triton import qmm, wgmma_decode

POINTERS = dict(x_ptr="*bf16", w_ptr="*i32", s_ptr="*bf16", b_ptr="*bf16", g_ptr="*bf16", lhs_ptr="*i64",
                rhs_ptr="*i64", rows_ptr="*i32", tile_w_ptr="*i32", tile_start_ptr="*i32", tile_rows_ptr="*i32",
                out_ptr="*bf16", part_ptr="*fp32", arrivals_ptr="*i32")
INTS = "M N K n_rows n_weights sg sx_b sx_m sx_k sw_b sw_r sw_c ss_b ss_r ss_c sb_b sb_r sb_c so_i so_m so_n".split()
ONES = ("sx_k", "sw_c", "ss_c", "sb_c", "so_n")  # unit strides: Triton specializes them as constants
DIVISIBLE = ("K", "N", "sx_b", "sx_m", "sw_b", "sw_r", "ss_b", "ss_r", "sb_b", "sb_r", "so_i", "so_m")


def compile_decode(kernel, gluon: bool, group_size=64, splits=4, routing=0, x_slot_major=True, block_n=64,
                   mode=0, has_global=False, **extra):
    """A 4-bit bf16 decode call's kernel (BLOCK_M 16), compiled for sm_90: affine (mode 0, bf16 scales and biases),
    mxfp4 (1) or nvfp4 (3; uint8 scales, `has_global`: the tensor scale)."""
    pointers = dict(POINTERS) if mode == 0 else dict(POINTERS, s_ptr="*u8", b_ptr="*u8", g_ptr="*fp32")
    signature = dict(pointers, **{name: "i32" for name in INTS if name not in ONES})
    constexprs = dict(MODE=mode, BITS=4, GS=group_size, TRANSPOSE=True, HAS_GLOBAL=has_global, PER_PACK=8, WORDS=1,
                      WORDS_POW2=1, SPLITS=splits, SPLIT_IN_GRID=True,
                      SCALE_DTYPE=tl.bfloat16 if mode == 0 else tl.float32, DOT_DTYPE=tl.bfloat16, PRECISION="tf32",
                      BLOCK_M=16, BLOCK_N=block_n, BLOCK_K=128, ROUTING=routing, PACKED=True, BLOCKS=1,
                      UNROLL_SLOTS=True, X_SLOT_MAJOR=x_slot_major, INTERPRET=False, **{name: 1 for name in ONES})
    constexprs.update(extra)
    if gluon:
        constexprs.setdefault("PREFETCH", 1)
        constexprs.setdefault("X_AHEAD_M", 16)
        constexprs.setdefault("X_ASYNC", False)
    signature.update({name: "constexpr" for name in constexprs})
    attrs = {(kernel.arg_names.index(name),): [["tt.divisibility", 16]] for name in (*POINTERS, *DIVISIBLE)}
    if gluon:
        from triton.experimental.gluon._runtime import GluonASTSource as Source
    else:
        Source = ASTSource
    source = Source(kernel, signature, constexprs, attrs)
    return triton.compile(source, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=block_n // 16,
                                                                                   num_stages=3))


def disassemble(compiled) -> tuple[str, str]:
    """(SASS text, resource usage) of a compiled kernel, through the cuobjdump that ships with Triton."""
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        sass = subprocess.run([tool, "-sass", f.name], capture_output=True, text=True).stdout
        usage = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True).stdout
    return sass, " ".join(re.findall(r"REG:\d+|STACK:\d+|SHARED:\d+", usage))


def innermost_loops(sass: str) -> list[list[str]]:
    """The instructions of each loop that contains a wgmma (from a backward branch's target to the branch)."""
    lines = [line for line in sass.splitlines() if re.match(r"\s+/\*[0-9a-f]+\*/", line)]
    at = [(int(re.search(r"/\*([0-9a-f]+)\*/", line).group(1), 16), line) for line in lines]
    loops = []
    for address, line in at:
        target = re.search(r"BRA (0x[0-9a-f]+)", line)
        if target and int(target.group(1), 16) < address:
            body = [text for a, text in at if int(target.group(1), 16) <= a <= address]
            if any("HGMMA" in text for text in body):
                loops.append(body)
    return loops


def opcode(line: str) -> str:
    return re.sub(r"^\s*/\*[0-9a-f]+\*/\s*(@!?U?P\w+\s+)?", "", line).split()[0].split(".")[0]


def main():
    listing = "--listing" in sys.argv
    print(f"triton {triton.__version__}, sm_90, 4-bit bf16 decode tile (16 tokens), per K block of 128")
    variants = [("affine4 g64, qmm_kernel (Triton)", qmm.qmm_kernel, False, {}),
                ("affine4 g64, qmm_kernel, x reordered in the kernel", qmm.qmm_kernel, False, dict(x_slot_major=False)),
                ("mxfp4, qmm_kernel (x reordered in the kernel)", qmm.qmm_kernel, False,
                 dict(x_slot_major=False, mode=1, group_size=32)),
                ("nvfp4, qmm_kernel (x reordered in the kernel)", qmm.qmm_kernel, False,
                 dict(x_slot_major=False, mode=3, group_size=16))]
    if wgmma_decode.gluon is not None:
        gluon_kernel = wgmma_decode.packed4_decode_kernel
        variants += [("affine4 g64, Gluon decode kernel", gluon_kernel, True, dict(PREFETCH=1, x_slot_major=False)),
                     ("affine4 g64, Gluon, x copied slot-major first", gluon_kernel, True, dict(PREFETCH=1)),
                     ("affine4 g64, Gluon, no prefetch", gluon_kernel, True, dict(PREFETCH=0, x_slot_major=False)),
                     ("affine4 g64, Gluon, 8-token tile", gluon_kernel, True,
                      dict(PREFETCH=1, x_slot_major=False, BLOCK_M=8)),
                     ("mxfp4, Gluon", gluon_kernel, True, dict(PREFETCH=1, x_slot_major=False, mode=1,
                                                                group_size=32)),
                     ("nvfp4, Gluon", gluon_kernel, True, dict(PREFETCH=1, x_slot_major=False, mode=3,
                                                                group_size=16))]
        grouped = dict(routing=2, block_n=128, BLOCK_M=128, SPLIT_IN_GRID=False, splits=8)  # MoE prefill's tile
        variants += [("affine4 g64, MoE prefill tile (128 x 128, grouped), qmm_kernel", qmm.qmm_kernel, False,
                      grouped),
                     ("affine4 g64, MoE prefill tile, Gluon", gluon_kernel, True, dict(grouped, PREFETCH=1)),
                     ("affine4 g64, MoE prefill tile, Gluon, x loaded ahead", gluon_kernel, True,
                      dict(grouped, PREFETCH=1, X_AHEAD_M=128)),
                     ("affine4 g64, MoE prefill tile, Gluon, x by cp.async", gluon_kernel, True,
                      dict(grouped, X_ASYNC=True))]
    for name, kernel, gluon, options in variants:
        sass, usage = disassemble(compile_decode(kernel, gluon, **options))
        for body in innermost_loops(sass):
            ops = collections.Counter(opcode(line) for line in body)
            blocks = ops["HGMMA"] // 8  # K blocks a trip: eight k16 wgmmas each
            weights = blocks * 64 * 128 // 128  # per thread: 64 rows x 128 codes a block over 128 threads
            print(f"\n{name}: {usage}; loop of {len(body)} instructions for {blocks} K block(s) = "
                  f"{len(body) / weights:.2f} per weight")
            print("  " + ", ".join(f"{op} {n}" for op, n in ops.most_common()))
            if listing:
                print("\n".join(re.sub(r"\s*/\* 0x[0-9a-f]+ \*/", "", line) for line in body))


if __name__ == "__main__":
    main()
