"""The common inference request and response of one model version, in one step each.

Almost every request a model gets looks the same: each input raw, in the config's order,
with the config's names, datatypes and dims. That is what perf_analyzer, tritonclient and
Salvo's own client send; perf_analyzer also names the output it wants and adds a parameter
(`triton_enable_empty_final_response`), and parameters are decoded as the general path
decodes them. `WirePlan` works out once, per model version, what such a request must look
like, and turns one into an `InferRequest` with a handful of comparisons and one
`np.frombuffer` an input. It answers with the response's wire bytes from a prefix
serialized once (model name, version, each output's description per shape) and the
outputs' raw bytes.

Anything else, well formed or not, is left to the general path (`codec.decode_inputs`,
`validation.validate_request`, `codec.encode_outputs`), which gives the same result for
what the plan takes and the errors for what is wrong: `decode` and `encode` return None
rather than raise. tests/unit/test_wire.py holds the plan to the general path's results,
byte for byte.

Measured (benchmarks/RESULTS.md, "Wire plan and held arrivals: reading"): inside a busy
server the general path took `mlp` 33 to 37 µs a request to decode and validate, the plan
19 to 20 µs.

A client sends the same request over and over with new tensor bytes: every field before
`raw_input_contents` is byte for byte the last request's, bar the id. `RequestTemplates`
is the deserializer of ModelInfer and ModelStreamInfer: once the plan has taken a request,
the request's bytes become a template, and a later request whose bytes match it (the same
model name, version and everything up to the tensor bytes, the same lengths; any id)
skips both the protobuf parse and the plan: a `Matched`, whose `validated` makes the
InferRequest from views of its bytes (so, unlike a parsed request's, its arrays need not be
aligned: torch takes them as they are). Anything else is parsed as before. For perf_analyzer's
`mlp` request that took 3.8 µs instead of 9.9 (parse and plan, timeit), and Salvo's CPU a
unary call went from 321 to 294 µs (benchmarks/RESULTS.md, "A/B: 7a87fb6 against 9cd0a88").
"""

from __future__ import annotations

from collections.abc import Sequence
from types import MappingProxyType
from typing import Any

import numpy as np
from google.protobuf.message import DecodeError
from google.protobuf.unknown_fields import UnknownFieldSet

from salvo_client.proto import grpc_service_pb2 as pb

from .codec import decode_parameters, varint, wire_dtype
from .config import ModelConfig
from .errors import InvalidRequest
from .parsing import Undecodable
from .validation import InferRequest

_ID_TAG = b"\x1a"  # ModelInferResponse.id: field 3, length-delimited
_OUTPUT_TAG = b"\x2a"  # ModelInferResponse.outputs: field 5
_RAW_TAG = b"\x32"  # ModelInferResponse.raw_output_contents: field 6
_MAX_DESCRIBED = 256
"""Output descriptions kept per plan: one per output and batch size for fixed dims."""


def _length_delimited(tag: bytes, size: int) -> bytes:
    """A field's tag and its length; the payload follows."""
    return tag + varint(size)


_Input = tuple[str, str, np.dtype, tuple[int, ...], int]
"""An input as the plan checks it: name, datatype, dtype, dims, bytes a row."""


def _common_inputs(config: ModelConfig) -> tuple[_Input, ...] | None:
    """The config's inputs as the plan checks them; None when it takes no request: a
    BYTES input must be split, a BOOL one checked byte by byte and a variable dim matched
    against -1, which is the general path's work, not worth a second copy here."""
    inputs = []
    for spec in config.inputs:
        dtype = wire_dtype(spec.datatype)
        if dtype.kind in "Ob" or -1 in spec.dims:
            return None
        row_bytes = dtype.itemsize * int(np.prod(spec.dims, dtype=np.int64))
        inputs.append((spec.name, spec.datatype, dtype, spec.dims, row_bytes))
    return tuple(inputs)


def _raw_dtype(datatype: str) -> np.dtype | None:
    """The dtype whose bytes are an output's raw contents as they are; None where the
    general path converts them (BYTES are length-prefixed, BF16 arrays are viewed as bits)."""
    dtype = wire_dtype(datatype)
    return None if dtype.kind == "O" or datatype == "BF16" else dtype


