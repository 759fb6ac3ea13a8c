"""benchmarks/locustfile.py drives Salvo from a real headless locust process.

Locust is part of the `bench` extra; without it the test skips and says how to install it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import grpc
import pytest

from salvo_client.proto import grpc_service_pb2 as pb
from salvo_client.proto import grpc_service_pb2_grpc as pb_grpc

ROOT = Path(__file__).resolve().parents[2]
LOCUSTFILE = ROOT / "benchmarks" / "locustfile.py"
LOCUST = Path(sys.executable).with_name("locust")

pytestmark = pytest.mark.skipif(
    not LOCUST.exists(), reason="locust not installed: pip install -e '.[bench]'"
)


def inference_count(target: str, model: str) -> int:
    with grpc.insecure_channel(target) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        stats = stub.ModelStatistics(pb.ModelStatisticsRequest(name=model), timeout=10)
    return sum(s.inference_count for s in stats.model_stats)


def run_locust(
    target: str, cwd: Path, run_time: str, **env: str
) -> tuple[subprocess.CompletedProcess, list]:
    """A headless locust run of 4 users; its result and its final stats (JSON)."""
    cmd = [
        str(LOCUST), "-f", str(LOCUSTFILE), "--headless", "-u", "4", "-r", "4", "-t", run_time,
        "--host", target, "--only-summary", "--json", "--skip-log", "--csv", str(cwd / "run"),
    ]  # fmt: skip
    result = subprocess.run(
        cmd, capture_output=True, text=True, timeout=90, cwd=cwd, env={**os.environ, **env}
    )
    return result, json.loads(result.stdout or "[]")


def test_locust_drives_salvo(demo_server, tmp_path: Path):
    before = inference_count(demo_server.grpc_target, "mlp")
    result, stats = run_locust(demo_server.grpc_target, tmp_path, "3s", SALVO_MODEL="mlp")
    ran = inference_count(demo_server.grpc_target, "mlp") - before

    assert result.returncode == 0, result.stdout + result.stderr
    by_name = {entry["name"]: entry for entry in stats}
    infer = by_name["ModelInfer mlp"]
    assert infer["method"] == "grpc"
    assert infer["num_requests"] > 100
    assert all(entry["num_failures"] == 0 for entry in stats)
    assert by_name["ModelMetadata"]["num_requests"] == 4  # one per user
    # Users ran concurrently (gevent-aware gRPC). By Little's law, throughput x response time
    # is the mean number of calls in flight: about 4 here, about 1 when gRPC blocks gevent's
    # loop and the users take turns (0.94 measured without init_gevent).
    mean_ms = infer["total_response_time"] / infer["num_requests"]
    seconds = infer["last_request_timestamp"] - infer["start_time"]
    assert infer["num_requests"] / seconds > 1.5 * (1000 / mean_ms)
    # Each request locust counted reached the server (users stopped mid-call may add a few).
    assert ran >= infer["num_requests"]


def test_locust_reports_failures_by_status(demo_server, tmp_path: Path):
    result, stats = run_locust(demo_server.grpc_target, tmp_path, "2s", SALVO_MODEL="no_such_model")

    assert result.returncode == 1  # locust's exit code when any request failed
    metadata = next(entry for entry in stats if entry["name"] == "ModelMetadata")
    assert metadata["num_failures"] == metadata["num_requests"] == 4
    # Failures are named by gRPC status, so locust groups them by it.
    failures = (tmp_path / "run_failures.csv").read_text()
    assert "NOT_FOUND" in failures and "no_such_model" in failures
