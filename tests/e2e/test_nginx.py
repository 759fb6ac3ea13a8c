"""Three Salvo replicas behind Debian's nginx, configured from deploy/nginx, on loopback.

The config is deploy/nginx/nginx.conf.template rendered by deploy/nginx/render.py for the
replicas' ports, exactly as deploy/compose.yaml's is for its containers; nginx runs
unprivileged from a folder of its own. Calls go through nginx with tritonclient, and each
replica's own statistics say where they landed.

Zero failures on a replica kill with the client's retries on, and through rolling restarts
(through nginx and with client-side round robin): tests/e2e/test_rolling.py.
"""

from __future__ import annotations

import os
import shutil
import signal
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as tc
from tritonclient.utils import InferenceServerException

from tests.nginx import NGINX, Nginx
from tests.servers import ServerProcess

REPLICAS = 3
CONCURRENCY = 4

pytestmark = pytest.mark.skipif(
    NGINX is None and not os.environ.get("CI"),
    reason="nginx not installed: tools/check_deploy.sh install (or apt-get install nginx)",
)


@pytest.fixture(scope="module")
def cluster(demo_repo: Path, tmp_path_factory) -> Iterator[tuple[list[ServerProcess], Nginx]]:
    """Three replicas of `salvo serve` (the mlp model: they start fast) and nginx in front."""
    repository = tmp_path_factory.mktemp("mlp-repo")
    shutil.copytree(demo_repo / "mlp", repository / "mlp")
    replicas = [ServerProcess(repository, "--torch-threads", "1") for _ in range(REPLICAS)]
    try:
        with ThreadPoolExecutor(REPLICAS) as pool:
            list(pool.map(lambda r: r.start(), replicas))
        proxy = Nginx(tmp_path_factory.mktemp("nginx"), [r.grpc_target for r in replicas]).start()
        try:
            with tc.InferenceServerClient(proxy.target) as client:
                # Through nginx to a replica: the whole path answers.
                assert client.is_server_ready(client_timeout=10)
            yield replicas, proxy
        finally:
            proxy.stop()
    finally:
        for replica in replicas:
            if hasattr(replica, "proc"):
                replica.stop()


def _inference_count(replica: ServerProcess) -> int:
    with tc.InferenceServerClient(replica.grpc_target) as client:
        stats = client.get_inference_statistics("mlp", as_json=True, client_timeout=10)
    return sum(int(s.get("inference_count", 0)) for s in stats.get("model_stats", []))


def _mlp_input(value: float) -> list[tc.InferInput]:
    x = tc.InferInput("input", [1, 64], "FP32")
    x.set_data_from_numpy(np.full((1, 64), value, dtype=np.float32))
    return [x]


def test_calls_spread_over_every_replica(cluster) -> None:
    replicas, proxy = cluster
    calls = 30
    before = [_inference_count(r) for r in replicas]
    with tc.InferenceServerClient(proxy.target) as client:
        for i in range(calls):
            result = client.infer("mlp", _mlp_input(i), client_timeout=10)
            assert result.as_numpy("output").shape == (1, 10)
    served = [_inference_count(r) - b for r, b in zip(replicas, before, strict=True)]
    assert sum(served) == calls, served
    assert all(n > 0 for n in served), f"a replica got no calls: {served}"


class Load:
    """`concurrency` threads, each calling ModelInfer through `target` in a loop until stopped.

    Bounded: each thread stops on `stop()` or after `limit_s`, whichever comes first.
    """

    def __init__(self, target: str, concurrency: int, limit_s: float = 90) -> None:
        self.target = target
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
        with tc.InferenceServerClient(self.target) as client:
            i = 0
            while not self._stopping.is_set() and time.monotonic() < self.deadline:
                i += 1
                try:
                    client.infer("mlp", _mlp_input(n * 1e6 + i), client_timeout=10)
                except InferenceServerException as exc:
                    with self._changed:
                        self.failures.append(f"{exc.status()}: {exc.message()}")
                        self._changed.notify_all()
                else:
                    with self._changed:
                        self.ok += 1
                        self._changed.notify_all()

    def wait_ok(self, count: int, timeout_s: float = 60) -> None:
        """Block until `count` calls in all have succeeded."""
        with self._changed:
            if not self._changed.wait_for(lambda: self.ok >= count, timeout_s):
                raise AssertionError(f"{self.ok} calls succeeded, wanted {count}: {self.failures}")

    def __exit__(self, *exc: object) -> None:
        self._stopping.set()
        for thread in self.threads:
            thread.join(30)


def test_replica_killed_under_load_fails_at_most_its_calls_in_flight(cluster) -> None:
    replicas, proxy = cluster
    victim, survivors = replicas[0], replicas[1:]
    with Load(proxy.target, CONCURRENCY) as load:
        load.wait_ok(50)
        victim.proc.send_signal(signal.SIGKILL)
        victim.proc.wait(10)
        before = [_inference_count(r) for r in survivors]
        killed_at = load.ok
        load.wait_ok(killed_at + 200)
    after = [_inference_count(r) for r in survivors]

    # Each thread has one call in flight at a time, so at most CONCURRENCY were on the victim
    # when it died; each of those reaches its caller as UNAVAILABLE: nginx's 502, which
    # deploy/nginx's error_page answers as gRPC (so that retry policies apply). Any later call
    # that nginx sent to the dead replica was refused before it left, and nginx retried it on
    # another one.
    failures = Counter(load.failures)
    assert len(load.failures) <= CONCURRENCY, failures
    unavailable = "StatusCode.UNAVAILABLE: unavailable: no Salvo replica answered"
    assert all(f == unavailable for f in failures), failures
    # Traffic goes on, on both survivors.
    assert all(a > b for a, b in zip(after, before, strict=True)), (before, after)
    assert sum(after) - sum(before) >= 200 - CONCURRENCY
