"""`salvo serve --workers N`: N server processes sharing the gRPC port, under one supervisor.

One Python process serves gRPC on one core at most: its event loop runs every RPC, and for
small models that loop, not the model, is what limits throughput. Several processes bound
to the same port with SO_REUSEPORT let the kernel spread connections over them, each with
its own models and event loop, and torch's intra-op threads divided among them.

The supervisor loads no model. It
- reserves the gRPC port (port 0 picks one) and starts each worker as `salvo serve` with
  the same settings, SO_REUSEPORT on, its own HTTP port, and `torch_threads` set to its
  share of the cores unless the user chose;
- relays the workers' log lines (each carries its `worker` index) to its own stdout;
- restarts a worker that exits while serving, with a doubling back-off, so a crash costs
  the connections that worker held and nothing else;
- forwards SIGTERM and SIGINT so each worker drains as a single server would, then exits;
- serves the HTTP port itself: `/metrics` merges the workers' metrics with a `worker`
  label (every series stays a true counter or histogram for Prometheus to aggregate), and
  `/v2/health/ready` is ready while every worker is. The REST API is not served there:
  each worker's HTTP port is private (loopback, for these scrapes), so with workers,
  inference is gRPC's.
OTLP pushes need no merging: each worker exports its own, with `service.instance.id` set.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import logging
import os
import signal
import socket
import sys
import time
import urllib.request
from collections.abc import Iterable

from fastapi import FastAPI
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from salvo.frontends.http.server import HttpFrontEnd
from salvo.ops.settings import Settings

log = logging.getLogger("salvo.supervisor")

WORKER_ENV = "SALVO_WORKER_ID"
"""Set in each worker's environment: its index, for its log lines and its telemetry."""
RESTART_BACKOFF_S = (0.5, 30.0)
"""First and largest pause before restarting a worker that keeps crashing."""
PR_SET_PDEATHSIG = 1
LOG_LINE_LIMIT = 1 << 20
"""Longest worker log line relayed (a JSON line with a traceback can be long)."""


def default_workers() -> int:
    """What `--workers` means when left out: one process.

    Set SALVO_WORKERS or --workers to the number of cores for overhead-bound models
    (`make bench-workers` measures what it gains).
    """
    return 1


def threads_per_worker(workers: int, cores: int | None = None) -> int:
    """Torch intra-op threads for each of `workers` processes: the cores shared out."""
    return max(1, (cores or os.cpu_count() or 1) // workers)


def reserve_port(host: str, port: int) -> socket.socket:
    """A socket holding `port` (0: a free one) that SO_REUSEPORT listeners can share.

    It is bound but never listens, so the kernel hands it no connection; it keeps another
    program from taking the port between worker restarts.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    return sock


class _Worker:
    """One child process and what the supervisor knows of it."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.process: asyncio.subprocess.Process | None = None
        self.http_port = 0
        self.restarts = 0


class Supervisor:
    """Starts, watches, restarts and stops the workers; serves the merged HTTP port."""

    def __init__(self, settings: Settings, workers: int) -> None:
        self.settings = settings
        self.workers = [_Worker(i) for i in range(workers)]
        self.grpc_port = 0
        self.http_port = 0
        self._stopping = asyncio.Event()
        self._tasks: set[asyncio.Task] = set()

    # -- lifecycle -----------------------------------------------------------------------

    async def run_until_signalled(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stopping.set)
        s = self.settings
        reserved = reserve_port(s.host, s.grpc_port)
        self.grpc_port = reserved.getsockname()[1]
        http = HttpFrontEnd(supervisor_app(self), s)
        self.http_port = await http.start()
        log.info(
            "listening grpc=%s:%d http=%s:%d (supervising %d workers)",
            s.host, self.grpc_port, s.host, self.http_port, len(self.workers),
        )  # fmt: skip
        try:
            for worker in self.workers:
                self._spawn(self._keep_running(worker))
            await self._stopping.wait()
            log.info("stopping workers")
            await self._stop_all()
        finally:
            for task in self._tasks:
                task.cancel()
            await http.stop()
            reserved.close()
        log.info("stopped")

    def _spawn(self, coro) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _keep_running(self, worker: _Worker) -> None:
        """Run `worker`; whenever it exits while serving, start it again after a pause."""
        backoff = RESTART_BACKOFF_S[0]
        while not self._stopping.is_set():
            started = time.monotonic()
            code = await self._run_once(worker)
            if self._stopping.is_set():
                return
            if time.monotonic() - started > 60:
                backoff = RESTART_BACKOFF_S[0]  # it had been healthy: a fresh start
            worker.restarts += 1
            log.warning(
                "worker %d exited with %s; restarting in %.1f s", worker.index, code, backoff
            )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), backoff)
            backoff = min(backoff * 2, RESTART_BACKOFF_S[1])

    async def _run_once(self, worker: _Worker) -> int:
        s = self.settings
        env = {
            **os.environ,
            **settings_env(s),
            WORKER_ENV: str(worker.index),
            "SALVO_GRPC_PORT": str(self.grpc_port),
            "SALVO_HTTP_PORT": "0",
            "SALVO_HTTP_PRIVATE": "true",
            "SALVO_REUSE_PORT": "true",
            "SALVO_WORKERS": "1",
            "SALVO_TORCH_THREADS": str(s.torch_threads or threads_per_worker(len(self.workers))),
            "OTEL_RESOURCE_ATTRIBUTES": _with_instance(
                os.environ.get("OTEL_RESOURCE_ATTRIBUTES", ""), worker.index
            ),
        }
        worker.http_port = 0
        worker.process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "salvo", "serve",
            env=env, stdout=asyncio.subprocess.PIPE, stderr=None, limit=LOG_LINE_LIMIT,
            # Its own process group (setsid): a terminal's Ctrl-C reaches the supervisor
            # only, which then drains each worker once; and the worker dies with a
            # supervisor that is killed.
            start_new_session=True, preexec_fn=_die_with_parent,
        )  # fmt: skip
        pid = worker.process.pid
        log.info("worker %d started (pid %d)", worker.index, pid)
        assert worker.process.stdout is not None
        serving = False
        async for line in worker.process.stdout:
            if not worker.http_port:
                worker.http_port = _http_port(line)
            sys.stdout.buffer.write(line)
            sys.stdout.flush()
            if not serving and b'"msg": "ready: ' in line:
                serving = True
                log.info("worker %d ready (pid %d)", worker.index, pid)
        return await worker.process.wait()

    async def _stop_all(self) -> None:
        """SIGTERM every worker and wait for their drains; SIGKILL what outlives the bound."""
        s = self.settings
        bound = s.shutdown_grace_s + s.drain_timeout_s + 5
        running = [w.process for w in self.workers if w.process and w.process.returncode is None]
        for process in running:
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(asyncio.gather(*(p.wait() for p in running)), bound)
        except TimeoutError:
            for process in running:
                if process.returncode is None:
                    log.error("worker pid %d outlived %.0f s; killing it", process.pid, bound)
                    with contextlib.suppress(ProcessLookupError):
                        process.kill()
            await asyncio.gather(*(p.wait() for p in running))

    # -- the HTTP port -------------------------------------------------------------------

    async def scrape(self, path: str) -> list[tuple[_Worker, int, bytes]]:
        """GET `path` from every running worker: (worker, status, body); status 0 if unreachable."""

        def get(worker: _Worker) -> tuple[_Worker, int, bytes]:
            url = f"http://127.0.0.1:{worker.http_port}{path}"  # private: loopback, plaintext
            try:
                with urllib.request.urlopen(url, timeout=5) as reply:
                    return worker, reply.status, reply.read()
            except urllib.error.HTTPError as exc:
                return worker, exc.code, b""
            except OSError:
                return worker, 0, b""

        ready = [w for w in self.workers if w.http_port]
        return list(await asyncio.gather(*(asyncio.to_thread(get, w) for w in ready)))


