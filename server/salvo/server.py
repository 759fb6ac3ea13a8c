"""Assembles and runs Salvo: gRPC (v2 service, health, reflection) and the HTTP port.

Start-up: bind both ports and log them, then load every model; health turns SERVING once
all have loaded. Shutdown (SIGTERM or SIGINT) goes as `lifecycle` describes: health
NOT_SERVING, a grace for load balancers, new calls refused, admitted ones finished.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging

import grpc
from google.protobuf import descriptor_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2
from prometheus_client import CollectorRegistry

from salvo_client.proto import grpc_service_pb2 as pb
from salvo_client.proto import grpc_service_pb2_grpc as pb_grpc
from salvo_client.proto._pool import POOL

from . import lifecycle
from .auth import build_interceptors, refuse_repository_changes, repository_changes_allowed
from .cache import ResponseCache
from .parsing import refuse_undecodable
from .repository import ModelLoader, ModelManager
from .servicer import InferenceServicer
from .settings import Settings
from .telemetry import Telemetry
from .transport import bind, grpc_options

log = logging.getLogger("salvo")

LIVENESS = "liveness"
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name


def _add_to_pool(file_descriptor) -> None:
    """Make a default-pool file (health, reflection) resolvable through Salvo's pool."""
    proto = descriptor_pb2.FileDescriptorProto()
    file_descriptor.CopyToProto(proto)
    with contextlib.suppress(TypeError, KeyError):
        POOL.FindFileByName(proto.name)
        return
    for dependency in file_descriptor.dependencies:
        _add_to_pool(dependency)
    POOL.Add(proto)


def _serialize_response(response: pb.ModelInferResponse | bytes) -> bytes:
    return response if isinstance(response, bytes) else response.SerializeToString()


class _Capture:
    """Stands in for a server to catch the generated code's method handlers."""

    def add_generic_rpc_handlers(self, handlers: object) -> None:
        pass

    def add_registered_method_handlers(self, service: str, handlers: dict) -> None:
        self.service, self.handlers = service, handlers


