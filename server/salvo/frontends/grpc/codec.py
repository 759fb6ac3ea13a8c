"""The v2 protobuf messages and Salvo's domain, one into the other.

Decoding validates everything a client controls (datatype, shape, byte size, encodings,
value ranges) and raises `InvalidRequest` naming the input and the mismatch, before it
allocates anything sized by the request. Raw tensors are decoded by `salvo.domain.tensors`
(read-only views of the request's bytes); typed `contents` here. Outputs always leave as
`raw_output_contents`; the typed encoder exists for clients and tests. Encoders raise
`ValueError` when the array does not fit the datatype: that is the server's bug, not the
caller's. The model-level messages (metadata, config, statistics, index) are built here
from the data plane's answers.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from salvo.core.dataplane import IndexEntry, ModelInfo
from salvo.domain.config import ModelConfig
from salvo.domain.datatypes import DATATYPES
from salvo.domain.protocol import EXTENSIONS, PLATFORM, SERVER_NAME, SERVER_VERSION
from salvo.domain.stats import Duration, ModelStats
from salvo.domain.status import InvalidRequest
from salvo.domain.tensors import (
    as_bytes,
    decode_tensor_raw,
    element_count,
    encode_raw,
    wire_array,
    wire_dtype,
)
from salvo.domain.types import Tensor
from salvo.frontends.grpc.wire import packed_contents, packed_payload, tag
from salvo_client.proto import grpc_service_pb2 as pb
from salvo_client.proto import model_config_pb2 as mc


@dataclass(frozen=True, slots=True)
class _Typed:
    """How one datatype travels in InferTensorContents, worked out once at import."""

    dtype: np.dtype
    """Little-endian, as on the wire (object for BYTES)."""
    field: str | None
    """The InferTensorContents field; None for the raw-only FP16 and BF16."""
    packed_tag: bytes | None
    """Tag of the packed fixed-width field (FP32, FP64), whose values are copied as bytes
    rather than through Python floats: faster, and signalling NaNs keep their bits."""
    bounds: tuple[int, int] | None
    """Value range where the contents field is wider than the datatype (INT8 in int32…)."""


def _typed(name: str) -> _Typed:
    field = DATATYPES[name].contents_field
    dtype = wire_dtype(name)
    packed = None
    if field in ("fp32_contents", "fp64_contents"):
        packed = tag(pb.InferTensorContents.DESCRIPTOR, field, packed=True)
    bounds = None
    if name in ("INT8", "INT16", "UINT8", "UINT16"):
        info = np.iinfo(dtype)
        bounds = (int(info.min), int(info.max))
    return _Typed(dtype, field, packed, bounds)


_TYPED: dict[str, _Typed] = {name: _typed(name) for name in DATATYPES}


def decode_tensor_typed(
    name: str, datatype: str, shape: Sequence[int], contents: pb.InferTensorContents
) -> np.ndarray:
    """Decode one tensor from its typed `contents`, which must use the datatype's field."""
    count = element_count(name, datatype, shape)
    spec = _TYPED[datatype]
    populated = [fd.name for fd, _ in contents.ListFields()]
    if spec.field is None:
        if populated or count:
            raise InvalidRequest(
                f"input '{name}': {datatype} has no typed contents field; "
                "expected it in raw_input_contents"
            )
        return np.empty(shape, dtype=spec.dtype)
    if len(populated) > 1 or (populated and populated[0] != spec.field):
        raise InvalidRequest(
            f"input '{name}': {datatype} expects contents.{spec.field}, "
            f"got contents.{', contents.'.join(populated)}"
        )
    values: Any = getattr(contents, spec.field)
    if len(values) != count:
        raise InvalidRequest(
            f"input '{name}': contents.{spec.field} holds {len(values)} values, "
            f"but shape {list(shape)} of {datatype} needs {count}"
        )
    if spec.dtype.kind == "O":
        out = np.empty(count, dtype=object)
        out[:] = list(values)
        return out.reshape(shape)
    if spec.packed_tag is not None and count:
        payload = packed_payload(contents, spec.packed_tag)
        if payload is not None:
            return np.frombuffer(payload, dtype=spec.dtype).reshape(shape)
    if spec.bounds is None:
        return np.fromiter(values, dtype=spec.dtype, count=count).reshape(shape)
    wide = np.fromiter(values, dtype=np.int64, count=count)
    low, high = spec.bounds
    bad = np.flatnonzero((wide < low) | (wide > high))
    if bad.size:
        i = int(bad[0])
        raise InvalidRequest(
            f"input '{name}': contents.{spec.field}[{i}] is {int(wide[i])}, "
            f"expected a {datatype} in [{low}, {high}]"
        )
    return wide.astype(spec.dtype).reshape(shape)


