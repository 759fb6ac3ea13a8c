"""The synchronous client: every v2 RPC as a typed method, numpy in and out.

    with InferenceClient("127.0.0.1:8001") as client:
        outputs = client.infer("mlp", {"input": np.zeros((1, 64), np.float32)})
        outputs["output"]  # np.ndarray (1, 10)

Failed calls raise the `salvo_client.errors` exception for their status. Results are
numpy arrays for tensors, bools for the yes/no RPCs, and the protobuf messages for the rest
(unwrapped from responses that hold a single field).
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from types import TracebackType
from typing import Any, TypeVar

import grpc
import numpy as np

from salvo_client.channel import ClientConfig
from salvo_client.errors import from_rpc_error
from salvo_client.messages import (
    Param,
    RequestIds,
    StreamResult,
    build_request,
    result_of,
    version_str,
)
from salvo_client.proto import grpc_service_pb2 as pb
from salvo_client.proto import grpc_service_pb2_grpc as pb_grpc
from salvo_client.proto import model_config_pb2 as mc
from salvo_client.tensors import decode_outputs

__all__ = ["InferStream", "InferenceClient"]

log = logging.getLogger(__name__)
_Response = TypeVar("_Response")


class InferenceClient(ClientConfig):
    """A blocking client for a Salvo (or any v2) server; safe to share between threads.

    The constructor's arguments are described on `ClientConfig`. Use it as a context
    manager, or call `close()`, to release the channel.
    """

    def _open_channel(self) -> None:
        setup = self._setup
        if setup.credentials is None:
            self._channel = grpc.insecure_channel(setup.target, options=setup.options)
        else:
            self._channel = grpc.secure_channel(
                setup.target, setup.credentials, options=setup.options
            )
        self._stub = pb_grpc.GRPCInferenceServiceStub(self._channel)

    def close(self) -> None:
        """Close the channel; calls in flight are cancelled."""
        self._channel.close()

    def __enter__(self) -> InferenceClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(
        self, method: Callable[..., _Response], request: Any, timeout_s: float | None
    ) -> _Response:
        try:
            return method(
                request,
                timeout=self._setup.timeout(timeout_s),
                metadata=self._setup.call_metadata(),
            )
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from exc

    # ----------------------------------------------------------------- inference

    def infer(
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
        """Run `model` on `inputs` (name → array; the datatype follows the dtype) and return
        its outputs by name: all of them, or those named in `outputs`.

        Inputs travel raw. Fixed-width outputs are read-only views of the response (no
        copy); BYTES outputs are object arrays of bytes.
        """
        request = build_request(model, inputs, outputs, version, priority, parameters, request_id)
        response: pb.ModelInferResponse = self._call(self._stub.ModelInfer, request, timeout_s)
        return decode_outputs(response)

    def stream(
        self,
        callback: Callable[[StreamResult], None] | None = None,
        timeout_s: float | None = None,
    ) -> InferStream:
        """Open a ModelStreamInfer stream (a context manager): `send` requests, then iterate
        the stream for their results, or pass `callback` to have each result handed to it
        from a background thread.

        A stream has no deadline unless `timeout_s` bounds its whole life, since streams
        are long-lived; the client's default timeout does not apply.
        """
        return InferStream(self, callback, timeout_s)

    # ----------------------------------------------------------------- health, metadata

    def server_live(self, timeout_s: float | None = None) -> bool:
        """Whether the server is up (it may still be loading models)."""
        response = self._call(self._stub.ServerLive, pb.ServerLiveRequest(), timeout_s)
        return bool(response.live)

    def server_ready(self, timeout_s: float | None = None) -> bool:
        """Whether the server is ready to serve every model it loads."""
        response = self._call(self._stub.ServerReady, pb.ServerReadyRequest(), timeout_s)
        return bool(response.ready)

    def model_ready(
        self, model: str, version: str | int | None = None, timeout_s: float | None = None
    ) -> bool:
        """Whether `model` (at `version`, or the server's choice) can serve now."""
        request = pb.ModelReadyRequest(name=model, version=version_str(version))
        return bool(self._call(self._stub.ModelReady, request, timeout_s).ready)

    def server_metadata(self, timeout_s: float | None = None) -> pb.ServerMetadataResponse:
        """The server's name, version and protocol extensions."""
        return self._call(self._stub.ServerMetadata, pb.ServerMetadataRequest(), timeout_s)

    def model_metadata(
        self, model: str, version: str | int | None = None, timeout_s: float | None = None
    ) -> pb.ModelMetadataResponse:
        """`model`'s versions, platform, and inputs and outputs (name, datatype, shape)."""
        request = pb.ModelMetadataRequest(name=model, version=version_str(version))
        return self._call(self._stub.ModelMetadata, request, timeout_s)

    def model_config(
        self, model: str, version: str | int | None = None, timeout_s: float | None = None
    ) -> mc.ModelConfig:
        """`model`'s configuration, as Triton's ModelConfig."""
        request = pb.ModelConfigRequest(name=model, version=version_str(version))
        response: pb.ModelConfigResponse = self._call(self._stub.ModelConfig, request, timeout_s)
        return response.config

    def statistics(
        self,
        model: str | None = None,
        version: str | int | None = None,
        timeout_s: float | None = None,
    ) -> list[pb.ModelStatistics]:
        """Cumulative statistics of `model` (at `version`), or of every model version."""
        request = pb.ModelStatisticsRequest(name=model or "", version=version_str(version))
        response: pb.ModelStatisticsResponse = self._call(
            self._stub.ModelStatistics, request, timeout_s
        )
        return list(response.model_stats)

    # ----------------------------------------------------------------- repository

    def repository_index(
        self, ready: bool = False, timeout_s: float | None = None
    ) -> list[pb.RepositoryIndexResponse.ModelIndex]:
        """Every model in the repository with its versions and state (only the ready ones
        with `ready=True`)."""
        request = pb.RepositoryIndexRequest(ready=ready)
        response: pb.RepositoryIndexResponse = self._call(
            self._stub.RepositoryIndex, request, timeout_s
        )
        return list(response.models)

    def load_model(self, name: str, timeout_s: float | None = None) -> None:
        """Load (or reload) `name` from the repository; returns once it is ready."""
        self._call(
            self._stub.RepositoryModelLoad,
            pb.RepositoryModelLoadRequest(model_name=name),
            timeout_s,
        )

    def unload_model(self, name: str, timeout_s: float | None = None) -> None:
        """Unload `name`; its requests in flight finish first."""
        self._call(
            self._stub.RepositoryModelUnload,
            pb.RepositoryModelUnloadRequest(model_name=name),
            timeout_s,
        )


_CLOSE = None


class InferStream:
    """One ModelStreamInfer stream: requests go out with `send`; results come back in the
    order the server finishes them, each tagged with its request id.

    Iterate it (`for result in stream`) or give the client's `stream()` a callback. A
    request's failure arrives in-band as a StreamResult with `error` set and the stream
    goes on; a failure of the stream itself is raised (from iteration) or handed to the
    callback as a StreamResult with an empty request id. Leaving the `with` block
    half-closes the stream; without a callback it then cancels what was not read, with one
    it waits until every answer has been handed over.
    """

    def __init__(
        self,
        client: InferenceClient,
        callback: Callable[[StreamResult], None] | None,
        timeout_s: float | None,
    ) -> None:
        self._ids: RequestIds = client._ids
        self._requests: queue.SimpleQueue[pb.ModelInferRequest | None] = queue.SimpleQueue()
        self._closed = False
        self._cancelled = False
        self._lock = threading.Lock()
        self._call = client._stub.ModelStreamInfer(
            self._request_iterator(),
            timeout=timeout_s,
            metadata=client._setup.call_metadata(),
        )
        self._callback = callback
        self._reader: threading.Thread | None = None
        if callback is not None:
            self._reader = threading.Thread(
                target=self._deliver, args=(callback,), name="salvo-stream", daemon=True
            )
            self._reader.start()

    def _request_iterator(self) -> Iterator[pb.ModelInferRequest]:
        while (request := self._requests.get()) is not _CLOSE:
            yield request

    def send(
        self,
        model: str,
        inputs: Mapping[str, np.ndarray],
        outputs: Sequence[str] | None = None,
        version: str | int | None = None,
        priority: int | None = None,
        parameters: Mapping[str, Param] | None = None,
        request_id: str | None = None,
    ) -> str:
        """Queue one request on the stream; returns its id (generated when not given), which
        its StreamResult carries."""
        request_id = request_id or self._ids.next()
        request = build_request(model, inputs, outputs, version, priority, parameters, request_id)
        with self._lock:
            if self._closed:
                raise RuntimeError("the stream is closed for sending")
            self._requests.put(request)
        return request_id

    def close(self) -> None:
        """Send no more: the server answers what it has and then ends the stream."""
        with self._lock:
            if not self._closed:
                self._closed = True
                self._requests.put(_CLOSE)

    def cancel(self) -> None:
        """End the stream now; answers not yet received are dropped."""
        self._cancelled = True
        self.close()
        self._call.cancel()

    def __iter__(self) -> Iterator[StreamResult]:
        if self._callback is not None:
            raise RuntimeError("results go to the callback; this stream cannot be iterated")
        return self._results()

    def _results(self) -> Iterator[StreamResult]:
        try:
            for response in self._call:
                yield result_of(response)
        except grpc.RpcError as exc:
            if self._cancelled and exc.code() is grpc.StatusCode.CANCELLED:
                return
            raise from_rpc_error(exc) from exc

    def _deliver(self, callback: Callable[[StreamResult], None]) -> None:
        def hand_over(result: StreamResult) -> None:
            # A failing callback must not stop the answers that follow.
            try:
                callback(result)
            except Exception:
                log.exception("stream callback failed for request %r", result.request_id)

        try:
            for response in self._call:
                hand_over(result_of(response))
        except grpc.RpcError as exc:
            if not (self._cancelled and exc.code() is grpc.StatusCode.CANCELLED):
                hand_over(StreamResult("", "", "", {}, from_rpc_error(exc)))

    def wait(self, timeout_s: float | None = None) -> None:
        """With a callback: block until every answer has been handed over (after `close`)."""
        if self._reader is not None:
            self._reader.join(timeout_s)

    def __enter__(self) -> InferStream:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
        if self._reader is not None and exc_type is None:
            self.wait()
        else:
            self.cancel()
