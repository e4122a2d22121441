#!/usr/bin/env bash
# One GPU call, most important first (so a call cut short still answers the first questions):
#   1. what bounds the MoE prefill tile (NOTES v17): its kernels' times, then ncu's warp stall reasons for the
#      Triton kernel's and the Gluon kernel's grouped 128 x 128 tile (memory latency, wgmmas or barriers?);
#   2. the bits of the Gluon grouped tiles and of fp4's 8-token tile against the Triton kernel's (GPU tests);
#   3. decode A/B at M = 1 / 4 / 16: the Triton kernel alone against the defaults (the Gluon kernel up to 8 rows,
#      16 for nvfp4) and fp4 in 8-token tiles, bit for bit;
#   4. host overhead at decode (eager: fp4 is one launch at M = 1 now);
#   5. the rest of the Gluon kernel's GPU tests.
# Usage (GPU machine, repo root): bash benchmarks/gluon_ab.sh
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH}
export OUT=${OUT:-/tmp/lowbit-out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name --format=csv,noheader
python3 -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__)'
T0=$(date +%s); elapsed() { echo "[$(( $(date +%s) - T0 )) s]"; }
NCU=/usr/local/cuda/bin/ncu; [ -x "$NCU" ] || NCU=ncu
STALLS="regex:smsp__average_warps_issue_stalled_.*_per_issue_active\.ratio"
for v in "LOWBIT_QMM_GLUON=0" "LOWBIT_QMM_GLUON=1 LOWBIT_GLUON_MAX_M=128 LOWBIT_GLUON_X_ASYNC=1"; do
  echo "--- MoE prefill tile: $v"
  env $v timeout 60 python3 benchmarks/ncu_moe_prefill.py 2>&1 | tail -2
  env $v timeout 120 "$NCU" --nvtx --nvtx-include profiled/ -k "regex:qmm_kernel|packed4" --section SpeedOfLight \
    --section Occupancy --metrics "$STALLS" python3 benchmarks/ncu_moe_prefill.py --ncu 2>&1 \
    | grep -E "Duration|Throughput|Registers|Achieved Occupancy|stalled" | awk '$NF+0 > 0.05 || !/stalled/' | head -40
done
elapsed
T="tests/test_wgmma_decode.py"; FIRST="(grouped_routing and (knobs3 or knobs4)) or eight_token"
timeout 120 python3 -m pytest -q -x -p no:cacheprovider --durations=5 "$T" -k "$FIRST" \
  2>&1 | tail -12
elapsed
run() {  # tag, then environment assignments
  local tag=$1; shift
  env "$@" FORMATS="affine4g64 affine4g128 mxfp4 nvfp4" timeout 90 python3 benchmarks/decode_ab.py "$tag" 2>&1 | grep -v "^bf16\|^$"
}
run triton LOWBIT_QMM_GLUON=0
run default LOWBIT_BACKEND=triton
run gluon8 LOWBIT_BACKEND=triton LOWBIT_GLUON_BLOCK_M=8  # fp4 in 8-token tiles too
python3 benchmarks/decode_ab.py --compare triton default
python3 benchmarks/decode_ab.py --compare triton gluon8
rm -f "$OUT"/triton.pt "$OUT"/default.pt "$OUT"/gluon8.pt
elapsed
timeout 60 python3 benchmarks/overhead_bench.py --eager 2>&1 | tail -20
elapsed
timeout 120 python3 -m pytest -q -p no:cacheprovider --durations=8 "$T" -k "not ($FIRST)" \
  2>&1 | tail -14
elapsed
