"""The v2 GRPCInferenceService: thin glue from protobuf to the model manager and back.

Each RPC decodes, calls the domain, encodes. Errors become statuses in one place
(`errors.status_for`); nothing here knows about torch.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc

from salvo_client.proto import grpc_service_pb2 as pb
from salvo_client.proto import grpc_service_pb2_grpc as pb_grpc
from salvo_client.proto import model_config_pb2 as mc

from . import __version__
from .batch_queue import Entry
from .cache import ResponseCache
from .codec import Tensor, decode_inputs, decode_parameters, encode_outputs, varint
from .config import ModelConfig
from .datatypes import DATATYPES
from .errors import InvalidRequest, Overloaded, SalvoError, status_for
from .parsing import Undecodable
from .repository import ModelEntry, ModelManager, ModelVersion
from .scheduler import Scheduler
from .telemetry import Probe, Telemetry
from .validation import InferRequest, validate_request
from .wire import Matched, RequestTemplates

log = logging.getLogger(__name__)

SERVICE = "inference.GRPCInferenceService"
INFER = f"{SERVICE}/ModelInfer"
STREAM = f"{SERVICE}/ModelStreamInfer"
# The v2 health RPCs are measured but never traced: they would drown the traces.
UNTRACED = frozenset({"ServerLive", "ServerReady", "ModelReady"})


def observed(handler: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
    """Wrap a unary RPC: its duration metric, and its SERVER span unless it is a health RPC."""
    name = handler.__name__
    method = f"{SERVICE}/{name}"

    @functools.wraps(handler)
    async def wrapper(self: InferenceServicer, request: Any, context: Any) -> Any:
        telemetry = self.telemetry
        if telemetry is None:
            return await handler(self, request, context)
        start = time.perf_counter()
        probe = Probe(
            None if name in UNTRACED else telemetry.start_rpc(method, context.invocation_metadata)
        )
        code = "OK"
        try:
            return await handler(self, request, context)
        except asyncio.CancelledError:
            code = "CANCELLED"
            raise
        except Exception:
            code = context.code().name if context.code() is not None else "UNKNOWN"
            raise
        finally:
            telemetry.end_rpc(method, probe, code, "", time.perf_counter() - start)

    return wrapper


EXTENSIONS = ["model_repository", "model_configuration", "statistics", "binary_tensor_data"]


def _cacheable(parameters: dict[str, object]) -> bool:
    """False when the request asks to bypass the cache (`cache`: false or "bypass")."""
    value = parameters.get("cache", True)
    if isinstance(value, str):
        return value.lower() not in ("false", "bypass", "off", "0", "no")
    return bool(value)


def _id_field(request_id: str) -> bytes:
    """ModelInferResponse.id as wire bytes, to append to a cached serialized response."""
    return pb.ModelInferResponse(id=request_id).SerializeToString() if request_id else b""


def _message_bytes(request: pb.ModelInferRequest) -> bytes:
    """`request` serialized deterministically without its id (not part of what it asks)."""
    request_id = request.id
    if not request_id:
        return request.SerializeToString(deterministic=True)
    request.ClearField("id")
    try:
        return request.SerializeToString(deterministic=True)
    finally:
        request.id = request_id


def _count_cached(
    mv: ModelVersion, probe: Probe | None, outcome: str, rows: int, start_ns: int
) -> None:
    """Statistics for an answer the cache gave: a miss, or a hit (coalesced counts as one)."""
    elapsed = time.monotonic_ns() - start_ns
    if probe is not None:
        probe.cache = outcome
    if outcome == "miss":
        mv.stats.cache_miss.add(elapsed)
    else:
        mv.stats.cache_hit.add(elapsed)
        mv.stats.inference_count += rows


# ModelStreamInferResponse.infer_response is field 2, length-delimited: tag (2 << 3) | 2.
_INFER_RESPONSE_TAG = b"\x12"


def _stream_response(infer_response: bytes) -> bytes:
    """ModelStreamInferResponse(infer_response=...) as wire bytes, from the serialized
    response: its tensors are not copied into a new message and serialized again."""
    return _INFER_RESPONSE_TAG + varint(len(infer_response)) + infer_response


def _stream_error(request: pb.ModelInferRequest, status: grpc.StatusCode, message: str) -> bytes:
    """An in-band error for one request of a stream: the stream stays OK, so the status
    travels as a parameter (`grpc_status`) beside the message, with the request's id."""
    failed = pb.ModelInferResponse(
        model_name=request.model_name, model_version=request.model_version, id=request.id
    )
    failed.parameters["grpc_status"].int64_param = status.value[0]
    return pb.ModelStreamInferResponse(
        error_message=message, infer_response=failed
    ).SerializeToString()


