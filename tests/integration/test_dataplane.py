"""One data plane under every transport: unary and streaming gRPC get the same answers,
the same statistics and the same cache; the router picks the version its policy says.

tritonclient is the client throughout (unary `infer`, and `async_stream_infer` over
ModelStreamInfer), against a real in-process server.
"""

from __future__ import annotations

import queue
from pathlib import Path

import numpy as np
import pytest
import torch
import tritonclient.grpc as tc

from salvo.core.router import TrafficPolicy
from salvo.domain.config import ModelConfig
from salvo.engine.backend import LoadedModel
from tests.servers import InProcessServer

CONFIG = """max_batch_size: 8
inputs: [{name: x, datatype: FP32, dims: [3]}]
outputs: [{name: y, datatype: FP32, dims: [3]}]
dynamic_batching: {max_queue_delay_us: 100}
version_policy: {all: true}
"""


class Times:
    """y = x times the version's number: which version answered shows in the answer."""

    def __init__(self, factor: int) -> None:
        self.factor = factor

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.factor


def load(config: ModelConfig, version_dir: Path) -> LoadedModel:
    factor = int(version_dir.name)
    return LoadedModel(config, version_dir / "model.pt", Times(factor), torch.device("cpu"))


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("dataplane")
    for name, extra in (("plain", ""), ("cached", "response_cache: {enable: true}\n")):
        for version in ("1", "2"):
            (root / name / version).mkdir(parents=True)
        (root / name / "config.yaml").write_text(CONFIG + extra)
    with InProcessServer(root, load, cache_max_bytes=1 << 20) as server:
        yield server


@pytest.fixture()
def client(server):
    with tc.InferenceServerClient(server.grpc_target) as c:
        yield c


def x_input(values: list[float]) -> tc.InferInput:
    x = tc.InferInput("x", [1, 3], "FP32")
    x.set_data_from_numpy(np.array([values], np.float32))
    return x


def unary(client, model: str, values: list[float], version: str = "", request_id: str = ""):
    result = client.infer(model, [x_input(values)], model_version=version, request_id=request_id)
    response = result.get_response()
    return result.as_numpy("y").tolist(), response.model_version, response.id


def streamed(client, model: str, requests: list[tuple[list[float], str]], version: str = ""):
    """Each (values, id) sent over one ModelStreamInfer stream; the answers by id."""
    answers: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: answers.put((result, error)))
    try:
        for values, request_id in requests:
            client.async_stream_infer(
                model, [x_input(values)], model_version=version, request_id=request_id
            )
        out = {}
        for _ in requests:
            result, error = answers.get(timeout=30)
            assert error is None, error
            response = result.get_response()
            out[response.id] = (result.as_numpy("y").tolist(), response.model_version)
        return out
    finally:
        client.stop_stream()


def stats(client, model: str, version: str):
    (s,) = client.get_inference_statistics(model, version).model_stats
    i = s.inference_stats
    return {
        "success": i.success.count,
        "fail": i.fail.count,
        "queue": i.queue.count,
        "compute": i.compute_infer.count,
        "hit": i.cache_hit.count,
        "miss": i.cache_miss.count,
        "inferences": s.inference_count,
        "executions": s.execution_count > 0,
    }


def delta(after: dict, before: dict) -> dict:
    return {k: after[k] - before[k] for k in after}


def test_unary_and_streaming_get_the_same_answers_and_statistics(client):
    values = [[1.0, 2.0, 3.0], [4.0, 5.0, 6.0], [-1.0, 0.5, 7.0]]
    before = stats(client, "plain", "2")
    by_unary = [unary(client, "plain", v, request_id=f"u{i}") for i, v in enumerate(values)]
    by_stream = streamed(client, "plain", [(v, f"s{i}") for i, v in enumerate(values)])
    for i, v in enumerate(values):
        expected = [[2 * e for e in v]]
        assert by_unary[i] == (expected, "2", f"u{i}")
        assert by_stream[f"s{i}"] == (expected, "2")
    counted = delta(stats(client, "plain", "2"), before)
    # Six requests of one row each, every one queued, computed and counted alike.
    assert {k: counted[k] for k in ("success", "fail", "queue", "compute", "inferences")} == {
        "success": 6, "fail": 0, "queue": 6, "compute": 6, "inferences": 6,
    }  # fmt: skip
    assert counted["hit"] == counted["miss"] == 0


def test_unary_and_streaming_share_the_cache(client):
    values = [7.0, 8.0, 9.0]
    before = stats(client, "cached", "2")
    first = unary(client, "cached", values, request_id="a")  # a miss: computed and kept
    by_stream = streamed(client, "cached", [(values, "b"), (values, "c")])  # hits, kept entry
    again = unary(client, "cached", values, request_id="d")  # a hit, then through its alias
    last = unary(client, "cached", values, request_id="e")
    expected = [[14.0, 16.0, 18.0]]
    assert first == (expected, "2", "a") and again == (expected, "2", "d")
    assert last == (expected, "2", "e")
    assert by_stream == {"b": (expected, "2"), "c": (expected, "2")}
    counted = delta(stats(client, "cached", "2"), before)
    # Triton's semantics: hits are successes and queue entries, never inferences.
    kinds = ("success", "queue", "hit", "miss", "compute", "inferences")
    assert {k: counted[k] for k in kinds} == {
        "success": 5, "queue": 5, "hit": 4, "miss": 1, "compute": 1, "inferences": 1,
    }  # fmt: skip


def test_a_request_naming_no_version_goes_where_the_policy_says(server, client):
    router = server.server.router

    def route(policy: TrafficPolicy | None) -> None:
        async def set_policy() -> None:
            router.set_policy("plain", policy)

        server.call(set_policy())

    assert unary(client, "plain", [1, 1, 1])[:2] == ([[2, 2, 2]], "2")  # no policy: latest
    before = {v: stats(client, "plain", v) for v in ("1", "2")}
    route(TrafficPolicy(weights=((1, 1.0),)))
    try:
        assert unary(client, "plain", [1, 2, 3])[:2] == ([[1, 2, 3]], "1")
        assert streamed(client, "plain", [([3, 2, 1], "s")]) == {"s": ([[3, 2, 1]], "1")}
        # A request that names its version gets it, whatever the policy.
        assert unary(client, "plain", [1, 2, 3], version="2")[:2] == ([[2, 4, 6]], "2")
        after = {v: stats(client, "plain", v) for v in ("1", "2")}
        assert delta(after["1"], before["1"])["success"] == 2
        assert delta(after["2"], before["2"])["success"] == 1
        # A policy whose version is not loaded leaves its requests to the latest.
        route(TrafficPolicy(weights=((7, 1.0),)))
        assert unary(client, "plain", [1, 1, 1])[:2] == ([[2, 2, 2]], "2")
    finally:
        route(None)
    assert unary(client, "plain", [1, 1, 1])[:2] == ([[2, 2, 2]], "2")


def test_an_unknown_version_is_not_found_over_both_transports(client):
    with pytest.raises(tc.InferenceServerException) as unary_error:
        unary(client, "plain", [1, 2, 3], version="9")
    assert unary_error.value.status() == "StatusCode.NOT_FOUND"
    assert "no version 9" in unary_error.value.message()
    errors: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: errors.put(error))
    try:
        client.async_stream_infer("plain", [x_input([1, 2, 3])], model_version="9")
        error = errors.get(timeout=30)
    finally:
        client.stop_stream()
    assert error is not None and "no version 9" in str(error)
