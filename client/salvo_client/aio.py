"""The asyncio client (grpc.aio), with a pipelined mode for high-throughput callers.

    async with AsyncInferenceClient("127.0.0.1:8001") as client:
        outputs = await client.infer("mlp", {"input": x})
        pipeline = client.pipelined()          # one ModelStreamInfer stream for all
        many = await asyncio.gather(*(pipeline.infer("mlp", {"input": x}) for x in xs))

`pipelined()` (a `salvo_client.pipeline.Pipeline`) multiplexes concurrent `infer` calls
over one bidirectional stream: each request carries an id made by the client, and answers
are matched back by it, so a thousand callers cost one HTTP/2 stream rather than a thousand.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping, Sequence
from types import TracebackType
from typing import Any

import grpc
import grpc.aio
import numpy as np

from salvo_client.channel import ClientConfig
from salvo_client.errors import SalvoClientError, Unavailable, error_for, from_rpc_error
from salvo_client.messages import (
    Param,
    RequestIds,
    StreamResult,
    build_request,
    result_of,
    version_str,
)
from salvo_client.pipeline import Pipeline
from salvo_client.proto import grpc_service_pb2 as pb
from salvo_client.proto import grpc_service_pb2_grpc as pb_grpc
from salvo_client.proto import model_config_pb2 as mc
from salvo_client.tensors import decode_outputs

__all__ = ["AsyncInferStream", "AsyncInferenceClient", "Pipeline"]


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