def supervisor_app(supervisor: Supervisor) -> FastAPI:
    """The HTTP port of `salvo serve --workers N`: the workers' metrics and readiness,
    merged. (Each worker serves the REST API on its own loopback port only.)"""
    app = FastAPI(openapi_url=None, docs_url=None, redoc_url=None)

    @app.get("/metrics")
    async def metrics() -> Response:
        answers = await supervisor.scrape("/metrics")
        texts = {w.index: body.decode() for w, status, body in answers if status == 200}
        return Response(merge_metrics(texts), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v2/health/live")
    async def live() -> Response:
        return Response(b"live\n", media_type="text/plain")

    @app.get("/v2/health/ready")
    async def ready() -> Response:
        answers = await supervisor.scrape("/v2/health/ready")
        if len(answers) == len(supervisor.workers) and all(s == 200 for _, s, _ in answers):
            return Response(b"ready\n", media_type="text/plain")
        return Response(b"not ready\n", 503, media_type="text/plain")

    return app


def merge_metrics(texts: dict[int, str]) -> bytes:
    """Prometheus text from several workers as one exposition, each sample labelled `worker`."""
    families: dict[str, Metric] = {}
    for index, text in sorted(texts.items()):
        for family in text_string_to_metric_families(text):
            merged = families.get(family.name)
            if merged is None:
                merged = families[family.name] = Metric(
                    family.name, family.documentation, family.type, family.unit
                )
            merged.samples += [
                Sample(s.name, {**s.labels, "worker": str(index)}, s.value, s.timestamp)
                for s in family.samples
            ]
    registry = CollectorRegistry()
    registry.register(_Fixed(families.values()))
    return generate_latest(registry)


class _Fixed:
    """A collector that yields the families it was given."""

    def __init__(self, families: Iterable[Metric]) -> None:
        self.families = list(families)

    def collect(self) -> Iterable[Metric]:
        return self.families


def settings_env(settings: Settings) -> dict[str, str]:
    """`settings` as SALVO_* variables, so a worker sees what flags gave the supervisor."""
    env = {}
    for name, value in settings.model_dump(mode="json").items():
        if value is None:
            continue
        text = value if isinstance(value, str) else json.dumps(value)
        env[f"SALVO_{name.upper()}"] = text
    return env


def _http_port(line: bytes) -> int:
    """The HTTP port from a worker's "listening" log line, else 0."""
    try:
        message = json.loads(line).get("msg", "")
    except ValueError:
        return 0
    if not message.startswith("listening "):
        return 0
    for field in message.split():
        if field.startswith("http="):
            return int(field.rpartition(":")[2])
    return 0


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM it when the supervisor dies (Linux prctl)."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def _with_instance(attributes: str, index: int) -> str:
    """OTEL_RESOURCE_ATTRIBUTES with this worker's `service.instance.id` (unless set)."""
    if "service.instance.id=" in attributes:
        return attributes
    instance = f"service.instance.id={socket.gethostname()}-{os.getpid()}-{index}"
    return f"{attributes},{instance}" if attributes else instance
