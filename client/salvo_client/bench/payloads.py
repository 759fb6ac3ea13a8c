"""The requests a run sends: concrete input shapes from the model's metadata, raw tensor
contents, and ModelInferRequests serialized once up front, each later given its id by
prepending the field rather than serializing again."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from salvo_client.bench.errors import BenchError
from salvo_client.proto import grpc_service_pb2 as pb
from salvo_client.tensors import WIRE_DTYPES

__all__ = [
    "TensorSpec",
    "build_payloads",
    "parse_shapes",
    "resolve_inputs",
    "tensor_bytes",
    "with_id",
]

# The request `id` is prepended to each pre-serialized request as its own field: protobuf
# merges concatenated messages, so a fresh id costs a few bytes, not a re-serialization.
_ID_TAG = bytes([(pb.ModelInferRequest.DESCRIPTOR.fields_by_name["id"].number << 3) | 2])


@dataclass(frozen=True)
class TensorSpec:
    """One input as it will be sent: name, v2 datatype and a concrete shape."""

    name: str
    datatype: str
    shape: tuple[int, ...]


def resolve_inputs(
    metadata: pb.ModelMetadataResponse, batch_size: int, shapes: dict[str, tuple[int, ...]]
) -> list[TensorSpec]:
    """Concrete shapes for the model's inputs.

    A leading -1 is the batch dimension and becomes `batch_size`; `shapes` (from `--shape`)
    gives whole shapes and wins; any other variable dimension has to come from `shapes`.
    """
    known = {t.name for t in metadata.inputs}
    unknown = sorted(set(shapes) - known)
    if unknown:
        raise BenchError(f"--shape names unknown inputs {unknown}; the model has {sorted(known)}")
    specs = []
    for tensor in metadata.inputs:
        if tensor.name in shapes:
            shape = shapes[tensor.name]
        else:
            dims = list(tensor.shape)
            if dims and dims[0] == -1:
                dims[0] = batch_size
            if any(d < 0 for d in dims):
                raise BenchError(
                    f"input {tensor.name!r} has variable dims {list(tensor.shape)}: "
                    f"give its shape with --shape {tensor.name}=D1,D2,..."
                )
            shape = tuple(dims)
        specs.append(TensorSpec(tensor.name, tensor.datatype, tuple(shape)))
    return specs


def tensor_bytes(spec: TensorSpec, input_data: str, rng: np.random.Generator) -> bytes:
    """Raw little-endian contents for one input (`raw_input_contents`), zero or random."""
    count = math.prod(spec.shape)
    zero = input_data == "zero"
    if spec.datatype == "BYTES":
        # Each element: a 4-byte little-endian length, then the bytes.
        out = bytearray()
        for _ in range(count):
            item = b"" if zero else rng.integers(0, 256, 8, dtype=np.uint8).tobytes()
            out += len(item).to_bytes(4, "little") + item
        return bytes(out)
    if spec.datatype == "BF16":
        # bfloat16 is the upper half of a float32.
        values = np.zeros(count, np.float32) if zero else rng.random(count, np.float32)
        return (values.view(np.uint32) >> 16).astype("<u2").tobytes()
    dtype = WIRE_DTYPES.get(spec.datatype)
    if dtype is None or dtype.kind == "O":
        raise BenchError(f"input {spec.name!r}: unsupported datatype {spec.datatype}")
    if zero:
        array_ = np.zeros(count, dtype)
    elif dtype.kind == "b":
        array_ = rng.integers(0, 2, count).astype(np.bool_)
    elif np.issubdtype(dtype, np.integer):
        # Small non-negative values: safe for inputs used as indices or token ids.
        array_ = rng.integers(0, 100, count).astype(dtype)
    else:
        array_ = rng.random(count).astype(dtype)
    return array_.astype(np.dtype(dtype).newbyteorder("<"), copy=False).tobytes()


def build_payloads(
    model: str,
    version: str,
    specs: Sequence[TensorSpec],
    input_data: str,
    count: int,
    seed: int | None = None,
) -> list[bytes]:
    """`count` serialized ModelInferRequests (distinct data when random), without an id."""
    rng = np.random.default_rng(seed)
    payloads = []
    for _ in range(count if input_data == "random" else 1):
        request = pb.ModelInferRequest(model_name=model, model_version=version)
        for spec in specs:
            request.inputs.add(name=spec.name, datatype=spec.datatype, shape=spec.shape)
            request.raw_input_contents.append(tensor_bytes(spec, input_data, rng))
        payloads.append(request.SerializeToString())
    return payloads


def with_id(payload: bytes, request_id: str) -> bytes:
    """`payload` with its `id` field set (prepended as a field of its own)."""
    raw = request_id.encode()
    length = len(raw)
    varint = bytearray()
    while True:
        byte = length & 0x7F
        length >>= 7
        if length:
            varint.append(byte | 0x80)
        else:
            varint.append(byte)
            break
    return _ID_TAG + bytes(varint) + raw + payload


def parse_shapes(items: Sequence[str]) -> dict[str, tuple[int, ...]]:
    """`--shape name=1,64` arguments as {name: (1, 64)}."""
    shapes = {}
    for item in items:
        name, sep, dims = item.partition("=")
        try:
            shape = tuple(int(d) for d in dims.split(",") if d.strip())
        except ValueError:
            shape = ()
        if not sep or not name or not shape or any(d < 0 for d in shape):
            raise BenchError(f"--shape {item!r}: expected NAME=D1,D2,... with D >= 0")
        shapes[name] = shape
    return shapes
