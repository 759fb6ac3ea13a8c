"""One Salvo process, assembled: the engine, the data plane over it, and the front ends.

Start-up: bind both ports and log them, then load every model; health turns SERVING once
all have loaded. Shutdown (SIGTERM or SIGINT) goes as `salvo.ops.lifecycle` describes:
health NOT_SERVING, a grace for load balancers, new calls refused, admitted ones finished.
This module (with `supervisor` and `cli`) is the only one that imports the front ends.
"""

from __future__ import annotations

import asyncio
import gc
import logging

from prometheus_client import CollectorRegistry

from salvo.core.cache import ResponseCache
from salvo.core.dataplane import DataPlane
from salvo.core.router import Router
from salvo.engine.repository import ModelLoader, ModelManager
from salvo.frontends.grpc.server import GrpcFrontEnd
from salvo.frontends.http.app import RestApi
from salvo.frontends.http.server import HttpFrontEnd
from salvo.observability.telemetry import Telemetry
from salvo.ops import lifecycle
from salvo.ops.access import admission_from, repository_changes_allowed
from salvo.ops.settings import Settings

log = logging.getLogger("salvo")


class SalvoServer:
    """One Salvo process: its ports, its models, its lifecycle."""

    def __init__(
        self,
        settings: Settings,
        loader: ModelLoader | None = None,
        telemetry: Telemetry | None = None,
    ) -> None:
        self.settings = settings
        self.cache = ResponseCache(settings.cache_max_bytes) if settings.cache_max_bytes else None
        self.registry = CollectorRegistry()
        if telemetry is None and settings.telemetry_enabled:
            telemetry = Telemetry(self.registry, access_logs_per_s=settings.access_logs_per_s)
        self.telemetry = telemetry
        on_swap = self._model_swapped
        self.models = (
            ModelManager(settings.model_repository, on_swap=on_swap, telemetry=telemetry)
            if loader is None
            else ModelManager(
                settings.model_repository, loader, on_swap=on_swap, telemetry=telemetry
            )
        )
        if telemetry is not None:
            telemetry.add_source(self.models.observe)
            if self.cache is not None:
                telemetry.add_source(self.cache.observe)
        self.router = Router(self.models)
        self.dataplane = DataPlane(self.models, self.router, self.cache, self.refresh_health)
        if telemetry is not None:
            telemetry.add_source(self.dataplane.shadows.observe)
        self.grpc_port = 0
        self.http_port = 0
        self._stopped = asyncio.Event()
        self._poller: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Bind, log the ports, load the models, turn health SERVING."""
        s = self.settings
        admission = admission_from(s)
        changes = repository_changes_allowed(s)
        self.grpc = GrpcFrontEnd(s, self.dataplane, admission, changes, self.telemetry)
        self.grpc_port = await self.grpc.start()
        api = RestApi(
            self.dataplane, self.registry, admission, changes, s.max_message_bytes,
            s.http_cors_origins, self.telemetry,
        )  # fmt: skip
        self.http = HttpFrontEnd(api.app, s)
        self.http_port = await self.http.start()
        log.info("listening grpc=%s:%d http=%s:%d", s.host, self.grpc_port, s.host, self.http_port)

        await self.models.load_all()
        # What start-up made (torch, the models, protobuf's pools: some 200k objects) lives
        # as long as the process: keep the collector's full passes off it, so that while
        # the cache grows a full pass takes tens of ms instead of 150. Unloading or
        # reloading a model thaws it (_model_swapped).
        gc.collect()
        gc.freeze()
        self.dataplane.accepting = True
        await self.refresh_health()
        if s.repository_poll_s > 0:
            self._poller = asyncio.create_task(self._poll_repository(s.repository_poll_s))
        log.info(
            "ready: %s",
            ", ".join(f"{n}={e.state.value}" for n, e in sorted(self.models.models.items())),
        )

    async def _poll_repository(self, every_s: float) -> None:
        """`--repository-poll-s`: keep the models in line with the repository's files."""
        while True:
            await asyncio.sleep(every_s)
            try:
                if await self.models.poll():
                    await self.refresh_health()
            except Exception:  # a poll must never end the polling
                log.exception("repository poll failed")

    @property
    def servicer(self):  # noqa: ANN201 (the gRPC servicer, for tests)
        return self.grpc.servicer

    def _model_swapped(self, name: str) -> None:
        """A model was reloaded or unloaded: drop its cached answers, and let the collector
        reach the old model again (frozen at start-up, its cycles would never be freed)."""
        if self.cache is not None:
            self.cache.drop_model(name)
        gc.unfreeze()

    def is_ready(self) -> bool:
        return self.dataplane.ready()

    async def refresh_health(self) -> None:
        """Re-derive health from the models (after start-up, a load or an unload)."""
        await self.grpc.set_serving(self.is_ready())

    async def drain(self, hurry: asyncio.Event | None = None) -> None:
        """Shut down as `lifecycle` describes, all but closing gRPC: health NOT_SERVING, the
        grace (cut short when `hurry` is set), new calls refused, admitted ones finished,
        telemetry flushed. Only the first call does anything."""
        if self._stopped.is_set():
            return
        self._stopped.set()
        s = self.settings
        await self.grpc.enter_graceful_shutdown()
        self.dataplane.accepting = False  # ServerReady and HTTP /v2/health/ready say so too
        if self._poller is not None:
            self._poller.cancel()
        log.info("draining: health NOT_SERVING; serving new calls %.1f s more", s.shutdown_grace_s)
        await lifecycle.grace(s.shutdown_grace_s, hurry)
        calls = self.grpc.close("the server is shutting down")
        log.info("refusing new calls; finishing admitted ones (up to %.1f s)", s.drain_timeout_s)
        schedulers = [
            mv.scheduler for entry in self.models.models.values() for mv in entry.versions.values()
        ]
        await lifecycle.finish_admitted(calls, schedulers, s.drain_timeout_s)
        await self.models.stop()
        await self.http.stop()
        if self.telemetry is not None:
            await asyncio.to_thread(self.telemetry.shutdown)
        log.info("stopped")

    async def stop(self) -> None:
        """Drain, then stop gRPC: how an in-process server (a test's) ends."""
        await self.drain()
        await self.grpc.stop(lifecycle.STREAM_LINGER_S)

    async def run_until_signalled(self) -> None:
        """Start, serve until SIGTERM or SIGINT, drain, and end the process (`lifecycle`).

        A signal during start-up (models still loading) ends the process at once: nothing
        was sent traffic yet, and a model load cannot be interrupted any other way.
        """
        signals = lifecycle.Signals()
        starting = asyncio.create_task(self.start())
        stop = asyncio.create_task(signals.stop.wait())
        await asyncio.wait((starting, stop), return_when=asyncio.FIRST_COMPLETED)
        if starting.done():
            starting.result()  # a start-up error (a port in use, a bad file) ends here
            await stop
            await self.drain(signals.hurry)
        else:
            starting.cancel()
            log.info("stopped during start-up")
            if self.telemetry is not None:
                await asyncio.to_thread(self.telemetry.shutdown)
        lifecycle.exit_process()
