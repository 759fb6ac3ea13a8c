#!/usr/bin/env bash
# The checks that need a GPU, in one command (well under 8 minutes):
#   benchmarks/gpu_check.sh [OUT_DIR]
# Runs the CUDA tests (tests/gpu), then a resnet sweep at fp32 and fp16 (salvo bench),
# and records the card and results in OUT_DIR.
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

# resnet served from the GPU at fp32 and fp16, swept with salvo bench (no perf_analyzer
# needed on the GPU host): concurrency 1 to 256, 5 s per level.
python3 - "$out" <<'PY'
import json, shutil, subprocess, sys, tempfile
from pathlib import Path
sys.path.insert(0, ".")
from salvo.demo import build_demo_repo
from tests.servers import ServerProcess

out = Path(sys.argv[1])
with tempfile.TemporaryDirectory() as tmp:
    repo = Path(tmp) / "repo"
    build_demo_repo(repo)
    for name in ("digits", "mlp"):
        shutil.rmtree(repo / name)
    config = repo / "resnet" / "config.yaml"
    base = config.read_text()
    for precision in ("fp32", "fp16"):
        config.write_text(base + f"optimization: {{precision: {precision}, channels_last: true}}\n")
        with ServerProcess(repo) as server:
            result = subprocess.run(
                [sys.executable, "-m", "salvo_client.bench", "-m", "resnet", "-u",
                 server.grpc_target, "--sweep-concurrency", "1,4,16,64,256",
                 "--duration-s", "5", "--warmup-s", "1", "--p99-bound-ms", "100",
                 "--json", "--quiet"],
                capture_output=True, text=True, check=False,
            )
        (out / f"resnet-{precision}.json").write_text(result.stdout)
        if not result.stdout.strip():
            sys.exit(f"salvo bench failed:\n{result.stderr}")
        for level in json.loads(result.stdout)["levels"]:
            lat = level["latency_ms"] or {}
            print(f"resnet {precision} c={level['concurrency']}: {level['throughput_rps']:.0f}/s "
                  f"p50 {lat.get('p50', float('nan')):.2f} ms p99 {lat.get('p99', float('nan')):.2f} ms")
PY
