"""Replicas restarted or killed under load, with zero failed calls: through nginx, and with
client-side round robin.

Three `salvo serve` replicas serving only the mlp model (twice, so that each client's calls
are counted apart), which keeps start-ups short. Two loads at once: one through deploy/nginx's
config (as tests/e2e/test_nginx.py runs it), one with no proxy, one
`salvo_client.InferenceClient` spreading calls over the three (round_robin). Each load is
threads sharing one client with its retry policy on; every call that does not succeed counts
as a failure, whatever its status.

- Rolling restart: each replica in turn gets SIGTERM, drains as salvo.lifecycle describes,
  exits 0, and comes back on the same ports (the nginx config, or the client's target list,
  name them): it is started with `--grpc-port P --http-port Q` after the
  `--grpc-port 0 --http-port 0` ServerProcess passes, and argparse keeps the last. The next
  replica goes once the round-robin client and nginx (after `fail_timeout`) both send calls
  to the new one again.
- SIGKILL: calls held in a forward pass on the killed replica (the `gated` stand-in of
  tests/e2e/hooks) fail; nginx answers each as gRPC UNAVAILABLE (deploy/nginx's error_page),
  which the client's retry policy sends to another replica. Without retries, at most the
  calls in flight fail: tests/e2e/test_nginx.py.
"""

from __future__ import annotations

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

from salvo_client import InferenceClient, RetryPolicy
from salvo_client.errors import SalvoClientError
from tests.e2e.gate import Gate, write_model
from tests.nginx import Nginx
from tests.servers import ServerProcess
from tests.tools import require

REPLICAS = 3
CONCURRENCY = 4
# gRPC's most attempts: a call refused by a draining replica, or lost with a killed one, is
# retried (through nginx, or on another subchannel).
RETRY = RetryPolicy(max_attempts=5, initial_backoff_s=0.05, max_backoff_s=0.5)


PROXIED, DIRECT = "mlp", "mlp_direct"
"""The model each load calls: through nginx, and with the client's round robin."""