def config_to_proto(config: ModelConfig, device_type: str = "cpu") -> mc.ModelConfig:
    """The config as Triton's ModelConfig message (what perf_analyzer reads).

    `device_type` is where the model was loaded ("cuda" or "cpu"), which `auto` leaves open.
    """
    out = mc.ModelConfig(
        name=config.name,
        platform="pytorch_libtorch",
        backend="pytorch",
        max_batch_size=config.max_batch_size,
    )
    for spec in config.inputs:
        out.input.add(
            name=spec.name, data_type=mc.DataType.Value(_enum(spec.datatype)), dims=spec.dims
        )
    for spec in config.outputs:
        out.output.add(
            name=spec.name, data_type=mc.DataType.Value(_enum(spec.datatype)), dims=spec.dims
        )
    kind = (
        mc.ModelInstanceGroup.KIND_GPU if device_type == "cuda" else mc.ModelInstanceGroup.KIND_CPU
    )
    out.instance_group.add(name=config.name, count=config.instance_count, kind=kind)
    policy = config.version_policy
    if policy.all:
        out.version_policy.all.SetInParent()
    elif policy.specific is not None:
        out.version_policy.specific.versions.extend(policy.specific)
    else:
        out.version_policy.latest.num_versions = policy.latest or 1
    batching = config.dynamic_batching
    if batching is not None and config.max_batch_size > 0:
        db = out.dynamic_batching
        db.preferred_batch_size.extend(batching.preferred_batch_sizes)
        db.max_queue_delay_microseconds = batching.max_queue_delay_us
        db.priority_levels = batching.priority_levels
        db.default_priority_level = batching.default_priority_level
        db.default_queue_policy.default_timeout_microseconds = batching.default_timeout_us
        db.default_queue_policy.allow_timeout_override = batching.allow_timeout_override
        db.default_queue_policy.max_queue_size = batching.max_queue_size
    for key, value in config.parameters.items():
        out.parameters[key].string_value = value
    return out


def _enum(datatype: str) -> str:
    return DATATYPES[datatype].config_enum


