"""Tensors in the v2 protocol's raw layout: the bytes of gRPC's `raw_input_contents` and
`raw_output_contents`, and of HTTP's binary tensor data extension.

Elements are little-endian whatever the host, in row-major order; a BYTES element is a
4-byte little-endian length and then its bytes. Decoding checks everything a caller
controls (datatype, shape, byte size) and raises `InvalidRequest` naming the input and the
mismatch, before it allocates anything sized by the request; fixed-width tensors become
read-only numpy views of the request's bytes (no copy). Encoding raises `ValueError` when
an array does not fit its datatype: that is the server's bug, not the caller's.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

import numpy as np

from salvo.domain.datatypes import DATATYPES
from salvo.domain.status import InvalidRequest

_DTYPES: dict[str, np.dtype] = {
    name: dt.numpy if dt.numpy.kind == "O" else dt.numpy.newbyteorder("<")
    for name, dt in DATATYPES.items()
}


def wire_dtype(datatype: str) -> np.dtype:
    """The numpy dtype of a v2 datatype's raw elements: little-endian (object for BYTES)."""
    return _DTYPES[datatype]


_U32 = struct.Struct("<I")
_U32_MAX = 2**32 - 1
# numpy refuses arrays whose non-zero dimensions times the itemsize exceed this, even empty ones.
_MAX_NBYTES = int(np.iinfo(np.intp).max)


def _dtype(name: str, datatype: str) -> np.dtype:
    dtype = _DTYPES.get(datatype)
    if dtype is None:
        raise InvalidRequest(f"input '{name}': unknown datatype {datatype!r}")
    return dtype


def element_count(name: str, datatype: str, shape: Sequence[int]) -> int:
    """Elements in `shape`, after checking it is one numpy can hold; allocates nothing."""
    dtype = _dtype(name, datatype)
    nbytes = dtype.itemsize
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
                f"input '{name}': shape {list(shape)} of {datatype} is too large; "
                f"expected at most {_MAX_NBYTES} bytes"
            )
    return 0 if has_zero else nbytes // dtype.itemsize


ALIGNMENT = 16
"""Where the contents of a bytes object start, modulo this: a raw tensor that is a whole
bytes object is aligned so, one at any other offset in a buffer may not be."""


def aligned_view(buffer: bytes, offset: int, dtype: np.dtype, shape: tuple[int, ...]) -> np.ndarray:
    """A read-only array of `shape` of the bytes of `buffer` at `offset`: a view where they
    lie `ALIGNMENT`-aligned, else a copy. CPU kernels (oneDNN, MKL) round differently on
    input that is not, so without the copy a request's answer would depend, in its last
    bits, on where its bytes happened to lie in the message."""
    array = np.ndarray(shape, dtype, buffer, offset)
    if offset % ALIGNMENT:
        array = array.copy()
        array.flags.writeable = False
    return array


def decode_tensor_raw(
    name: str, datatype: str, shape: Sequence[int], raw: bytes, source: str = "raw_input_contents"
) -> np.ndarray:
    """Decode one tensor from its raw bytes (`source` names where they came from, for
    errors).

    Fixed-width datatypes become a read-only view of `raw`. BYTES elements each carry a
    4-byte little-endian length, then the bytes; they must fill `raw` exactly.
    """
    dtype = _dtype(name, datatype)
    count = element_count(name, datatype, shape)
    if dtype.kind == "O":
        return _split_bytes(name, shape, count, raw, source).reshape(shape)
    _check_size(name, datatype, shape, count * dtype.itemsize, len(raw), source)
    # Any non-zero byte would be a numpy bool that is neither True nor False.
    if dtype.kind == "b" and raw.translate(None, b"\x00\x01"):
        raise InvalidRequest(f"input '{name}': BOOL {source} must hold bytes 0 or 1")
    return np.frombuffer(raw, dtype=dtype).reshape(shape)


