"""ModelInferRequest and ModelInferResponse as the data plane's requests and responses.

A message becomes an `InferRequest` that is decoded when it is prepared: the data plane
routes a request before it asks for its tensors, so a message is decoded against the
config of the version that will serve it: from its bytes where they match one of the
connection's templates (`wire.templates`), through that version's `WirePlan` when it is a
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
from salvo.frontends.grpc.wire.plan import WirePlan
from salvo.frontends.grpc.wire.templates import Matched, RequestTemplates
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
    """One ModelInferRequest, for the data plane: a parsed message, or a template's bytes
    (`wire.templates.Matched`). Given the connection's `templates` and the bytes a message was
    parsed from, a message the plan takes becomes a template."""

    __slots__ = ("_data", "_matched", "_message", "_parameters", "_plans", "_templates", "plan")

    transport: ClassVar[str] = "grpc"

    def __init__(
        self,
        message: pb.ModelInferRequest | Matched,
        plans: WirePlans,
        deadline_ns: int | None = None,
        probe: Any = None,
        templates: RequestTemplates | None = None,
        data: bytes = b"",
    ) -> None:
        super().__init__(message.model_name, message.model_version, message.id, deadline_ns, probe)
        if isinstance(message, Matched):
            self._matched: Matched | None = message
            self._message: pb.ModelInferRequest | None = None
            self._parameters: Mapping[str, object] | None = message.template.parameters
        else:
            self._matched = None
            self._message = message
            self._parameters = None
        self._plans = plans
        self._templates = templates
        self._data = data
        self.plan: WirePlan | None = None
        """The plan the request was prepared with, which encodes its response."""

    @property
    def message(self) -> pb.ModelInferRequest:
        message = self._message
        if message is None:
            assert self._matched is not None
            message = self._message = self._matched.message()
        return message

    def parameters(self) -> Mapping[str, object]:
        if self._parameters is None:
            parameters = self.message.parameters
            self._parameters = MessageParameters(parameters) if parameters else _NO_PARAMETERS
        return self._parameters

    def prepare(self, config: ModelConfig, version: int) -> Prepared:
        plan = self.plan = self._plans.get(config, version)
        matched = self._matched
        if matched is not None:
            prepared = matched.prepared(plan)
            if prepared is not None:
                return prepared
            # A template of a version since replaced: parsed, and learnt anew below.
            self._message = message = matched.message()
            self._matched = None
            self._data = matched.data
        else:
            message = self.message
        parameters = self.parameters()
        prepared = plan.decode(message, parameters)
        if prepared is not None:
            if self._templates is not None:
                self._templates.learn(message, self._data, prepared, plan)
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
        if self._matched is not None:
            return self._matched.fingerprint()
        message = self.message
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
