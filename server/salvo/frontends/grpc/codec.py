"""Tensors between the v2 protobuf messages and numpy: the server's hot path.

Decoding validates everything a client controls (datatype, shape, byte size, encodings,
value ranges) and raises `InvalidRequest` naming the input and the mismatch, before it
allocates anything sized by the request. Raw tensors become read-only numpy views of the
request's bytes (no copy); the wire is little-endian whatever the host.

Encoding is for outputs and always uses `raw_output_contents`. The typed encoder exists for
clients and tests. Encoders raise `ValueError` when the array does not fit the datatype: that
is the server's bug, not the caller's.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from salvo.datatypes import DATATYPES
from salvo.errors import InvalidRequest
from salvo_client.proto import grpc_service_pb2 as pb

__all__ = [
    "Tensor",
    "decode_inputs",
    "decode_parameters",
    "decode_tensor_raw",
    "decode_tensor_typed",
    "encode_outputs",
    "encode_tensor_raw",
    "encode_tensor_typed",
]


@dataclass(frozen=True, slots=True)
class Tensor:
    """One decoded input: its v2 name and datatype, and the data as a shaped numpy array."""

    name: str
    datatype: str
    """The v2 datatype name ("FP32", "BYTES"…)."""
    shape: tuple[int, ...]
    data: np.ndarray
    """Shaped like `shape`; dtype from DATATYPES (uint16 bits for BF16, object of bytes for
    BYTES). Raw inputs are read-only views of the request's bytes."""


@dataclass(frozen=True, slots=True)
class _Spec:
    """What the codec needs to know about one datatype, worked out once at import."""

    name: str
    dtype: np.dtype
    """Little-endian, as on the wire (object for BYTES)."""
    field: str | None
    """The InferTensorContents field; None for the raw-only FP16 and BF16."""
    packed_tag: int | None
    """Tag byte of the packed fixed-width field (FP32, FP64), whose values are copied as
    bytes rather than through Python floats: faster, and signalling NaNs keep their bits."""
    bounds: tuple[int, int] | None
    """Value range where the contents field is wider than the datatype (INT8 in int32…)."""


def _make_spec(name: str) -> _Spec:
    dt = DATATYPES[name]
    dtype = dt.numpy if dt.numpy.kind == "O" else dt.numpy.newbyteorder("<")
    packed_tag = None
    if dt.contents_field in ("fp32_contents", "fp64_contents"):
        number = pb.InferTensorContents.DESCRIPTOR.fields_by_name[dt.contents_field].number
        packed_tag = (number << 3) | 2  # wire type 2: length-delimited (packed)
    bounds = None
    if name in ("INT8", "INT16", "UINT8", "UINT16"):
        info = np.iinfo(dtype)
        bounds = (int(info.min), int(info.max))
    return _Spec(name, dtype, dt.contents_field, packed_tag, bounds)


_SPECS: dict[str, _Spec] = {name: _make_spec(name) for name in DATATYPES}


def wire_dtype(datatype: str) -> np.dtype:
    """The numpy dtype of a v2 datatype on the wire: little-endian (object for BYTES)."""
    return _SPECS[datatype].dtype


_U32 = struct.Struct("<I")
_U32_MAX = 2**32 - 1
# numpy refuses arrays whose non-zero dimensions times the itemsize exceed this, even empty ones.
_MAX_NBYTES = int(np.iinfo(np.intp).max)


def _spec(name: str, datatype: str) -> _Spec:
    spec = _SPECS.get(datatype)
    if spec is None:
        raise InvalidRequest(f"input '{name}': unknown datatype {datatype!r}")
    return spec


