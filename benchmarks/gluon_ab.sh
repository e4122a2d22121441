#!/usr/bin/env bash
# One GPU call: the Gluon decode kernel's tests, then decode_ab of the Triton kernel against the Gluon kernel's
# variants (affine4 and the fp4 formats), with bitwise comparisons. Usage (GPU machine, repo root):
#   bash benchmarks/gluon_ab.sh                # FORMATS="affine4g64 affine4g128 mxfp4 nvfp4" by default
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH}
export OUT=${OUT:-/tmp/lowbit-out}; mkdir -p "$OUT"
F=${FORMATS:-"affine4g64 affine4g128 mxfp4 nvfp4"}
nvidia-smi --query-gpu=name --format=csv,noheader
python3 -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__)'
timeout 240 python3 -m pytest -q -p no:cacheprovider tests/test_wgmma_decode.py 2>&1 | tail -4
run() {  # tag, then environment assignments
  local tag=$1; shift
  env "$@" FORMATS="$F" timeout 120 python3 benchmarks/decode_ab.py "$tag" 2>&1 | grep -v "^bf16"
}
run triton LOWBIT_QMM_GLUON=0
run gluon LOWBIT_QMM_GLUON=1
F="affine4g64 mxfp4" run gluon8 LOWBIT_QMM_GLUON=1 LOWBIT_GLUON_BLOCK_M=8
# more loads in flight a SM: two blocks ahead (164 registers: 3 programs a SM), or one ahead under 128 registers (4)
F="affine4g64" run gluon_pf2 LOWBIT_QMM_GLUON=1 LOWBIT_GLUON_PREFETCH=2
F="affine4g64" run gluon_r128 LOWBIT_QMM_GLUON=1 LOWBIT_QMM_MAXNREG=128
for tag in gluon gluon8 gluon_pf2 gluon_r128; do python3 benchmarks/decode_ab.py --compare triton "$tag"; done
rm -f "$OUT"/triton.pt "$OUT"/gluon*.pt
