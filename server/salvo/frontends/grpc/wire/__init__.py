"""Protobuf wire bytes: the one package of the server that reads or writes them.

Field tags come from the generated descriptors, never from literals. Here:

- `varint` / `read_varint`: the base-128 integers that prefix every length.
- `packed_payload` / `packed_contents`: a packed repeated FP32/FP64 field read and written
  as bytes, so that values (NaN payloads included) keep their bits and no Python float
  is made per element.
- `id_field`, `stream_response`, `stream_error`: what a response needs beyond its tensors:
  a caller's id appended to a response encoded without one (a response cache hit), and the
  ModelStreamInferResponse around a serialized response, without parsing it again.

and in its modules:

- `plan.WirePlan`: a model version's common request and response, each in one step.
- `templates`: a connection's repeated requests read from their bytes, unparsed.
"""

from __future__ import annotations

from typing import Any

from google.protobuf.descriptor import FieldDescriptor

from salvo.domain.status import describe
from salvo.frontends.grpc.status import CODES, PUSHBACK_KEY
from salvo_client.errors import STREAM_STATUS_PARAMETER
from salvo_client.proto import grpc_service_pb2 as pb

_WIRE_TYPES = {
    FieldDescriptor.TYPE_STRING: 2,
    FieldDescriptor.TYPE_BYTES: 2,
    FieldDescriptor.TYPE_MESSAGE: 2,
}


def tag(message: Any, field: str, packed: bool = False) -> bytes:
    """The tag byte(s) of `message.field` (a message's descriptor), length-delimited where
    `packed`."""
    descriptor = message.fields_by_name[field]
    wire_type = 2 if packed else _WIRE_TYPES.get(descriptor.type, 0)
    return varint((descriptor.number << 3) | wire_type)


def varint(value: int) -> bytes:
    """`value` (non-negative) as a protobuf base-128 varint."""
    if value < 0x80:  # ids, names and small tensors: every request has a few
        return _ONE_BYTE[value]
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


_ONE_BYTE = [bytes((value,)) for value in range(0x80)]


def read_varint(data: bytes | memoryview, pos: int) -> tuple[int, int] | None:
    """The varint at `pos` and the position after it; None where `data` ends first."""
    value = shift = 0
    while pos < len(data):
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return value, pos
    return None


def packed_payload(contents: pb.InferTensorContents, field_tag: bytes) -> memoryview | None:
    """The bytes of a packed field when it is all that `contents` holds, else None.

    The message is re-serialised, which always writes repeated scalars packed, whichever
    way the client sent them.
    """
    buf = contents.SerializeToString()
    if not buf.startswith(field_tag):
        return None
    read = read_varint(buf, len(field_tag))
    if read is None:
        return None
    length, pos = read
    if pos + length != len(buf):
        return None  # unknown fields follow: take the slow path
    return memoryview(buf)[pos:]


def packed_contents(field_tag: bytes, payload: bytes) -> pb.InferTensorContents:
    """An InferTensorContents holding one packed field of `payload` bytes."""
    return pb.InferTensorContents.FromString(field_tag + varint(len(payload)) + payload)


_RESPONSE = pb.ModelInferResponse.DESCRIPTOR
_ID_TAG = tag(_RESPONSE, "id")
_INFER_RESPONSE_TAG = tag(pb.ModelStreamInferResponse.DESCRIPTOR, "infer_response")


def id_field(request_id: str) -> bytes:
    """ModelInferResponse.id as wire bytes, to append to a response encoded without one."""
    if not request_id:
        return b""
    encoded = request_id.encode()
    return _ID_TAG + varint(len(encoded)) + encoded


def stream_response(infer_response: bytes) -> bytes:
    """ModelStreamInferResponse(infer_response=...) as wire bytes, from the serialized
    response: its tensors are not copied into a new message and serialized again."""
    return _INFER_RESPONSE_TAG + varint(len(infer_response)) + infer_response


def stream_error(request: Any, exc: BaseException) -> bytes:
    """The in-band answer to one failed request of a stream: the stream stays OK, so the
    status travels as a parameter beside the message, with the request's id (and, for an
    overload, the push-back)."""
    status, message = describe(exc)
    failed = pb.ModelInferResponse(
        model_name=request.model_name, model_version=request.model_version, id=request.id
    )
    failed.parameters[STREAM_STATUS_PARAMETER].int64_param = CODES[status].value[0]
    retry_after_ms = getattr(exc, "retry_after_ms", 0)
    if retry_after_ms:
        failed.parameters[PUSHBACK_KEY].int64_param = retry_after_ms
    return pb.ModelStreamInferResponse(
        error_message=message, infer_response=failed
    ).SerializeToString()
