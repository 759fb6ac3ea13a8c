"""Versions swapped live: the repository poll (`--repository-poll-s`) loads a new version
while the old one serves, switches traffic to it once it has loaded and warmed up, and
drains the old one; callers under load see no failure and never wait for the load. A
version that fails to load never takes traffic, and a fixed one is picked up.

Version N of model `m` answers x times N. The loader holds a version's load while the test
says (a threading.Event), and refuses a version directory holding a file named `broken`.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import threading
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import tritonclient.grpc as tgrpc

from salvo.domain.config import ModelConfig
from salvo.domain.status import ConfigError
from salvo.engine.backend import LoadedModel
from tests.servers import InProcessServer

CONFIG = """max_batch_size: 8
inputs: [{name: x, datatype: FP32, dims: [1]}]
outputs: [{name: y, datatype: FP32, dims: [1]}]
"""


class Times:
    def __init__(self, factor: int) -> None:
        self.factor = factor

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.factor


class Loader:
    """Version N answers x times N; `hold` keeps loads waiting until `release`."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.go = threading.Event()
        self.go.set()

    def hold(self) -> None:
        self.entered.clear()
        self.go.clear()

    def __call__(self, config: ModelConfig, version_dir: Path) -> LoadedModel:
        if (version_dir / "broken").exists():
            raise ConfigError(f"{version_dir}: broken on purpose")
        self.entered.set()
        if not self.go.wait(60):
            raise ConfigError("the test never released the load")
        factor = int(version_dir.name)
        return LoadedModel(config, version_dir / "model.pt", Times(factor), torch.device("cpu"))


def model_dir(root: Path, name: str, *versions: int) -> Path:
    for version in versions:
        (root / name / str(version)).mkdir(parents=True, exist_ok=True)
    (root / name / "config.yaml").write_text(CONFIG)
    return root / name


def answer(client: tgrpc.InferenceServerClient, model: str = "m") -> str:
    x = tgrpc.InferInput("x", [1, 1], "FP32")
    x.set_data_from_numpy(np.ones((1, 1), np.float32))
    result = client.infer(model, [x], client_timeout=30)
    version = result.get_response().model_version
    assert float(result.as_numpy("y")[0, 0]) == float(version)
    return version


class Load:
    """Callers on threads, each calling `m` in a loop until stopped, recording what
    answered and every failure."""

    def __init__(self, target: str, callers: int = 4) -> None:
        self.target = target
        self.answers: Counter[str] = Counter()
        self.failures: list[str] = []
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self._run) for _ in range(callers)]

    def _run(self) -> None:
        with tgrpc.InferenceServerClient(self.target) as client:
            while not self.stop.is_set():
                try:
                    version = answer(client)
                except Exception as exc:  # every failure is the test's finding
                    with self.lock:
                        self.failures.append(repr(exc))
                else:
                    with self.lock:
                        self.answers[version] += 1

    def __enter__(self) -> Load:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(60)


def poll(server) -> list[str]:
    return server.call(server.server.models.poll(), timeout_s=120)


def test_a_new_version_takes_over_under_load_with_nothing_failed_or_kept_waiting(tmp_path):
    loader = Loader()
    model_dir(tmp_path, "m", 1)
    with InProcessServer(tmp_path, loader) as server, Load(server.grpc_target) as load:
        (tmp_path / "m" / "2").mkdir()
        loader.hold()
        future = asyncio.run_coroutine_threadsafe(server.server.models.poll(), server.loop)
        assert loader.entered.wait(30)  # version 2 is loading, held
        with tgrpc.InferenceServerClient(server.grpc_target) as client:
            assert {answer(client) for _ in range(20)} == {"1"}  # nobody waits for it
        loader.go.set()
        assert future.result(60) == ["m"]
        with tgrpc.InferenceServerClient(server.grpc_target) as client:
            assert {answer(client) for _ in range(20)} == {"2"}
    assert load.failures == [] and load.answers["1"] > 0 and load.answers["2"] > 0, (
        load.failures[:3], load.answers,
    )  # fmt: skip


def test_a_version_that_fails_to_load_never_takes_traffic(tmp_path, caplog):
    model_dir(tmp_path, "m", 1)
    with InProcessServer(tmp_path, Loader()) as server, Load(server.grpc_target) as load:
        model_dir(tmp_path, "m", 2)
        (tmp_path / "m" / "2" / "broken").write_text("")
        with caplog.at_level(logging.ERROR, logger="salvo.engine.repository"):
            assert poll(server) == ["m"]
        assert "broken on purpose" in caplog.text
        with tgrpc.InferenceServerClient(server.grpc_target) as client:
            assert {answer(client) for _ in range(20)} == {"1"}
            assert client.is_model_ready("m")
            assert poll(server) == []  # unchanged: not retried
            (tmp_path / "m" / "2" / "broken").unlink()  # fixed
            assert poll(server) == ["m"]
            assert {answer(client) for _ in range(20)} == {"2"}
    assert load.failures == [], load.failures[:3]


def test_models_that_appear_load_and_those_that_go_unload(tmp_path):
    model_dir(tmp_path, "m", 1)
    with (
        InProcessServer(tmp_path, Loader(), repository_rpcs="enabled") as server,
        tgrpc.InferenceServerClient(server.grpc_target) as client,
    ):
        model_dir(tmp_path, "n", 3)
        assert poll(server) == ["n"]
        assert answer(client, "n") == "3"
        shutil.rmtree(tmp_path / "n")
        assert poll(server) == ["n"]
        assert not client.is_model_ready("n")
        client.unload_model("m")  # unloaded on request: a poll leaves it so
        assert poll(server) == []
        assert not client.is_model_ready("m")


@pytest.mark.timeout(60)
def test_the_server_polls_on_its_own(tmp_path):
    model_dir(tmp_path, "m", 1)
    with InProcessServer(tmp_path, Loader(), repository_poll_s=0.05) as server:
        swapped = threading.Event()
        models = server.server.models
        before = models.on_swap

        def on_swap(name: str) -> None:
            before(name)
            swapped.set()

        models.on_swap = on_swap
        (tmp_path / "m" / "2").mkdir()
        assert swapped.wait(30)
        with tgrpc.InferenceServerClient(server.grpc_target) as client:
            assert answer(client) == "2"
