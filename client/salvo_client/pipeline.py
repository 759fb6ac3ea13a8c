"""Pipeline: `infer` calls of many concurrent callers multiplexed over one ModelStreamInfer
stream of an AsyncInferenceClient (`client.pipelined()`).

Each request carries an id made by the client, and answers are matched back by it, so a
thousand callers cost one HTTP/2 stream rather than a thousand.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import grpc
import grpc.aio
import numpy as np

from salvo_client.errors import DeadlineExceeded, error_for
from salvo_client.messages import Param, StreamResult, build_request, result_of
from salvo_client.proto import grpc_service_pb2 as pb

if TYPE_CHECKING:
    from salvo_client.aio import AsyncInferenceClient

__all__ = ["Pipeline"]

log = logging.getLogger(__name__)

# Stream failures that say something the caller must act on are passed through as they
# are; every other way a stream can end fails its pending requests as UNAVAILABLE.
_PASS_THROUGH = frozenset({grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED})


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
