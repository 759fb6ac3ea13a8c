#!/usr/bin/env bash
# The checks that need a GPU, in one command (well under 8 minutes):
#   benchmarks/gpu_check.sh [OUT_DIR]
# Runs the CUDA tests (tests/gpu) and records the card and results in OUT_DIR.
# Expects torch with CUDA and the project's dependencies importable (PYTHONPATH may point at
# server/ and client/ instead of an installed package).
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-build/gpu-check}
mkdir -p "$out"
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PWD/server:$PWD/client:$PWD"
python3 - <<'PY' | tee "$out/device.txt"
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda)
print("device", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none")
PY
python3 -m pytest -q -p no:cacheprovider tests/gpu tests/integration/test_batching.py \
    -o addopts="" 2>&1 | tee "$out/tests.txt"
