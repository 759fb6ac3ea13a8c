"""`salvo serve --workers 2`: two real worker processes behind one port, under a supervisor."""

from __future__ import annotations

import os
import re
import signal
import urllib.request

import numpy as np
import pytest
import tritonclient.grpc as tc
from tritonclient.utils import InferenceServerException

from salvo.supervisor import merge_metrics
from tests.servers import ServerProcess

X = np.zeros((1, 64), np.float32)
PID = re.compile(r"worker (\d) started \(pid (\d+)\)")


def served_by_worker(server: ServerProcess) -> dict[str, float]:
    """Successful mlp requests per worker, from the supervisor's merged /metrics."""
    with urllib.request.urlopen(server.http_url + "/metrics", timeout=10) as reply:
        text = reply.read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("salvo_requests_total{") and 'model="mlp"' in line:
            worker = re.search(r'worker="(\d)"', line)
            assert worker is not None, line
            out[worker.group(1)] = float(line.rsplit(" ", 1)[1])
    return out


def infer_on_new_connection(target: str) -> None:
    """One request on a connection of its own, so the kernel picks a worker for it."""
    with tc.InferenceServerClient(
        target, channel_args=[("grpc.use_local_subchannel_pool", 1)]
    ) as c:
        x = tc.InferInput("input", [1, 64], "FP32")
        x.set_data_from_numpy(X)
        c.infer("mlp", [x])


def worker_pids(server: ServerProcess) -> dict[str, int]:
    """The latest pid of each worker, from the supervisor's log."""
    return {m.group(1): int(m.group(2)) for m in PID.finditer(server.log())}


def start(repository) -> ServerProcess:
    """The supervisor logs its ports before any worker listens: wait for both workers."""
    server = ServerProcess(repository, "--workers", "2", "--torch-threads", "1")
    server.start(wait_ready=False)
    server.wait_for_line(r"worker 0 ready")
    server.wait_for_line(r"worker 1 ready")
    return server


@pytest.fixture()
def server(demo_repo):
    server = start(demo_repo)
    yield server
    server.stop()


def test_connections_spread_over_both_workers_and_metrics_say_which(server):
    # Each connection lands on one worker (SO_REUSEPORT hashes the client's port); forty
    # all landing on the same one would happen once in 2**39 runs.
    for _ in range(40):
        infer_on_new_connection(server.grpc_target)
    counts = served_by_worker(server)
    assert set(counts) == {"0", "1"}, counts
    assert sum(counts.values()) == 40
    with urllib.request.urlopen(server.http_url + "/v2/health/ready", timeout=10) as reply:
        assert reply.status == 200


def test_a_killed_worker_is_restarted_and_the_other_keeps_serving(server):
    old = worker_pids(server)
    os.kill(old["0"], signal.SIGKILL)
    server.wait_for_line(r"worker 0 exited with -9; restarting")
    before = served_by_worker(server).get("1", 0.0)
    for _ in range(5):  # worker 0 is gone: every new connection reaches worker 1
        infer_on_new_connection(server.grpc_target)
    assert served_by_worker(server)["1"] == before + 5
    new = server.wait_for_line(rf"worker 0 started \(pid (?!{old['0']}\b)\d+\)")
    new_pid = int(PID.search(new).group(2))  # type: ignore[union-attr]
    server.wait_for_line(rf"worker 0 ready \(pid {new_pid}\)")
    with pytest.raises(ProcessLookupError):
        os.kill(old["0"], 0)
    assert worker_pids(server)["1"] == old["1"]  # the other one never stopped
    infer_on_new_connection(server.grpc_target)


def test_sigterm_drains_every_worker_and_exits(demo_repo):
    server = start(demo_repo)
    pids = worker_pids(server)
    infer_on_new_connection(server.grpc_target)
    assert server.stop(signal.SIGTERM) == 0
    for pid in pids.values():
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    assert server.log().count('"msg": "stopped"') == 3  # both workers, then the supervisor
    with pytest.raises(InferenceServerException) as refused:
        infer_on_new_connection(server.grpc_target)
    assert refused.value.status() == "StatusCode.UNAVAILABLE"


def test_merged_metrics_keep_each_family_once_with_a_worker_label():
    text = (
        "# HELP salvo_requests_total Inference requests by outcome\n"
        "# TYPE salvo_requests_total counter\n"
        'salvo_requests_total{model="mlp"} 3.0\n'
    )
    merged = merge_metrics({0: text, 1: text.replace("3.0", "4.0")}).decode()
    assert merged.count("# TYPE salvo_requests_total counter") == 1
    assert 'salvo_requests_total{model="mlp",worker="0"} 3.0' in merged
    assert 'salvo_requests_total{model="mlp",worker="1"} 4.0' in merged
