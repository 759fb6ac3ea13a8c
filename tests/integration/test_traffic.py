"""Traffic policies on a real server: weights from the config spread requests that name no
version within statistical bounds; a sticky parameter keeps each caller on one version;
the admin API (`/v2/models/{model}/traffic`, `salvo traffic`) changes routing live, logs
it, refuses bad policies naming the field, and needs repository rights.

Shadow copies: a share of the requests also runs on a candidate version, compared with
the answer and never returned, and never holding an answer up.

Version N of each model answers x times N, so every answer says which version gave it
(but 3 answers as 1 does, and 4 as 1 does once a gate opens).
"""

from __future__ import annotations

import http.client
import json
import logging
import subprocess
import sys
import threading
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import tritonclient.grpc as tgrpc
from scipy.stats import binomtest

from salvo.domain.config import ModelConfig
from salvo.engine.backend import LoadedModel
from tests.servers import InProcessServer

BASE = """max_batch_size: 8
inputs: [{name: x, datatype: FP32, dims: [1]}]
outputs: [{name: y, datatype: FP32, dims: [1]}]
version_policy: {all: true}
"""
MODELS = {
    "split": (BASE + "traffic: {weights: {1: 80, 2: 20}}\n", (1, 2)),
    "sticky": (BASE + "traffic: {weights: {1: 1, 2: 1}, sticky_parameter: user}\n", (1, 2)),
    # Batches on instance threads: a candidate held at its gate holds no one else up.
    "shadowed": (
        BASE + "optimization: {execution: thread}\n"
        "traffic: {weights: {1: 1}, shadow: {version: 2, share: 1.0}}\n",
        (1, 2, 3, 4),
    ),
}
GATE = threading.Event()
"""Version 4 of every model answers only while this is set."""
GATE.set()
SIGNIFICANCE = 1e-6
"""A split this unlikely under the policy's shares fails the test (a real fault is far
less likely still: 50/50 against 80/20 over 2,000 requests is about 1e-160)."""


class Times:
    def __init__(self, factor: int) -> None:
        self.factor = factor

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.factor


class Gated(Times):
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if not GATE.wait(60):
            raise RuntimeError("the gate never opened")
        return x * self.factor


def load(config: ModelConfig, version_dir: Path) -> LoadedModel:
    """Version N answers x times N, but 3 answers as 1 does, and 4 as 1 does behind GATE."""
    version = int(version_dir.name)
    module = Gated(1) if version == 4 else Times(1 if version == 3 else version)
    return LoadedModel(config, version_dir / "model.pt", module, torch.device("cpu"))


def repository(root: Path) -> Path:
    for name, (config, versions) in MODELS.items():
        for version in versions:
            (root / name / str(version)).mkdir(parents=True)
        (root / name / "config.yaml").write_text(config)
    return root


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    root = repository(tmp_path_factory.mktemp("traffic"))
    with InProcessServer(root, load, repository_rpcs="enabled") as running:
        yield running


