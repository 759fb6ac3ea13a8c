"""Request messages that do not parse get INVALID_ARGUMENT, not grpc.aio's UNKNOWN.

grpc.aio runs a method's request deserializer before any servicer context exists and
turns whatever it raises into UNKNOWN ("Unexpected DecodeError"), logging a traceback
per request: a stranger sending garbage would flood the log and see a status that blames
the server. So the deserializer never raises: a message that fails to parse becomes an
`Undecodable`, and the method's behaviour, wrapped here, aborts with INVALID_ARGUMENT
before the servicer sees it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
from google.protobuf.message import DecodeError


class Undecodable:
    """Stands in for a request message whose bytes did not parse; `reason` says why."""

    __slots__ = ("reason",)

    def __init__(self, reason: str) -> None:
        self.reason = reason


def _tolerant(parse: Callable[[bytes], Any]) -> Callable[[bytes], Any]:
    def deserialize(data: bytes) -> Any:
        try:
            return parse(data)
        except DecodeError as exc:
            return Undecodable(f"malformed request message: {exc}")

    return deserialize


def refuse_undecodable(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    """`handler` with a deserializer that never raises and a behaviour that refuses
    undecodable messages (unary-unary and stream-stream, the kinds the v2 service has)."""
    if handler.request_deserializer is None:
        return handler
    deserializer = _tolerant(handler.request_deserializer)
    if handler.unary_unary is not None:
        unary = handler.unary_unary

        async def unary_unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
            if isinstance(request, Undecodable):
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.reason)
            return await unary(request, context)

        return handler._replace(request_deserializer=deserializer, unary_unary=unary_unary)
    if handler.stream_stream is not None:
        stream = handler.stream_stream

        # An async generator function, so that grpc.aio streams what it yields. The stream
        # ends at the first undecodable message: what came before is answered, then the
        # status goes out from this task, never from the servicer's reader task while a
        # response is being written.
        async def stream_stream(
            requests: AsyncIterator[Any], context: grpc.aio.ServicerContext
        ) -> AsyncIterator[Any]:
            refused: list[Undecodable] = []

            async def until_undecodable() -> AsyncIterator[Any]:
                async for request in requests:
                    if isinstance(request, Undecodable):
                        refused.append(request)
                        return
                    yield request

            async for response in stream(until_undecodable(), context):
                yield response
            if refused:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, refused[0].reason)

        return handler._replace(request_deserializer=deserializer, stream_stream=stream_stream)
    return handler
