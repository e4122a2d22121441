#!/usr/bin/env bash
# Sweep tile configs of the qmm kernel (LOWBIT_QMM_TILE) on one shape and print graph time per config.
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD/src
for tile in "16,64,4,4" "16,64,4,1" "16,64,4,2" "16,128,4,3" "16,128,8,3" "16,32,4,4" "16,64,8,4" "16,256,8,2"; do
  echo "tile $tile"
  LOWBIT_QMM_TILE=$tile timeout 60 python3 benchmarks/profile_probe.py 8192 ${1:-affine4,affine8} 1 2>&1 | grep M= | sed 's/|.*//'
done
