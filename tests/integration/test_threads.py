"""`--torch-threads` reaches the threads that run models, not only the main thread.

OpenMP keeps its thread count per thread and a new thread starts from its default (every
core): before salvo.backend.inherit_torch_threads, a model's executor thread ran batches on
a team of every core whatever `--torch-threads` said, and the idle team member spun between
batches. The check asks libgomp itself, in the thread that ran the batch: torch's own
report (`torch.__config__.parallel_info()`) sets the count as it reads it, so it would hide
the fault.
"""

from __future__ import annotations

import ctypes
import os
import shutil
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
