#!/usr/bin/env bash
# CPU-vs-GPU parity and GPU timings at N = 100k and 1M; needs a CUDA GPU, finishes in < 3 minutes.
# Usage (from the repository root): bash benchmarks/gpu_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python3 benchmarks/gpu_check.py "$@"