class Rest:
    """One keep-alive HTTP connection to the server."""

    def __init__(self, port: int, token: str | None = None) -> None:
        self.connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        self.headers = {"Authorization": f"Bearer {token}"} if token else {}

    def call(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        data = None if body is None else json.dumps(body).encode()
        self.connection.request(method, path, data, self.headers)
        reply = self.connection.getresponse()
        return reply.status, json.loads(reply.read())

    def version(self, model: str, parameters: dict[str, Any] | None = None) -> str:
        """Which version answered an inference naming none."""
        body: dict[str, Any] = {
            "inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 1], "data": [1.0]}]
        }
        if parameters:
            body["parameters"] = parameters
        status, answer = self.call("POST", f"/v2/models/{model}/infer", body)
        assert status == 200, answer
        assert answer["outputs"][0]["data"] == [float(answer["model_version"])]
        return answer["model_version"]

    def close(self) -> None:
        self.connection.close()


@pytest.fixture()
def rest(server):
    client = Rest(server.server.http_port)
    yield client
    client.close()


def grpc_version(server, model: str, parameters: dict[str, Any] | None = None) -> str:
    x = tgrpc.InferInput("x", [1, 1], "FP32")
    x.set_data_from_numpy(np.ones((1, 1), np.float32))
    with tgrpc.InferenceServerClient(server.grpc_target) as client:
        return client.infer(model, [x], parameters=parameters).get_response().model_version


def test_the_configs_weights_split_requests_that_name_no_version(rest, server) -> None:
    n = 2000
    counts = Counter(rest.version("split") for _ in range(n))
    assert set(counts) == {"1", "2"}
    assert binomtest(counts["2"], n, 0.2).pvalue > SIGNIFICANCE, counts
    status, answer = rest.call("GET", "/v2/models/split/traffic")
    assert status == 200 and answer == {
        "model": "split", "source": "config", "weights": {"1": 80.0, "2": 20.0},
        "sticky_parameter": None, "shadow": None, "serving": [1, 2], "shadow_comparisons": [],
    }  # fmt: skip
    # A request naming its version gets it, whatever the policy.
    status, answer = rest.call("POST", "/v2/models/split/versions/1/infer", {
        "inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 1], "data": [1.0]}]
    })  # fmt: skip
    assert status == 200 and answer["model_version"] == "1"


def test_a_sticky_parameter_keeps_each_caller_on_one_version(rest, server) -> None:
    users = [f"user-{i}" for i in range(300)]
    seen: dict[str, set[str]] = {u: set() for u in users}
    for _ in range(3):
        for user in users:
            seen[user].add(rest.version("sticky", {"user": user}))
    for user in users[:20]:  # gRPC routes the same key to the same version
        seen[user].add(grpc_version(server, "sticky", {"user": user}))
    assert all(len(versions) == 1 for versions in seen.values()), seen
    on_two = sum(versions == {"2"} for versions in seen.values())
    assert binomtest(on_two, len(users), 0.5).pvalue > SIGNIFICANCE, on_two


def test_the_admin_api_changes_routing_live_and_logs_it(rest, server, caplog) -> None:
    with caplog.at_level(logging.INFO, logger="salvo.core.router"):
        status, answer = rest.call("PUT", "/v2/models/split/traffic", {"weights": {"2": 1}})
    assert status == 200 and answer["source"] == "admin" and answer["weights"] == {"2": 1.0}
    assert "traffic policy of model 'split' (admin)" in caplog.text
    try:
        assert {rest.version("split") for _ in range(100)} == {"2"}
        assert {grpc_version(server, "split") for _ in range(20)} == {"2"}
    finally:
        status, answer = rest.call("DELETE", "/v2/models/split/traffic")
    assert status == 200 and answer["source"] == "config"
    assert {rest.version("split") for _ in range(200)} == {"1", "2"}


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"weights": {"3": 1}}, "version 3 does not serve"),
        ({"weights": {"1": -1}}, "finite number >= 0"),
        ({"weights": {"one": 1}}, "'one' is not a version number"),
        ({"weights": {"1": 0, "2": 0}}, "at least one weight"),
        ({"weights": {"1": "half"}}, "the weight must be a number"),
        ({"weights": [1, 2]}, "'weights' must be an object"),
        ({"sticky_parameter": ""}, "'sticky_parameter'"),
        ({"weight": {"1": 1}}, "unknown field(s) ['weight']"),
    ],
)
def test_a_bad_policy_is_refused_naming_the_field(rest, body, field) -> None:
    status, answer = rest.call("PUT", "/v2/models/split/traffic", body)
    assert status == 400 and field in answer["error"], answer
    status, answer = rest.call("GET", "/v2/models/split/traffic")
    assert answer["source"] == "config"  # unchanged


def test_an_unknown_model_has_no_policy(rest) -> None:
    for method in ("GET", "PUT", "DELETE"):
        status, answer = rest.call(
            method, "/v2/models/nope/traffic", {} if method == "PUT" else None
        )
        assert status == 404 and "nope" in answer["error"], (method, answer)


