"""The v2 messages both clients exchange: ModelInferRequest building, the StreamResult of
each ModelStreamInfer answer, and the request ids a client generates."""

from __future__ import annotations

import itertools
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from salvo_client.errors import STREAM_STATUS_PARAMETER, SalvoClientError, from_stream_error
from salvo_client.proto import grpc_service_pb2 as pb
from salvo_client.tensors import decode_outputs, encode_tensor

__all__ = ["Param", "RequestIds", "StreamResult", "build_request", "result_of", "version_str"]

Param = bool | int | float | str
"""A request parameter's value: InferParameter's bool, int64, double or string."""


def _set_param(target: pb.InferParameter, key: str, value: Param) -> None:
    if isinstance(value, bool):  # before int: bool is an int
        target.bool_param = value
    elif isinstance(value, int):
        target.int64_param = value
    elif isinstance(value, float):
        target.double_param = value
    elif isinstance(value, str):
        target.string_param = value
    else:
        raise TypeError(
            f"parameter '{key}': expected bool, int, float or str, got {type(value).__name__}"
        )


def build_request(
    model: str,
    inputs: Mapping[str, np.ndarray],
    outputs: Sequence[str] | None = None,
    version: str | int | None = None,
    priority: int | None = None,
    parameters: Mapping[str, Param] | None = None,
    request_id: str | None = None,
) -> pb.ModelInferRequest:
    """A ModelInferRequest with every input in `raw_input_contents`.

    `outputs` names the outputs wanted (None: all); `priority` becomes the `priority`
    parameter, which must then not also be in `parameters`.
    """
    request = pb.ModelInferRequest(
        model_name=model,
        model_version="" if version is None else str(version),
        id=request_id or "",
    )
    params = dict(parameters or {})
    if priority is not None:
        if "priority" in params:
            raise ValueError("priority given both as an argument and in parameters")
        params["priority"] = int(priority)
    for key, value in params.items():
        _set_param(request.parameters[key], key, value)
    for name, array in inputs.items():
        datatype, raw = encode_tensor(name, array)
        request.inputs.add(name=name, datatype=datatype, shape=array.shape)
        request.raw_input_contents.append(raw)
    for name in [outputs] if isinstance(outputs, str) else outputs or ():
        request.outputs.add(name=name)
    return request


def _param_value(p: pb.InferParameter) -> object:
    which = p.WhichOneof("parameter_choice")
    return getattr(p, which) if which else None


@dataclass(frozen=True, slots=True)
class StreamResult:
    """One answer from ModelStreamInfer: the outputs of the request sent with `request_id`,
    or the in-band `error` that request got (the stream itself goes on)."""

    request_id: str
    model_name: str
    model_version: str
    outputs: dict[str, np.ndarray] = field(default_factory=dict)
    """Empty when `error` is set."""
    error: SalvoClientError | None = None

    @property
    def ok(self) -> bool:
        """True when the request succeeded."""
        return self.error is None

    def unwrap(self) -> dict[str, np.ndarray]:
        """The outputs, or raise the request's error."""
        if self.error is not None:
            raise self.error
        return self.outputs


def result_of(response: pb.ModelStreamInferResponse) -> StreamResult:
    """The StreamResult of one ModelStreamInfer answer."""
    inner = response.infer_response
    if response.error_message:
        declared = inner.parameters.get(STREAM_STATUS_PARAMETER)
        error = from_stream_error(
            response.error_message,
            inner.id,
            None if declared is None else _param_value(declared),
        )
        return StreamResult(inner.id, inner.model_name, inner.model_version, {}, error)
    try:
        outputs = decode_outputs(inner)
    except SalvoClientError as exc:
        exc.request_id = inner.id
        return StreamResult(inner.id, inner.model_name, inner.model_version, {}, exc)
    return StreamResult(inner.id, inner.model_name, inner.model_version, outputs)


class RequestIds:
    """Unique request ids for one client: a random prefix and a counter.

    The prefix keeps ids of different clients apart in the server's logs; `next` is safe
    from several threads (itertools.count is atomic under the GIL).
    """

    def __init__(self) -> None:
        self.prefix = secrets.token_hex(4)
        self._counter = itertools.count(1)

    def next(self) -> str:
        """A new id, never returned before by this generator."""
        return f"{self.prefix}-{next(self._counter)}"


def version_str(version: str | int | None) -> str:
    """A model version as the protocol carries it ("" for the server's choice)."""
    return "" if version is None else str(version)
