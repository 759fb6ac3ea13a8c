"""ModelInferRequest and ModelInferResponse as the data plane's requests and responses.

A message becomes an `InferRequest` that is decoded when it is prepared: the data plane
routes a request before it asks for its tensors, so a message is decoded against the
config of the version that will serve it, through that version's `WirePlan` when it is a
common request, else the general way (`codec.decode_inputs` and `validate_request`),
which also gives the errors. A response is encoded through the same plan.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

from salvo.domain.config import ModelConfig
from salvo.domain.types import InferRequest, InferResponse, Prepared
from salvo.domain.validation import validate_request
from salvo.frontends.grpc.codec import decode_inputs, decode_parameters, encode_outputs
from salvo.frontends.grpc.wire import WirePlan, id_field
from salvo_client.proto import grpc_service_pb2 as pb

_MAX_PLANS = 256
"""Plans kept at most (one per loaded model version); all start again past it."""


class WirePlans:
    """Each model version's `WirePlan`, made the first time a request needs it.

    Kept by the config object and version number: a reload makes a new config object, so a
    reloaded model gets a new plan, and the old one goes when the plans start again.
    """

    def __init__(self) -> None:
        self._plans: dict[tuple[int, int], WirePlan] = {}

    def get(self, config: ModelConfig, version: int) -> WirePlan:
        plan = self._plans.get((id(config), version))
        if plan is None or plan.config is not config:
            if len(self._plans) >= _MAX_PLANS:
                self._plans.clear()
            plan = self._plans[(id(config), version)] = WirePlan(config, version)
        return plan


class MessageRequest(InferRequest):
    """One ModelInferRequest message, for the data plane."""

    __slots__ = ("_message", "_parameters", "_plans")

    transport: ClassVar[str] = "grpc"

    def __init__(
        self,
        message: pb.ModelInferRequest,
        plans: WirePlans,
        deadline_ns: int | None = None,
        probe: Any = None,
    ) -> None:
        super().__init__(message.model_name, message.model_version, message.id, deadline_ns, probe)
        self._message = message
        self._plans = plans
        self._parameters: dict[str, object] | None = None

    @property
    def message(self) -> pb.ModelInferRequest:
        return self._message

    def parameters(self) -> Mapping[str, object]:
        if self._parameters is None:
            self._parameters = decode_parameters(self._message)
        return self._parameters

    def prepare(self, config: ModelConfig, version: int) -> Prepared:
        message = self._message
        parameters = self._parameters
        if parameters is None:
            parameters = self._parameters = decode_parameters(message)
        prepared = self._plans.get(config, version).decode(message, parameters)
        if prepared is not None:
            return prepared
        return validate_request(
            config,
            version,
            message.id,
            decode_inputs(message),
            [o.name for o in message.outputs],
            parameters,
        )

    def fingerprint(self) -> bytes | None:
        """The message serialized deterministically without its id (which is not part of
        what it asks); None for a message with parameters."""
        message = self._message
        if message.parameters:
            return None
        request_id = message.id
        if not request_id:
            return message.SerializeToString(deterministic=True)
        message.ClearField("id")
        try:
            return message.SerializeToString(deterministic=True)
        finally:
            message.id = request_id


def encode_response(response: InferResponse, plans: WirePlans) -> bytes:
    """The serialized ModelInferResponse: through the version's wire plan, or built as a
    message where the plan does not take the outputs (`encode_outputs` says what is wrong).

    A response the cache holds is encoded once without the caller's id and kept there;
    each caller's id is appended to those bytes.
    """
    encodings = response.encodings
    if encodings is None:
        return _encoded(response, plans, response.id)
    kept = encodings.get(MessageRequest.transport)
    if kept is None:
        kept = _encoded(response, plans, "")
        encodings.put(MessageRequest.transport, kept)
    return kept + id_field(response.id)


def _encoded(response: InferResponse, plans: WirePlans, request_id: str) -> bytes:
    encoded = plans.get(response.config, response.version).encode(
        request_id, response.outputs, response.arrays
    )
    if encoded is not None:
        return encoded
    message = pb.ModelInferResponse(
        model_name=response.model, model_version=str(response.version), id=request_id
    )
    encode_outputs(message, response.tensors())
    return message.SerializeToString()
