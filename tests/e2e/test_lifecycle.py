"""Graceful shutdown of real `salvo serve` processes, as salvo.lifecycle describes it.

Each test starts a server on a small repository (the demo's mlp, plus the `gated` or `slow`
stand-ins of tests/e2e/hooks, held through a FIFO) and signals it; tritonclient is the
client. Synchronisation is on log lines, health Watch streams and the held model.
"""

from __future__ import annotations

import shutil
import signal
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as tc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tritonclient.utils import InferenceServerException

from tests.e2e.gate import Gate, write_model
from tests.servers import ServerProcess

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
UNAVAILABLE = "StatusCode.UNAVAILABLE"
GRACE_S = 3.0
DRAIN_S = 20.0
# Long enough that an exit which waited for either could not pass for a prompt one.
LONG_S = "120"


@pytest.fixture
def repo(demo_repo: Path, tmp_path: Path) -> Path:
    root = tmp_path / "repo"
    shutil.copytree(demo_repo / "mlp", root / "mlp")
    write_model(root, "gated")
    return root


@pytest.fixture
def gate(tmp_path: Path) -> Gate:
    return Gate(tmp_path / "gate")


def _serve(repo: Path, gate: Gate, grace_s: object, drain_s: object) -> ServerProcess:
    return ServerProcess(
        repo,
        "--torch-threads", "1",
        "--shutdown-grace-s", str(grace_s),
        "--drain-timeout-s", str(drain_s),
        env=gate.env(),
    )  # fmt: skip


class HealthWatch:
    """A grpc.health.v1 Watch stream, read by a thread: every status, in order."""

    def __init__(self, target: str) -> None:
        self.statuses: list[int] = []
        self._changed = threading.Condition()
        self._channel = grpc.insecure_channel(target)
        self._call = health_pb2_grpc.HealthStub(self._channel).Watch(
            health_pb2.HealthCheckRequest(service="")
        )
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        try:
            for response in self._call:
                with self._changed:
                    self.statuses.append(response.status)
                    self._changed.notify_all()
        except grpc.RpcError:
            pass  # the server went away, or the test cancelled the stream

    def wait_for(self, status: int, timeout_s: float = 30) -> None:
        with self._changed:
            if not self._changed.wait_for(lambda: status in self.statuses, timeout_s):
                raise AssertionError(f"health never reported {status}: {self.statuses}")

    def close(self) -> None:
        self._call.cancel()
        self._thread.join(10)
        self._channel.close()


def _mlp(value: float) -> list[tc.InferInput]:
    x = tc.InferInput("input", [1, 64], "FP32")
    x.set_data_from_numpy(np.full((1, 64), value, dtype=np.float32))
    return [x]


def _gated(client: tc.InferenceServerClient, value: float) -> np.ndarray:
    x = tc.InferInput("x", [1, 4], "FP32")
    x.set_data_from_numpy(np.full((1, 4), value, dtype=np.float32))
    return client.infer("gated", [x], client_timeout=60).as_numpy("y")


class Load:
    """Threads calling mlp in a loop, each until its first failure (or `stop`); every call is
    kept as (monotonic start, status: "OK" or the gRPC code, message)."""

    def __init__(self, target: str, concurrency: int = 2) -> None:
        self.target = target
        self.calls: list[tuple[float, str, str]] = []
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._threads = [
            threading.Thread(target=self._run, daemon=True) for _ in range(concurrency)
        ]

    def __enter__(self) -> Load:
        for thread in self._threads:
            thread.start()
        return self

    def _run(self) -> None:
        with tc.InferenceServerClient(self.target) as client:
            status = "OK"
            while status == "OK" and not self._stopping.is_set():
                started = time.monotonic()
                try:
                    client.infer("mlp", _mlp(started), client_timeout=30)
                    message = ""
                except InferenceServerException as exc:
                    status, message = str(exc.status()), str(exc.message())
                with self._lock:
                    self.calls.append((started, status, message))

    def join(self, timeout_s: float = 60) -> None:
        """Wait for every thread to end (each ends at its first failure)."""
        for thread in self._threads:
            thread.join(timeout_s)
            assert not thread.is_alive(), "a call never returned"

    def __exit__(self, *exc: object) -> None:
        self._stopping.set()
        self.join()


