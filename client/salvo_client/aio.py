"""The asyncio client (grpc.aio), with a pipelined mode for high-throughput callers.

    async with AsyncInferenceClient("127.0.0.1:8001") as client:
        outputs = await client.infer("mlp", {"input": x})
        pipeline = client.pipelined()          # one ModelStreamInfer stream for all
        many = await asyncio.gather(*(pipeline.infer("mlp", {"input": x}) for x in xs))

`pipelined()` multiplexes concurrent `infer` calls over one bidirectional stream: each
request carries an id made by the client, and answers are matched back by it, so a
thousand callers cost one HTTP/2 stream rather than a thousand.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Mapping, Sequence
from types import TracebackType
from typing import Any

import grpc
import grpc.aio
import numpy as np

from salvo_client._common import (
    ClientConfig,
    Param,
    RequestIds,
    StreamResult,
    build_request,
    decode_outputs,
    result_of,
    version_str,
)
from salvo_client.errors import (
    DeadlineExceeded,
    SalvoClientError,
    Unavailable,
    error_for,
    from_rpc_error,
)
from salvo_client.proto import grpc_service_pb2 as pb
from salvo_client.proto import grpc_service_pb2_grpc as pb_grpc
from salvo_client.proto import model_config_pb2 as mc

__all__ = ["AsyncInferStream", "AsyncInferenceClient", "Pipeline"]

log = logging.getLogger(__name__)

# Stream failures that say something the caller must act on are passed through as they
# are; every other way a stream can end fails its pending requests as UNAVAILABLE.
_PASS_THROUGH = frozenset({grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED})


class AsyncInferenceClient(ClientConfig):
    """An asyncio client for a Salvo (or any v2) server, for use on one event loop.

    The constructor's arguments are described on `ClientConfig`. Create it inside a
    running loop, and use it with `async with` or call `await close()`.
    """

    def _open_channel(self) -> None:
        setup = self._setup
        if setup.credentials is None:
            self._channel = grpc.aio.insecure_channel(setup.target, options=setup.options)
        else:
            self._channel = grpc.aio.secure_channel(
                setup.target, setup.credentials, options=setup.options
            )
        self._stub = pb_grpc.GRPCInferenceServiceStub(self._channel)
        self._pipeline: Pipeline | None = None

    async def close(self) -> None:
        """Close the pipelined stream (if open) and the channel."""
        if self._pipeline is not None:
            await self._pipeline.aclose()
        await self._channel.close()

    async def __aenter__(self) -> AsyncInferenceClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _call(self, method: Any, request: Any, timeout_s: float | None) -> Any:
        try:
            return await method(
                request,
                timeout=self._setup.timeout(timeout_s),
                metadata=self._setup.call_metadata(),
            )
        except grpc.aio.AioRpcError as exc:
            raise from_rpc_error(exc) from exc

    # ----------------------------------------------------------------- inference

    async def infer(
        self,
        model: str,
        inputs: Mapping[str, np.ndarray],
        outputs: Sequence[str] | None = None,
        version: str | int | None = None,
        timeout_s: float | None = None,
        priority: int | None = None,
        parameters: Mapping[str, Param] | None = None,
        request_id: str | None = None,
    ) -> dict[str, np.ndarray]:
        """Run `model` on `inputs` with one ModelInfer call; see `InferenceClient.infer`."""
        request = build_request(model, inputs, outputs, version, priority, parameters, request_id)
        response: pb.ModelInferResponse = await self._call(
            self._stub.ModelInfer, request, timeout_s
        )
        return decode_outputs(response)

    def pipelined(self) -> Pipeline:
        """The client's pipeline: `infer` calls multiplexed over one ModelStreamInfer stream.

        The same Pipeline every time, so callers anywhere in the program share one stream;
        the stream opens on first use and reopens after it breaks.
        """
        if self._pipeline is None:
            self._pipeline = Pipeline(self)
        return self._pipeline

    def stream(self, timeout_s: float | None = None) -> AsyncInferStream:
        """Open a ModelStreamInfer stream (an async context manager): `await send(...)`,
        then `async for result in stream`. No deadline unless `timeout_s` is given."""
        return AsyncInferStream(self, timeout_s)

    # ----------------------------------------------------------------- health, metadata

    async def server_live(self, timeout_s: float | None = None) -> bool:
        """Whether the server is up (it may still be loading models)."""
        response = await self._call(self._stub.ServerLive, pb.ServerLiveRequest(), timeout_s)
        return bool(response.live)

    async def server_ready(self, timeout_s: float | None = None) -> bool:
        """Whether the server is ready to serve every model it loads."""
        response = await self._call(self._stub.ServerReady, pb.ServerReadyRequest(), timeout_s)
        return bool(response.ready)

    async def model_ready(
        self, model: str, version: str | int | None = None, timeout_s: float | None = None
    ) -> bool:
        """Whether `model` (at `version`, or the server's choice) can serve now."""
        request = pb.ModelReadyRequest(name=model, version=version_str(version))
        response = await self._call(self._stub.ModelReady, request, timeout_s)
        return bool(response.ready)

    async def server_metadata(self, timeout_s: float | None = None) -> pb.ServerMetadataResponse:
        """The server's name, version and protocol extensions."""
        response: pb.ServerMetadataResponse = await self._call(
            self._stub.ServerMetadata, pb.ServerMetadataRequest(), timeout_s
        )
        return response

    async def model_metadata(
        self, model: str, version: str | int | None = None, timeout_s: float | None = None
    ) -> pb.ModelMetadataResponse:
        """`model`'s versions, platform, and inputs and outputs (name, datatype, shape)."""
        request = pb.ModelMetadataRequest(name=model, version=version_str(version))
        response: pb.ModelMetadataResponse = await self._call(
            self._stub.ModelMetadata, request, timeout_s
        )
        return response

    async def model_config(
        self, model: str, version: str | int | None = None, timeout_s: float | None = None
    ) -> mc.ModelConfig:
        """`model`'s configuration, as Triton's ModelConfig."""
        request = pb.ModelConfigRequest(name=model, version=version_str(version))
        response: pb.ModelConfigResponse = await self._call(
            self._stub.ModelConfig, request, timeout_s
        )
        return response.config

    async def statistics(
        self,
        model: str | None = None,
        version: str | int | None = None,
        timeout_s: float | None = None,
    ) -> list[pb.ModelStatistics]:
        """Cumulative statistics of `model` (at `version`), or of every model version."""
        request = pb.ModelStatisticsRequest(name=model or "", version=version_str(version))
        response: pb.ModelStatisticsResponse = await self._call(
            self._stub.ModelStatistics, request, timeout_s
        )
        return list(response.model_stats)

    # ----------------------------------------------------------------- repository

    async def repository_index(
        self, ready: bool = False, timeout_s: float | None = None
    ) -> list[pb.RepositoryIndexResponse.ModelIndex]:
        """Every model in the repository with its versions and state (only the ready ones
        with `ready=True`)."""
        response: pb.RepositoryIndexResponse = await self._call(
            self._stub.RepositoryIndex, pb.RepositoryIndexRequest(ready=ready), timeout_s
        )
        return list(response.models)

    async def load_model(self, name: str, timeout_s: float | None = None) -> None:
        """Load (or reload) `name` from the repository; returns once it is ready."""
        await self._call(
            self._stub.RepositoryModelLoad,
            pb.RepositoryModelLoadRequest(model_name=name),
            timeout_s,
        )

    async def unload_model(self, name: str, timeout_s: float | None = None) -> None:
        """Unload `name`; its requests in flight finish first."""
        await self._call(
            self._stub.RepositoryModelUnload,
            pb.RepositoryModelUnloadRequest(model_name=name),
            timeout_s,
        )


class AsyncInferStream:
    """One ModelStreamInfer stream: `await send(...)` requests, `async for` their results,
    in the order the server finishes them.

    A request's failure arrives in-band as a StreamResult with `error` set and the stream
    goes on; a failure of the stream itself is raised from iteration. Leaving the `async
    with` block cancels whatever was not read; call `close()` first to half-close and
    read the remaining answers.
    """

    def __init__(self, client: AsyncInferenceClient, timeout_s: float | None) -> None:
        self._ids: RequestIds = client._ids
        self._call = client._stub.ModelStreamInfer(
            timeout=timeout_s, metadata=client._setup.call_metadata()
        )
        # grpc.aio allows one write at a time.
        self._write_lock = asyncio.Lock()
        self._cancelled = False

    async def send(
        self,
        model: str,
        inputs: Mapping[str, np.ndarray],
        outputs: Sequence[str] | None = None,
        version: str | int | None = None,
        priority: int | None = None,
        parameters: Mapping[str, Param] | None = None,
        request_id: str | None = None,
    ) -> str:
        """Send one request; returns its id (generated when not given), which its
        StreamResult carries. Cancelling a `send` in progress cancels the whole stream
        (grpc.aio's rule); use the pipelined mode for cancellable requests."""
        request_id = request_id or self._ids.next()
        request = build_request(model, inputs, outputs, version, priority, parameters, request_id)
        async with self._write_lock:
            try:
                await self._call.write(request)
            except grpc.aio.AioRpcError as exc:
                raise from_rpc_error(exc) from exc
            except asyncio.InvalidStateError:
                raise await self._ended() from None
        return request_id

    async def _ended(self) -> SalvoClientError:
        """The error for a write to a stream that has already ended."""
        if self._call.done():
            code = await self._call.code()
            if code is not grpc.StatusCode.OK:
                return error_for(code, await self._call.details() or "")
        return Unavailable(grpc.StatusCode.UNAVAILABLE, "the stream is closed for sending")

    async def close(self) -> None:
        """Send no more: the server answers what it has and then ends the stream."""
        async with self._write_lock:
            if not self._call.done():
                await self._call.done_writing()

    def cancel(self) -> None:
        """End the stream now; answers not yet read are dropped."""
        self._cancelled = True
        self._call.cancel()

    async def __aiter__(self) -> AsyncIterator[StreamResult]:
        while True:
            try:
                response = await self._call.read()
            except grpc.aio.AioRpcError as exc:
                if self._cancelled and exc.code() is grpc.StatusCode.CANCELLED:
                    return
                raise from_rpc_error(exc) from exc
            except asyncio.CancelledError:
                if self._cancelled:
                    return
                raise
            if response is grpc.aio.EOF:
                return
            yield result_of(response)

    async def __aenter__(self) -> AsyncInferStream:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if not self._call.done():
            self.cancel()


def _set_result(future: asyncio.Future[StreamResult], result: StreamResult) -> None:
    if not future.done():
        future.set_result(result)


def _set_exception(future: asyncio.Future[StreamResult], exc: BaseException) -> None:
    if not future.done():
        future.set_exception(exc)


def _log_failure(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("pipelined stream task failed", exc_info=task.exception())


class _Stream:
    """One open ModelStreamInfer call of a Pipeline and the requests waiting on it.

    A writer task sends queued requests one at a time (a caller cancelled mid-write would
    otherwise cancel the whole call); a reader task resolves each caller's future by
    request id. Whatever ends the call fails every pending future, once.
    """

    def __init__(self, call: Any) -> None:
        self.call = call
        self.pending: dict[str, asyncio.Future[StreamResult]] = {}
        self.outbox: asyncio.Queue[
            tuple[pb.ModelInferRequest, asyncio.Future[StreamResult]] | None
        ] = asyncio.Queue()
        self.broken = False
        self.writer = asyncio.create_task(self._write_all(), name="salvo-pipeline-writer")
        self.reader = asyncio.create_task(self._read_all(), name="salvo-pipeline-reader")
        self.writer.add_done_callback(_log_failure)
        self.reader.add_done_callback(_log_failure)

    def submit(self, request: pb.ModelInferRequest) -> asyncio.Future[StreamResult]:
        """Queue `request`; its future resolves with its StreamResult."""
        future: asyncio.Future[StreamResult] = asyncio.get_running_loop().create_future()
        self.pending[request.id] = future
        self.outbox.put_nowait((request, future))
        return future

    def forget(self, request_id: str, future: asyncio.Future[StreamResult]) -> None:
        """Stop waiting for `request_id` (its caller left); a late answer is dropped."""
        if self.pending.get(request_id) is future:
            del self.pending[request_id]

    async def _write_all(self) -> None:
        try:
            while (item := await self.outbox.get()) is not None:
                request, future = item
                if future.done():  # its caller left before it was sent
                    continue
                await self.call.write(request)
            await self.call.done_writing()
        except grpc.aio.AioRpcError as exc:
            self.fail(exc.code(), exc.details() or "")
        except asyncio.InvalidStateError:
            # The call ended under us; the reader reports how.
            pass

    async def _read_all(self) -> None:
        try:
            while (response := await self.call.read()) is not grpc.aio.EOF:
                result = result_of(response)
                future = self.pending.pop(result.request_id, None)
                if future is not None:
                    _set_result(future, result)
            self.fail(grpc.StatusCode.UNAVAILABLE, "the server ended the stream")
        except grpc.aio.AioRpcError as exc:
            self.fail(exc.code(), exc.details() or "")

    def fail(self, code: grpc.StatusCode, details: str) -> None:
        """End this stream: every pending request fails, and the pipeline will reopen."""
        self.broken = True
        self.outbox.put_nowait(None)
        if code not in _PASS_THROUGH:
            details = f"pipelined stream ended ({code.name}: {details})"
            code = grpc.StatusCode.UNAVAILABLE
        pending, self.pending = self.pending, {}
        for request_id, future in pending.items():
            _set_exception(future, error_for(code, details, request_id=request_id))
        if not self.call.done():
            self.call.cancel()

    async def aclose(self) -> None:
        """Half-close: requests already queued are sent and answered, then the stream ends."""
        if not self.broken:
            self.outbox.put_nowait(None)
        await asyncio.gather(self.writer, self.reader, return_exceptions=True)


class Pipeline:
    """`infer` multiplexed over one ModelStreamInfer stream, for many concurrent callers.

    Each call gets a unique request id from the client and awaits its own future; the
    answer is matched back by id. An error for one request is raised to its caller alone,
    as the typed exception for its status. A caller that is cancelled, or whose `timeout_s`
    passes (DeadlineExceeded), leaves the stream intact; its late answer is dropped. When
    the stream breaks, every pending call fails with Unavailable and the next call opens
    a new stream.
    """

    def __init__(self, client: AsyncInferenceClient) -> None:
        self._client = client
        self._stream: _Stream | None = None
        self.streams_opened = 0
        """How many streams this pipeline has opened (1 while none broke)."""

    @property
    def in_flight(self) -> int:
        """Requests sent or queued whose answer has not arrived."""
        return 0 if self._stream is None else len(self._stream.pending)

    def _open(self) -> _Stream:
        stream = self._stream
        if stream is None or stream.broken:
            # No trace context on the stream: it would attribute every request to
            # whichever caller happened to open it.
            call = self._client._stub.ModelStreamInfer(
                timeout=None, metadata=self._client._setup.metadata
            )
            stream = self._stream = _Stream(call)
            self.streams_opened += 1
        return stream

    async def infer(
        self,
        model: str,
        inputs: Mapping[str, np.ndarray],
        outputs: Sequence[str] | None = None,
        version: str | int | None = None,
        timeout_s: float | None = None,
        priority: int | None = None,
        parameters: Mapping[str, Param] | None = None,
        request_id: str | None = None,
    ) -> dict[str, np.ndarray]:
        """`AsyncInferenceClient.infer`, over the shared stream.

        `timeout_s` (default: the client's) bounds the wait here and is also sent as the
        request's `timeout` parameter (µs) so the server drops it unrun once it has passed.
        A `request_id` of your own must be unique among the requests in flight.
        """
        timeout = self._client._setup.timeout(timeout_s)
        params: dict[str, Param] = dict(parameters or {})
        if timeout is not None:
            params.setdefault("timeout", max(int(timeout * 1_000_000), 1))
        stream = self._open()
        if request_id is None:
            request_id = self._client._ids.next()
        elif request_id in stream.pending:
            raise ValueError(f"request id {request_id!r} is already in flight")
        request = build_request(model, inputs, outputs, version, priority, params, request_id)
        future = stream.submit(request)
        try:
            result = await asyncio.wait_for(future, timeout)
        except asyncio.TimeoutError:
            raise DeadlineExceeded(
                grpc.StatusCode.DEADLINE_EXCEEDED,
                f"no answer within {timeout} s on the pipelined stream",
                request_id=request_id,
            ) from None
        finally:
            stream.forget(request_id, future)
        return result.unwrap()

    async def aclose(self) -> None:
        """Let requests in flight finish, then close the stream. A later `infer` opens a
        new one."""
        stream, self._stream = self._stream, None
        if stream is not None:
            await stream.aclose()

    async def __aenter__(self) -> Pipeline:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