@pytest.fixture(scope="module")
def mlp_repo(demo_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("mlp-repo")
    for name in (PROXIED, DIRECT):
        shutil.copytree(demo_repo / "mlp", root / name)
        config = root / name / "config.yaml"
        config.write_text(config.read_text().replace("name: mlp\n", f"name: {name}\n"))
    write_model(root, "gated")
    return root


def _replica(repository: Path, gate: Gate, grpc_port: int = 0, http_port: int = 0):
    return ServerProcess(
        repository,
        "--torch-threads", "1",
        "--shutdown-grace-s", "0.2",
        "--drain-timeout-s", "10",
        "--grpc-port", str(grpc_port), "--http-port", str(http_port),
        env=gate.env(),
    )  # fmt: skip


def _restart(old: ServerProcess, gate: Gate) -> ServerProcess:
    """A new process on `old`'s ports (old has exited), returned once it reports SERVING."""
    new = _replica(old.repository, gate, old.grpc_port, old.http_port)
    new.start()
    assert (new.grpc_port, new.http_port) == (old.grpc_port, old.http_port), new.log()
    return new


def _inference_count(replica: ServerProcess, model: str) -> int:
    with InferenceClient(replica.grpc_target, retries=0, timeout_s=10) as client:
        return sum(s.inference_count for s in client.statistics(model))


class Load:
    """`concurrency` threads calling ModelInfer of `model` through one client until stopped
    (or `limit_s`)."""

    def __init__(
        self, client: InferenceClient, model: str, concurrency: int, limit_s: float = 120
    ) -> None:
        self.client = client
        self.model = model
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
                out = self.client.infer(self.model, {"input": x}, timeout_s=20)
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

    def wait_served(self, replica: ServerProcess, timeout_s: float = 30, after: int = 0) -> int:
        """Block until `replica` has served more than `after` calls of this load; paced by
        the load's progress."""
        deadline = time.monotonic() + timeout_s
        while (count := _inference_count(replica, self.model)) <= after:
            if time.monotonic() > deadline:
                raise AssertionError(f"{replica.grpc_target} served nothing in {timeout_s} s")
            self.wait_ok(CONCURRENCY)
        return count

    def __exit__(self, *exc: object) -> None:
        self._stopping.set()
        for thread in self.threads:
            thread.join(30)


@pytest.fixture(scope="module")
def gates(tmp_path_factory: pytest.TempPathFactory) -> list[Gate]:
    folder = tmp_path_factory.mktemp("gates")
    return [Gate(folder / f"replica-{n}") for n in range(REPLICAS)]


@pytest.fixture(scope="module")
def replicas(mlp_repo: Path, gates: list[Gate]) -> Iterator[list[ServerProcess]]:
    started = [_replica(mlp_repo, gate) for gate in gates]
    try:
        with ThreadPoolExecutor(REPLICAS) as pool:
            list(pool.map(lambda r: r.start(), started))
        yield started  # the tests replace restarted replicas in this list
    finally:
        for replica in started:
            if hasattr(replica, "proc"):
                replica.stop(signal.SIGKILL)


@pytest.fixture(scope="module")
def proxy(
    replicas: list[ServerProcess], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Nginx]:
    require("nginx")
    nginx = Nginx(tmp_path_factory.mktemp("nginx"), [r.grpc_target for r in replicas]).start()
    try:
        yield nginx
    finally:
        nginx.stop()


def test_rolling_restart_loses_no_call_through_nginx_or_round_robin(replicas, gates, proxy) -> None:
    targets = [r.grpc_target for r in replicas]
    with (
        InferenceClient(proxy.target, retries=RETRY, timeout_s=20) as proxied_client,
        InferenceClient(targets, retries=RETRY, timeout_s=20) as direct_client,
        Load(proxied_client, PROXIED, CONCURRENCY // 2) as proxied,
        Load(direct_client, DIRECT, CONCURRENCY // 2) as direct,
    ):
        proxied.wait_ok(50)
        direct.wait_ok(50)
        for n, old in enumerate(replicas):
            assert old.stop(signal.SIGTERM) == 0, old.log()
            old.wait_for_line(r"stopped")
            replicas[n] = _restart(old, gates[n])
            # As a rolling update does, the next replica goes only once both balancers send
            # calls to this one again (nginx after `fail_timeout`): otherwise nginx can have
            # two of three marked down, and a hiccup on the third answers every call 502.
            direct.wait_served(replicas[n])
            proxied.wait_served(replicas[n])
    assert not proxied.failures, (proxied.ok, Counter(proxied.failures))
    assert not direct.failures, (direct.ok, Counter(direct.failures))


def test_replica_killed_through_nginx_loses_nothing_with_retries(replicas, gates, proxy) -> None:
    victim, survivors = replicas[0], replicas[1:]
    calls = 2 * REPLICAS  # least_conn spreads held calls evenly: the victim gets some
    with (
        InferenceClient(proxy.target, retries=RETRY, timeout_s=30) as client,
        Load(client, PROXIED, CONCURRENCY // 2) as load,
        ThreadPoolExecutor(calls) as pool,
    ):
        # nginx sends this load to the victim again: any idle connection it kept to the
        # victim's predecessor (restarted in the test before) has failed and been dropped,
        # and the victim is not marked down for `fail_timeout` while the held calls go out.
        load.wait_served(victim, after=_inference_count(victim, PROXIED) + CONCURRENCY)
        held = [
            pool.submit(client.infer, "gated", {"x": np.full((1, 4), n, dtype=np.float32)})
            for n in range(calls)
        ]
        victim.wait_for_line(r"gated forward")  # a call in a forward pass there, held
        victim.proc.send_signal(signal.SIGKILL)
        victim.proc.wait(10)
        before = [_inference_count(r, PROXIED) for r in survivors]
        for gate in gates[1:]:
            gate.release(2 * calls)  # the survivors' own calls, and the victim's, retried
        for n, call in enumerate(held):
            np.testing.assert_array_equal(call.result(30)["y"], np.full((1, 4), 2 * n))
        load.wait_ok(100)
    after = [_inference_count(r, PROXIED) for r in survivors]
    assert not load.failures, (load.ok, Counter(load.failures))
    assert all(a > b for a, b in zip(after, before, strict=True)), (before, after)
