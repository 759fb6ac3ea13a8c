"""What flows through Salvo, in numpy and plain Python: no protobuf, no JSON, no torch.

A front end turns what arrived into an `InferRequest` and hands it to the data plane; the
data plane routes it to a model version and asks it to `prepare` itself against that
version's config, which gives a `Prepared` request (checked, arrays in config order) for
the batcher; what comes back is an `InferResponse`, which the front end encodes.

`prepare` is a method rather than a step of the core because the fastest way to decode a
request depends on its transport: the gRPC front end checks its common requests and
decodes them in one step from the message's fields (`frontends.grpc.wire.plan`), and leaves
everything else to `validate_request`, which every transport shares and whose errors
name the field. Requests and responses are slotted classes, not frozen dataclasses: a
frozen dataclass sets each field through `object.__setattr__`, which doubled the cost of
making one, and one of each is made per request. Nothing changes them once made.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from salvo.domain.config import ModelConfig


@dataclass(frozen=True, slots=True)
class Tensor:
    """One decoded input: its v2 name and datatype, and the data as a shaped numpy array."""

    name: str
    datatype: str
    """The v2 datatype name ("FP32", "BYTES"…)."""
    shape: tuple[int, ...]
    data: np.ndarray
    """Shaped like `shape`; dtype from DATATYPES (uint16 bits for BF16, object of bytes for
    BYTES). Inputs decoded from raw bytes are read-only views of those bytes."""


@dataclass(slots=True)
class Prepared:
    """A request checked against its model version's config, ready to queue."""

    model: str
    version: int
    id: str
    inputs: tuple[np.ndarray, ...]
    """One array per model input, in config order."""
    outputs: tuple[int, ...]
    """Indices into the config's outputs that the caller asked for, in the order asked."""
    rows: int
    """Batch rows the request carries (1 for a model without a batch dimension)."""
    parameters: Mapping[str, object] = field(default_factory=dict)
    signature: tuple = field(init=False, repr=False, compare=False)
    """Requests with equal signatures can share a batch: same non-batch shapes and outputs.
    Worked out once: the batch queue compares it for every queued request it looks at."""

    def __post_init__(self) -> None:
        self.signature = (tuple([a.shape[1:] for a in self.inputs]), self.outputs)


class InferRequest:
    """An inference request as a front end hands it to the data plane.

    `model` and `version` are as the caller named them ("" for the version the model's
    traffic policy chooses); `deadline_ns` is a `time.monotonic_ns()` instant or None;
    `probe` (a `salvo.observability.telemetry.Probe`, or None) carries the request's span and
    what the core learns for its telemetry. Subclasses say how the request's tensors are
    decoded (`prepare`); `salvo.domain.validation.DecodedRequest` is the general form.
    """

    __slots__ = ("deadline_ns", "id", "model", "probe", "version")

    transport: ClassVar[str] = "in-process"
    """Where requests of this kind come from ("grpc", "http"…): what the cache's aliases
    and the telemetry tell apart."""

    def __init__(
        self,
        model: str,
        version: str = "",
        id: str = "",
        deadline_ns: int | None = None,
        probe: Any = None,
    ) -> None:
        self.model = model
        self.version = version
        self.id = id
        self.deadline_ns = deadline_ns
        self.probe = probe

    def prepare(self, config: ModelConfig, version: int) -> Prepared:
        """The request checked against `config` (of `version`); raises InvalidRequest
        naming the field that is wrong."""
        raise NotImplementedError

    def parameters(self) -> Mapping[str, object]:
        """The request's parameters; raises InvalidRequest for ones that cannot be read."""
        return {}

    def fingerprint(self) -> bytes | None:
        """Exactly what was asked, as bytes that two requests share only if they ask the same
        (their ids aside), for the response cache's aliases; None where the front end has no
        cheap such form, or the request has parameters (which may bypass the cache)."""
        return None


class InferResponse:
    """The outputs of one request: the arrays of the outputs it asked for, in the order
    asked (`outputs` indexes `config.outputs`). Arrays from the response cache are shared
    by every response it gives: read-only."""

    __slots__ = ("arrays", "config", "id", "model", "outputs", "version")

    def __init__(
        self,
        config: ModelConfig,
        version: int,
        id: str,
        outputs: tuple[int, ...],
        arrays: Sequence[np.ndarray],
    ) -> None:
        self.config = config
        self.model = config.name
        self.version = version
        self.id = id
        self.outputs = outputs
        self.arrays = arrays

    def tensors(self) -> Iterator[tuple[str, str, np.ndarray]]:
        """Each output as (name, datatype, array), in the order asked."""
        specs = self.config.outputs
        for index, array in zip(self.outputs, self.arrays, strict=True):
            spec = specs[index]
            yield spec.name, spec.datatype, array
