"""Real Salvo servers for tests: `salvo serve` in its own process, on ports picked by the OS.

The server is started as users start it, and readiness is awaited through gRPC health
(Watch), never with sleeps.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

START_TIMEOUT_S = 300
"""How long an in-process server may take to start: load and warm up its models."""

LISTENING = re.compile(r"listening grpc=([\w.:\[\]-]+):(\d+) http=([\w.:\[\]-]+):(\d+)")


class ServerProcess:
    """`salvo serve` on port 0 in a child process; a context manager."""

    def __init__(self, repository: Path, *extra: str, env: dict[str, str] | None = None):
        self.repository = repository
        self.extra = extra
        # Tests stop servers often and nothing balances load in front of them: no grace
        # (the lifecycle tests pass --shutdown-grace-s).
        self.env = {**os.environ, "SALVO_SHUTDOWN_GRACE_S": "0", **(env or {})}
        self.lines: list[str] = []
        self._changed = threading.Condition()
        self._listening = threading.Event()
        self.grpc_port = 0
        self.http_port = 0

    @property
    def grpc_target(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def start(self, wait_ready: bool = True, timeout_s: float = 90) -> ServerProcess:
        cmd = [
            sys.executable, "-m", "salvo", "serve",
            "--model-repository", str(self.repository),
            "--grpc-port", "0", "--http-port", "0", *self.extra,
        ]  # fmt: skip
        self.proc = subprocess.Popen(
            cmd,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=self.env,
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        if not self._listening.wait(timeout_s) or not self.grpc_port:
            self.stop()
            raise RuntimeError("server did not start:\n" + "".join(self.lines))
        if wait_ready:
            try:
                self.wait_health(health_pb2.HealthCheckResponse.SERVING, timeout_s)
            except BaseException:
                self.stop()  # never leave a server behind a failed start
                raise
        return self

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with self._changed:
                self.lines.append(line)
                self._changed.notify_all()
            match = LISTENING.search(line)
            if match and not self._listening.is_set():
                self.grpc_port = int(match.group(2))
                self.http_port = int(match.group(4))
                self._listening.set()
        self._listening.set()  # the process ended: wake anyone waiting

    def wait_health(self, status: int, timeout_s: float = 60, service: str = "") -> None:
        """Block until gRPC health reports `status` (a Watch stream, no polling)."""
        with grpc.insecure_channel(self.grpc_target) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            for response in stub.Watch(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout_s
            ):
                if response.status == status:
                    return

    def wait_for_line(self, pattern: str, timeout_s: float = 60) -> str:
        """Block until a log line matches `pattern` (a regex); returns the line."""
        regex = re.compile(pattern)
        with self._changed:
            found = self._changed.wait_for(
                lambda: any(regex.search(x) for x in self.lines) or self.proc.poll() is not None,
                timeout_s,
            )
            match = next((x for x in self.lines if regex.search(x)), None)
        if not found or match is None:
            raise AssertionError(f"no log line matching {pattern!r}:\n{self.log()}")
        return match

    def log(self) -> str:
        return "".join(self.lines)

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._reader.join(5)
        return self.proc.returncode

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class InProcessServer:
    """A real Salvo (real sockets, real gRPC) on its own event loop in a background thread.

    For tests that need a model written in Python, such as one whose forward waits on an
    event, passed in through `loader`. Clients still talk to it over the network.
    """

    def __init__(self, repository: Path, loader=None, telemetry=None, **settings):
        from salvo.ops.settings import Settings

        settings.setdefault("shutdown_grace_s", 0)
        self.settings = Settings(
            model_repository=repository, grpc_port=0, http_port=0, drain_timeout_s=5, **settings
        )
        self.loader = loader
        self.telemetry = telemetry
        self._started = threading.Event()
        self._error: BaseException | None = None

    @property
    def grpc_target(self) -> str:
        return f"127.0.0.1:{self.server.grpc_port}"

    def __enter__(self) -> InProcessServer:
        import asyncio

        from salvo.server import SalvoServer

        async def main() -> None:
            self.loop = asyncio.get_running_loop()
            self._stop = asyncio.Event()
            self.server = SalvoServer(self.settings, self.loader, self.telemetry)
            try:
                await self.server.start()
            finally:
                self._started.set()
            await self._stop.wait()
            await self.server.stop()

        def run() -> None:
            try:
                asyncio.run(main())
            except BaseException as exc:  # reported to the test by __enter__
                self._error = exc
                self._started.set()

        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()
        # Start-up loads every model; compiling one (optimization.compile) took over a minute
        # on a fresh GPU host. Returning before then would hand the test a loading model.
        if not self._started.wait(START_TIMEOUT_S):
            raise TimeoutError(f"the server did not start in {START_TIMEOUT_S} s")
        if self._error is not None:
            raise self._error
        return self

    def call(self, coro, timeout_s: float = 30):
        """Run a coroutine on the server's loop and return its result."""
        import asyncio

        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout_s)

    def scheduler(self, model: str):
        return self.server.router.route(model).scheduler

    def wait_queued(self, model: str, count: int, timeout_s: float = 30) -> None:
        """Block until `count` requests of `model` wait in its queue (no polling)."""
        scheduler = self.scheduler(model)
        self.call(scheduler.wait_until(lambda: len(scheduler.queue) == count), timeout_s)

    def until(self, predicate, timeout_s: float = 30) -> None:
        """Block until `predicate()` holds, checked on the server's loop between its tasks.

        For state with no event of its own (cache counters): the loop yields to the server's
        work between checks, so it sees each change as soon as it happens.
        """
        import asyncio
        import time

        async def check() -> None:
            deadline = time.monotonic() + timeout_s
            while not predicate():
                if time.monotonic() > deadline:
                    raise AssertionError("condition not reached")
                await asyncio.sleep(0)

        self.call(check(), timeout_s + 5)

    def __exit__(self, *exc: object) -> None:
        self.loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(30)
