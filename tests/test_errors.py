"""Bad inputs: every invalid argument of every public op raises a ValueError that starts with "[<op>]" and says
what was expected and what was given. Plus the non-finite policy of quantize (raise, or NaN groups)."""

from __future__ import annotations

import re

import pytest
import torch

import lowbit
from conftest import ALL_CONFIGS, DTYPES, same_bits

GEN = torch.Generator().manual_seed(2024)
W = torch.randn(4, 64, generator=GEN)  # float32, K = 64
X = torch.randn(2, 64, generator=GEN)
AFF = lowbit.quantize(W)  # gs 64, bits 4: w_q (4, 8), scales (4, 1), biases (4, 1)
AFF32 = lowbit.quantize(W, 32, 4)  # w_q (4, 8), scales (4, 2), biases (4, 2)
MX4 = lowbit.quantize(W, mode="mxfp4")  # w_q (4, 8), scales (4, 2) uint8
MX8 = lowbit.quantize(W, mode="mxfp8")  # w_q (4, 16), scales (4, 2) uint8
NV = lowbit.quantize(W, mode="nvfp4")  # w_q (4, 8), scales (4, 4) uint8
W3 = torch.randn(2, 4, 64, generator=GEN)  # two experts
AFF3 = lowbit.quantize(W3)
NV3 = lowbit.quantize(W3, mode="nvfp4")
X3 = torch.randn(2, 3, 64, generator=GEN)
G1 = torch.tensor([3.0])  # a valid nvfp4 global scale
META = "meta"  # a second device: the checks run before any data is touched

q, dq, qmm, gqmm = lowbit.quantize, lowbit.dequantize, lowbit.quantized_matmul, lowbit.gather_qmm
qq, gqq, to8, from8 = lowbit.qqmm, lowbit.gather_qqmm, lowbit.to_fp8, lowbit.from_fp8

MODE = r"Invalid quantization mode {}; expected one of affine, mxfp4, mxfp8, nvfp4"
FLOAT = r"must have a floating dtype \(float16, bfloat16 or float32\) but got torch\.{}"
GS = r"{} quantization requires group size {} but got {}"
BITS = r"{} quantization requires bits in \{{{}\}} but got {}"
AFFINE_BITS = "1, 2, 3, 4, 5, 6, 8"
NOT_U32 = r"quantized weight w must be uint32 packed codes but got dtype torch\.{}"
SCALES_SHAPE = r"Scales of shape {} do not match w of shape {} with group_size={} and bits={}: expected scales of shape {}"
GLOBAL_MODE = r"global_scale is only supported for nvfp4 quantization but mode is '{}'"
GLOBAL_KIND = r"{} must be a float32 tensor with {} element\(s\) but got dtype torch\.{} and shape {}"
SAME_DEVICE = r"All tensors must be on the same device but got .*{} on cpu.*{} on meta"


def case(op, fn, regex, id):
    return pytest.param(op, fn, regex, id=f"{op}-{id}")


