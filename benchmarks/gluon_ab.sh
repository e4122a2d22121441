#!/usr/bin/env bash
# One GPU call, most important first (so a call cut short still answers the first questions):
#   1. the Gluon kernel's GPU tests (bits against the Triton kernel: plain, fp4, routed, grouped, variants);
#   2. MoE prefill (4096 tokens) with the Triton kernel and the Gluon kernel's grouped tiles (NOTES v16);
#   3. decode A/B at M = 1 / 4 / 16 of the Triton kernel and the Gluon variants, with bitwise comparisons;
#   4. host overhead at decode (eager).
# Usage (GPU machine, repo root): bash benchmarks/gluon_ab.sh
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH}
export OUT=${OUT:-/tmp/lowbit-out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name --format=csv,noheader
python3 -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__)'
T0=$(date +%s); elapsed() { echo "[$(( $(date +%s) - T0 )) s]"; }
timeout 300 python3 -m pytest -q -p no:cacheprovider tests/test_wgmma_decode.py 2>&1 | grep -v "^\.*$" | tail -12
elapsed
G="LOWBIT_QMM_GLUON=1 LOWBIT_GLUON_MAX_M=128"; T="LOWBIT_QMM_TILE=64,128,8,3 LOWBIT_QMM_SPLIT_IN_GRID=0"
for v in "LOWBIT_QMM_GLUON=0" "$G" "$G LOWBIT_GLUON_X_ASYNC=1" "$G $T" "$G $T LOWBIT_GLUON_X_ASYNC=1"; do
  echo "--- MoE prefill: $v"
  env $v TOKENS=4096 FORMATS="affine4g64 mxfp4" timeout 60 python3 benchmarks/moe_bench.py 2>&1 \
    | grep "^| qwen\|^| gpt\|rror"
done
elapsed
run() {  # tag, then environment assignments; FORMATS from $F
  local tag=$1; shift
  env "$@" FORMATS="$F" timeout 90 python3 benchmarks/decode_ab.py "$tag" 2>&1 | grep -v "^bf16\|^$"
}
F="affine4g64 affine4g128 mxfp4 nvfp4" run triton LOWBIT_QMM_GLUON=0
F="affine4g64 affine4g128 mxfp4 nvfp4" run gluon LOWBIT_QMM_GLUON=1
F="affine4g64 mxfp4" run gluon8 LOWBIT_QMM_GLUON=1 LOWBIT_GLUON_BLOCK_M=8
# more loads in flight a SM: two blocks ahead (164 registers: 3 programs a SM), or one ahead under 128 registers (4)
F="affine4g64" run gluon_pf2 LOWBIT_QMM_GLUON=1 LOWBIT_GLUON_PREFETCH=2
F="affine4g64" run gluon_r128 LOWBIT_QMM_GLUON=1 LOWBIT_QMM_MAXNREG=128
for tag in gluon gluon8 gluon_pf2 gluon_r128; do python3 benchmarks/decode_ab.py --compare triton "$tag"; done
rm -f "$OUT"/triton.pt "$OUT"/gluon*.pt
elapsed
timeout 60 python3 benchmarks/overhead_bench.py --eager 2>&1 | tail -20
elapsed
