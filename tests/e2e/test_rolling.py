"""Zero failed calls through a rolling restart of three replicas: through nginx, and with
client-side round robin.

Three `salvo serve` replicas: deploy/nginx's config in front (as tests/e2e/test_nginx.py runs
it), or no proxy and one `salvo_client.InferenceClient` spreading calls over the three
(round_robin). Load comes from threads sharing one client with its retry policy on; every call
that does not succeed counts as a failure, whatever its status. Each replica in turn gets
SIGTERM (drain), exits, and comes back on the same ports (the nginx config, or the client's
target list, name them): it is started with `--grpc-port P --http-port Q` after the
`--grpc-port 0 --http-port 0` ServerProcess passes, and argparse keeps the last.

Skipped: neither reaches zero failures reliably yet. Now and then (about half the runs
through nginx, one in four or so without it) one or two calls in 8,000 to 30,000 fail with
CANCELLED: a call that reaches a replica just as its gRPC server starts shutting down, before
a handler took it, is cancelled by gRPC core rather than refused as UNAVAILABLE
(grpc/grpc#41785), so no retry policy covers it. A SIGKILL through nginx is not covered
either: nginx answers the calls in flight with HTTP 502 and an HTML body, which gRPC takes as a
committed response and does not retry.
"""

from __future__ import annotations

import signal
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from salvo_client import InferenceClient, RetryPolicy
from salvo_client.errors import SalvoClientError
from tests.e2e.test_nginx import NGINX, Nginx
from tests.servers import ServerProcess

REPLICAS = 3
CONCURRENCY = 4
# gRPC's most: a call refused by a draining replica is retried (through nginx, or on another
# subchannel).
pytestmark = pytest.mark.skip(
    reason="a draining replica cancels calls it had not yet handed to a handler (grpc/grpc#41785)"
)

RETRY = RetryPolicy(max_attempts=5, initial_backoff_s=0.05, max_backoff_s=0.5)


def _replica(repository: Path, grpc_port: int = 0, http_port: int = 0) -> ServerProcess:
    return ServerProcess(
        repository,
        "--torch-threads", "1",
        "--drain-timeout-s", "10",
        "--grpc-port", str(grpc_port), "--http-port", str(http_port),
    )  # fmt: skip


def _restart(old: ServerProcess) -> ServerProcess:
    """A new process on `old`'s ports (old has exited), returned once it reports SERVING."""
    new = _replica(old.repository, old.grpc_port, old.http_port)
    new.start()
    assert (new.grpc_port, new.http_port) == (old.grpc_port, old.http_port), new.log()
    return new


def _inference_count(replica: ServerProcess) -> int:
    with InferenceClient(replica.grpc_target, retries=0, timeout_s=10) as client:
        return sum(s.inference_count for s in client.statistics("mlp"))


class Load:
    """`concurrency` threads calling ModelInfer through one client until stopped (or `limit_s`)."""

    def __init__(self, client: InferenceClient, concurrency: int, limit_s: float = 120) -> None:
        self.client = client
        self.concurrency = concurrency
        self.deadline = time.monotonic() + limit_s
        self.ok = 0
        self.failures: list[str] = []
        self._stopping = threading.Event()
        self._changed = threading.Condition()

    def __enter__(self) -> Load:
        self.threads = [
            threading.Thread(target=self._run, args=(n,), daemon=True)
            for n in range(self.concurrency)
        ]
        for thread in self.threads:
            thread.start()
        return self

    def _run(self, n: int) -> None:
        i = 0
        while not self._stopping.is_set() and time.monotonic() < self.deadline:
            i += 1
            x = np.full((1, 64), n * 1e6 + i, dtype=np.float32)
            try:
                out = self.client.infer("mlp", {"input": x}, timeout_s=20)
                assert out["output"].shape == (1, 10)
            except (SalvoClientError, AssertionError) as exc:
                with self._changed:
                    self.failures.append(f"{type(exc).__name__}: {exc}")
                    self._changed.notify_all()
            else:
                with self._changed:
                    self.ok += 1
                    self._changed.notify_all()

    def wait_ok(self, more: int, timeout_s: float = 30) -> None:
        """Block until `more` further calls have succeeded."""
        with self._changed:
            target = self.ok + more
            if not self._changed.wait_for(lambda: self.ok >= target, timeout_s):
                raise AssertionError(f"{self.ok} calls succeeded, wanted {target}: {self.failures}")

    def wait_served(self, replica: ServerProcess, timeout_s: float = 30) -> int:
        """Block until `replica` has served calls of this load; paced by the load's progress."""
        deadline = time.monotonic() + timeout_s
        while (count := _inference_count(replica)) == 0:
            if time.monotonic() > deadline:
                raise AssertionError(f"{replica.grpc_target} served nothing in {timeout_s} s")
            self.wait_ok(CONCURRENCY)
        return count

    def __exit__(self, *exc: object) -> None:
        self._stopping.set()
        for thread in self.threads:
            thread.join(30)


def _rolling_restart(replicas: list[ServerProcess], load: Load) -> None:
    """In turn: SIGTERM, wait for exit, start on the same ports, wait for SERVING and traffic."""
    for n, old in enumerate(replicas):
        assert old.stop(signal.SIGTERM) == 0, old.log()
        old.wait_for_line(r"stopped")
        replicas[n] = _restart(old)
        load.wait_served(replicas[n])


@pytest.fixture
def replicas(demo_repo: Path) -> Iterator[list[ServerProcess]]:
    started = [_replica(demo_repo) for _ in range(REPLICAS)]
    try:
        with ThreadPoolExecutor(REPLICAS) as pool:
            list(pool.map(lambda r: r.start(), started))
        yield started  # the tests replace restarted replicas in this list
    finally:
        for replica in started:
            if hasattr(replica, "proc"):
                replica.stop(signal.SIGKILL)


@pytest.fixture
def proxy(replicas: list[ServerProcess], tmp_path: Path) -> Iterator[Nginx]:
    if NGINX is None:
        pytest.skip("nginx not installed")
    nginx = Nginx(tmp_path, [r.grpc_target for r in replicas]).start()
    try:
        yield nginx
    finally:
        nginx.stop()


def test_rolling_restart_through_nginx(replicas, proxy) -> None:
    with (
        InferenceClient(proxy.target, retries=RETRY, timeout_s=20) as client,
        Load(client, CONCURRENCY) as load,
    ):
        load.wait_ok(50)
        _rolling_restart(replicas, load)
        load.wait_ok(50)
    assert not load.failures, (load.ok, Counter(load.failures))
    assert all(_inference_count(r) > 0 for r in replicas)


def test_rolling_restart_with_client_round_robin(replicas) -> None:
    targets = [r.grpc_target for r in replicas]
    with (
        InferenceClient(targets, retries=RETRY, timeout_s=20) as client,
        Load(client, CONCURRENCY) as load,
    ):
        load.wait_ok(50)
        _rolling_restart(replicas, load)
        load.wait_ok(50)
    assert not load.failures, (load.ok, Counter(load.failures))
    assert all(_inference_count(r) > 0 for r in replicas)
