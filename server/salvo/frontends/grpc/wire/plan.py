"""A model version's common request and response, each in one step.

Almost every request a model gets looks the same: each input raw, in the config's order,
with the config's names, datatypes and dims; that is what perf_analyzer, tritonclient and
Salvo's own client send (perf_analyzer also names the outputs it wants and adds a
parameter). A plan works out once per model version what such a request must look like and
turns one into a `Prepared` request with a handful of comparisons and one `np.frombuffer`
an input (the general path decodes into Tensors, then validates: about twice the time).
It answers with the response's wire bytes from a prefix serialized once (model name,
version, each output's description per shape) and the outputs' raw bytes. Anything else,
well formed or not, is left to the general path (`codec`, `validate_request`), which gives
the same result for what the plan takes and the errors for what is wrong: `decode` and
`encode` return None rather than raise. tests/unit/test_wire.py holds the plan to the
general path's results, byte for byte.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from salvo.domain.config import ModelConfig
from salvo.domain.status import InvalidRequest
from salvo.domain.tensors import wire_dtype
from salvo.domain.types import Prepared
from salvo.domain.validation import check_parameters
from salvo.frontends.grpc.wire import id_field, tag, varint
from salvo_client.proto import grpc_service_pb2 as pb

_OUTPUT_TAG = tag(pb.ModelInferResponse.DESCRIPTOR, "outputs")
_RAW_TAG = tag(pb.ModelInferResponse.DESCRIPTOR, "raw_output_contents")

_MAX_DESCRIBED = 256
"""Output descriptions kept per plan: one per output and batch size for fixed dims."""

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
        self.config = config
        self.version = version
        self._model = config.name
        self._version = version
        self._max_batch_size = config.max_batch_size
        self._inputs = _common_inputs(config)
        self._output_index = {spec.name: i for i, spec in enumerate(config.outputs)}
        self._one_output = {name: (i,) for name, i in self._output_index.items()}
        self._all_outputs = tuple(range(len(config.outputs)))
        self._outputs = tuple(
            (spec.name, spec.datatype, _raw_dtype(spec.datatype)) for spec in config.outputs
        )
        self._prefix = pb.ModelInferResponse(
            model_name=config.name, model_version=str(version)
        ).SerializeToString()
        self._described: dict[tuple[int, tuple[int, ...]], bytes] = {}

    def decode(
        self, request: pb.ModelInferRequest, parameters: Mapping[str, object]
    ) -> Prepared | None:
        """`request` (whose parameters decoded to `parameters`) prepared, if it is a common
        one; None leaves it to the general path."""
        specs = self._inputs
        if specs is None:
            return None
        if parameters:  # perf_analyzer's requests carry one it does not act on
            try:
                check_parameters(parameters)
            except InvalidRequest:
                return None
        raw_contents = request.raw_input_contents
        tensors = request.inputs
        count = len(specs)
        if len(raw_contents) != count or len(tensors) != count:
            return None
        asked = request.outputs
        outputs = self._outputs_asked(asked) if asked else self._all_outputs
        if outputs is None:
            return None
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
            # A read-only view of the request's bytes (they are immutable), as frombuffer
            # gives, in one call.
            arrays.append(np.ndarray(shape, dtype, raw))
        return Prepared(
            model=self._model,
            version=self._version,
            id=request.id,
            inputs=tuple(arrays),
            outputs=outputs,
            rows=rows or 1,
            parameters=parameters,
        )

    def _outputs_asked(self, asked: Any) -> tuple[int, ...] | None:
        """The indices of the outputs a request names, in its order; None for a name the
        model has not or a name asked twice (the general path says which)."""
        if len(asked) == 1:  # the usual case: perf_analyzer names the one output
            return self._one_output.get(asked[0].name)
        indices = tuple([self._output_index.get(o.name, -1) for o in asked])
        if -1 in indices or len(set(indices)) != len(indices):
            return None
        return indices

    def encode(
        self, request_id: str, outputs: Sequence[int], arrays: Sequence[np.ndarray]
    ) -> bytes | None:
        """The serialized ModelInferResponse for `arrays` (the outputs at `outputs`), as
        `codec.encode_outputs` would make it; None for what the plan does not take."""
        parts: list[Any] = [self._prefix]  # bytes, and arrays joined as buffers
        if request_id:
            parts.append(id_field(request_id))
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
                described = _OUTPUT_TAG + varint(len(tensor)) + tensor
                if len(self._described) < _MAX_DESCRIBED:
                    self._described[key] = described
            parts.append(described)
            raws.append(_RAW_TAG + varint(array.nbytes))
            # A C-contiguous array joins as it is (bytes.join takes any simple buffer).
            raws.append(array if array.flags.c_contiguous else array.tobytes())
        parts.extend(raws)
        return b"".join(parts)
