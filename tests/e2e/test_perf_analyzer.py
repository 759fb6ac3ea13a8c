"""Triton's own benchmark client, perf_analyzer, drives Salvo unmodified (gRPC unary and
streaming, REST, and a model answered from the response cache).

`make test` installs it (benchmarks/setup_perf_analyzer.sh); run by hand, the test skips
when that has not been done.
"""

from __future__ import annotations

import csv
import shutil
import subprocess
from pathlib import Path

import pytest
import tritonclient.grpc as tc

from tests.servers import ServerProcess

ROOT = Path(__file__).resolve().parents[2]
WRAPPER = ROOT / "benchmarks" / "perf_analyzer"


def _installed() -> bool:
    return subprocess.run([WRAPPER, "--version"], capture_output=True).returncode == 0


pytestmark = pytest.mark.skipif(
    not _installed(), reason="perf_analyzer not installed: run benchmarks/setup_perf_analyzer.sh"
)


@pytest.mark.parametrize("mode", ["unary", "streaming", "http"])
def test_perf_analyzer_measures_salvo(demo_server, tmp_path, mode):
    """Over gRPC (unary and streaming) and over REST (`-i http`: binary tensor data, the
    model's config and statistics read as JSON)."""
    with tc.InferenceServerClient(demo_server.grpc_target) as client:
        before = client.get_inference_statistics("mlp").model_stats[0].inference_count
    out = tmp_path / "pa.csv"
    target = f"127.0.0.1:{demo_server.http_port}" if mode == "http" else demo_server.grpc_target
    cmd = [
        str(WRAPPER), "-m", "mlp", "-i", "http" if mode == "http" else "grpc", "-u", target,
        "-b", "1", "--concurrency-range", "4", "-p", "500", "-s", "100",
        "--percentile", "50", "--max-trials", "12", "-f", str(out),
    ]  # fmt: skip
    cmd.append("--streaming" if mode == "streaming" else "--async")
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    rows = list(csv.DictReader(out.open()))
    assert rows and float(rows[0]["Inferences/Second"]) > 0
    with tc.InferenceServerClient(demo_server.grpc_target) as client:
        after = client.get_inference_statistics("mlp").model_stats[0].inference_count
    # Every request perf_analyzer counted reached the model (it also sends warm-up ones).
    # (-s 100 and p50 stabilisation: perf_analyzer's stability check is not under test,
    # and on a busy 2-core machine its default one fails.)
    assert after - before >= float(rows[0]["Inferences/Second"]) / 2


def test_perf_analyzer_measures_a_model_whose_every_request_hits_the_cache(demo_repo, tmp_path):
    """perf_analyzer finds the version it measures by the `queue` count that grew in its
    window. Every request here but the first is a cache hit (`--input-data zero`), so that
    count must include hits, as Triton's does, or perf_analyzer gives up ("failed to find
    the requested model version")."""
    repo = tmp_path / "repo"
    shutil.copytree(demo_repo / "mlp", repo / "mlp")
    with (repo / "mlp" / "config.yaml").open("a") as config:
        config.write("response_cache: {enable: true}\n")
    out = tmp_path / "pa.csv"
    with ServerProcess(repo, "--torch-threads", "1") as server:
        cmd = [
            str(WRAPPER), "-m", "mlp", "-i", "grpc", "-u", server.grpc_target, "-b", "1",
            "--concurrency-range", "4", "-p", "500", "-s", "100", "--percentile", "50",
            "--max-trials", "12", "--input-data", "zero", "--async", "-f", str(out),
        ]  # fmt: skip
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stdout + result.stderr
        rows = list(csv.DictReader(out.open()))
        assert rows and float(rows[0]["Inferences/Second"]) > 0
        with tc.InferenceServerClient(server.grpc_target) as client:
            (stats,) = client.get_inference_statistics("mlp").model_stats
    counts = stats.inference_stats
    assert counts.success.count > 100 and counts.fail.count == 0
    assert counts.queue.count == counts.success.count  # hits queue-counted, as in Triton
    assert counts.cache_hit.count + counts.cache_miss.count == counts.success.count
    assert counts.cache_miss.count <= 4  # the first requests, before the answer was kept
    assert stats.inference_count == counts.compute_infer.count <= 4  # hits never computed
