#!/usr/bin/env bash
# The checks that need a GPU, in one command (about 5 minutes on an H200):
#   benchmarks/gpu_check.sh [OUT_DIR]
# Runs the CUDA tests (tests/gpu, and the batching and compile tests on the GPU), then
# resnet at fp32 and fp16, with and without CUDA graphs: raw, and served and swept at
# concurrency 1 to 256 (benchmarks/gpu_check.py). Writes OUT_DIR/device.txt, tests.txt,
# gpu_check.json and summary.md; the summary is printed last.
# Expects torch with CUDA and the project's dependencies importable (PYTHONPATH may point at
# server/ and client/ instead of an installed package).
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-build/gpu-check}
mkdir -p "$out"
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PWD/server:$PWD/client:$PWD"
export PYTHONUNBUFFERED=1
{
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
    python3 -c 'import torch, grpc; print("torch", torch.__version__, "cuda", torch.version.cuda,
"grpcio", grpc.__version__, "device", torch.cuda.get_device_name(0))'
} 2>&1 | tee "$out/device.txt"
timeout 330 python3 -m pytest -q -p no:cacheprovider -o addopts="" --timeout 300 -rs \
    tests/gpu tests/integration/test_batching.py tests/integration/test_compile.py \
    2>&1 | tee "$out/tests.txt"
tests=${PIPESTATUS[0]}
timeout 300 python3 benchmarks/gpu_check.py "$out"
bench=$?
echo "tests rc=$tests bench rc=$bench"
exit $(( tests || bench ))
