"""The gRPC front end: the v2 service over the data plane, health and reflection, on one
grpc.aio server with the connection settings, TLS and access checks configured."""

from __future__ import annotations

import asyncio
import contextlib
import logging

import grpc
from google.protobuf import descriptor_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2

from salvo.core.admission import Admission
from salvo.core.dataplane import DataPlane
from salvo.frontends.grpc.access import build_interceptors, refuse_repository_changes
from salvo.frontends.grpc.gate import Gate
from salvo.frontends.grpc.health import HealthServicer
from salvo.frontends.grpc.parsing import refuse_undecodable
from salvo.frontends.grpc.service import SERVICE, InferenceServicer
from salvo.frontends.grpc.transport import bind, grpc_options
from salvo.observability.telemetry import Telemetry
from salvo.ops.settings import Settings
from salvo_client.proto import grpc_service_pb2 as pb
from salvo_client.proto import grpc_service_pb2_grpc as pb_grpc
from salvo_client.proto._pool import POOL

log = logging.getLogger(__name__)

LIVENESS = "liveness"
"""The health service name that reports SERVING while the process serves, whatever its
models do (for orchestrators' liveness probes)."""


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
    gate: Gate | None = None,
) -> None:
    """Register the v2 service; ModelInfer and ModelStreamInfer take and answer bytes.

    A request message that does not parse is answered INVALID_ARGUMENT (see `parsing`).
    Without `repository_changes`, load and unload answer PERMISSION_DENIED. A `gate` can
    refuse every method once the server drains.
    """
    capture = _Capture()
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, capture)
    raw = ("ModelInfer", "ModelStreamInfer")
    handlers = {
        name: refuse_undecodable(h) for name, h in capture.handlers.items() if name not in raw
    }
    for method in raw:
        # Bytes in: the servicer reads them through a connection's templates or parses
        # them, and refuses what does not parse itself. Bytes out.
        handlers[method] = capture.handlers[method]._replace(
            request_deserializer=None, response_serializer=_serialize_response
        )
    if not repository_changes:
        handlers = refuse_repository_changes(handlers)
    if gate is not None:
        handlers = gate.wrap(handlers)
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(capture.service, handlers),)
    )
    server.add_registered_method_handlers(capture.service, handlers)


class GrpcFrontEnd:
    """One grpc.aio server: the v2 service, health and reflection."""

    def __init__(
        self,
        settings: Settings,
        dataplane: DataPlane,
        admission: Admission | None,
        repository_changes: bool,
        telemetry: Telemetry | None = None,
    ) -> None:
        self.settings = settings
        self.server = grpc.aio.server(
            options=grpc_options(settings),
            interceptors=build_interceptors(admission),
            maximum_concurrent_rpcs=settings.max_concurrent_rpcs or None,
        )
        self.servicer = InferenceServicer(dataplane, settings.stream_max_in_flight, telemetry)
        self.gate = Gate(SERVICE)
        add_inference_service(self.servicer, self.server, repository_changes, self.gate)
        self.health = HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        for module in (health_pb2, reflection_pb2):
            _add_to_pool(module.DESCRIPTOR)
        health_name = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
        reflection.enable_server_reflection(
            (SERVICE, health_name, reflection.SERVICE_NAME), self.server, pool=POOL
        )
        self.port = 0

    async def start(self) -> int:
        """Health NOT_SERVING (models not loaded yet), liveness SERVING; bind and serve.
        Returns the bound port."""
        await self.set_serving(False)
        await self.health.set(LIVENESS, health_pb2.HealthCheckResponse.SERVING)
        self.port = bind(self.server, self.settings)
        await self.server.start()
        return self.port

    async def set_serving(self, serving: bool) -> None:
        """Health of the server and of the v2 service."""
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if serving
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for name in ("", SERVICE):
            await self.health.set(name, status)

    async def enter_graceful_shutdown(self) -> None:
        """Health NOT_SERVING for good (Watch streams are told)."""
        await self.health.enter_graceful_shutdown()

    def close(self, message: str) -> tuple[set[asyncio.Task], set[asyncio.Task]]:
        """Refuse new calls with UNAVAILABLE from now on; the calls still running (unary,
        streams)."""
        self.gate.close(message)
        return self.gate.calls()

    async def stop(self, grace_s: float) -> None:
        await self.server.stop(grace_s)