def decode_inputs(request: pb.ModelInferRequest) -> list[Tensor]:
    """Decode and validate every input of `request`, in order.

    With `raw_input_contents` present, it holds one entry per input and no input may also
    carry typed `contents`; without it, every input is typed.
    """
    inputs = request.inputs
    raw_contents = request.raw_input_contents
    use_raw = len(raw_contents) > 0
    if use_raw and len(raw_contents) != len(inputs):
        raise InvalidRequest(
            f"raw_input_contents holds {len(raw_contents)} entries, "
            f"but the request has {len(inputs)} inputs"
        )
    seen: set[str] = set()
    tensors: list[Tensor] = []
    for i, tensor in enumerate(inputs):
        name = tensor.name
        if name in seen:
            raise InvalidRequest(f"input '{name}' appears more than once; expected unique names")
        seen.add(name)
        shape = tuple(tensor.shape)
        if use_raw:
            if tensor.HasField("contents") and tensor.contents.ListFields():
                raise InvalidRequest(
                    f"input '{name}': sets both contents and raw_input_contents; "
                    "expected one encoding"
                )
            data = decode_tensor_raw(name, tensor.datatype, shape, raw_contents[i])
        else:
            data = decode_tensor_typed(name, tensor.datatype, shape, tensor.contents)
        tensors.append(Tensor(name, tensor.datatype, shape, data))
    return tensors


def _parameter_value(p: pb.InferParameter) -> object:
    which = p.WhichOneof("parameter_choice")
    return getattr(p, which) if which else None


class MessageParameters(Mapping[str, object]):
    """A request's parameters as a read-only mapping of Python values, each converted when
    it is read: the server reads two or three by name (`priority`, `timeout`, `cache`),
    and clients send others it never reads (perf_analyzer, one on every request)."""

    __slots__ = ("_map",)

    def __init__(self, parameters: Any) -> None:
        self._map = parameters

    def __getitem__(self, key: str) -> object:
        if key not in self._map:  # indexing a protobuf map would insert the key
            raise KeyError(key)
        return _parameter_value(self._map[key])

    def get(self, key: str, default: object = None) -> object:
        return _parameter_value(self._map[key]) if key in self._map else default

    def __iter__(self) -> Iterator[str]:
        return iter(self._map)

    def __len__(self) -> int:
        return len(self._map)


def decode_parameters(request: pb.ModelInferRequest) -> dict[str, object]:
    """The request's parameters as Python values, as they came (`validate_request` checks
    the ones the server acts on)."""
    return {k: _parameter_value(v) for k, v in request.parameters.items()}


def encode_tensor_typed(datatype: str, array: np.ndarray) -> pb.InferTensorContents:
    """The typed `contents` encoding of `array`; ValueError for the raw-only FP16 and BF16."""
    wire = wire_array("array", datatype, array)
    spec = _TYPED[datatype]
    if spec.field is None:
        raise ValueError(f"{datatype} has no typed contents field; use raw_input_contents")
    if spec.packed_tag is not None:
        # Built as wire bytes so that float values, NaN payloads included, keep their bits.
        payload = wire.tobytes(order="C")
        return packed_contents(spec.packed_tag, payload)
    contents = pb.InferTensorContents()
    field: Any = getattr(contents, spec.field)
    if spec.dtype.kind == "O":
        field.extend([as_bytes("array", item) for item in wire.flat])
    else:
        field.extend(wire.ravel(order="C").tolist())
    return contents


