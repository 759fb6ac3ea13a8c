"""Traffic policies on a real server: weights from the config spread requests that name no
version within statistical bounds; a sticky parameter keeps each caller on one version;
the admin API (`/v2/models/{model}/traffic`, `salvo traffic`) changes routing live, logs
it, refuses bad policies naming the field, and needs repository rights.

Version N of each model answers x times N, so every answer says which version gave it.
"""

from __future__ import annotations

import http.client
import json
import logging
import subprocess
import sys
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
    "split": BASE + "traffic: {weights: {1: 80, 2: 20}}\n",
    "sticky": BASE + "traffic: {weights: {1: 1, 2: 1}, sticky_parameter: user}\n",
}
SIGNIFICANCE = 1e-6
"""A split this unlikely under the policy's shares fails the test (a real fault is far
less likely still: 50/50 against 80/20 over 2,000 requests is about 1e-160)."""


class Times:
    def __init__(self, factor: int) -> None:
        self.factor = factor

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.factor


def load(config: ModelConfig, version_dir: Path) -> LoadedModel:
    factor = int(version_dir.name)
    return LoadedModel(config, version_dir / "model.pt", Times(factor), torch.device("cpu"))


def repository(root: Path) -> Path:
    for name, config in MODELS.items():
        for version in ("1", "2"):
            (root / name / version).mkdir(parents=True)
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
        "sticky_parameter": None, "serving": [1, 2],
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
        "sticky_parameter": "team", "serving": [1, 2],
    }  # fmt: skip
    refused = salvo("--weights", "1=0,2=x")
    assert refused.returncode == 1 and "the weight is not a number" in refused.stderr
    refused = salvo("--weights", "7=1")
    assert refused.returncode == 1 and "400: 'weights': version 7 does not serve" in refused.stderr
    cleared = salvo("--clear")
    assert cleared.returncode == 0 and json.loads(cleared.stdout)["source"] == "config"
