"""The client's exceptions: one per gRPC status a Salvo server sends, all `SalvoClientError`.

Every failed RPC is raised as the subclass for its status, carrying the status and the
server's message, so callers branch on types (`except NotFound`) instead of comparing
status codes. Statuses without a subclass of their own raise `SalvoClientError` itself.
Errors in the client's own arguments (a dtype with no v2 datatype…) stay `TypeError` and
`ValueError`: they are the caller's bug, found before anything is sent.
"""

from __future__ import annotations

import re
from typing import ClassVar

import grpc

__all__ = [
    "Cancelled",
    "DeadlineExceeded",
    "InternalError",
    "InvalidArgument",
    "NotFound",
    "PermissionDenied",
    "ResourceExhausted",
    "SalvoClientError",
    "Unauthenticated",
    "Unavailable",
    "error_for",
    "from_rpc_error",
    "from_stream_error",
]


class SalvoClientError(Exception):
    """A failed call: the gRPC `status` and the server's `message`.

    `request_id` is set where the failure belongs to one request of a stream (the id the
    request was sent with); it is None for unary calls.
    """

    STATUS: ClassVar[grpc.StatusCode | None] = None
    """The status this class stands for; None for the base, which takes any."""

    def __init__(
        self, status: grpc.StatusCode, message: str, *, request_id: str | None = None
    ) -> None:
        super().__init__(status, message)
        self.status = status
        self.message = message
        self.request_id = request_id

    def __str__(self) -> str:
        return f"{self.status.name}: {self.message}"


class InvalidArgument(SalvoClientError):
    """The request is malformed: input names, datatype, shape, byte size, batch size…"""

    STATUS = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(SalvoClientError):
    """Unknown model or version."""

    STATUS = grpc.StatusCode.NOT_FOUND


class Unavailable(SalvoClientError):
    """No server could be reached, the model is loading or unloaded, the server is draining,
    or a pipelined stream broke. Retrying later may succeed."""

    STATUS = grpc.StatusCode.UNAVAILABLE


class ResourceExhausted(SalvoClientError):
    """The server is overloaded (queue full, rate limited) or a message is too large."""

    STATUS = grpc.StatusCode.RESOURCE_EXHAUSTED


class DeadlineExceeded(SalvoClientError):
    """The call's deadline, or the request's queue timeout, passed before an answer."""

    STATUS = grpc.StatusCode.DEADLINE_EXCEEDED


class Cancelled(SalvoClientError):
    """The call was cancelled."""

    STATUS = grpc.StatusCode.CANCELLED


class InternalError(SalvoClientError):
    """The model raised, or the server (or its answer) is broken."""

    STATUS = grpc.StatusCode.INTERNAL


class Unauthenticated(SalvoClientError):
    """Missing or invalid credentials."""

    STATUS = grpc.StatusCode.UNAUTHENTICATED


class PermissionDenied(SalvoClientError):
    """The credentials are valid but not allowed to do this."""

    STATUS = grpc.StatusCode.PERMISSION_DENIED


_BY_STATUS: dict[grpc.StatusCode, type[SalvoClientError]] = {
    cls.STATUS: cls
    for cls in (
        InvalidArgument,
        NotFound,
        Unavailable,
        ResourceExhausted,
        DeadlineExceeded,
        Cancelled,
        InternalError,
        Unauthenticated,
        PermissionDenied,
    )
    if cls.STATUS is not None
}
_BY_VALUE: dict[int, grpc.StatusCode] = {code.value[0]: code for code in grpc.StatusCode}
_BY_NAME: dict[str, grpc.StatusCode] = {code.name: code for code in grpc.StatusCode}


def error_for(
    status: grpc.StatusCode, message: str, *, request_id: str | None = None
) -> SalvoClientError:
    """The exception for `status`: its own subclass, or `SalvoClientError` for the rest."""
    cls = _BY_STATUS.get(status, SalvoClientError)
    return cls(status, message, request_id=request_id)


def from_rpc_error(error: grpc.RpcError) -> SalvoClientError:
    """The typed exception for a failed RPC (sync `grpc.RpcError` or `grpc.aio.AioRpcError`)."""
    code = getattr(error, "code", None)
    details = getattr(error, "details", None)
    status = code() if callable(code) else grpc.StatusCode.UNKNOWN
    message = details() if callable(details) else str(error)
    return error_for(status or grpc.StatusCode.UNKNOWN, message or "")


STREAM_STATUS_PARAMETER = "grpc_status"
"""The `infer_response.parameters` key through which a server may state the status of an
in-band stream error (an int64 gRPC code, or a string status name). ModelStreamInfer's
error carries only a message; without this parameter the status is inferred from it."""

# Salvo's messages, by status, for servers that do not send STREAM_STATUS_PARAMETER. Order
# matters: a model's own failures mention outputs and 'expected' too.
_MESSAGE_STATUS: tuple[tuple[re.Pattern[str], grpc.StatusCode], ...] = (
    (re.compile(r"^internal error\b|^model '[^']*' (raised|returned)\b|^model '[^']*' output '"),
     grpc.StatusCode.INTERNAL),
    (re.compile(r"^unknown model\b|is not in the repository$|^model '[^']*' has no version\b"),
     grpc.StatusCode.NOT_FOUND),
    (re.compile(r"^queue full\b|rate limit"), grpc.StatusCode.RESOURCE_EXHAUSTED),
    (re.compile(r"timed out|deadline"), grpc.StatusCode.DEADLINE_EXCEEDED),
    (re.compile(r"^model '[^']*' is (loading|unloading|unavailable)\b|^failed to load model\b"
                r"|draining|unavailable"), grpc.StatusCode.UNAVAILABLE),
    (re.compile(r"cancel"), grpc.StatusCode.CANCELLED),
    (re.compile(r"\b(input|output|parameter) '|raw_input_contents|\bexpected\b"),
     grpc.StatusCode.INVALID_ARGUMENT),
)  # fmt: skip


def stream_error_status(message: str, declared: object = None) -> grpc.StatusCode:
    """The status of an in-band stream error: `declared` (the STREAM_STATUS_PARAMETER value,
    a code number or name) when the server sent it, else inferred from the message, else
    UNKNOWN."""
    if isinstance(declared, int) and not isinstance(declared, bool) and declared in _BY_VALUE:
        return _BY_VALUE[declared]
    if isinstance(declared, str) and declared.upper() in _BY_NAME:
        return _BY_NAME[declared.upper()]
    for pattern, status in _MESSAGE_STATUS:
        if pattern.search(message):
            return status
    return grpc.StatusCode.UNKNOWN


def from_stream_error(
    message: str, request_id: str | None, declared: object = None
) -> SalvoClientError:
    """The typed exception for one request's in-band ModelStreamInfer error."""
    return error_for(stream_error_status(message, declared), message, request_id=request_id)
