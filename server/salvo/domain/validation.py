"""Checks a decoded request against its model's config and shapes it for the batcher.

A front end has already checked that each tensor is well formed on its own; this module
checks that the tensors are the ones the model takes, the same way for every transport.
Every error names the tensor and says what was expected and what came.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from salvo.domain.config import ModelConfig, TensorConfig
from salvo.domain.status import InvalidRequest
from salvo.domain.types import InferRequest, Prepared, Tensor


def check_parameters(parameters: Mapping[str, object]) -> None:
    """The parameters the server acts on (`priority`, `timeout`) must be non-negative
    integers; every other one is passed on as it came."""
    for key in ("priority", "timeout"):
        value = parameters.get(key)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool)):
            raise InvalidRequest(f"parameter '{key}' must be an integer, got {value!r}")
        if isinstance(value, int) and value < 0:
            raise InvalidRequest(f"parameter '{key}' must not be negative, got {value}")


def _shape(dims: Sequence[int]) -> str:
    return "[" + ", ".join(str(d) for d in dims) + "]"


def _check_shape(model: ModelConfig, spec: TensorConfig, shape: tuple[int, ...]) -> None:
    expected = ((-1,) if model.max_batch_size > 0 else ()) + spec.dims
    if len(shape) != len(expected) or any(
        e != -1 and e != s for e, s in zip(expected, shape, strict=False)
    ):
        raise InvalidRequest(
            f"input '{spec.name}': expected shape {_shape(expected)}, got {_shape(shape)}"
        )


def validate_request(
    model: ModelConfig,
    version: int,
    request_id: str,
    tensors: Sequence[Tensor],
    requested_outputs: Sequence[str],
    parameters: dict[str, object] | None = None,
) -> Prepared:
    """Match `tensors` to `model`'s inputs and `requested_outputs` to its outputs."""
    if parameters:
        check_parameters(parameters)
    by_name = {t.name: t for t in tensors}
    for tensor in tensors:
        if model.input(tensor.name) is None:
            known = ", ".join(t.name for t in model.inputs)
            raise InvalidRequest(
                f"unknown input '{tensor.name}' for model '{model.name}' (inputs: {known})"
            )
    ordered = []
    rows: int | None = None
    for spec in model.inputs:
        given = by_name.get(spec.name)
        if given is None:
            raise InvalidRequest(f"missing input '{spec.name}' for model '{model.name}'")
        if given.datatype != spec.datatype:
            raise InvalidRequest(
                f"input '{spec.name}': expected datatype {spec.datatype}, got {given.datatype}"
            )
        _check_shape(model, spec, given.shape)
        if model.max_batch_size > 0:
            batch = given.shape[0]
            if batch < 1:
                raise InvalidRequest(f"input '{spec.name}': batch size must be at least 1, got 0")
            if batch > model.max_batch_size:
                raise InvalidRequest(
                    f"input '{spec.name}': batch size {batch} exceeds max_batch_size "
                    f"{model.max_batch_size} of model '{model.name}'"
                )
            if rows is not None and batch != rows:
                raise InvalidRequest(
                    f"input '{spec.name}': batch size {batch} differs from the other inputs' {rows}"
                )
            rows = batch
        ordered.append(given.data)

    names = [o.name for o in model.outputs]
    indices = []
    for name in requested_outputs:
        if name not in names:
            raise InvalidRequest(
                f"unknown output '{name}' for model '{model.name}' (outputs: {', '.join(names)})"
            )
        index = names.index(name)
        if index in indices:
            raise InvalidRequest(f"output '{name}' requested twice")
        indices.append(index)
    outputs = tuple(indices) if indices else tuple(range(len(names)))
    return Prepared(
        model=model.name,
        version=version,
        id=request_id,
        inputs=tuple(ordered),
        outputs=outputs,
        rows=rows or 1,
        parameters=parameters or {},
    )


class DecodedRequest(InferRequest):
    """A request whose tensors are decoded already (by a front end without a faster way,
    or by a caller in the same process)."""

    __slots__ = ("inputs", "outputs", "_parameters")

    def __init__(
        self,
        model: str,
        inputs: Sequence[Tensor],
        outputs: Sequence[str] = (),
        parameters: Mapping[str, object] | None = None,
        *,
        version: str = "",
        id: str = "",
        deadline_ns: int | None = None,
        probe: Any = None,
    ) -> None:
        super().__init__(model, version, id, deadline_ns, probe)
        self.inputs = inputs
        self.outputs = outputs
        self._parameters = parameters or {}

    def prepare(self, config: ModelConfig, version: int) -> Prepared:
        return validate_request(
            config, version, self.id, self.inputs, self.outputs, dict(self._parameters)
        )

    def parameters(self) -> Mapping[str, object]:
        return self._parameters