def test_changing_traffic_needs_repository_rights(tmp_path) -> None:
    tokens = tmp_path / "tokens.json"
    tokens.write_text(json.dumps({
        "ops-token": {"name": "ops", "models": "*", "repository": True},
        "app-token": {"name": "app", "models": "*"},
    }))  # fmt: skip
    root = repository(tmp_path / "repo")
    with InProcessServer(root, load, repository_rpcs="enabled", auth_tokens_file=tokens) as server:
        app, ops = (Rest(server.server.http_port, t) for t in ("app-token", "ops-token"))
        try:
            assert app.call("GET", "/v2/models/split/traffic")[0] == 200
            status, answer = app.call("PUT", "/v2/models/split/traffic", {"weights": {"1": 1}})
            assert status == 403 and "repository rights" in answer["error"]
            assert app.call("DELETE", "/v2/models/split/traffic")[0] == 403
            status, answer = ops.call("PUT", "/v2/models/split/traffic", {"weights": {"1": 1}})
            assert status == 200 and answer["source"] == "admin"
        finally:
            app.close()
            ops.close()


def test_salvo_traffic_reads_and_sets_the_policy(server) -> None:
    url = f"127.0.0.1:{server.server.http_port}"

    def salvo(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "salvo", "traffic", "sticky", "--url", url, *args],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip

    shown = salvo()
    assert shown.returncode == 0 and json.loads(shown.stdout)["source"] == "config"
    changed = salvo("--weights", "1=0,2=1", "--sticky-parameter", "team")
    assert changed.returncode == 0, changed.stderr
    assert json.loads(changed.stdout) == {
        "model": "sticky", "source": "admin", "weights": {"1": 0.0, "2": 1.0},
        "sticky_parameter": "team", "shadow": None, "serving": [1, 2], "shadow_comparisons": [],
    }  # fmt: skip
    shadowed = salvo("--weights", "2=1", "--shadow", "1:0.5")
    assert shadowed.returncode == 0, shadowed.stderr
    assert json.loads(shadowed.stdout)["shadow"] == {"version": 1, "share": 0.5}
    refused = salvo("--weights", "1=0,2=x")
    assert refused.returncode == 1 and "the weight is not a number" in refused.stderr
    refused = salvo("--weights", "7=1")
    assert refused.returncode == 1 and "400: 'weights': version 7 does not serve" in refused.stderr
    cleared = salvo("--clear")
    assert cleared.returncode == 0 and json.loads(cleared.stdout)["source"] == "config"


def comparison(rest: Rest, candidate: int) -> dict[str, Any]:
    """The tally of `shadowed`'s version 1 against `candidate` (zeros if none yet)."""
    status, answer = rest.call("GET", "/v2/models/shadowed/traffic")
    assert status == 200, answer
    for tally in answer["shadow_comparisons"]:
        if (tally["version"], tally["shadow_version"]) == (1, candidate):
            return tally
    return {"compared": 0, "failed": 0, "agreement": None, "mean_abs_difference": None}


def settle(server) -> None:
    server.call(server.server.dataplane.shadows.settled())


def stream_versions(server, model: str, count: int) -> set[str]:
    """The versions that answered `count` requests over one ModelStreamInfer stream."""
    answers: list[str] = []
    done = threading.Semaphore(0)

    def callback(result, error) -> None:
        answers.append(error.message() if error else result.get_response().model_version)
        done.release()

    x = tgrpc.InferInput("x", [1, 1], "FP32")
    x.set_data_from_numpy(np.ones((1, 1), np.float32))
    with tgrpc.InferenceServerClient(server.grpc_target) as client:
        client.start_stream(callback=callback)
        for _ in range(count):
            client.async_stream_infer(model, [x])
        for _ in range(count):
            assert done.acquire(timeout=30)
        client.stop_stream()
    return set(answers)


