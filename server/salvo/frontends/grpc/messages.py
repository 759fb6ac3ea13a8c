"""ModelInferRequest and ModelInferResponse as the data plane's requests and responses.

A message becomes an `InferRequest` that is decoded when it is prepared: the data plane
routes a request before it asks for its tensors, so a message is decoded against the
config of the version that will serve it, through that version's `WirePlan` when it is a
common request, else the general way (`codec.decode_inputs` and `validate_request`),
which also gives the errors. A response is encoded through the same plan.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Any, ClassVar

from salvo.domain.config import ModelConfig
from salvo.domain.types import InferRequest, InferResponse, Prepared
from salvo.domain.validation import validate_request
from salvo.frontends.grpc.codec import MessageParameters, decode_inputs, encode_outputs
from salvo.frontends.grpc.wire import WirePlan
from salvo_client.proto import grpc_service_pb2 as pb

_NO_PARAMETERS: Mapping[str, object] = MappingProxyType({})
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

    __slots__ = ("_message", "_parameters", "_plans", "plan")

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
        self._parameters: Mapping[str, object] | None = None
        self.plan: WirePlan | None = None
        """The plan the request was prepared with, which encodes its response."""

    @property
    def message(self) -> pb.ModelInferRequest:
        return self._message

    def parameters(self) -> Mapping[str, object]:
        if self._parameters is None:
            parameters = self._message.parameters
            self._parameters = MessageParameters(parameters) if parameters else _NO_PARAMETERS
        return self._parameters

    def prepare(self, config: ModelConfig, version: int) -> Prepared:
        message = self._message
        parameters = self.parameters()
        plan = self.plan = self._plans.get(config, version)
        prepared = plan.decode(message, parameters)
        if prepared is not None:
            return prepared
        return validate_request(
            config,
            version,
            message.id,
            decode_inputs(message),
            [o.name for o in message.outputs],
            dict(parameters),
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


def encode_response(
    response: InferResponse, plans: WirePlans, plan: WirePlan | None = None
) -> bytes:
    """The serialized ModelInferResponse: through the version's wire plan (`plan`, the one
    the request was prepared with, where it was), or built as a message where the plan
    does not take the outputs (`encode_outputs` says what is wrong)."""
    if plan is None or plan.config is not response.config or plan.version != response.version:
        plan = plans.get(response.config, response.version)
    encoded = plan.encode(response.id, response.outputs, response.arrays)
    if encoded is not None:
        return encoded
    message = pb.ModelInferResponse(
        model_name=response.model, model_version=str(response.version), id=response.id
    )
    encode_outputs(message, response.tensors())
    return message.SerializeToString()
