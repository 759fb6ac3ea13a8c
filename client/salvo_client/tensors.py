"""The v2 tensor codec: numpy arrays to the protocol's raw bytes and back.

Fixed-width datatypes travel little-endian and row-major; BYTES elements each carry their
length as 4 little-endian bytes. Kept free of any server code: the server has its own codec
(`salvo.codec`), and this package must install and import with grpcio, protobuf and numpy
alone.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

import grpc
import numpy as np

from salvo_client.errors import InternalError
from salvo_client.proto import grpc_service_pb2 as pb

__all__ = ["WIRE_DTYPES", "datatype_of", "decode_outputs", "decode_tensor", "encode_tensor"]

_WIRE_DTYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype("<u1"),
    "UINT16": np.dtype("<u2"),
    "UINT32": np.dtype("<u4"),
    "UINT64": np.dtype("<u8"),
    "INT8": np.dtype("<i1"),
    "INT16": np.dtype("<i2"),
    "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"),
    "FP16": np.dtype("<f2"),
    "FP32": np.dtype("<f4"),
    "FP64": np.dtype("<f8"),
    "BF16": np.dtype("<u2"),  # bit patterns: numpy has no bfloat16
    "BYTES": np.dtype(object),
}
"""How each v2 datatype travels (little-endian) and how outputs come back in numpy."""
WIRE_DTYPES = _WIRE_DTYPES

_BY_KIND: dict[tuple[str, int], str] = {
    ("b", 1): "BOOL",
    ("u", 1): "UINT8",
    ("u", 2): "UINT16",
    ("u", 4): "UINT32",
    ("u", 8): "UINT64",
    ("i", 1): "INT8",
    ("i", 2): "INT16",
    ("i", 4): "INT32",
    ("i", 8): "INT64",
    ("f", 2): "FP16",
    ("f", 4): "FP32",
    ("f", 8): "FP64",
}

_TYPED_FIELDS: dict[str, str] = {
    "BOOL": "bool_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}
_U32 = struct.Struct("<I")
_U32_MAX = 2**32 - 1


def datatype_of(dtype: np.dtype) -> str:
    """The v2 datatype of a numpy dtype; TypeError for dtypes the protocol cannot carry.

    Object, bytes (`S`) and str (`U`) arrays are BYTES; ml_dtypes' bfloat16 is BF16.
    """
    if dtype.kind in "OSU":
        return "BYTES"
    if dtype.name == "bfloat16":
        return "BF16"
    datatype = _BY_KIND.get((dtype.kind, dtype.itemsize))
    if datatype is None:
        raise TypeError(f"numpy dtype {dtype} has no v2 datatype")
    return datatype


def _element_bytes(what: str, item: object) -> bytes:
    if isinstance(item, bytes):
        return item
    if isinstance(item, str):
        return item.encode("utf-8")
    if isinstance(item, bytearray | memoryview):
        return bytes(item)
    raise TypeError(f"{what}: BYTES elements must be bytes or str, got {type(item).__name__}")


def encode_tensor(name: str, array: np.ndarray) -> tuple[str, bytes]:
    """`array` as (v2 datatype, raw bytes): little-endian and row-major whatever its layout;
    BYTES elements each prefixed with their length as 4 little-endian bytes."""
    if not isinstance(array, np.ndarray):
        raise TypeError(f"input '{name}': expected a numpy array, got {type(array).__name__}")
    datatype = datatype_of(array.dtype)
    if datatype == "BYTES":
        parts: list[bytes] = []
        for item in array.flat:  # row-major, as the protocol orders elements
            data = _element_bytes(f"input '{name}'", item)
            if len(data) > _U32_MAX:
                raise ValueError(f"input '{name}': a BYTES element of {len(data)} bytes is > 4 GiB")
            parts.append(_U32.pack(len(data)))
            parts.append(data)
        return datatype, b"".join(parts)
    if datatype == "BF16":
        array = array.view(np.uint16)
    wire = _WIRE_DTYPES[datatype]
    if array.dtype != wire:
        array = array.astype(wire)  # only the byte order differs
    return datatype, array.tobytes(order="C")


def _split_bytes(name: str, shape: tuple[int, ...], raw: bytes) -> np.ndarray:
    count = int(np.prod(shape, dtype=np.int64))
    end = len(raw)
    # Every element needs its 4-byte length: check before allocating `count` slots.
    ok = count * 4 <= end
    out = np.empty(count if ok else 0, dtype=object)
    offset = 0
    for i in range(len(out)):
        if offset + 4 > end:
            ok = False
            break
        (size,) = _U32.unpack_from(raw, offset)
        offset += 4
        if offset + size > end:
            ok = False
            break
        out[i] = raw[offset : offset + size]
        offset += size
    if not ok or offset != end:
        raise InternalError(
            grpc.StatusCode.INTERNAL,
            f"output '{name}': malformed BYTES contents for shape {list(shape)} ({end} bytes)",
        )
    return out.reshape(shape)


def decode_tensor(name: str, datatype: str, shape: Sequence[int], raw: bytes) -> np.ndarray:
    """Decode one raw tensor. Fixed-width datatypes become a read-only numpy view of `raw`
    (no copy); BYTES becomes an object array of bytes; BF16 comes back as uint16 bits.

    A malformed answer raises InternalError: it is the server's bug, not the caller's.
    """
    wire = _WIRE_DTYPES.get(datatype)
    dims = tuple(int(d) for d in shape)
    if wire is None or any(d < 0 for d in dims):
        raise InternalError(
            grpc.StatusCode.INTERNAL,
            f"output '{name}': cannot decode datatype {datatype!r} of shape {list(dims)}",
        )
    if datatype == "BYTES":
        return _split_bytes(name, dims, raw)
    needed = int(np.prod(dims, dtype=np.int64)) * wire.itemsize
    if len(raw) != needed:
        raise InternalError(
            grpc.StatusCode.INTERNAL,
            f"output '{name}': {len(raw)} raw bytes, but shape {list(dims)} of {datatype} "
            f"needs {needed}",
        )
    return np.frombuffer(raw, dtype=wire).reshape(dims)


def _decode_typed(
    name: str, datatype: str, shape: Sequence[int], contents: pb.InferTensorContents
) -> np.ndarray:
    """Decode typed `contents`, which other v2 servers may answer with instead of raw."""
    field_name = _TYPED_FIELDS.get(datatype)
    if field_name is None:
        raise InternalError(
            grpc.StatusCode.INTERNAL, f"output '{name}': {datatype} has no typed contents"
        )
    values = list(getattr(contents, field_name))
    dims = tuple(int(d) for d in shape)
    if datatype == "BYTES":
        out = np.empty(len(values), dtype=object)
        out[:] = values
    else:
        out = np.array(values, dtype=_WIRE_DTYPES[datatype])
    if out.size != int(np.prod(dims, dtype=np.int64)):
        raise InternalError(
            grpc.StatusCode.INTERNAL,
            f"output '{name}': {out.size} values for shape {list(dims)}",
        )
    return out.reshape(dims)


def decode_outputs(response: pb.ModelInferResponse) -> dict[str, np.ndarray]:
    """Every output of `response` by name, in the order the server sent them."""
    raw = response.raw_output_contents
    outputs = response.outputs
    if raw and len(raw) != len(outputs):
        raise InternalError(
            grpc.StatusCode.INTERNAL,
            f"response has {len(outputs)} outputs but {len(raw)} raw_output_contents",
        )
    result: dict[str, np.ndarray] = {}
    for i, out in enumerate(outputs):
        if raw:
            result[out.name] = decode_tensor(out.name, out.datatype, out.shape, raw[i])
        else:
            result[out.name] = _decode_typed(out.name, out.datatype, out.shape, out.contents)
    return result
