"""Salvo's error hierarchy and its one mapping to gRPC status codes.

Every failure a client can see is one of these exceptions; the servicer turns it into a
status with `status_for`. Messages are for the caller: they name the offending field and
never carry a traceback.
"""

from __future__ import annotations

import grpc


class SalvoError(Exception):
    """Base of every error that reaches a client; `code` is its gRPC status."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class ModelNotFound(SalvoError):
    """Unknown model or version."""

    code = grpc.StatusCode.NOT_FOUND


class ModelUnavailable(SalvoError):
    """The model is loading, unloaded or failed to load, or the server is draining."""

    code = grpc.StatusCode.UNAVAILABLE


class InvalidRequest(SalvoError):
    """A malformed request: names, datatype, shape, byte size, encodings, batch size."""

    code = grpc.StatusCode.INVALID_ARGUMENT


class Overloaded(SalvoError):
    """Queue full or rate limited; `retry_after_ms` is the push-back sent to the client."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED

    def __init__(self, message: str, retry_after_ms: int = 100) -> None:
        super().__init__(message)
        self.retry_after_ms = retry_after_ms


class DeadlineExceeded(SalvoError):
    """The request's timeout or gRPC deadline passed before it could run."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED


class Cancelled(SalvoError):
    """The caller cancelled."""

    code = grpc.StatusCode.CANCELLED


class ModelFailed(SalvoError):
    """The model raised or returned something unusable while running a batch."""

    code = grpc.StatusCode.INTERNAL


class ConfigError(Exception):
    """A model configuration or model file that cannot be used; names the file and field."""


def status_for(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The gRPC status and message a client gets for `exc`."""
    if isinstance(exc, SalvoError):
        return exc.code, exc.message
    # Anything unexpected is our bug: say so plainly, keep internals out of the message.
    return grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}"
