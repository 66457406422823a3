#!/usr/bin/env bash
# Grid throughput with N runs sharing one GPU (short runs: 50 steps, 2 runs per worker), in the
# order 1, 8, 4, 2 so that a run cut short still has the baseline and the largest N.
# usage (peftlab importable: pip install -e . or PYTHONPATH=src):
#   PEFTLAB_DATA_DIR=../shared/data bash benchmarks/gpu-grid.sh [OUT]
set -uo pipefail
out=${1:-benchmarks/results/gpu}
python3 benchmarks/bench.py --out "$out" --keep --precision bf16 --steps 30 --warmup 10 \
  --sections grid --grid-runs 2 --grid-steps 50 --runs-per-gpu 1,8,4,2