def add_inference_service(
    servicer: InferenceServicer,
    server: grpc.aio.Server,
    repository_changes: bool = True,
    gate: lifecycle.Gate | None = None,
) -> None:
    """Register the v2 service; ModelInfer and ModelStreamInfer may answer with ready bytes.

    A cached response is stored serialized, so the hot path of a cache hit appends the
    caller's id to those bytes instead of building and serializing a message. A request
    message that does not parse is answered INVALID_ARGUMENT (see `parsing`); the two infer
    methods' deserializer knows a repeated request by its bytes (`wire.RequestTemplates`,
    which never raises either). Without
    `repository_changes`, load and unload answer PERMISSION_DENIED. A `gate` can refuse
    every method once the server drains.
    """
    capture = _Capture()
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, capture)
    handlers = {name: refuse_undecodable(h) for name, h in capture.handlers.items()}
    for method in ("ModelInfer", "ModelStreamInfer"):
        handlers[method] = handlers[method]._replace(
            request_deserializer=servicer.templates, response_serializer=_serialize_response
        )
    if not repository_changes:
        handlers = refuse_repository_changes(handlers)
    if gate is not None:
        handlers = gate.wrap(handlers)
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(capture.service, handlers),)
    )
    server.add_registered_method_handlers(capture.service, handlers)


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
        on_swap = self._model_swapped
        self.registry = CollectorRegistry()
        if telemetry is None and settings.telemetry_enabled:
            telemetry = Telemetry(self.registry, access_logs_per_s=settings.access_logs_per_s)
        self.telemetry = telemetry
        self.models = (
            ModelManager(settings.model_repository, on_swap=on_swap, telemetry=self.telemetry)
            if loader is None
            else ModelManager(
                settings.model_repository, loader, on_swap=on_swap, telemetry=self.telemetry
            )
        )
        if self.telemetry is not None:
            self.telemetry.add_source(self.models.observe)
            if self.cache is not None:
                self.telemetry.add_source(self.cache.observe)
        self.ready = asyncio.Event()
        self.grpc_port = 0
        self.http_port = 0
        self._stopped = asyncio.Event()
        self.gate = lifecycle.Gate(SERVICE_NAME)

    async def start(self) -> None:
        """Bind, log the ports, load the models, turn health SERVING."""
        from .httpserver import HttpServer

        s = self.settings
        self.server = grpc.aio.server(
            options=grpc_options(s),
            interceptors=build_interceptors(s),
            maximum_concurrent_rpcs=s.max_concurrent_rpcs or None,
        )
        self.servicer = InferenceServicer(
            self.models,
            self.ready,
            s.stream_max_in_flight,
            on_change=self.refresh_health,
            cache=self.cache,
            telemetry=self.telemetry,
        )
        add_inference_service(self.servicer, self.server, repository_changes_allowed(s), self.gate)
        self.health = lifecycle.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        for module in (health_pb2, reflection_pb2):
            _add_to_pool(module.DESCRIPTOR)
        health_name = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
        reflection.enable_server_reflection(
            (SERVICE_NAME, health_name, reflection.SERVICE_NAME), self.server, pool=POOL
        )
        for name in ("", SERVICE_NAME):
            await self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        # Liveness for orchestrators: the process serves, whatever its models do.
        await self.health.set(LIVENESS, health_pb2.HealthCheckResponse.SERVING)
        self.grpc_port = bind(self.server, s)
        await self.server.start()

        self.http = HttpServer(self.registry, self.is_ready)
        self.http_port = await self.http.start(s.host, s.http_port)
        log.info("listening grpc=%s:%d http=%s:%d", s.host, self.grpc_port, s.host, self.http_port)

        await self.models.load_all()
        # What start-up made (torch, the models, protobuf's pools: some 200k objects) lives
        # as long as the process: keep the collector's full passes off it. While the cache
        # grows, a full pass then takes at most 40 ms instead of 150 (benchmarks/
        # inprocess.py). Unloading or reloading a model thaws it (_model_swapped).
        gc.collect()
        gc.freeze()
        self.ready.set()
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if self.models.all_ready()
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for name in ("", SERVICE_NAME):
            await self.health.set(name, status)
        log.info(
            "ready: %s",
            ", ".join(f"{n}={e.state.value}" for n, e in sorted(self.models.models.items())),
        )

    def _model_swapped(self, name: str) -> None:
        """A model was reloaded or unloaded: drop its cached answers, and let the collector
        reach the old model again (frozen at start-up, its cycles would never be freed)."""
        if self.cache is not None:
            self.cache.drop_model(name)
        gc.unfreeze()

    def is_ready(self) -> bool:
        return self.ready.is_set() and self.models.all_ready()

    async def refresh_health(self) -> None:
        """Re-derive health from the models (after a load or unload)."""
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if self.is_ready()
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for name in ("", SERVICE_NAME):
            await self.health.set(name, status)

    async def drain(self, hurry: asyncio.Event | None = None) -> None:
        """Shut down as `lifecycle` describes, all but closing gRPC: health NOT_SERVING, the
        grace (cut short when `hurry` is set), new calls refused, admitted ones finished,
        telemetry flushed. Only the first call does anything."""
        if self._stopped.is_set():
            return
        self._stopped.set()
        s = self.settings
        await self.health.enter_graceful_shutdown()
        self.ready.clear()  # ServerReady and HTTP /v2/health/ready say so too
        log.info("draining: health NOT_SERVING; serving new calls %.1f s more", s.shutdown_grace_s)
        await lifecycle.grace(s.shutdown_grace_s, hurry)
        self.gate.close("the server is shutting down")
        log.info("refusing new calls; finishing admitted ones (up to %.1f s)", s.drain_timeout_s)
        schedulers = [
            mv.scheduler for entry in self.models.models.values() for mv in entry.versions.values()
        ]
        await lifecycle.finish_admitted(self.gate, schedulers, s.drain_timeout_s)
        await self.models.stop()
        await self.http.stop()
        if self.telemetry is not None:
            await asyncio.to_thread(self.telemetry.shutdown)
        log.info("stopped")

    async def stop(self) -> None:
        """Drain, then stop gRPC: how an in-process server (a test's) ends."""
        await self.drain()
        await self.server.stop(lifecycle.STREAM_LINGER_S)

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