def _element_count(name: str, spec: _Spec, shape: Sequence[int]) -> int:
    """Elements in `shape`, after checking it is one numpy can hold; allocates nothing."""
    nbytes = spec.dtype.itemsize
    has_zero = False
    for dim in shape:
        if dim < 0:
            raise InvalidRequest(
                f"input '{name}': shape {list(shape)} has negative dimension {dim}; "
                "expected dimensions >= 0"
            )
        if dim == 0:
            has_zero = True
            continue
        nbytes *= dim
        # Checked per dimension so that a hostile shape cannot build huge integers.
        if nbytes > _MAX_NBYTES:
            raise InvalidRequest(
                f"input '{name}': shape {list(shape)} of {spec.name} is too large; "
                f"expected at most {_MAX_NBYTES} bytes"
            )
    return 0 if has_zero else nbytes // spec.dtype.itemsize


def decode_tensor_raw(name: str, datatype: str, shape: Sequence[int], raw: bytes) -> np.ndarray:
    """Decode one tensor from its `raw_input_contents` entry.

    Fixed-width datatypes become a read-only view of `raw`. BYTES elements each carry a
    4-byte little-endian length, then the bytes; they must fill `raw` exactly.
    """
    spec = _spec(name, datatype)
    count = _element_count(name, spec, shape)
    if spec.dtype.kind == "O":
        return _split_bytes(name, shape, count, raw).reshape(shape)
    needed = count * spec.dtype.itemsize
    if len(raw) != needed:
        raise InvalidRequest(
            f"input '{name}': raw_input_contents holds {len(raw)} bytes, "
            f"but shape {list(shape)} of {datatype} needs {needed}"
        )
    # Any non-zero byte would be a numpy bool that is neither True nor False.
    if spec.dtype.kind == "b" and raw.translate(None, b"\x00\x01"):
        raise InvalidRequest(f"input '{name}': BOOL raw_input_contents must hold bytes 0 or 1")
    return np.frombuffer(raw, dtype=spec.dtype).reshape(shape)


def _split_bytes(name: str, shape: Sequence[int], count: int, raw: bytes) -> np.ndarray:
    end = len(raw)
    # Every element needs its 4-byte length: check before allocating `count` slots.
    if count * 4 > end:
        raise InvalidRequest(
            f"input '{name}': raw_input_contents holds {end} bytes, but shape {list(shape)} "
            f"of BYTES needs at least {count * 4} for {count} element lengths"
        )
    out = np.empty(count, dtype=object)
    unpack = _U32.unpack_from
    offset = 0
    for i in range(count):
        if offset + 4 > end:
            raise InvalidRequest(
                f"input '{name}': BYTES element {i} needs a 4-byte length at offset {offset}, "
                f"but raw_input_contents ends at {end}"
            )
        (size,) = unpack(raw, offset)
        offset += 4
        if offset + size > end:
            raise InvalidRequest(
                f"input '{name}': BYTES element {i} declares {size} bytes, "
                f"but only {end - offset} remain"
            )
        out[i] = raw[offset : offset + size]
        offset += size
    if offset != end:
        raise InvalidRequest(
            f"input '{name}': raw_input_contents holds {end} bytes, but the {count} BYTES "
            f"elements of shape {list(shape)} use {offset}"
        )
    return out


def _packed_payload(contents: pb.InferTensorContents, tag: int) -> memoryview | None:
    """The bytes of a packed field when it is all that `contents` holds, else None.

    The message is re-serialised, which always writes repeated scalars packed, whichever
    way the client sent them.
    """
    buf = contents.SerializeToString()
    if not buf or buf[0] != tag:
        return None
    length = shift = 0
    pos = 1
    while pos < len(buf):
        byte = buf[pos]
        pos += 1
        length |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            break
    else:
        return None
    if pos + length != len(buf):
        return None  # unknown fields follow: take the slow path
    return memoryview(buf)[pos:]


def decode_tensor_typed(
    name: str, datatype: str, shape: Sequence[int], contents: pb.InferTensorContents
) -> np.ndarray:
    """Decode one tensor from its typed `contents`, which must use the datatype's field."""
    spec = _spec(name, datatype)
    count = _element_count(name, spec, shape)
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
        payload = _packed_payload(contents, spec.packed_tag)
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