CASES = [
    # ---------------------------------------------------------------------------------------------- quantize
    case("quantize", lambda: q(W, mode="xyz"), MODE.format("'xyz'"), "mode-xyz"),
    case("quantize", lambda: q(W, mode=None), MODE.format("None"), "mode-None"),
    case("quantize", lambda: q(W, mode="AFFINE"), MODE.format("'AFFINE'"), "mode-case"),
    case("quantize", lambda: q(W.to(torch.int32)), "w " + FLOAT.format("int32"), "w-int32"),
    case("quantize", lambda: q(W.double()), "w " + FLOAT.format("float64"), "w-float64"),
    case("quantize", lambda: q(W.to(torch.uint8)), "w " + FLOAT.format("uint8"), "w-uint8"),
    case("quantize", lambda: q(W.to(torch.float8_e4m3fn)), "w " + FLOAT.format("float8_e4m3fn"), "w-float8"),
    case("quantize", lambda: q(W.tolist()), r"w must be a torch\.Tensor but got list", "w-list"),
    case("quantize", lambda: q(W[0]), r"at least 2 dimensions but it has only 1", "w-1d"),
    case("quantize", lambda: q(torch.tensor(1.0)), r"at least 2 dimensions but it has only 0", "w-0d"),
    case("quantize", lambda: q(torch.randn(4, 48), 32, 4),
         r"divisible by the quantization group size 32\. However the provided matrix has shape \(4,48\)", "K-mod-gs"),
    case("quantize", lambda: q(torch.randn(2, 40), mode="nvfp4"),
         r"group size 16\. However the provided matrix has shape \(2,40\)", "K-mod-gs-nvfp4"),
    case("quantize", lambda: q(W, 16, 4), GS.format("affine", "32 or 64 or 128", 16), "affine-gs16"),
    case("quantize", lambda: q(W, 256, 4), GS.format("affine", "32 or 64 or 128", 256), "affine-gs256"),
    case("quantize", lambda: q(W, True, 4), GS.format("affine", "32 or 64 or 128", True), "affine-gs-bool"),
    case("quantize", lambda: q(W, 64, 7), BITS.format("affine", AFFINE_BITS, 7), "affine-bits7"),
    case("quantize", lambda: q(W, 64, 0), BITS.format("affine", AFFINE_BITS, 0), "affine-bits0"),
    case("quantize", lambda: q(W, 64, 9), BITS.format("affine", AFFINE_BITS, 9), "affine-bits9"),
    case("quantize", lambda: q(W, 64, 4.0), BITS.format("affine", AFFINE_BITS, "4.0"), "affine-bits-float"),
    case("quantize", lambda: q(W, 32, 3, "mxfp4"), BITS.format("mxfp4", "4", 3), "mxfp4-bits3"),
    case("quantize", lambda: q(W, 64, 4, "mxfp4"), GS.format("mxfp4", "32", 64), "mxfp4-gs64"),
    case("quantize", lambda: q(W, 32, 4, "mxfp8"), BITS.format("mxfp8", "8", 4), "mxfp8-bits4"),
    case("quantize", lambda: q(W, 16, 8, "mxfp8"), GS.format("mxfp8", "32", 16), "mxfp8-gs16"),
    case("quantize", lambda: q(W, 32, 4, "nvfp4"), GS.format("nvfp4", "16", 32), "nvfp4-gs32"),
    case("quantize", lambda: q(W, 16, 8, "nvfp4"), BITS.format("nvfp4", "4", 8), "nvfp4-bits8"),
    case("quantize", lambda: q(W, global_scale=G1), GLOBAL_MODE.format("affine"), "global-affine"),
    case("quantize", lambda: q(W, mode="mxfp4", global_scale=G1), GLOBAL_MODE.format("mxfp4"), "global-mxfp4"),
    case("quantize", lambda: q(W, mode="mxfp8", global_scale=G1), GLOBAL_MODE.format("mxfp8"), "global-mxfp8"),
    case("quantize", lambda: q(W, mode="nvfp4", global_scale=G1.half()),
         GLOBAL_KIND.format("global_scale", 1, "float16", r"\(1\)"), "global-f16"),
    case("quantize", lambda: q(W, mode="nvfp4", global_scale=torch.tensor([1.0, 2.0])),
         GLOBAL_KIND.format("global_scale", 1, "float32", r"\(2\)"), "global-2-elements"),
    case("quantize", lambda: q(W, mode="nvfp4", global_scale=3.0),
         r"global_scale must be a torch\.Tensor but got float", "global-python-float"),
    case("quantize", lambda: q(W, nonfinite="skip"), r"nonfinite must be 'raise' or 'nan' but got 'skip'",
         "nonfinite-skip"),
    case("quantize", lambda: q(W, mode="nvfp4", global_scale=G1.to(META)),
         SAME_DEVICE.format("w", "global_scale"), "device"),
    # -------------------------------------------------------------------------------------------- dequantize
    case("dequantize", lambda: dq(*AFF, mode="xyz"), MODE.format("'xyz'"), "mode-xyz"),
    case("dequantize", lambda: dq(*AFF, mode=None), MODE.format("None"), "mode-None"),
    case("dequantize", lambda: dq(AFF[0].to(torch.int32), *AFF[1:]), NOT_U32.format("int32"), "w-int32"),
    case("dequantize", lambda: dq(W, *AFF[1:]), NOT_U32.format("float32"), "w-float32"),
    case("dequantize", lambda: dq(AFF[0][0], *AFF[1:]),
         r"quantized weight w must have at least 2 dimensions but got shape \(8\)", "w-1d"),
    case("dequantize", lambda: dq(AFF[0], AFF[1]), r"Biases must be provided for affine quantization", "no-biases"),
    case("dequantize", lambda: dq(*MX4, AFF[2], mode="mxfp4"),
         r"Biases must be None for mxfp4 quantization but were given", "mxfp4-biases"),
    case("dequantize", lambda: dq(*NV, AFF[2], mode="nvfp4"),
         r"Biases must be None for nvfp4 quantization but were given", "nvfp4-biases"),
    case("dequantize", lambda: dq(MX4[0], MX4[1].float(), mode="mxfp4"),
         r"mxfp4 scales must be uint8 \(e8m0 bytes\) but got dtype torch\.float32", "mxfp4-scales-float"),
    case("dequantize", lambda: dq(MX8[0], MX8[1].to(torch.int32), mode="mxfp8"),
         r"mxfp8 scales must be uint8 \(e8m0 bytes\) but got dtype torch\.int32", "mxfp8-scales-int32"),
    case("dequantize", lambda: dq(NV[0], NV[1].to(torch.bfloat16), mode="nvfp4"),
         r"nvfp4 scales must be uint8 \(e4m3 bytes\) but got dtype torch\.bfloat16", "nvfp4-scales-bf16"),
    case("dequantize", lambda: dq(AFF[0], AFF[1].to(torch.uint8), AFF[2]), "scales " + FLOAT.format("uint8"),
         "affine-scales-uint8"),
    case("dequantize", lambda: dq(AFF[0], AFF[1].double(), AFF[2]), "scales " + FLOAT.format("float64"),
         "affine-scales-f64"),
    case("dequantize", lambda: dq(AFF[0], AFF[1], AFF[2].to(torch.int32)), "biases " + FLOAT.format("int32"),
         "affine-biases-int32"),
    case("dequantize", lambda: dq(AFF[0], AFF[1], AFF[2].tolist()), r"biases must be a torch\.Tensor but got list",
         "affine-biases-list"),
    case("dequantize", lambda: dq(AFF[0], AFF[1].tolist(), AFF[2]), r"scales must be a torch\.Tensor but got list",
         "scales-list"),
    case("dequantize", lambda: dq(AFF[0], AFF[1], AFF[2][:2]),
         r"Scales and biases must have the same shape but got \(4,1\) and \(2,1\)", "scales-biases-shape"),
    case("dequantize", lambda: dq(AFF[0], AFF[1][:3], AFF[2][:3]),
         SCALES_SHAPE.format(r"\(3,1\)", r"\(4,8\)", 64, 4, r"\(4,1\)"), "scales-rows"),
    case("dequantize", lambda: dq(*AFF, group_size=32),
         SCALES_SHAPE.format(r"\(4,1\)", r"\(4,8\)", 32, 4, r"\(4,2\)"), "scales-vs-gs"),
    case("dequantize", lambda: dq(*AFF, bits=8),
         SCALES_SHAPE.format(r"\(4,1\)", r"\(4,8\)", 64, 8, r"\(4,0\)"), "scales-vs-bits"),
    case("dequantize", lambda: dq(MX4[0], MX4[1][:, :1], mode="mxfp4"),
         SCALES_SHAPE.format(r"\(4,1\)", r"\(4,8\)", 32, 4, r"\(4,2\)"), "mxfp4-scales-shape"),
    case("dequantize", lambda: dq(NV[0], NV[1][:, :2], mode="nvfp4"),
         SCALES_SHAPE.format(r"\(4,2\)", r"\(4,8\)", 16, 4, r"\(4,4\)"), "nvfp4-scales-shape"),
    case("dequantize", lambda: dq(*AFF, dtype=torch.int32), r"dtype must be a floating dtype .* but got torch\.int32",
         "dtype-int32"),
    case("dequantize", lambda: dq(*AFF, dtype=torch.float64), r"dtype must be a floating dtype .* but got torch\.float64",
         "dtype-float64"),
    case("dequantize", lambda: dq(*MX4, mode="mxfp4", dtype=torch.int32),
         r"dtype must be a floating dtype \(float16, bfloat16 or float32\) but got torch\.int32", "mxfp4-dtype-int32"),
    case("dequantize", lambda: dq(*MX4, group_size=64, mode="mxfp4"), GS.format("mxfp4", "32", 64), "mxfp4-gs64"),
    case("dequantize", lambda: dq(*MX4, bits=3, mode="mxfp4"), BITS.format("mxfp4", "4", 3), "mxfp4-bits3"),
    case("dequantize", lambda: dq(*MX8, group_size=16, mode="mxfp8"), GS.format("mxfp8", "32", 16), "mxfp8-gs16"),
    case("dequantize", lambda: dq(*MX8, bits=4, mode="mxfp8"), BITS.format("mxfp8", "8", 4), "mxfp8-bits4"),
    case("dequantize", lambda: dq(*AFF, bits=7), BITS.format("affine", AFFINE_BITS, 7), "affine-bits7"),
    case("dequantize", lambda: dq(*AFF, global_scale=G1), GLOBAL_MODE.format("affine"), "global-affine"),
    case("dequantize", lambda: dq(*MX4, mode="mxfp4", global_scale=G1), GLOBAL_MODE.format("mxfp4"), "global-mxfp4"),
    case("dequantize", lambda: dq(*NV, mode="nvfp4", global_scale=G1.half()),
         GLOBAL_KIND.format("global_scale", 1, "float16", r"\(1\)"), "global-f16"),
    case("dequantize", lambda: dq(*NV, mode="nvfp4", global_scale=torch.ones(2)),
         GLOBAL_KIND.format("global_scale", 1, "float32", r"\(2\)"), "global-2-elements"),
    case("dequantize", lambda: dq(AFF[0], AFF[1].to(META), AFF[2]), SAME_DEVICE.format("w", "scales"), "device"),
    # -------------------------------------------------------------------------------------- quantized_matmul
    case("quantized_matmul", lambda: qmm(X, *AFF, mode="xyz"), MODE.format("'xyz'"), "mode-xyz"),
    case("quantized_matmul", lambda: qmm(X, *AFF, mode=None), MODE.format("None"), "mode-None"),
    case("quantized_matmul", lambda: qmm(torch.randn(2, 32), *AFF),
         r"Last dimension of x with shape \(\.\.\., 32\) does not match the expanded quantized matrix \(64, 4\)",
         "x-last-dim"),
    case("quantized_matmul", lambda: qmm(X, *AFF, transpose=False),
         r"Last dimension of x with shape \(\.\.\., 64\) does not match the expanded quantized matrix \(4, 64\).*"
         r"transpose=False", "x-last-dim-not-transposed"),
    case("quantized_matmul", lambda: qmm(torch.randn(2, 32), *MX8, mode="mxfp8"),
         r"\(\.\.\., 32\) does not match the expanded quantized matrix \(64, 4\)", "x-last-dim-mxfp8"),
    case("quantized_matmul", lambda: qmm(X.to(torch.int32), *AFF), "x " + FLOAT.format("int32"), "x-int32"),
    case("quantized_matmul", lambda: qmm(X.double(), *AFF), "x " + FLOAT.format("float64"), "x-float64"),
    case("quantized_matmul", lambda: qmm(torch.randn(3, 2, 64), *AFF3),
         r"batch dimensions of x \(3,\) and w \(2,\) cannot be broadcast together", "batch-dims"),
    case("quantized_matmul", lambda: qmm(X, *AFF, transpose=1), r"transpose must be a bool but got 1",
         "transpose-int"),
    case("quantized_matmul", lambda: qmm(X, *AFF, transpose="yes"), r"transpose must be a bool but got 'yes'",
         "transpose-str"),
    case("quantized_matmul", lambda: qmm(X, AFF[0].to(torch.int32), *AFF[1:]), NOT_U32.format("int32"), "w-int32"),
    case("quantized_matmul", lambda: qmm(X, W, *AFF[1:]), NOT_U32.format("float32"), "w-float"),
    case("quantized_matmul", lambda: qmm(X, AFF[0], AFF[1]), r"Biases must be provided for affine quantization",
         "no-biases"),
    case("quantized_matmul", lambda: qmm(X, *MX4, AFF[2], mode="mxfp4"), r"Biases must be None for mxfp4",
         "fp-biases"),
    case("quantized_matmul", lambda: qmm(X, MX4[0], MX4[1].half(), mode="mxfp4"),
         r"mxfp4 scales must be uint8 \(e8m0 bytes\) but got dtype torch\.float16", "fp-scales-f16"),
    case("quantized_matmul", lambda: qmm(X, AFF[0], AFF[1].to(torch.int32), AFF[2]),
         "scales " + FLOAT.format("int32"), "affine-scales-int"),
    case("quantized_matmul", lambda: qmm(X, *AFF32, group_size=64),
         SCALES_SHAPE.format(r"\(4,2\)", r"\(4,8\)", 64, 4, r"\(4,1\)"), "scales-vs-gs"),
    case("quantized_matmul", lambda: qmm(X, AFF[0], AFF[1], AFF[2][:, :0]),
         r"Scales and biases must have the same shape but got \(4,1\) and \(4,0\)", "scales-biases-shape"),
    case("quantized_matmul", lambda: qmm(X, *AFF, bits=7), BITS.format("affine", AFFINE_BITS, 7), "bits7"),
    case("quantized_matmul", lambda: qmm(X, *MX4, mode="mxfp4", global_scale=G1), GLOBAL_MODE.format("mxfp4"),
         "global-mxfp4"),
    case("quantized_matmul", lambda: qmm(X.to(META), *AFF),
         r"All tensors must be on the same device but got x on meta, w on cpu, scales on cpu", "device-x"),
    case("quantized_matmul", lambda: qmm(X, AFF[0], AFF[1], AFF[2].to(META)),
         SAME_DEVICE.format("scales", "biases"), "device-biases"),
    # ------------------------------------------------------------------------------------------- gather_qmm
    case("gather_qmm", lambda: gqmm(X3, *AFF3, rhs_indices=torch.tensor([0, -1])),
         r"rhs_indices holds index -1, out of range for the 2 matrices of the flattened batch dims \(2,\)",
         "rhs-negative"),
    case("gather_qmm", lambda: gqmm(X3, *AFF3, rhs_indices=torch.tensor([0, 2])),
         r"rhs_indices holds index 2, out of range for the 2 matrices", "rhs-too-large"),
    case("gather_qmm", lambda: gqmm(X3, *AFF3, lhs_indices=torch.tensor([5])),
         r"lhs_indices holds index 5, out of range for the 2 matrices", "lhs-too-large"),
    case("gather_qmm", lambda: gqmm(X3, *AFF3, lhs_indices=torch.tensor([-3])),
         r"lhs_indices holds index -3, out of range", "lhs-negative"),
    case("gather_qmm", lambda: gqmm(X3, *AFF3, rhs_indices=torch.tensor([0.0, 1.0])),
         r"rhs_indices must be an integer tensor but got dtype torch\.float32", "rhs-float"),
    case("gather_qmm", lambda: gqmm(X3, *AFF3, lhs_indices=torch.tensor([True])),
         r"lhs_indices must be an integer tensor but got dtype torch\.bool", "lhs-bool"),
    case("gather_qmm", lambda: gqmm(X3, *AFF3, rhs_indices=[0, 1]),
         r"rhs_indices must be a torch\.Tensor but got list", "rhs-list"),
    case("gather_qmm", lambda: gqmm(X3, *AFF3, lhs_indices=torch.zeros(3, dtype=torch.long),
                                    rhs_indices=torch.zeros(2, dtype=torch.long)),
         r"lhs_indices \(3,\) and rhs_indices \(2,\) cannot be broadcast together", "index-broadcast"),
    case("gather_qmm", lambda: gqmm(X3, *AFF3, rhs_indices=torch.tensor([0, 1], device=META)),
         r"rhs_indices must be on cpu like x but is on meta", "index-device"),
    case("gather_qmm", lambda: gqmm(X[0], *AFF3, rhs_indices=torch.tensor([0])),
         r"x must have at least 2 dimension\(s\) but got shape \(64,\)", "x-1d"),
    case("gather_qmm", lambda: gqmm(X3, AFF3[0].to(torch.int32), *AFF3[1:]), NOT_U32.format("int32"), "w-int32"),
    case("gather_qmm", lambda: gqmm(X3, AFF3[0], AFF3[1][:1], AFF3[2][:1], rhs_indices=torch.tensor([0])),
         SCALES_SHAPE.format(r"\(1,4,1\)", r"\(2,4,8\)", 64, 4, r"\(2,4,1\)"), "scales-experts"),
    case("gather_qmm", lambda: gqmm(X3, *AFF3, mode="xyz"), MODE.format("'xyz'"), "mode-xyz"),
    case("gather_qmm", lambda: gqmm(X3, *AFF3, transpose=None), r"transpose must be a bool but got None",
         "transpose-None"),
    case("gather_qmm", lambda: gqmm(X3, *AFF3, global_scale=torch.ones(2)), GLOBAL_MODE.format("affine"),
         "global-affine"),
    case("gather_qmm", lambda: gqmm(X3, *NV3, mode="nvfp4", global_scale=torch.ones(3)),
         GLOBAL_KIND.format("global_scale", "1 or 2", "float32", r"\(3\)"), "global-count"),
    case("gather_qmm", lambda: gqmm(torch.randn(2, 3, 32), *AFF3, rhs_indices=torch.tensor([0])),
         r"\(\.\.\., 32\) does not match the expanded quantized matrix \(64, 4\)", "x-last-dim"),
    case("gather_qmm", lambda: gqmm(X3.half().to(torch.int16), *AFF3), "x " + FLOAT.format("int16"), "x-int16"),
    # ------------------------------------------------------------------------------------------------- qqmm
    case("qqmm", lambda: qq(X, AFF[0], AFF[1], mode="affine"),
         r"Activation quantization supports modes nvfp4, mxfp8, mxfp4 but got 'affine'", "mode-affine"),
    case("qqmm", lambda: qq(X, *NV, mode="xyz"), r"supports modes nvfp4, mxfp8, mxfp4 but got 'xyz'", "mode-xyz"),
    case("qqmm", lambda: qq(X, *NV, global_scale_x=G1),
         r"global_scale_x and global_scale_w must be given together \(both or neither\)", "only-global-x"),
    case("qqmm", lambda: qq(X, *NV, global_scale_w=G1), r"must be given together", "only-global-w"),
    case("qqmm", lambda: qq(X, NV[0]), r"scales must be provided when w is quantized \(uint32\)", "scales-None"),
    case("qqmm", lambda: qq(X, W, NV[1]),
         r"scales must be None when w is not quantized \(w has dtype torch\.float32\)", "float-w-with-scales"),
    case("qqmm", lambda: qq(X, *NV3), r"w must be a 2-D matrix but got shape \(2, 4, 8\)", "w-3d"),
    case("qqmm", lambda: qq(X, W3), r"w must be a 2-D matrix but got shape \(2, 4, 8\)", "float-w-3d"),
    case("qqmm", lambda: qq(X, W.to(torch.int32)), "w " + FLOAT.format("int32"), "w-int32"),
    case("qqmm", lambda: qq(X, torch.randn(4, 40)), r"group size 16\. However the provided matrix has shape \(4,40\)",
         "float-w-K"),
    case("qqmm", lambda: qq(X.to(torch.int32), *NV), "x " + FLOAT.format("int32"), "x-int32"),
    case("qqmm", lambda: qq(torch.randn(2, 32), *NV), r"\(\.\.\., 32\) does not match the expanded quantized matrix "
         r"\(64, 4\)", "x-last-dim"),
    case("qqmm", lambda: qq(X, *MX8, mode="mxfp8", global_scale_x=G1, global_scale_w=G1),
         r"global_scale_x is only supported for nvfp4 quantization but mode is 'mxfp8'", "global-mxfp8"),
    case("qqmm", lambda: qq(X, *NV, global_scale_x=G1.half(), global_scale_w=G1),
         GLOBAL_KIND.format("global_scale_x", 1, "float16", r"\(1\)"), "global-x-f16"),
    case("qqmm", lambda: qq(X, *NV, global_scale_x=G1, global_scale_w=torch.ones(2)),
         GLOBAL_KIND.format("global_scale_w", 1, "float32", r"\(2\)"), "global-w-2"),
    case("qqmm", lambda: qq(X, *MX4, group_size=64, mode="mxfp4"), GS.format("mxfp4", "32", 64), "mxfp4-gs64"),
    case("qqmm", lambda: qq(X, MX8[0], MX8[1].float(), mode="mxfp8"),
         r"mxfp8 scales must be uint8 \(e8m0 bytes\) but got dtype torch\.float32", "scales-float"),
    case("qqmm", lambda: qq(X.clone().requires_grad_(), *NV, global_scale_x=G1, global_scale_w=G1),
         r"Gradients with tensor scales \(global_scale_x / global_scale_w\) are not supported", "grad-global"),
    case("gather_qqmm", lambda: gqq(X3.clone().requires_grad_(), *NV3),
         r"gather_qqmm has no gradient; use gather_qmm to train", "x-requires-grad"),
    case("qqmm", lambda: qq(X, *NV, global_scale_x=G1.to(META), global_scale_w=G1),
         r"All tensors must be on the same device but got global_scale_x on meta, x on cpu", "device"),
    # ------------------------------------------------------------------------------------------ gather_qqmm
    case("gather_qqmm", lambda: gqq(X3, *NV3, global_scale_x=G1, global_scale_w=torch.ones(3)),
         GLOBAL_KIND.format("global_scale_w", "1 or 2", "float32", r"\(3\)"), "global-w-count"),
    case("gather_qqmm", lambda: gqq(X3, W3, global_scale_x=G1, global_scale_w=torch.ones(2)),
         r"A float w is quantized with one global_scale_w; got 2", "float-w-2-global"),
    case("gather_qqmm", lambda: gqq(X3, *NV3, global_scale_w=torch.ones(2)), r"must be given together",
         "only-global-w"),
    case("gather_qqmm", lambda: gqq(X3, AFF3[0], AFF3[1], mode="affine"),
         r"supports modes nvfp4, mxfp8, mxfp4 but got 'affine'", "mode-affine"),
    case("gather_qqmm", lambda: gqq(X3, *NV3, rhs_indices=torch.tensor([2])),
         r"rhs_indices holds index 2, out of range for the 2 matrices", "rhs-too-large"),
    case("gather_qqmm", lambda: gqq(X3, W3, NV3[1]), r"scales must be None when w is not quantized", "float-w-scales"),
    case("gather_qqmm", lambda: gqq(X3, NV3[0]), r"scales must be provided when w is quantized", "scales-None"),
    case("gather_qqmm", lambda: gqq(X3.to(torch.int32), *NV3), "x " + FLOAT.format("int32"), "x-int32"),
    # --------------------------------------------------------------------------------------- to_fp8, from_fp8
    case("to_fp8", lambda: to8(torch.arange(4)), "x " + FLOAT.format("int64"), "int64"),
    case("to_fp8", lambda: to8(torch.arange(4, dtype=torch.int32)), "x " + FLOAT.format("int32"), "int32"),
    case("to_fp8", lambda: to8(torch.ones(4, dtype=torch.float64)), "x " + FLOAT.format("float64"), "float64"),
    case("to_fp8", lambda: to8(torch.ones(2, dtype=torch.bool)), "x " + FLOAT.format("bool"), "bool"),
    case("to_fp8", lambda: to8([1.0]), r"x must be a torch\.Tensor but got list", "list"),
    case("from_fp8", lambda: from8(torch.ones(4, dtype=torch.int8)),
         r"x must be uint8 fp8 \(e4m3\) codes but got dtype torch\.int8", "int8"),
    case("from_fp8", lambda: from8(torch.ones(4)), r"x must be uint8 fp8 \(e4m3\) codes but got dtype torch\.float32",
         "float32"),
    case("from_fp8", lambda: from8(torch.ones(4, dtype=torch.uint8), torch.int32),
         r"dtype must be a floating dtype \(float16, bfloat16 or float32\) but got torch\.int32", "dtype-int32"),
    case("from_fp8", lambda: from8(torch.ones(4, dtype=torch.uint8), torch.float64),
         r"dtype must be a floating dtype \(float16, bfloat16 or float32\) but got torch\.float64", "dtype-float64"),
    case("from_fp8", lambda: from8(b"\x38"), r"x must be a torch\.Tensor but got bytes", "bytes"),
]

