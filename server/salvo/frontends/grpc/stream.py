"""ModelStreamInfer: each request of a stream served through the data plane, side by side,
each answered as soon as it is ready.

An error is answered in-band (error_message, with the request's id and its status as a
parameter) and the stream stays open; a message that does not parse ends it,
INVALID_ARGUMENT, once the requests before it are answered. Each message comes as bytes
and is read through the stream's own request templates (`wire.templates`). At most
`stream_max_in_flight` requests of one stream are served at once (backpressure: the
stream is not read further meanwhile). Responses leave as serialized
ModelStreamInferResponse bytes. When the stream goes away, what it still had queued is
withdrawn and never runs.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any

import grpc

from salvo.domain.status import Cancelled
from salvo.domain.types import InferResponse
from salvo.frontends.grpc.messages import MessageRequest, encode_response
from salvo.frontends.grpc.parsing import Undecodable
from salvo.frontends.grpc.status import grpc_status
from salvo.frontends.grpc.wire import stream_error, stream_response
from salvo.frontends.grpc.wire.templates import Matched, RequestTemplates
from salvo.observability.telemetry import Probe
from salvo_client.proto import grpc_service_pb2 as pb

if TYPE_CHECKING:
    from salvo.frontends.grpc.service import InferenceServicer

STREAM = f"{pb.DESCRIPTOR.services_by_name['GRPCInferenceService'].full_name}/ModelStreamInfer"


async def serve_stream(
    servicer: InferenceServicer,
    request_iterator: AsyncIterator[bytes],
    context: grpc.aio.ServicerContext,
) -> AsyncIterator[bytes]:
    """Serve one stream (see the module's docstring)."""
    dataplane, plans, telemetry = servicer.dataplane, servicer.plans, servicer.telemetry
    max_in_flight = servicer.stream_max_in_flight
    responses: asyncio.Queue[bytes | None] = asyncio.Queue()
    slots = asyncio.Semaphore(max_in_flight)
    pending: dict[MessageRequest, Callable[[], None]] = {}
    metadata = context.invocation_metadata()
    templates = RequestTemplates()  # this stream's own

    def stream_metadata() -> Any:
        return metadata

    def serve(message: pb.ModelInferRequest | Matched, data: bytes) -> None:
        begun = time.monotonic_ns()
        probe = Probe(telemetry.start_rpc(STREAM, stream_metadata)) if telemetry else None
        request = MessageRequest(message, plans, None, probe, templates, data)

        def done(response: InferResponse | None, error: BaseException | None) -> None:
            pending.pop(request, None)
            slots.release()
            code, text = "OK", ""
            if response is not None:
                try:
                    encoded = encode_response(response, plans, request.plan)
                    responses.put_nowait(stream_response(encoded))
                except Exception as exc:  # encoding failed: Salvo's bug, answered in-band
                    error = exc
            if error is not None:
                status, text = grpc_status(error)
                code = status.name
                if not isinstance(error, Cancelled):  # nobody is left to read that one
                    responses.put_nowait(stream_error(message, error))
            if probe is not None and telemetry is not None:
                duration_s = (time.monotonic_ns() - begun) / 1e9
                telemetry.end_rpc(STREAM, probe, code, text, duration_s)

        abandon = dataplane.start(request, done)
        if abandon is not None:  # None: answered already, at once
            pending[request] = abandon

    refused: list[Undecodable] = []

    async def read_all() -> None:
        try:
            async for data in request_iterator:
                message = templates.read(data)
                if isinstance(message, Undecodable):
                    refused.append(message)  # answered below, once the rest are
                    break
                await slots.acquire()
                serve(message, data)
            # Every request answered gives its slot back: all of them back, all answered.
            for _ in range(max_in_flight):
                await slots.acquire()
        finally:
            responses.put_nowait(None)

    reader = asyncio.create_task(read_all())
    try:
        while (response := await responses.get()) is not None:
            yield response
        await reader
        if refused:  # from this task, never from the reader's while a response is written
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, refused[0].reason)
    finally:
        reader.cancel()
        for abandon in list(pending.values()):
            abandon()
