#!/usr/bin/env bash
# Sweep tile configs of the qmm kernel (LOWBIT_QMM_TILE) on one shape and print graph time per config.
# Usage: bash benchmarks/tile_sweep.sh FORMATS MS "TILE TILE ..."   (TILE = BLOCK_M,BLOCK_N,num_warps,num_stages)
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD/src
for tile in ${3:-16,64,4,4 16,64,4,1 16,32,4,4 16,32,4,2}; do
  echo "tile $tile"
  LOWBIT_QMM_TILE=$tile timeout 90 python3 benchmarks/profile_probe.py 8192 ${1:-affine4,affine8} ${2:-1} 2>&1 | grep M= | sed 's/|.*//'
done
