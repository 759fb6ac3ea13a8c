"""`--torch-threads` reaches the threads that run models, not only the main thread.

OpenMP keeps its thread count per thread and a new thread starts from its default (every
core): without salvo.engine.threads.inherit_torch_threads, a model's executor thread runs
batches on a team of every core whatever `--torch-threads` says, and the idle team member
spins between batches. The check asks libgomp itself, in the thread that ran the batch: torch's own
report (`torch.__config__.parallel_info()`) sets the count as it reads it, so it would hide
the fault.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
import tritonclient.grpc as tc

from tests.servers import InProcessServer

LIBGOMP = sorted((Path(torch.__file__).parent / "lib").glob("libgomp*.so*"))

pytestmark = [
    pytest.mark.skipif(
        (os.cpu_count() or 1) < 2, reason="one core: OpenMP's default is already 1 thread"
    ),
    pytest.mark.skipif(not LIBGOMP, reason="this torch build does not use libgomp"),
]


def _openmp_threads() -> int:
    """OpenMP's thread count for parallel regions the calling thread starts: libgomp's own
    per-thread setting (the library torch loaded, so the same state)."""
    return int(ctypes.CDLL(str(LIBGOMP[0])).omp_get_max_threads())


def test_a_model_runs_on_the_torch_threads_set_at_start_up(demo_repo: Path, tmp_path) -> None:
    shutil.copytree(demo_repo / "mlp", tmp_path / "mlp")
    # On its instance's thread: `auto` would run this fast model on the event loop, which in
    # `salvo serve` is the main thread that --torch-threads set.
    with (tmp_path / "mlp" / "config.yaml").open("a") as config:
        config.write("optimization: {execution: thread}\n")
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # what `salvo serve --torch-threads 1` does before serving
    try:
        with (
            InProcessServer(tmp_path) as server,
            tc.InferenceServerClient(server.grpc_target) as client,
        ):
            x = tc.InferInput("input", [16, 64], "FP32")
            x.set_data_from_numpy(np.ones((16, 64), dtype=np.float32))
            assert client.infer("mlp", [x]).as_numpy("output").shape == (16, 10)
            # The thread that ran that batch (the model's one instance).
            assert not server.scheduler("mlp").on_loop
            executor = server.scheduler("mlp")._executors[0]
            assert executor.submit(_openmp_threads).result(10) == 1
    finally:
        torch.set_num_threads(before)


class _Recording:
    """y = 2x, noting OpenMP's thread count in the thread that ran each forward pass."""

    def __init__(self) -> None:
        self.threads: list[int] = []

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.threads.append(_openmp_threads())
        return x * 2


def test_batches_on_the_event_loop_run_on_one_thread_and_give_the_loop_its_count_back(
    tmp_path,
) -> None:
    """A fast model's batches run on the event loop on one OpenMP thread (a team's second
    thread would spin on the core gRPC needs); its instance threads keep the count set."""
    from salvo.engine.backend import LoadedModel

    modules: dict[str, _Recording] = {}

    def loader(config, version_dir):
        module = modules.setdefault(config.name, _Recording())
        return LoadedModel(config, version_dir / "model.pt", module, torch.device("cpu"))

    for name, execution in (("on_loop", "loop"), ("on_thread", "thread")):
        (tmp_path / name / "1").mkdir(parents=True)
        (tmp_path / name / "config.yaml").write_text(
            "max_batch_size: 4\n"
            "inputs: [{name: x, datatype: FP32, dims: [2]}]\n"
            "outputs: [{name: y, datatype: FP32, dims: [2]}]\n"
            f"optimization: {{execution: {execution}}}\n"
        )

    async def loop_threads() -> int:
        return _openmp_threads()

    with (
        InProcessServer(tmp_path, loader) as server,
        tc.InferenceServerClient(server.grpc_target) as client,
    ):
        before = server.call(loop_threads())
        assert before > 1, "the loop's thread starts from OpenMP's default, every core"
        for name in ("on_loop", "on_thread"):
            x = tc.InferInput("x", [1, 2], "FP32")
            x.set_data_from_numpy(np.ones((1, 2), dtype=np.float32))
            assert client.infer(name, [x]).as_numpy("y").tolist() == [[2.0, 2.0]]
        assert server.scheduler("on_loop").on_loop
        assert not server.scheduler("on_thread").on_loop
        assert modules["on_loop"].threads == [1]
        assert modules["on_thread"].threads == [before]
        assert server.call(loop_threads()) == before


class _Holding(_Recording):
    """`_Recording` whose first forward pass waits until the test lets it go."""

    def __init__(self) -> None:
        super().__init__()
        self.started = threading.Event()
        self.release = threading.Event()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        first = not self.threads
        y = super().__call__(x)
        if first:
            self.started.set()
            assert self.release.wait(30), "the test never let the first batch go"
        return y


def test_cpu_instances_share_the_cores_they_run_on_at_once(tmp_path) -> None:
    """Two CPU instances: a batch that starts alone runs on every intra-op thread, and one
    that starts while the other instance is busy runs on its share (so two busy at once do
    not put twice as many threads as cores to work)."""
    from salvo.engine.backend import LoadedModel

    module = _Holding()

    def loader(config, version_dir):
        return LoadedModel(config, version_dir / "model.pt", module, torch.device("cpu"))

    (tmp_path / "pair" / "1").mkdir(parents=True)
    (tmp_path / "pair" / "config.yaml").write_text(
        "max_batch_size: 4\n"
        "instance_count: 2\n"
        "inputs: [{name: x, datatype: FP32, dims: [2]}]\n"
        "outputs: [{name: y, datatype: FP32, dims: [2]}]\n"
        "optimization: {warmup: false}\n"
    )

    async def loop_threads() -> int:
        return _openmp_threads()

    def infer(client: tc.InferenceServerClient, value: float) -> list:
        x = tc.InferInput("x", [1, 2], "FP32")
        x.set_data_from_numpy(np.full((1, 2), value, dtype=np.float32))
        return client.infer("pair", [x]).as_numpy("y").tolist()

    with (
        InProcessServer(tmp_path, loader) as server,
        tc.InferenceServerClient(server.grpc_target) as client,
        tc.InferenceServerClient(server.grpc_target) as other,
        ThreadPoolExecutor(1) as pool,
    ):
        every = server.call(loop_threads())
        assert every > 1, "the loop's thread starts from OpenMP's default, every core"
        assert server.scheduler("pair").shares_cores
        held = pool.submit(infer, client, 1.0)  # the first batch: alone, then held
        assert module.started.wait(30)
        assert infer(other, 2.0) == [[4.0, 4.0]]  # runs while the first is held
        module.release.set()
        assert held.result(30) == [[2.0, 2.0]]
        assert infer(client, 3.0) == [[6.0, 6.0]]  # alone again
    assert module.threads == [every, max(1, every // 2), every]
