#!/usr/bin/env bash
# One call on the GPU machine: environment, the GPU test suite, the conformance sweep on CUDA, then the benchmark.
# Usage (from the repo root, on the GPU machine): bash benchmarks/gpu_session.sh [quick]
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH}
OUT=${OUT:-/tmp/lowbit-out}; mkdir -p "$OUT"
python3 -c 'import torch, triton; print(torch.__version__, triton.__version__, torch.cuda.get_device_name(0))'
python3 -m pytest -q tests/test_triton.py -p no:cacheprovider 2>&1 | tail -40 | tee "$OUT/gpu-tests.log"
python3 -m lowbit.cli check --device cuda 2>&1 | tail -8 | tee "$OUT/check-cuda.log"
python3 -c "
import sys, lowbit.bench_cuda as b
sys.exit(b.main(quick='${1:-}' == 'quick', output='$OUT/bench.md'))
" 2>&1 | tee "$OUT/bench.log"
