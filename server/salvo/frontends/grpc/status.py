"""The core's statuses as gRPC status codes: the one place they are mapped for gRPC."""

from __future__ import annotations

import logging
from typing import NoReturn

import grpc

from salvo.domain.status import Overloaded, SalvoError, Status, describe

log = logging.getLogger(__name__)

PUSHBACK_KEY = "grpc-retry-pushback-ms"
"""Trailing metadata (and, in a stream, an infer_response parameter) with the wait in ms,
which gRPC's retry policy honours."""

CODES: dict[Status, grpc.StatusCode] = {status: grpc.StatusCode[status.name] for status in Status}


def grpc_status(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The gRPC code and message a caller gets for `exc`."""
    status, message = describe(exc)
    return CODES[status], message


def trailing_metadata(exc: BaseException) -> tuple[tuple[str, str], ...]:
    """What travels beside the status: the push-back of an overload."""
    if isinstance(exc, Overloaded):
        return ((PUSHBACK_KEY, str(exc.retry_after_ms)),)
    return ()


async def abort(context: grpc.aio.ServicerContext, exc: BaseException) -> NoReturn:
    """End the call with `exc`'s status (an unexpected exception is logged: it is a bug)."""
    code, message = grpc_status(exc)
    if not isinstance(exc, SalvoError):
        log.error("unexpected error", exc_info=exc)
    await context.abort(code, message, trailing_metadata=trailing_metadata(exc))
    raise AssertionError("context.abort always raises")
