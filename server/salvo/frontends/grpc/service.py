"""The v2 GRPCInferenceService: each RPC decodes its message, calls the data plane, and
encodes the answer. Errors become gRPC statuses in one place (`status.abort`); nothing
here knows about torch, batching or the cache.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Awaitable, Callable
from typing import Any

from salvo.core.dataplane import DataPlane
from salvo.domain.status import InvalidRequest, SalvoError
from salvo.frontends.grpc import codec
from salvo.frontends.grpc.messages import MessageRequest, WirePlans, encode_response
from salvo.frontends.grpc.parsing import Undecodable
from salvo.frontends.grpc.status import abort, grpc_status
from salvo.frontends.grpc.stream import serve_stream
from salvo.frontends.grpc.wire.templates import PeerTemplates, parse
from salvo.observability.telemetry import Probe, Telemetry
from salvo_client.proto import grpc_service_pb2 as pb
from salvo_client.proto import grpc_service_pb2_grpc as pb_grpc

SERVICE = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name
INFER = f"{SERVICE}/ModelInfer"
# The v2 health RPCs are measured but never traced: they would drown the traces.
UNTRACED = frozenset({"ServerLive", "ServerReady", "ModelReady"})


def observed(handler: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
    """Wrap a unary RPC: its duration metric, and its SERVER span unless it is a health RPC."""
    name = handler.__name__
    method = f"{SERVICE}/{name}"

    @functools.wraps(handler)
    async def wrapper(self: InferenceServicer, request: Any, context: Any) -> Any:
        telemetry = self.telemetry
        if telemetry is None:
            return await handler(self, request, context)
        start = time.perf_counter()
        probe = Probe(
            None if name in UNTRACED else telemetry.start_rpc(method, context.invocation_metadata)
        )
        code = "OK"
        try:
            return await handler(self, request, context)
        except asyncio.CancelledError:
            code = "CANCELLED"
            raise
        except Exception:
            code = context.code().name if context.code() is not None else "UNKNOWN"
            raise
        finally:
            telemetry.end_rpc(method, probe, code, "", time.perf_counter() - start)

    return wrapper


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    """Every v2 RPC, over the data plane."""

    def __init__(
        self,
        dataplane: DataPlane,
        stream_max_in_flight: int = 256,
        telemetry: Telemetry | None = None,
    ):
        self.dataplane = dataplane
        self.telemetry = telemetry
        self.stream_max_in_flight = stream_max_in_flight
        self.plans = WirePlans()
        self.templates = PeerTemplates()

    @observed
    async def ServerLive(self, request, context):
        return pb.ServerLiveResponse(live=True)

    @observed
    async def ServerReady(self, request, context):
        return pb.ServerReadyResponse(ready=self.dataplane.ready())

    @observed
    async def ServerMetadata(self, request, context):
        return codec.server_metadata()

    @observed
    async def ModelReady(self, request, context):
        try:
            ready = self.dataplane.model_ready(request.name, request.version)
        except InvalidRequest as exc:
            await abort(context, exc)
        return pb.ModelReadyResponse(ready=ready)

    @observed
    async def ModelMetadata(self, request, context):
        try:
            return codec.metadata(self.dataplane.model_info(request.name, request.version))
        except SalvoError as exc:
            await abort(context, exc)

    @observed
    async def ModelConfig(self, request, context):
        try:
            info = self.dataplane.model_info(request.name, request.version)
        except SalvoError as exc:
            await abort(context, exc)
        return pb.ModelConfigResponse(config=codec.config_to_proto(info.config, info.device_type))

    @observed
    async def ModelStatistics(self, request, context):
        try:
            stats = self.dataplane.statistics(request.name, request.version)
        except SalvoError as exc:
            await abort(context, exc)
        return pb.ModelStatisticsResponse(model_stats=[codec.statistics(s) for s in stats])

    @observed
    async def RepositoryIndex(self, request, context):
        return codec.index(self.dataplane.index(request.ready))

    @observed
    async def RepositoryModelLoad(self, request, context):
        try:
            await self.dataplane.load(request.model_name)
        except SalvoError as exc:
            await abort(context, exc)
        return pb.RepositoryModelLoadResponse()

    @observed
    async def RepositoryModelUnload(self, request, context):
        try:
            await self.dataplane.unload(request.model_name)
        except SalvoError as exc:
            await abort(context, exc)
        return pb.RepositoryModelUnloadResponse()

    async def ModelInfer(self, data: bytes, context):
        # The method's deserializer hands over the message's bytes: read through the
        # connection's templates (`wire.templates`), or parsed.
        templates = self.templates.of(context.peer())
        read = parse(data) if templates is None else templates.read(data)
        if isinstance(read, Undecodable):
            await abort(context, InvalidRequest(read.reason))
        remaining = context.time_remaining()
        deadline_ns = None if remaining is None else time.monotonic_ns() + int(remaining * 1e9)
        telemetry = self.telemetry
        if telemetry is None:
            try:
                message = MessageRequest(read, self.plans, deadline_ns, None, templates, data)
                response = await self.dataplane.infer(message)
                return encode_response(response, self.plans, message.plan)
            except Exception as exc:
                await abort(context, exc)
        start = time.perf_counter()
        probe = Probe(telemetry.start_rpc(INFER, context.invocation_metadata))
        code, text = "OK", ""
        try:
            message = MessageRequest(read, self.plans, deadline_ns, probe, templates, data)
            response = await self.dataplane.infer(message)
            return encode_response(response, self.plans, message.plan)
        except asyncio.CancelledError:
            code = "CANCELLED"
            raise
        except Exception as exc:
            status, text = grpc_status(exc)
            code = status.name
            await abort(context, exc)
        finally:
            telemetry.end_rpc(
                INFER, probe, code, text, time.perf_counter() - start, peer=context.peer
            )

    # An async generator function of its own (grpc.aio checks), not a wrapper around one:
    # a generator more per response would cost the stream's loop for nothing.
    ModelStreamInfer = serve_stream
