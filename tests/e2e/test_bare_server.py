"""The bare gRPC server (benchmarks/bare_server.py), the ceiling benchmarks/compare.py measures
Salvo against, is a real v2 server: tritonclient gets the model's true answer to a zero input,
with its request id, over ModelInfer and ModelStreamInfer."""

from __future__ import annotations

import queue
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import tritonclient.grpc as tc

BARE = Path(__file__).resolve().parents[2] / "benchmarks" / "bare_server.py"


@pytest.fixture(scope="module")
def bare_target(demo_repo: Path):
    cmd = [sys.executable, str(BARE), "--model-repository", str(demo_repo), "--model", "mlp"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        assert proc.stdout is not None
        first = proc.stdout.readline()  # the listening line, or the start-up error
        port = re.search(r"bare server listening grpc=\S+:(\d+)", first)
        assert port, first
        yield f"127.0.0.1:{port[1]}"
    finally:
        proc.terminate()
        proc.wait(10)


def zero_input() -> tc.InferInput:
    x = tc.InferInput("input", [1, 64], "FP32")
    x.set_data_from_numpy(np.zeros((1, 64), np.float32))
    return x


def expected(demo_repo: Path) -> np.ndarray:
    with torch.inference_mode():
        return torch.jit.load(str(demo_repo / "mlp" / "1" / "model.pt"))(torch.zeros(1, 64)).numpy()


def test_model_infer(bare_target, demo_repo):
    with tc.InferenceServerClient(bare_target) as client:
        result = client.infer("mlp", [zero_input()], request_id="42")
        config = client.get_model_config("mlp").config
    np.testing.assert_allclose(result.as_numpy("output"), expected(demo_repo), rtol=1e-6)
    assert result.get_response().id == "42"
    assert config.max_batch_size == 128  # perf_analyzer reads it before it sends anything


def test_model_stream_infer(bare_target, demo_repo):
    results: queue.Queue = queue.Queue()
    with tc.InferenceServerClient(bare_target) as client:
        client.start_stream(callback=lambda result, error: results.put((result, error)))
        client.async_stream_infer("mlp", [zero_input()], request_id="7")
        result, error = results.get(timeout=10)
        client.stop_stream()
    assert error is None
    np.testing.assert_allclose(result.as_numpy("output"), expected(demo_repo), rtol=1e-6)
    assert result.get_response().id == "7"