def decode_tensor_at(
    name: str,
    datatype: str,
    shape: Sequence[int],
    buffer: bytes,
    offset: int,
    size: int,
    source: str,
) -> np.ndarray:
    """`decode_tensor_raw` of the `size` bytes of `buffer` at `offset` (which the caller
    has checked lie inside it): a fixed-width tensor is a view of `buffer` where aligned
    (`aligned_view`), never a copy of the whole slice first."""
    dtype = _dtype(name, datatype)
    if dtype.kind in "Ob":
        return decode_tensor_raw(name, datatype, shape, buffer[offset : offset + size], source)
    count = element_count(name, datatype, shape)
    _check_size(name, datatype, shape, count * dtype.itemsize, size, source)
    return aligned_view(buffer, offset, dtype, tuple(shape))


def _check_size(
    name: str, datatype: str, shape: Sequence[int], needed: int, size: int, source: str
) -> None:
    if size != needed:
        raise InvalidRequest(
            f"input '{name}': {source} holds {size} bytes, "
            f"but shape {list(shape)} of {datatype} needs {needed}"
        )


def _split_bytes(
    name: str, shape: Sequence[int], count: int, raw: bytes, source: str
) -> np.ndarray:
    end = len(raw)
    # Every element needs its 4-byte length: check before allocating `count` slots.
    if count * 4 > end:
        raise InvalidRequest(
            f"input '{name}': {source} holds {end} bytes, but shape {list(shape)} "
            f"of BYTES needs at least {count * 4} for {count} element lengths"
        )
    out = np.empty(count, dtype=object)
    unpack = _U32.unpack_from
    offset = 0
    for i in range(count):
        if offset + 4 > end:
            raise InvalidRequest(
                f"input '{name}': BYTES element {i} needs a 4-byte length at offset {offset}, "
                f"but {source} ends at {end}"
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
            f"input '{name}': {source} holds {end} bytes, but the {count} BYTES "
            f"elements of shape {list(shape)} use {offset}"
        )
    return out


def wire_array(what: str, datatype: str, array: np.ndarray) -> np.ndarray:
    """`array` as the datatype's little-endian dtype, or ValueError if it is another type."""
    wire = _DTYPES.get(datatype)
    if wire is None:
        raise ValueError(f"{what}: unknown datatype {datatype!r}")
    dtype = array.dtype
    if wire.kind == "O":
        if dtype.kind not in "OSU":
            raise ValueError(f"{what}: BYTES expects an object, bytes or str array, got {dtype}")
        return array
    if datatype == "BF16" and dtype.name == "bfloat16":
        array = array.view(np.uint16)  # ml_dtypes.bfloat16: same bits
        dtype = array.dtype
    if dtype.newbyteorder("<") != wire:
        raise ValueError(f"{what}: {datatype} expects a {wire} array, got {dtype}")
    return np.asarray(array, dtype=wire)


def as_bytes(what: str, item: object) -> bytes:
    if isinstance(item, bytes):
        return item
    if isinstance(item, str):
        return item.encode("utf-8")
    if isinstance(item, bytearray | memoryview):
        return bytes(item)
    raise ValueError(f"{what}: BYTES elements must be bytes or str, got {type(item).__name__}")


def encode_raw(what: str, datatype: str, array: np.ndarray) -> bytes:
    """The raw encoding of `array` as `datatype`; `what` names it in errors."""
    wire = wire_array(what, datatype, array)
    if wire.dtype.kind != "O":
        return wire.tobytes(order="C")  # one copy, whatever the strides
    parts: list[bytes] = []
    for item in wire.flat:  # row-major, as the protocol orders elements
        data = as_bytes(what, item)
        if len(data) > _U32_MAX:
            raise ValueError(f"{what}: a BYTES element of {len(data)} bytes exceeds 4 GiB")
        parts.append(_U32.pack(len(data)))
        parts.append(data)
    return b"".join(parts)


def encode_tensor_raw(datatype: str, array: np.ndarray) -> bytes:
    """The raw (little-endian, row-major) encoding of `array` as `datatype`."""
    return encode_raw("array", datatype, array)