N_CASES = 145  # the number of cases written above: deleting one must be a conscious change


def test_case_count():
    """The case list has not shrunk."""
    assert len(CASES) >= N_CASES, f"{len(CASES)} error cases, expected at least {N_CASES}"


@pytest.mark.parametrize("op, fn, regex", CASES)
def test_bad_input_raises(op, fn, regex):
    """ValueError starting with "[<op>]" whose message says what was expected and what was given."""
    with pytest.raises(ValueError) as info:
        fn()
    message = str(info.value)
    assert message.startswith(f"[{op}] "), message
    assert re.search(regex, message), f"{message!r} does not match {regex!r}"


# ------------------------------------------------------------------------------------------------------------------
# non-finite weights: quantize raises (pointing at the first one) or, with nonfinite="nan", keeps NaN groups

NONFINITE = (float("nan"), float("inf"), float("-inf"))
MODE_CONFIGS = [("affine", 64, 4), ("affine", 32, 3), ("mxfp4", 32, 4), ("mxfp8", 32, 8), ("nvfp4", 16, 4)]


@pytest.mark.parametrize("mode, gs, bits", MODE_CONFIGS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bad", NONFINITE, ids=["nan", "inf", "-inf"])
def test_quantize_nonfinite_raises_with_first_index(mode, gs, bits, dtype, bad):
    """A NaN/Inf in w raises a ValueError naming the row-major first non-finite element and its value."""
    w = torch.randn(6, 64, generator=torch.Generator().manual_seed(5)).to(dtype)
    w[3, 17] = bad
    w[3, 40] = float("nan")  # later ones are not reported
    w[5, 0] = float("inf")
    with pytest.raises(ValueError) as info:
        lowbit.quantize(w, gs, bits, mode)
    message = str(info.value)
    assert message.startswith("[quantize] "), message
    assert re.search(rf"w has a non-finite value \({re.escape(str(bad))}\) at index \(3, 17\)", message), message
    assert "nonfinite='nan'" in message, message


def test_quantize_nonfinite_index_in_3d_and_global_scale():
    """The index has one entry per dimension; nvfp4 with a global scale checks too."""
    w = torch.randn(2, 3, 32, generator=torch.Generator().manual_seed(6))
    w[1, 2, 5] = float("-inf")
    with pytest.raises(ValueError, match=r"^\[quantize\] w has a non-finite value \(-inf\) at index \(1, 2, 5\)"):
        lowbit.quantize(w, mode="nvfp4", global_scale=torch.tensor([4.0]))
    with pytest.raises(ValueError, match=r"at index \(0, 0, 0\)"):
        lowbit.quantize(torch.full((1, 1, 32), float("nan")), 32, 4)


def _bad_weight(k, dtype, bad, seed=8):
    """(6, k) values with one non-finite value in row 1 (first group) and row 4 (last group)."""
    w = torch.randn(6, k, generator=torch.Generator().manual_seed(seed)).to(dtype)
    w[1, 5] = bad
    w[4, k - 1] = bad if bad == bad else float("inf")  # NaN and inf together when bad is NaN
    return w


@pytest.mark.parametrize("mode, gs, bits", ALL_CONFIGS + [("nvfp4+global", 16, 4)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_quantize_nonfinite_nan_groups(mode, gs, bits, dtype):
    """nonfinite='nan': groups holding NaN/Inf dequantize to all-NaN; every other group is finite and exactly what
    quantizing without the non-finite values gives (whole finite rows, and the other groups of the bad rows)."""
    global_scale = torch.tensor([2.5]) if mode == "nvfp4+global" else None
    mode = mode.split("+")[0]
    k = 2 * gs
    bad_groups = {(1, 0), (4, 1)}
    for bad in NONFINITE:
        w = _bad_weight(k, dtype, bad)
        qd = lowbit.quantize(w, gs, bits, mode, global_scale=global_scale, nonfinite="nan")
        q3 = qd if mode == "affine" else (*qd, None)
        for out_dtype in (torch.float32, dtype):
            deq = lowbit.dequantize(*q3, gs, bits, mode, global_scale, out_dtype).reshape(6, 2, gs)
            for r in range(6):
                for g in range(2):
                    if (r, g) in bad_groups:
                        assert bool(deq[r, g].isnan().all()), f"group {(r, g)} must be all NaN ({bad})"
                    else:
                        assert bool(deq[r, g].isfinite().all()), f"group {(r, g)} must stay finite ({bad})"

        good = [0, 2, 3, 5]
        alone = lowbit.quantize(w[good], gs, bits, mode, global_scale=global_scale)
        for got, want in zip(qd, alone):
            assert same_bits(got[good], want), "finite rows changed because other rows hold NaN/Inf"

        repaired = w.clone()
        repaired[~torch.isfinite(repaired)] = 0
        clean = lowbit.quantize(repaired, gs, bits, mode, global_scale=global_scale)
        clean3 = clean if mode == "affine" else (*clean, None)
        want = lowbit.dequantize(*clean3, gs, bits, mode, global_scale, dtype).reshape(6, 2, gs)
        got = lowbit.dequantize(*q3, gs, bits, mode, global_scale, dtype).reshape(6, 2, gs)
        rows, groups = [1, 4], [1, 0]  # the finite groups of the two bad rows
        assert same_bits(got[rows, groups], want[rows, groups]), "a group next to a NaN group changed"
        for t_got, t_clean in zip(qd[1:], clean[1:]):  # their scales (and biases)
            assert same_bits(t_got[rows, groups], t_clean[rows, groups])


@pytest.mark.parametrize("mode, gs, bits", MODE_CONFIGS)
def test_nonfinite_weight_never_becomes_finite_in_matmul(mode, gs, bits):
    """quantized_matmul with a NaN-group weight gives NaN exactly in the outputs that read the bad rows."""
    w = _bad_weight(2 * gs, torch.float32, float("inf"))
    q3 = lowbit.quantize(w, gs, bits, mode, nonfinite="nan")
    q3 = q3 if mode == "affine" else (*q3, None)
    y = lowbit.quantized_matmul(torch.ones(3, 2 * gs), *q3, True, gs, bits, mode)
    assert bool(y[:, [1, 4]].isnan().all())
    assert bool(y[:, [0, 2, 3, 5]].isfinite().all())


@pytest.mark.parametrize("mode", ["nvfp4", "mxfp8", "mxfp4"])
def test_nonfinite_activation_gives_nan_row(mode):
    """qqmm quantizes activations with nonfinite='nan': an Inf in x gives a NaN output row, other rows finite."""
    w = torch.randn(4, 64, generator=torch.Generator().manual_seed(9))
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(10))
    x[1, 7] = float("inf")
    y = lowbit.qqmm(x, w, mode=mode)
    assert bool(y[1].isnan().all()) and bool(y[[0, 2]].isfinite().all())


@pytest.mark.parametrize("dtype", DTYPES)
def test_to_fp8_nonfinite_stays_nonfinite(dtype):
    """to_fp8 maps NaN and +-Inf to the e4m3 NaN (0x7F, sign kept), never to +-448 (MLX does, lowbit does not)."""
    codes = lowbit.to_fp8(torch.tensor([float("nan"), float("inf"), float("-inf"), 1e4], dtype=dtype))
    assert codes.tolist() == [0x7F, 0x7F, 0xFF, 0x7E]
    back = lowbit.from_fp8(codes, torch.float32)
    assert bool(back[:3].isnan().all()) and float(back[3]) == 448.0
