#!/usr/bin/env bash
# Check and time the decomposition engine on a CUDA GPU, in one short run (a few minutes).
#   benchmarks/gpu_check.sh [CPU_SECONDS_PER_CHECKPOINT]
# The argument is the CPU figure bench_analyze.py measured (the README's Performance section);
# with it the script prints the GPU-to-CPU throughput ratio. Uses the python3 that holds a
# CUDA build of torch; nothing is installed and no store is written.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
args=()
if [ $# -ge 1 ]; then args+=(--cpu-seconds-per-checkpoint "$1"); fi
exec "${PYTHON:-python3}" benchmarks/gpu_check.py "${args[@]}"
