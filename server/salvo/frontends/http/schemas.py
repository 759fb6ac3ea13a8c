"""The shapes of the v2 REST API's requests and answers, for its OpenAPI document.

The routes never parse through these models (`codec` reads bodies with orjson, and
checks each field itself, naming it in its errors); they describe what the codec accepts
and what `documents` and `codec.encode_response` write, so that the OpenAPI document is a
contract that the API tests hold the server to, response by response.

Unknown fields are allowed in requests (the v2 protocol lets clients send extensions the
server ignores); every field the server reads is typed here as the codec checks it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt
from typing_extensions import TypeAliasType

from salvo.domain.datatypes import DATATYPES

if TYPE_CHECKING:
    Datatype = str
else:
    Datatype = Literal[tuple(DATATYPES)]

Parameter = StrictBool | StrictInt | float | str
"""A parameter's value: a string, a number or a boolean."""

TensorData = TypeAliasType(  # type: ignore[misc]
    "TensorData", "list[StrictBool | float | str | TensorData]"
)
"""A tensor's values, row-major: flat, or nested as its shape."""


class _Shape(BaseModel):
    model_config = ConfigDict(extra="allow")


class RequestInput(_Shape):
    name: str
    shape: list[StrictInt]
    datatype: Datatype
    parameters: dict[str, Parameter] | None = Field(
        None,
        description="`binary_data_size`: the input's bytes follow the JSON header "
        "(Triton's binary tensor data extension) instead of `data`.",
    )
    data: TensorData | None = Field(None, description="The values, unless binary_data_size.")


class RequestOutput(_Shape):
    name: str
    parameters: dict[str, Parameter] | None = Field(
        None, description="`binary_data`: true answers this output as raw bytes."
    )


class InferenceRequest(_Shape):
    """An inference request (the v2 protocol's `$inference_request`)."""

    id: str | None = None
    parameters: dict[str, Parameter] | None = Field(
        None,
        description="`priority`, `timeout` (µs in the queue), `binary_data_output`, "
        "`cache` (false skips the response cache); others reach the model's request.",
    )
    inputs: list[RequestInput]
    outputs: list[RequestOutput] | None = Field(
        None, description="The outputs to answer with; all of them when absent."
    )


class ResponseOutput(BaseModel):
    name: str
    shape: list[int]
    datatype: Datatype
    parameters: dict[str, Parameter] | None = None
    data: list[StrictBool | float | str] | None = Field(
        None, description="The values, flat and row-major, unless binary_data_size."
    )


class InferenceResponse(BaseModel):
    """An inference's answer (the v2 protocol's `$inference_response`)."""

    model_name: str
    model_version: str
    id: str | None = None
    parameters: dict[str, Parameter] | None = None
    outputs: list[ResponseOutput]


class Error(BaseModel):
    """Every failure's answer: what was wrong, naming the field."""

    error: str = Field(min_length=1)


class ServerMetadata(BaseModel):
    name: str
    version: str
    extensions: list[str]


class MetadataTensor(BaseModel):
    name: str
    datatype: Datatype
    shape: list[int] = Field(description="-1 where any size goes (the batch dimension).")


class ModelMetadata(BaseModel):
    name: str
    versions: list[str]
    platform: str
    inputs: list[MetadataTensor]
    outputs: list[MetadataTensor]


class Readiness(BaseModel):
    ready: bool


class ConfigTensor(BaseModel):
    name: str
    data_type: str = Field(description="Triton's enum name, e.g. TYPE_FP32.")
    dims: list[int]


class InstanceGroup(BaseModel):
    name: str
    count: int
    kind: Literal["KIND_CPU", "KIND_GPU"]


class ModelConfig(BaseModel):
    """The model's configuration in Triton's model-config JSON (what perf_analyzer and
    Triton's clients read)."""

    model_config = ConfigDict(extra="allow")

    name: str
    platform: str
    backend: str
    max_batch_size: int
    input: list[ConfigTensor]
    output: list[ConfigTensor]
    instance_group: list[InstanceGroup]
    version_policy: dict[str, Any]
    dynamic_batching: dict[str, Any] | None = None
    response_cache: dict[str, bool] | None = None
    parameters: dict[str, dict[str, str]] | None = None


class Duration(BaseModel):
    count: int
    ns: int


class InferenceStats(BaseModel):
    success: Duration
    fail: Duration
    queue: Duration
    compute_input: Duration
    compute_infer: Duration
    compute_output: Duration
    cache_hit: Duration
    cache_miss: Duration


class BatchStats(BaseModel):
    batch_size: int
    compute_input: Duration
    compute_infer: Duration
    compute_output: Duration


class ModelStats(BaseModel):
    name: str
    version: str
    last_inference: int = Field(description="Milliseconds since the epoch.")
    inference_count: int
    execution_count: int
    inference_stats: InferenceStats
    batch_stats: list[BatchStats]


class Statistics(BaseModel):
    """Statistics per model version, with Triton's fields and meaning."""

    model_stats: list[ModelStats]


class IndexRequest(_Shape):
    ready: StrictBool | None = Field(None, description="true lists only the models serving.")


class IndexEntry(BaseModel):
    name: str
    version: str | None = None
    state: str
    reason: str


class Empty(BaseModel):
    """An empty object: the change was made."""


class Shadow(BaseModel):
    model_config = ConfigDict(extra="forbid")

    version: StrictInt = Field(ge=1)
    share: float = Field(1.0, ge=0, le=1)


class ShadowComparison(BaseModel):
    version: int = Field(description="The version that answered.")
    shadow_version: int
    compared: int
    agreement: float | None
    mean_abs_difference: float | None
    failed: int = Field(description="Copies dropped (a full queue) or failed.")


class TrafficRequest(_Shape):
    """A traffic policy to set."""

    model_config = ConfigDict(extra="forbid")

    weights: dict[str, Annotated[float, Field(ge=0)]] = Field(
        default_factory=dict,
        description="Version number → weight; each serving version's share is its weight "
        "over the sum. Empty: the latest version takes everything.",
    )
    sticky_parameter: str | None = Field(
        None,
        min_length=1,
        description="A request parameter whose value keeps a caller on one version.",
    )
    shadow: Shadow | None = Field(
        None, description="A candidate version that a share of the requests also runs on."
    )


class Traffic(BaseModel):
    """The traffic policy in force and where it comes from."""

    model: str
    source: Literal["admin", "config", "default"]
    weights: dict[str, float]
    sticky_parameter: str | None
    shadow: Shadow | None
    serving: list[int]
    shadow_comparisons: list[ShadowComparison]