async def _abort(context: grpc.aio.ServicerContext, exc: BaseException) -> None:
    code, message = status_for(exc)
    if code is grpc.StatusCode.INTERNAL and not isinstance(exc, SalvoError):
        log.exception("unexpected error", exc_info=exc)
    trailing: tuple[tuple[str, str], ...] = ()
    if isinstance(exc, Overloaded):
        trailing = (("grpc-retry-pushback-ms", str(exc.retry_after_ms)),)
    await context.abort(code, message, trailing_metadata=trailing)


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    """Every v2 RPC, delegating to the ModelManager."""

    def __init__(
        self,
        models: ModelManager,
        ready: asyncio.Event,
        stream_max_in_flight: int = 256,
        on_change: Callable[[], Awaitable[None]] | None = None,
        cache: ResponseCache | None = None,
        telemetry: Telemetry | None = None,
    ):
        self.models = models
        self.cache = cache
        self.telemetry = telemetry
        self.on_change = on_change
        self.ready = ready
        self.stream_max_in_flight = stream_max_in_flight
        self.templates = RequestTemplates()
        """ModelInfer's and ModelStreamInfer's deserializer (see `salvo.wire`)."""

    @observed
    async def ServerLive(self, request, context):
        return pb.ServerLiveResponse(live=True)

    @observed
    async def ServerReady(self, request, context):
        return pb.ServerReadyResponse(ready=self.ready.is_set() and self.models.all_ready())

    @observed
    async def ServerMetadata(self, request, context):
        return pb.ServerMetadataResponse(name="salvo", version=__version__, extensions=EXTENSIONS)

    @observed
    async def ModelReady(self, request, context):
        try:
            self.models.get(request.name, request.version)
        except SalvoError as exc:
            if isinstance(exc, InvalidRequest):
                await _abort(context, exc)
            return pb.ModelReadyResponse(ready=False)
        return pb.ModelReadyResponse(ready=True)

    @observed
    async def ModelMetadata(self, request, context):
        try:
            mv = self.models.get(request.name, request.version)
        except SalvoError as exc:
            await _abort(context, exc)
        entry = self.models.models[mv.name]
        out = pb.ModelMetadataResponse(
            name=mv.name,
            versions=[str(v) for v in sorted(entry.versions)],
            platform="pytorch_libtorch",
        )
        batch = [-1] if mv.config.max_batch_size > 0 else []
        for spec in mv.config.inputs:
            out.inputs.add(name=spec.name, datatype=spec.datatype, shape=[*batch, *spec.dims])
        for spec in mv.config.outputs:
            out.outputs.add(name=spec.name, datatype=spec.datatype, shape=[*batch, *spec.dims])
        return out

    @observed
    async def ModelConfig(self, request, context):
        try:
            mv = self.models.get(request.name, request.version)
        except SalvoError as exc:
            await _abort(context, exc)
        return pb.ModelConfigResponse(config=config_to_proto(mv.config, mv.model.device.type))

    @observed
    async def ModelStatistics(self, request, context):
        out = pb.ModelStatisticsResponse()
        if request.name:
            try:
                mv = self.models.get(request.name, request.version)
            except SalvoError as exc:
                await _abort(context, exc)
            out.model_stats.append(mv.stats.to_proto())
            return out
        for entry in self.models.models.values():
            for version in sorted(entry.versions):
                out.model_stats.append(entry.versions[version].stats.to_proto())
        return out

    @observed
    async def RepositoryIndex(self, request, context):
        out = pb.RepositoryIndexResponse()
        with contextlib.suppress(Exception):
            for name in self.models.discover():
                self.models.models.setdefault(name, ModelEntry(name))
        for name in sorted(self.models.models):
            entry = self.models.models[name]
            if request.ready and entry.state.value != "READY":
                continue
            versions: list[int | None] = [*sorted(entry.versions)] or [None]
            for version in versions:
                out.models.add(
                    name=name,
                    version="" if version is None else str(version),
                    state=entry.state.value,
                    reason=entry.reason,
                )
        return out

    @observed
    async def RepositoryModelLoad(self, request, context):
        await self._repository_change(self.models.load(request.model_name), context)
        return pb.RepositoryModelLoadResponse()

    @observed
    async def RepositoryModelUnload(self, request, context):
        await self._repository_change(self.models.unload(request.model_name), context)
        return pb.RepositoryModelUnloadResponse()

    async def _repository_change(self, change: Awaitable[None], context) -> None:
        """Run a load or unload; health is re-derived afterwards, whether it worked or not."""
        try:
            await change
        except SalvoError as exc:
            await _abort(context, exc)
        finally:
            if self.on_change is not None:
                await self.on_change()

    async def _infer(
        self, request: pb.ModelInferRequest, deadline_ns: int | None, probe: Probe | None = None
    ) -> bytes:
        """One inference: the serialized response."""
        start = time.monotonic_ns()
        mv = self.models.get(request.model_name, request.model_version)
        if probe is not None:
            probe.model, probe.version = mv.name, str(mv.version)
        request_id = request.id
        cache = self.cache if mv.config.response_cache.enable else None
        if cache is not None and isinstance(request, Matched):
            request = request.message()  # the cache keys on the message's fields
        ok = False
        try:
            message = None
            if cache is not None and not request.parameters:
                # A message answered from the cache before is answered again through its
                # alias, before its inputs are decoded, validated and hashed (salvo.cache).
                message = _message_bytes(request)
                aliased = cache.lookup_alias(message, mv.name, mv.version)
                if aliased is not None:
                    value, rows = aliased
                    _count_cached(mv, probe, "hit", rows, start)
                    ok = True
                    return value + _id_field(request_id)
            if cache is None:
                validated = self._checked(mv, request)
            else:
                validated, tensors, outputs, parameters = self._validated(mv, request)
            if cache is not None and _cacheable(parameters):
                key = cache.key(mv.name, mv.version, tensors, outputs, parameters)
                hit = cache.lookup(key, mv.name)
                if hit is not None:
                    value, outcome = hit, "hit"
                    if message is not None:
                        cache.add_alias(message, key, mv.name, mv.version, validated.rows)
                else:
                    # A caller waits until its own gRPC deadline, when gRPC cancels it; the
                    # computation goes on for the others (see ResponseCache.get_or_compute).
                    value, outcome = await cache.get_or_compute(
                        key, mv.name, lambda: self._serialized(mv, validated)
                    )
                _count_cached(mv, probe, outcome, validated.rows, start)
                ok = True
                return value + _id_field(request_id)
            arrays = await mv.scheduler.infer(validated, deadline_ns, probe)
            response = self._response(mv, validated, arrays, request_id)
            ok = True
            return response
        finally:
            mv.stats.record_request(ok, time.monotonic_ns() - start)

    def _checked(self, mv: ModelVersion, request: pb.ModelInferRequest | Matched) -> InferRequest:
        """`request` decoded and checked: from its bytes when they match a template (see
        `salvo.wire`); in one step through the model's wire plan when it is a common one
        (which makes a template of it); else, and for every error, the general way."""
        plan = mv.plan
        if isinstance(request, Matched):
            validated = request.validated(plan)
            if validated is not None:
                return validated
            request = self.templates.parse(request)  # the model was replaced since
        validated = plan.decode(request)
        if validated is None:
            return self._validated(mv, request)[0]
        self.templates.learn(request, validated, plan)
        return validated

    @staticmethod
    def _validated(
        mv: ModelVersion, request: pb.ModelInferRequest
    ) -> tuple[InferRequest, list[Tensor], list[str], dict[str, object]]:
        """`request` decoded and checked against `mv`'s config, and what it was made of."""
        tensors = decode_inputs(request)
        parameters = decode_parameters(request)
        outputs = [o.name for o in request.outputs]
        validated = validate_request(
            mv.config, mv.version, request.id, tensors, outputs, parameters
        )
        return validated, tensors, outputs, parameters

    def _response(
        self, mv: ModelVersion, request: InferRequest, arrays: list, request_id: str
    ) -> bytes:
        """The serialized response: through the model's wire plan, or built as a message
        where the plan does not take the outputs (and `encode_outputs` says what is wrong)."""
        encoded = mv.plan.encode(request_id, request.outputs, arrays)
        if encoded is not None:
            return encoded
        response = pb.ModelInferResponse(
            model_name=mv.name, model_version=str(mv.version), id=request_id
        )
        specs = mv.config.outputs
        encode_outputs(
            response,
            (
                (specs[i].name, specs[i].datatype, array)
                for i, array in zip(request.outputs, arrays, strict=True)
            ),
        )
        return response.SerializeToString()

    def _serialized(self, mv: ModelVersion, request: InferRequest) -> asyncio.Future[bytes]:
        """Queue `request` now; the future of its response for the cache, serialized,
        without the caller's id. Cancelling the future (the cache does when no caller
        waits any more) drops the request.

        It is shared by every caller waiting on the same key, so it takes no caller's
        deadline: each caller waits only until its own.
        """
        scheduler = mv.scheduler
        entry = scheduler.submit(request)
        response: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()

        def serialize(waiter: asyncio.Future) -> None:
            if response.done():
                return
            if waiter.cancelled():
                response.cancel()
                return
            try:  # result() raises the request's own error; encoding may raise too
                arrays = waiter.result()
                response.set_result(self._response(mv, request, arrays, ""))
            except Exception as exc:
                response.set_exception(exc)

        def dropped(future: asyncio.Future) -> None:
            if future.cancelled():
                scheduler.abandon(entry)

        entry.waiter.add_done_callback(serialize)
        response.add_done_callback(dropped)
        return response

    async def ModelInfer(self, request, context):
        remaining = context.time_remaining()
        deadline_ns = None if remaining is None else time.monotonic_ns() + int(remaining * 1e9)
        telemetry = self.telemetry
        if telemetry is None:
            return await self._infer_untraced(request, deadline_ns, context)
        start = time.perf_counter()
        probe = Probe(telemetry.start_rpc(INFER, context.invocation_metadata))
        code, message = "OK", ""
        try:
            return await self._infer(request, deadline_ns, probe)
        except asyncio.CancelledError:
            code = "CANCELLED"
            raise
        except Exception as exc:
            status, message = status_for(exc)
            code = status.name
            await _abort(context, exc)
        finally:
            telemetry.end_rpc(
                INFER, probe, code, message, time.perf_counter() - start, peer=context.peer
            )

    async def _infer_untraced(self, request, deadline_ns, context):
        try:
            return await self._infer(request, deadline_ns)
        except Exception as exc:
            await _abort(context, exc)

    async def ModelStreamInfer(
        self, request_iterator: AsyncIterator[pb.ModelInferRequest], context
    ) -> AsyncIterator[bytes]:
        """Serve each request of the stream concurrently; answer each as soon as it is ready.

        An error is answered in-band (error_message, with the request's id) and the stream
        stays open; a message that does not parse ends it, INVALID_ARGUMENT, once the
        requests before it are answered. At most `stream_max_in_flight` requests of one
        stream run at once.
        Responses leave as serialized ModelStreamInferResponse bytes (see _stream_response).
        """
        responses: asyncio.Queue[bytes | None] = asyncio.Queue()
        slots = asyncio.Semaphore(self.stream_max_in_flight)
        tasks: set[asyncio.Task] = set()
        queued: dict[Entry, Scheduler] = {}

        telemetry = self.telemetry
        metadata = context.invocation_metadata()

        def stream_metadata() -> Any:
            return metadata

        def ended(probe: Probe | None, begun_ns: int, code: str, message: str) -> None:
            slots.release()
            if telemetry is not None and probe is not None:
                duration_s = (time.monotonic_ns() - begun_ns) / 1e9
                telemetry.end_rpc(STREAM, probe, code, message, duration_s)

        def failed(request: pb.ModelInferRequest, exc: BaseException) -> tuple[str, str]:
            status, message = status_for(exc)
            responses.put_nowait(_stream_error(request, status, message))
            return status.name, message

        async def serve_one(request: pb.ModelInferRequest) -> None:
            begun = time.monotonic_ns()
            probe = Probe(telemetry.start_rpc(STREAM, stream_metadata)) if telemetry else None
            code, message = "OK", ""
            try:
                responses.put_nowait(_stream_response(await self._infer(request, None, probe)))
            except Exception as exc:
                code, message = failed(request, exc)
            finally:
                ended(probe, begun, code, message)

        def serve_queued(request: pb.ModelInferRequest) -> bool:
            """Serve `request` without a task of its own: queue it on its model and answer
            from its waiter's callback. False (nothing done) when it needs `serve_one`:
            an unknown model, or one with the cache (whose path awaits)."""
            try:
                mv = self.models.get(request.model_name, request.model_version)
            except SalvoError:
                return False
            if self.cache is not None and mv.config.response_cache.enable:
                return False
            begun = time.monotonic_ns()
            probe = Probe(telemetry.start_rpc(STREAM, stream_metadata)) if telemetry else None
            if probe is not None:
                probe.model, probe.version = mv.name, str(mv.version)
            try:
                validated = self._checked(mv, request)
                entry = mv.scheduler.submit(validated, None, probe)
            except Exception as exc:
                mv.stats.record_request(False, time.monotonic_ns() - begun)
                ended(probe, begun, *failed(request, exc))
                return True

            def answer(waiter: asyncio.Future) -> None:
                queued.pop(entry, None)
                code, message = "OK", ""
                if waiter.cancelled():  # the stream went away first
                    code = "CANCELLED"
                else:
                    try:  # result() raises the request's own error; encoding may raise too
                        response = self._response(mv, validated, waiter.result(), request.id)
                        responses.put_nowait(_stream_response(response))
                    except Exception as exc:
                        code, message = failed(request, exc)
                mv.stats.record_request(code == "OK", time.monotonic_ns() - begun)
                ended(probe, begun, code, message)

            entry.waiter.add_done_callback(answer)
            queued[entry] = mv.scheduler
            return True

        async def read_all() -> None:
            try:
                async for request in request_iterator:
                    if isinstance(request, Undecodable):
                        refused.append(request)  # answered below, once the rest are
                        break
                    await slots.acquire()
                    if serve_queued(request):
                        continue
                    task = asyncio.create_task(serve_one(request))
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)
                # Every request answered gives its slot back: all of them back, all answered.
                for _ in range(self.stream_max_in_flight):
                    await slots.acquire()
            finally:
                responses.put_nowait(None)

        refused: list[Undecodable] = []
        reader = asyncio.create_task(read_all())
        try:
            while (response := await responses.get()) is not None:
                yield response
            await reader
            if refused:  # from this task, never from the reader's while a response is written
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, refused[0].reason)
        finally:
            reader.cancel()
            for task in list(tasks):
                task.cancel()
            for entry, scheduler in list(queued.items()):
                scheduler.abandon(entry)
