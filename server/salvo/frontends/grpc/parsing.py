"""Request messages that do not parse get INVALID_ARGUMENT, not grpc.aio's UNKNOWN.

grpc.aio runs a method's request deserializer before any servicer context exists and
turns whatever it raises into UNKNOWN ("Unexpected DecodeError"), logging a traceback
per request: a stranger sending garbage would flood the log and see a status that blames
the server. So the deserializer never raises: a message that fails to parse becomes an
`Undecodable`, and a unary method's behaviour, wrapped here, aborts with INVALID_ARGUMENT
before the servicer sees it. ModelInfer and ModelStreamInfer take their messages' bytes
instead (`wire.templates`) and refuse an `Undecodable` themselves: a unary call at once, a
stream once its requests before it are answered.
"""

from __future__ import annotations

from collections.abc import Callable
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
    """A unary `handler` with a deserializer that never raises and a behaviour that refuses
    an undecodable message; any other handler as it is (the inference methods read their
    own bytes)."""
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
    return handler