def decode_parameters(request: pb.ModelInferRequest) -> dict[str, object]:
    """The request's parameters as Python values. The ones the server acts on (`priority`,
    `timeout`) must be non-negative integers; every other one is passed on as it came."""
    params = {k: _parameter_value(v) for k, v in request.parameters.items()}
    for key in ("priority", "timeout"):
        value = params.get(key)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool)):
            raise InvalidRequest(f"parameter '{key}' must be an integer, got {value!r}")
        if isinstance(value, int) and value < 0:
            raise InvalidRequest(f"parameter '{key}' must not be negative, got {value}")
    return params


def _wire_array(what: str, datatype: str, array: np.ndarray) -> tuple[_Spec, np.ndarray]:
    """`array` as the datatype's little-endian dtype, or ValueError if it is another type."""
    spec = _SPECS.get(datatype)
    if spec is None:
        raise ValueError(f"{what}: unknown datatype {datatype!r}")
    dtype = array.dtype
    if spec.dtype.kind == "O":
        if dtype.kind not in "OSU":
            raise ValueError(f"{what}: BYTES expects an object, bytes or str array, got {dtype}")
        return spec, array
    if datatype == "BF16" and dtype.name == "bfloat16":
        array = array.view(np.uint16)  # ml_dtypes.bfloat16: same bits
        dtype = array.dtype
    if dtype.newbyteorder("<") != spec.dtype:
        raise ValueError(f"{what}: {datatype} expects a {spec.dtype} array, got {dtype}")
    return spec, np.asarray(array, dtype=spec.dtype)


def _as_bytes(what: str, item: object) -> bytes:
    if isinstance(item, bytes):
        return item
    if isinstance(item, str):
        return item.encode("utf-8")
    if isinstance(item, bytearray | memoryview):
        return bytes(item)
    raise ValueError(f"{what}: BYTES elements must be bytes or str, got {type(item).__name__}")


def _encode_raw(what: str, datatype: str, array: np.ndarray) -> bytes:
    spec, wire = _wire_array(what, datatype, array)
    if spec.dtype.kind != "O":
        return wire.tobytes(order="C")  # one copy, whatever the strides
    parts: list[bytes] = []
    for item in wire.flat:  # row-major, as the protocol orders elements
        data = _as_bytes(what, item)
        if len(data) > _U32_MAX:
            raise ValueError(f"{what}: a BYTES element of {len(data)} bytes exceeds 4 GiB")
        parts.append(_U32.pack(len(data)))
        parts.append(data)
    return b"".join(parts)


def encode_tensor_raw(datatype: str, array: np.ndarray) -> bytes:
    """The raw (little-endian, row-major) encoding of `array` as `datatype`."""
    return _encode_raw("array", datatype, array)


def varint(value: int) -> bytes:
    """`value` (non-negative) as a protobuf base-128 varint."""
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def encode_tensor_typed(datatype: str, array: np.ndarray) -> pb.InferTensorContents:
    """The typed `contents` encoding of `array`; ValueError for the raw-only FP16 and BF16."""
    spec, wire = _wire_array("array", datatype, array)
    if spec.field is None:
        raise ValueError(f"{datatype} has no typed contents field; use raw_input_contents")
    if spec.packed_tag is not None:
        # Built as wire bytes so that float values, NaN payloads included, keep their bits.
        payload = wire.tobytes(order="C")
        return pb.InferTensorContents.FromString(
            bytes([spec.packed_tag]) + varint(len(payload)) + payload
        )
    contents = pb.InferTensorContents()
    field: Any = getattr(contents, spec.field)
    if spec.dtype.kind == "O":
        field.extend([_as_bytes("array", item) for item in wire.flat])
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
        raw = _encode_raw(f"output '{name}'", datatype, array)
        response.outputs.add(name=name, datatype=datatype, shape=array.shape)
        response.raw_output_contents.append(raw)
