"""How the generator's requests travel: unary ModelInfer (asyncio or blocking) or one
ModelStreamInfer stream. Each call answers None on success or the failure's status name;
failures are counted, never raised."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any, Protocol

import grpc
import grpc.aio

from salvo_client.proto import grpc_service_pb2 as pb

__all__ = [
    "STREAM_ERROR",
    "BlockingUnary",
    "Stream",
    "Transport",
    "Unary",
    "status_name",
]

SERVICE = "/inference.GRPCInferenceService/"
# The error name for a failure ModelStreamInfer reports in-band: it carries no status code.
STREAM_ERROR = "STREAM_ERROR"


class Transport(Protocol):
    """How a request travels: unary calls, or a stream with answers matched by id."""

    async def __call__(self, payload: bytes, request_id: str) -> str | None: ...

    async def close(self) -> None: ...


def status_name(exc: BaseException) -> str:
    """The name a failed call is counted under: its gRPC status, else the client's error."""
    if isinstance(exc, grpc.aio.AioRpcError):
        return exc.code().name
    if isinstance(exc, grpc.RpcError) and isinstance(exc, grpc.Call):
        return exc.code().name
    if isinstance(exc, asyncio.TimeoutError):
        return grpc.StatusCode.DEADLINE_EXCEEDED.name
    # A client-side failure, not a server status: name the exception so it is not hidden.
    return f"CLIENT_{type(exc).__name__}"


class Unary:
    """ModelInfer calls on a shared channel; requests go out as pre-serialized bytes and the
    responses are not parsed (the status says whether the call succeeded)."""

    def __init__(self, channel: grpc.aio.Channel, timeout_s: float) -> None:
        self._method = channel.unary_unary(SERVICE + "ModelInfer")
        self._timeout_s = timeout_s

    async def __call__(self, payload: bytes, request_id: str) -> str | None:
        try:
            await self._method(payload, timeout=self._timeout_s)
        except Exception as exc:  # counted, never fatal: the run must finish and report
            return status_name(exc)
        return None

    async def close(self) -> None:
        return None


class BlockingUnary:
    """ModelInfer calls that block a thread each, for the threaded closed loop."""

    def __init__(self, channel: grpc.Channel, timeout_s: float) -> None:
        self._method = channel.unary_unary(SERVICE + "ModelInfer")
        self._timeout_s = timeout_s

    def __call__(self, payload: bytes) -> str | None:
        try:
            self._method(payload, timeout=self._timeout_s)
        except Exception as exc:  # counted, never fatal: the run must finish and report
            return status_name(exc)
        return None


class Stream:
    """One ModelStreamInfer call; responses are matched to their requests by id.

    Opened on first use and reopened after a failure. A failure of the stream itself fails
    every request waiting on it with the stream's status; an error answered in-band
    (`error_message`) fails its own request only, as STREAM_ERROR.
    """

    def __init__(self, channel: grpc.aio.Channel, timeout_s: float) -> None:
        self._method = channel.stream_stream(
            SERVICE + "ModelStreamInfer",
            response_deserializer=pb.ModelStreamInferResponse.FromString,
        )
        self._timeout_s = timeout_s
        self._call: Any = None
        self._reader: asyncio.Task[None] | None = None
        self._pending: dict[str, asyncio.Future[str | None]] = {}
        self._write_lock = asyncio.Lock()

    async def __call__(self, payload: bytes, request_id: str) -> str | None:
        if self._call is None:
            self._call = self._method()
            self._reader = asyncio.create_task(self._read(self._call))
        future: asyncio.Future[str | None] = asyncio.get_running_loop().create_future()
        self._pending[request_id] = future
        try:
            async with self._write_lock:
                await self._call.write(payload)
            return await asyncio.wait_for(future, self._timeout_s)
        except Exception as exc:  # counted, never fatal: the run must finish and report
            if future.done() and not future.cancelled():
                return future.result()
            return status_name(exc)
        finally:
            # A guarded pop: a late answer for a request that gave up must find nothing.
            self._pending.pop(request_id, None)

    async def _read(self, call: Any) -> None:
        status = grpc.StatusCode.UNAVAILABLE.name  # the server ended the stream early
        try:
            while True:
                response = await call.read()
                if response is grpc.aio.EOF:
                    break
                future = self._pending.get(response.infer_response.id)
                if future is not None and not future.done():
                    future.set_result(STREAM_ERROR if response.error_message else None)
        except grpc.aio.AioRpcError as exc:
            status = exc.code().name
        finally:
            if self._call is call:
                self._call = None
            for future in list(self._pending.values()):
                if not future.done():
                    future.set_result(status)

    async def close(self) -> None:
        call, reader = self._call, self._reader
        if call is not None:
            with contextlib.suppress(grpc.aio.AioRpcError, asyncio.InvalidStateError):
                await call.done_writing()
        if reader is not None:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(reader, 5)
        if call is not None:
            call.cancel()