class WirePlan:
    """What one model version's common requests look like, and its responses' prefix."""

    def __init__(self, config: ModelConfig, version: int) -> None:
        self._model = config.name
        self._version = version
        self._max_batch_size = config.max_batch_size
        self._inputs = _common_inputs(config)
        self._output_index = {spec.name: i for i, spec in enumerate(config.outputs)}
        self._all_outputs = tuple(range(len(config.outputs)))
        self._outputs = tuple(
            (spec.name, spec.datatype, _raw_dtype(spec.datatype)) for spec in config.outputs
        )
        self._prefix = pb.ModelInferResponse(
            model_name=config.name, model_version=str(version)
        ).SerializeToString()
        self._described: dict[tuple[int, tuple[int, ...]], bytes] = {}

    def decode(self, request: pb.ModelInferRequest) -> InferRequest | None:
        """`request` validated, if it is a common one; None leaves it to the general path."""
        specs = self._inputs
        if specs is None:
            return None
        parameters: dict[str, object] = {}
        if request.parameters:  # perf_analyzer's requests carry one it does not act on
            try:
                parameters = decode_parameters(request)
            except InvalidRequest:
                return None
        raw_contents = request.raw_input_contents
        tensors = request.inputs
        if len(raw_contents) != len(specs) or len(tensors) != len(specs):
            return None
        outputs = self._all_outputs
        if request.outputs:
            asked = tuple(self._output_index.get(o.name, -1) for o in request.outputs)
            if -1 in asked or len(set(asked)) != len(asked):
                return None
            outputs = asked
        batching = self._max_batch_size > 0
        rows = 0
        arrays = []
        for (name, datatype, dtype, dims, row_bytes), tensor, raw in zip(
            specs, tensors, raw_contents, strict=True
        ):
            if tensor.name != name or tensor.datatype != datatype or tensor.HasField("contents"):
                return None
            shape = tuple(tensor.shape)
            if batching:
                if shape[1:] != dims or len(shape) != len(dims) + 1:
                    return None
                batch = shape[0]
                if batch < 1 or batch > self._max_batch_size or (rows and batch != rows):
                    return None
                rows = batch
                if len(raw) != batch * row_bytes:
                    return None
            elif shape != dims or len(raw) != row_bytes:
                return None
            arrays.append(np.frombuffer(raw, dtype=dtype).reshape(shape))
        return InferRequest(
            model=self._model,
            version=self._version,
            id=request.id,
            inputs=tuple(arrays),
            outputs=outputs,
            rows=rows or 1,
            parameters=parameters,
        )

    def encode(
        self, request_id: str, outputs: Sequence[int], arrays: Sequence[np.ndarray]
    ) -> bytes | None:
        """The serialized ModelInferResponse for `arrays` (the outputs at `outputs`), as
        `codec.encode_outputs` would make it; None for what the plan does not take."""
        parts: list[Any] = [self._prefix]  # bytes, and arrays joined as buffers
        if request_id:
            encoded = request_id.encode()
            parts.append(_length_delimited(_ID_TAG, len(encoded)))
            parts.append(encoded)
        raws: list[Any] = []
        for index, array in zip(outputs, arrays, strict=True):
            name, datatype, dtype = self._outputs[index]
            if dtype is None or array.dtype != dtype:
                return None
            key = (index, array.shape)
            described = self._described.get(key)
            if described is None:
                tensor = pb.ModelInferResponse.InferOutputTensor(
                    name=name, datatype=datatype, shape=array.shape
                ).SerializeToString()
                described = _length_delimited(_OUTPUT_TAG, len(tensor)) + tensor
                if len(self._described) < _MAX_DESCRIBED:
                    self._described[key] = described
            parts.append(described)
            raws.append(_length_delimited(_RAW_TAG, array.nbytes))
            # A C-contiguous array joins as it is (bytes.join takes any simple buffer).
            raws.append(array if array.flags.c_contiguous else array.tobytes())
        parts.extend(raws)
        return b"".join(parts)


