"""Salvo's one status vocabulary: what can go wrong with a request, whatever its transport.

Every failure a caller can see is one of these exceptions. The core and the engine raise
them and know nothing of gRPC or HTTP; each front end maps `Status` to its own codes in
exactly one place (`salvo.frontends.grpc.status`, `salvo.frontends.http.status`).
Messages are for the caller: they name the offending field and never carry a traceback.
"""

from __future__ import annotations

import enum


class Status(enum.Enum):
    """Why a request was not answered; named as gRPC names its codes."""

    INVALID_ARGUMENT = "invalid argument"
    """Malformed request: names, datatype, shape, byte size, encodings, batch size."""
    NOT_FOUND = "not found"
    """Unknown model or version."""
    UNAVAILABLE = "unavailable"
    """The model is loading, unloaded or failed to load, or the server is draining."""
    RESOURCE_EXHAUSTED = "resource exhausted"
    """Queue full, rate limited, out of device memory: retry after the push-back."""
    DEADLINE_EXCEEDED = "deadline exceeded"
    """The request's timeout or deadline passed before it could run."""
    CANCELLED = "cancelled"
    """The caller went away."""
    UNAUTHENTICATED = "unauthenticated"
    """No credentials, or unknown ones."""
    PERMISSION_DENIED = "permission denied"
    """Credentials without the right to this model or call."""
    INTERNAL = "internal"
    """The model raised, or Salvo has a bug: a clear message, never a traceback."""


class SalvoError(Exception):
    """Base of every error that reaches a caller; `status` says which kind."""

    status: Status = Status.INTERNAL

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class ModelNotFound(SalvoError):
    status = Status.NOT_FOUND


class ModelUnavailable(SalvoError):
    status = Status.UNAVAILABLE


class InvalidRequest(SalvoError):
    status = Status.INVALID_ARGUMENT


class Overloaded(SalvoError):
    """Queue full, rate limited or out of device memory; `retry_after_ms` is the push-back
    the caller is told to wait before it tries again."""

    status = Status.RESOURCE_EXHAUSTED

    def __init__(self, message: str, retry_after_ms: int = 100) -> None:
        super().__init__(message)
        self.retry_after_ms = retry_after_ms


class DeadlineExceeded(SalvoError):
    status = Status.DEADLINE_EXCEEDED


class Cancelled(SalvoError):
    status = Status.CANCELLED


class Unauthenticated(SalvoError):
    status = Status.UNAUTHENTICATED


class PermissionDenied(SalvoError):
    status = Status.PERMISSION_DENIED


class ModelFailed(SalvoError):
    """The model raised or returned something unusable while running a batch."""

    status = Status.INTERNAL


class ConfigError(Exception):
    """A model configuration, model file or setting that cannot be used; names the file and
    field. Never sent to a caller as such: a failed load reaches one as ModelUnavailable."""


def describe(exc: BaseException) -> tuple[Status, str]:
    """The status and message a caller gets for `exc`."""
    if isinstance(exc, SalvoError):
        return exc.status, exc.message
    # Anything unexpected is Salvo's bug: say so plainly, keep internals out of the message.
    return Status.INTERNAL, f"internal error: {type(exc).__name__}"