@pytest.fixture
def server(repo: Path, gate: Gate) -> Iterator[ServerProcess]:
    process = _serve(repo, gate, GRACE_S, DRAIN_S).start()
    try:
        yield process
    finally:
        process.stop(signal.SIGKILL)


def test_sigterm_under_load_finishes_admitted_calls_then_refuses_new_ones(server, gate) -> None:
    with (
        tc.InferenceServerClient(server.grpc_target) as client,
        ThreadPoolExecutor(2) as pool,
        Load(server.grpc_target) as load,
    ):
        # Admitted before the signal: one call in a forward pass, held there, one queued.
        held = [pool.submit(_gated, client, value) for value in (1.0, 2.0)]
        server.wait_for_line(r"gated forward")
        watch = HealthWatch(server.grpc_target)
        watch.wait_for(SERVING)

        signalled_at = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)
        # Health first: the Watch stream hears NOT_SERVING before anything else changes.
        watch.wait_for(NOT_SERVING)
        not_serving_at = time.monotonic()
        assert watch.statuses == [SERVING, NOT_SERVING]
        assert not client.is_server_ready()  # the v2 readiness RPC agrees

        # After the grace, new calls are refused, retryably, while admitted ones still run.
        server.wait_for_line(r"refusing new calls")
        refused_at = time.monotonic()
        with pytest.raises(InferenceServerException) as refused:
            client.infer("mlp", _mlp(0), client_timeout=10)
        assert refused.value.status() == UNAVAILABLE
        assert "shutting down" in str(refused.value.message())
        assert not any(call.done() for call in held)

        gate.release(2)  # both held calls run: each finishes OK
        for call, value in zip(held, (1.0, 2.0), strict=True):
            np.testing.assert_array_equal(call.result(30), np.full((1, 4), 2 * value))
        assert server.proc.wait(GRACE_S + DRAIN_S) == 0, server.log()
        load.join()
        watch.close()

    server.wait_for_line(r"stopped")
    statuses = {status for _, status, _ in load.calls}
    assert statuses <= {"OK", UNAVAILABLE}, load.calls  # never CANCELLED, never a hang
    # Calls made before the signal were served; so were calls within the grace.
    assert all(status == "OK" for started, status, _ in load.calls if started < signalled_at)
    assert any(status == "OK" for started, status, _ in load.calls if started > not_serving_at)
    # Every call made once the server was refusing was refused.
    assert all(status != "OK" for started, status, _ in load.calls if started > refused_at)


def test_sigterm_during_a_model_load_exits_at_once(tmp_path, gate) -> None:
    root = tmp_path / "repo"
    write_model(root, "slow")
    server = _serve(root, gate, LONG_S, LONG_S).start(wait_ready=False)
    try:
        server.wait_for_line(r"slow load")  # the load is held: it would never end
        server.proc.send_signal(signal.SIGTERM)
        # Neither the grace nor the drain applies: nothing was served yet.
        assert server.proc.wait(30) == 0, server.log()
        server.wait_for_line(r"stopped during start-up")
    finally:
        server.stop(signal.SIGKILL)


def test_idle_connections_and_open_streams_do_not_hold_the_exit(repo, gate) -> None:
    server = _serve(repo, gate, LONG_S, LONG_S).start()
    try:
        with (
            tc.InferenceServerClient(server.grpc_target) as idle,
            tc.InferenceServerClient(server.grpc_target) as streaming,
        ):
            assert idle.is_server_live()  # a connection, now idle
            streaming.start_stream(callback=lambda result, error: None)  # a stream, idle
            gone = HealthWatch(server.grpc_target)
            watch = HealthWatch(server.grpc_target)
            for stream in (gone, watch):
                stream.wait_for(SERVING)
            # One watcher leaving must not silence the others (grpcio-health-checking's
            # servicer forgot them: salvo.lifecycle.HealthServicer).
            gone.close()

            server.proc.send_signal(signal.SIGTERM)
            watch.wait_for(NOT_SERVING)
            server.wait_for_line(r"draining")
            server.proc.send_signal(signal.SIGTERM)  # a second signal ends the grace now
            # The drain has nothing to wait for: idle connections and streams end with it.
            assert server.proc.wait(30) == 0, server.log()
            server.wait_for_line(r"ending the grace now")
            streaming.stop_stream()
            watch.close()
    finally:
        server.stop(signal.SIGKILL)