# ModelInferRequest's fields as a serializer lays them out, in field order: model_name (1),
# model_version (2), id (3), then parameters, inputs and outputs, then raw_input_contents.
_NAME_TAG, _VERSION_TAG, _REQUEST_ID_TAG = 0x0A, 0x12, 0x1A
_RAW_INPUT_TAG = b"\x3a"  # raw_input_contents: field 7, length-delimited
_MAX_TEMPLATES = 256
_MAX_LEARNT_BYTES = 1 << 20
"""Larger requests are not learnt: the parse is a sliver of their cost, and the last one
parsed would be kept until the next."""
_MAX_REFUSALS = 8
"""Times a kind of request (its key) may fail to become a template before `learn` stops
trying it: each try serializes the whole message, and some clients' bytes never match
what serializing gives (a map of several parameters comes out in hash order)."""


def _header(data: bytes) -> tuple[int, str, int] | None:
    """Where the model name and version end, the id, and where the rest starts; None for
    bytes not laid out so (a name, version or id of 128 bytes or more included)."""
    size = len(data)
    if size < 2 or data[0] != _NAME_TAG or data[1] > 0x7F:
        return None
    end = 2 + data[1]
    if end + 1 < size and data[end] == _VERSION_TAG:
        if data[end + 1] > 0x7F:
            return None
        end += 2 + data[end + 1]
    start = end
    request_id = ""
    if start + 1 < size and data[start] == _REQUEST_ID_TAG:
        if data[start + 1] > 0x7F:
            return None
        start += 2 + data[start + 1]
        try:
            request_id = data[end + 2 : start].decode()
        except UnicodeDecodeError:  # the parse refuses it, with its own message
            return None
    return end, request_id, start


class _Template:
    """A request the plan took, as bytes: what follows the id up to the first input's bytes
    (`body`), where each input's bytes lie after the id and the header of each input but
    the first (`headers`), and what the plan made of it, bar its tensors (which it does
    not keep alive)."""

    __slots__ = (
        "plan", "model_name", "model_version", "body", "headers", "inputs",
        "model", "version", "outputs", "rows", "parameters",
    )  # fmt: skip

    def __init__(
        self,
        plan: WirePlan,
        message: pb.ModelInferRequest,
        body: bytes,
        headers: tuple[tuple[int, bytes], ...],
        inputs: tuple[tuple[int, np.dtype, int, tuple[int, ...]], ...],
        request: InferRequest,
    ) -> None:
        self.plan = plan
        self.model_name = message.model_name
        self.model_version = message.model_version
        self.body = body
        self.headers = headers
        self.inputs = inputs
        self.model = request.model
        self.version = request.version
        self.outputs = request.outputs
        self.rows = request.rows
        self.parameters = MappingProxyType(request.parameters)  # shared: read-only


class Matched:
    """A ModelInferRequest known by its bytes to be a template's, bar its id and tensors.

    It answers `model_name`, `model_version` and `id` as the message would; `validated` is
    what the plan would make of the message, `message` the message itself.
    """

    __slots__ = ("model_name", "model_version", "id", "_template", "_data", "_start")

    def __init__(self, template: _Template, data: bytes, request_id: str, start: int) -> None:
        self.model_name = template.model_name
        self.model_version = template.model_version
        self.id = request_id
        self._template = template
        self._data = data
        self._start = start

    def validated(self, plan: WirePlan) -> InferRequest | None:
        """The request, if `plan` is the one its template was learnt with (None once the
        model has been replaced: the caller parses `message` instead)."""
        template = self._template
        if template.plan is not plan:
            return None
        data, start = self._data, self._start
        return InferRequest(
            model=template.model,
            version=template.version,
            id=self.id,
            inputs=tuple(
                [
                    np.frombuffer(data, dtype, count, start + offset).reshape(shape)
                    for offset, dtype, count, shape in template.inputs
                ]
            ),
            outputs=template.outputs,
            rows=template.rows,
            parameters=template.parameters,
        )

    def message(self) -> pb.ModelInferRequest:
        """The request parsed (it parses: its bytes differ from its template's only in the
        tensors' bytes and a valid id)."""
        return pb.ModelInferRequest.FromString(self._data)