def test_shadow_copies_are_compared_and_never_answer(rest, server) -> None:
    before = comparison(rest, 2)["compared"]
    assert {rest.version("shadowed") for _ in range(100)} == {"1"}
    assert {grpc_version(server, "shadowed") for _ in range(10)} == {"1"}
    assert stream_versions(server, "shadowed", 10) == {"1"}
    settle(server)
    tally = comparison(rest, 2)
    # Version 2 doubles what version 1 answers (1.0 for every request here).
    assert tally["compared"] - before == 120 and tally["failed"] == 0
    assert tally["agreement"] == 0.0 and tally["mean_abs_difference"] == 1.0


def test_an_identical_candidate_agrees(rest, server) -> None:
    policy = {"weights": {"1": 1}, "shadow": {"version": 3}}
    status, answer = rest.call("PUT", "/v2/models/shadowed/traffic", policy)
    assert status == 200 and answer["shadow"] == {"version": 3, "share": 1.0}, answer
    try:
        assert {rest.version("shadowed") for _ in range(50)} == {"1"}
        settle(server)
    finally:
        rest.call("DELETE", "/v2/models/shadowed/traffic")
    tally = comparison(rest, 3)
    assert tally["compared"] == 50 and tally["agreement"] == 1.0
    assert tally["mean_abs_difference"] == 0.0


def test_a_share_of_the_requests_is_shadowed(rest, server) -> None:
    policy = {"weights": {"1": 1}, "shadow": {"version": 2, "share": 0.25}}
    assert rest.call("PUT", "/v2/models/shadowed/traffic", policy)[0] == 200
    before = comparison(rest, 2)["compared"]
    n = 800
    try:
        assert {rest.version("shadowed") for _ in range(n)} == {"1"}
        settle(server)
    finally:
        rest.call("DELETE", "/v2/models/shadowed/traffic")
    copies = comparison(rest, 2)["compared"] - before
    assert binomtest(copies, n, 0.25).pvalue > SIGNIFICANCE, copies


def test_a_stuck_candidate_holds_no_answer_up(rest, server) -> None:
    policy = {"weights": {"1": 1}, "shadow": {"version": 4}}
    assert rest.call("PUT", "/v2/models/shadowed/traffic", policy)[0] == 200
    GATE.clear()
    try:
        # Every answer comes back while each copy waits at the candidate's gate.
        assert {rest.version("shadowed") for _ in range(30)} == {"1"}
        assert comparison(rest, 4)["compared"] == 0
    finally:
        GATE.set()
        settle(server)
        rest.call("DELETE", "/v2/models/shadowed/traffic")
    tally = comparison(rest, 4)
    assert tally["compared"] == 30 and tally["agreement"] == 1.0


def test_the_comparisons_are_metrics_labelled_by_both_versions(rest, server) -> None:
    assert {rest.version("shadowed") for _ in range(5)} == {"1"}
    settle(server)
    connection = http.client.HTTPConnection("127.0.0.1", server.server.http_port, timeout=30)
    try:
        connection.request("GET", "/metrics")
        text = connection.getresponse().read().decode()
    finally:
        connection.close()
    compared = comparison(rest, 2)["compared"]
    labels = 'model="shadowed",shadow_version="2",version="1"'
    assert f"salvo_shadow_compared_total{{{labels}}} {compared}.0" in text, text[-3000:]
    assert f"salvo_shadow_agreed_total{{{labels}}} 0.0" in text


def test_statistics_without_a_version_cover_every_version_as_triton_does(rest, server) -> None:
    status, answer = rest.call("GET", "/v2/models/split/stats")
    assert status == 200 and [s["version"] for s in answer["model_stats"]] == ["1", "2"]
    status, answer = rest.call("GET", "/v2/models/split/versions/2/stats")
    assert status == 200 and [s["version"] for s in answer["model_stats"]] == ["2"]
    with tgrpc.InferenceServerClient(server.grpc_target) as client:
        stats = client.get_inference_statistics("split").model_stats
    assert [s.version for s in stats] == ["1", "2"]