def encode_outputs(
    response: pb.ModelInferResponse, outputs: Iterable[tuple[str, str, np.ndarray]]
) -> None:
    """Append each (name, datatype, array) to `response` as an output and its raw contents.

    `response.outputs` and `response.raw_output_contents` grow in step, so they stay
    aligned by index as the protocol requires.
    """
    for name, datatype, array in outputs:
        raw = encode_raw(f"output '{name}'", datatype, array)
        response.outputs.add(name=name, datatype=datatype, shape=array.shape)
        response.raw_output_contents.append(raw)


def metadata(info: ModelInfo) -> pb.ModelMetadataResponse:
    """ModelMetadata's answer: shapes with -1 for the batch dimension where the model has one."""
    out = pb.ModelMetadataResponse(
        name=info.name, versions=[str(v) for v in info.versions], platform=PLATFORM
    )
    batch = [-1] if info.config.max_batch_size > 0 else []
    for spec in info.config.inputs:
        out.inputs.add(name=spec.name, datatype=spec.datatype, shape=[*batch, *spec.dims])
    for spec in info.config.outputs:
        out.outputs.add(name=spec.name, datatype=spec.datatype, shape=[*batch, *spec.dims])
    return out


def config_to_proto(config: ModelConfig, device_type: str = "cpu") -> mc.ModelConfig:
    """The config as Triton's ModelConfig message (what perf_analyzer reads).

    `device_type` is where the model was loaded ("cuda" or "cpu"), which `auto` leaves open.
    """
    out = mc.ModelConfig(
        name=config.name, platform=PLATFORM, backend="pytorch", max_batch_size=config.max_batch_size
    )
    for spec in config.inputs:
        out.input.add(name=spec.name, data_type=_enum(spec.datatype), dims=spec.dims)
    for spec in config.outputs:
        out.output.add(name=spec.name, data_type=_enum(spec.datatype), dims=spec.dims)
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
    if config.response_cache.enable:
        out.response_cache.enable = True
    for key, value in config.parameters.items():
        out.parameters[key].string_value = value
    return out


def _enum(datatype: str) -> Any:
    return mc.DataType.Value(DATATYPES[datatype].config_enum)


def _duration(target: pb.StatisticDuration, source: Duration) -> None:
    target.count = source.count
    target.ns = source.ns


def statistics(stats: ModelStats) -> pb.ModelStatistics:
    """One version's statistics as Triton's ModelStatistics (`salvo.domain.stats` says what
    each field counts)."""
    out = pb.ModelStatistics(
        name=stats.name,
        version=str(stats.version),
        last_inference=stats.last_inference_ms,
        inference_count=stats.inference_count,
        execution_count=stats.execution_count,
    )
    s = out.inference_stats
    for name in (
        "success", "fail", "queue", "compute_input", "compute_infer", "compute_output",
        "cache_hit", "cache_miss",
    ):  # fmt: skip
        _duration(getattr(s, name), getattr(stats, name))
    for size in sorted(stats.batches):
        batch = stats.batches[size]
        entry = out.batch_stats.add(batch_size=size)
        _duration(entry.compute_input, batch.compute_input)
        _duration(entry.compute_infer, batch.compute_infer)
        _duration(entry.compute_output, batch.compute_output)
    return out


def index(entries: Sequence[IndexEntry]) -> pb.RepositoryIndexResponse:
    out = pb.RepositoryIndexResponse()
    for e in entries:
        version = "" if e.version is None else str(e.version)
        out.models.add(name=e.name, version=version, state=e.state, reason=e.reason)
    return out


def server_metadata() -> pb.ServerMetadataResponse:
    return pb.ServerMetadataResponse(
        name=SERVER_NAME, version=SERVER_VERSION, extensions=EXTENSIONS
    )