class RequestTemplates:
    """The deserializer of ModelInfer and ModelStreamInfer: a `Matched` for bytes that
    match a template, else the parsed message (an `Undecodable` where it does not parse).

    `learn` makes a template of the last parsed request (of at most `_MAX_LEARNT_BYTES`),
    once the plan has taken it. At most `_MAX_TEMPLATES` are kept (they start again from
    none when full), keyed by the model name and version bytes and the length after the id.
    """

    def __init__(self) -> None:
        self._templates: dict[tuple[bytes, int], _Template] = {}
        self._refusals: dict[tuple[bytes, int], int] = {}
        self._last: tuple[pb.ModelInferRequest, bytes] | None = None

    def __call__(self, data: bytes) -> Matched | pb.ModelInferRequest | Undecodable:
        header = _header(data)
        if header is not None:
            end, request_id, start = header
            template = self._templates.get((data[:end], len(data) - start))
            if template is not None and data.startswith(template.body, start):
                for offset, expected in template.headers:
                    if not data.startswith(expected, start + offset):
                        break
                else:
                    return Matched(template, data, request_id, start)
        try:
            message = pb.ModelInferRequest.FromString(data)
        except DecodeError as exc:
            return Undecodable(f"malformed request message: {exc}")
        self._last = (message, data) if len(data) <= _MAX_LEARNT_BYTES else None
        return message

    def parse(self, matched: Matched) -> pb.ModelInferRequest:
        """`matched`'s message, for a template made with a plan since replaced: the last one
        parsed, so that `learn` can replace the template."""
        message = matched.message()
        self._last = (message, matched._data)
        return message

    def learn(self, message: pb.ModelInferRequest, request: InferRequest, plan: WirePlan) -> None:
        """A template of `message`, if it is the last one parsed, which `plan` made into
        `request`. Only where its bytes are what serializing the message gives (so every
        field lies where a template expects it: the tensors' bytes last, in order)."""
        last = self._last
        if last is None or last[0] is not message:
            return
        self._last = None
        data = last[1]
        header = _header(data)
        raws = message.raw_input_contents
        # Unknown fields are written back after the tensors: bytes with them at the end
        # would serialize to themselves, yet put the tensors where a template does not.
        if header is None or not raws or len(UnknownFieldSet(message)):
            return
        end, _, start = header
        key = (data[:end], len(data) - start)
        refusals = self._refusals.get(key, 0)
        if refusals >= _MAX_REFUSALS:
            return
        tags = [_RAW_INPUT_TAG + varint(len(raw)) for raw in raws]
        first = len(data) - sum(len(tag) + len(raw) for tag, raw in zip(tags, raws, strict=True))
        offset = first - start
        headers: list[tuple[int, bytes]] = []
        inputs: list[tuple[int, np.dtype, int, tuple[int, ...]]] = []
        for tag, raw, array in zip(tags, raws, request.inputs, strict=True):
            if not data.startswith(tag, start + offset):
                break
            if inputs:
                headers.append((offset, tag))
            offset += len(tag)
            inputs.append((offset, array.dtype, array.size, array.shape))
            offset += len(raw)
        if len(inputs) < len(raws) or message.SerializeToString() != data:
            self._refuse(key, refusals)
            return
        if len(self._templates) >= _MAX_TEMPLATES:
            self._templates.clear()
        replaced = self._templates.get(key)
        if replaced is not None and replaced.plan is plan:
            # Another request of the same kind, not a reloaded model's: a client that
            # changes what it sends (a parameter's value) would be learnt every time.
            self._refuse(key, refusals)
        body = data[start : first + len(tags[0])]
        self._templates[key] = _Template(
            plan, message, body, tuple(headers), tuple(inputs), request
        )

    def _refuse(self, key: tuple[bytes, int], refusals: int) -> None:
        """Count one more refusal of `key` (at most `_MAX_TEMPLATES` keys are counted)."""
        if len(self._refusals) >= _MAX_TEMPLATES and key not in self._refusals:
            self._refusals.clear()
        self._refusals[key] = refusals + 1
