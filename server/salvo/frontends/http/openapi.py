"""The REST API's OpenAPI document: each route's request and answers (`schemas`), every
status it can answer with, and an example inference request per model.

The examples are made from each serving model's config when the document is asked for
(a model loaded a moment ago has one): inputs of the model's datatypes and shapes, one row
where the model batches, zeros for values. Where bearer tokens are on, they list only the
models the caller's token may use; the rest of the document is the same for everyone.
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from fastapi import Body, Header
from fastapi import Path as PathParameter
from pydantic import BaseModel

from salvo.domain.config import ModelConfig
from salvo.frontends.http import schemas

TIMEOUT_HEADER = "Salvo-Timeout-Ms"
"""The request header that bounds an inference end to end, in milliseconds (gRPC's
deadline over HTTP): past it the caller gets 504 and a queued request never runs."""

_STATUSES: dict[int, str] = {
    400: "A field of the request is wrong; the message names it.",
    401: "Bearer tokens are on and the call has no valid one.",
    403: "The token may not make this call (this model, or the repository).",
    404: "No such model or version.",
    413: "The body (inflated, where compressed) is over the server's size limit.",
    415: "Content-Encoding is neither gzip nor deflate.",
    429: "Over the client's rate limit, or the model's queue is full: retry after "
    "Retry-After seconds.",
    500: "The server failed; the message says how.",
    503: "The server or the model is not serving now (loading, unloading, draining).",
    504: "The deadline passed before the answer was ready.",
}
_RETRY_AFTER = {"Retry-After": {"description": "Seconds to wait.", "schema": {"type": "integer"}}}
_ADMITTED = (400, 401, 403, 429, 500)
"""The statuses of every route that checks tokens and the rate limit."""
_PER_MODEL = (*_ADMITTED, 404, 503)


@dataclass(frozen=True)
class Doc:
    """How one route is described: its summary, body, headers and answers."""

    summary: str
    ok: Any
    """The model of the 200 answer's body."""
    errors: tuple[int, ...] = _ADMITTED
    body: type[BaseModel] | None = None
    body_required: bool = True
    headers: tuple[tuple[str, Any, str], ...] = ()
    """(header, type, description) for each request header the route reads."""
    more: Mapping[int | str, dict[str, Any]] = field(default_factory=dict)
    """Answers beside `ok` and `errors` (a 503 of ModelReady)."""

    def responses(self) -> dict[int | str, dict[str, Any]]:
        out: dict[int | str, dict[str, Any]] = {200: {"model": self.ok}}
        for status, answer in self.more.items():
            out.setdefault(status, {}).update(answer)
        for status in self.errors:
            out[status] = {"model": schemas.Error, "description": _STATUSES[status]}
        if 429 in out:
            out[429]["headers"] = _RETRY_AFTER
        return out

    def endpoint(self, names: Iterable[str]) -> Callable[..., Any]:
        """A function whose parameters FastAPI reads as this route's (path parameters,
        headers, body); it never runs (`RestApi` serves the route)."""

        async def documented(**_: Any) -> None:
            raise AssertionError("documented only: RestApi serves this route")

        keyword = inspect.Parameter.KEYWORD_ONLY
        parameters = [
            inspect.Parameter(name, keyword, annotation=str, default=PathParameter())
            for name in names
        ]
        for header, kind, text in self.headers:
            parameters.append(
                inspect.Parameter(
                    header.lower().replace("-", "_"), keyword, annotation=kind | None,
                    default=Header(None, alias=header, description=text),
                )
            )  # fmt: skip
        if self.body is not None:
            parameters.append(
                inspect.Parameter(
                    "body", keyword, annotation=self.body,
                    default=Body() if self.body_required else Body(None),
                )
            )  # fmt: skip
        documented.__signature__ = inspect.Signature(parameters)  # type: ignore[attr-defined]
        return documented


INFER = Doc(
    "Run an inference",
    schemas.InferenceResponse,
    (*_PER_MODEL, 413, 415, 504),
    body=schemas.InferenceRequest,
    headers=(
        (
            "Inference-Header-Content-Length",
            int,
            "The JSON header's length, where binary tensor data follow it (body type "
            "application/octet-stream).",
        ),
        ("Content-Encoding", str, "gzip or deflate: the body is compressed."),
        (TIMEOUT_HEADER, float, "The longest the caller waits, in milliseconds."),
    ),  # fmt: skip
    more={
        200: {
            "description": "The outputs: JSON, or JSON then raw bytes where outputs are asked "
            "for as binary data (Inference-Header-Content-Length gives the JSON's length).",
            "content": {"application/octet-stream": {"schema": {"type": "string"}}},
        }
    },
)
SERVER_METADATA = Doc("The server's name, version and protocol extensions", schemas.ServerMetadata)
MODEL_METADATA = Doc("A model's inputs and outputs", schemas.ModelMetadata, _PER_MODEL)
MODEL_READY = Doc(
    "Whether a model serves",
    schemas.Readiness,
    (*_ADMITTED, 404),
    more={503: {"model": schemas.Readiness, "description": "The model does not serve now."}},
)
MODEL_CONFIG = Doc("A model's configuration, as Triton's JSON", schemas.ModelConfig, _PER_MODEL)
STATISTICS = Doc("Inference statistics, per model version", schemas.Statistics, _PER_MODEL)
INDEX = Doc(
    "Every model in the repository, and its state",
    list[schemas.IndexEntry],
    body=schemas.IndexRequest,
    body_required=False,
)
TRAFFIC = Doc(
    "How requests that name no version are spread over the model's versions",
    schemas.Traffic,
    (*_ADMITTED, 404, 503),
)
SET_TRAFFIC = Doc(
    "Set the traffic policy (repository rights): weights, a sticky parameter, a shadow",
    schemas.Traffic,
    (*_ADMITTED, 404, 503),
    body=schemas.TrafficRequest,
)
CLEAR_TRAFFIC = Doc(
    "Drop the policy set here: the model's config applies again",
    schemas.Traffic,
    (*_ADMITTED, 404, 503),
)
LOAD = Doc("Load (or reload) a model", schemas.Empty, _PER_MODEL)
UNLOAD = Doc("Unload a model", schemas.Empty, _PER_MODEL)

HEALTH: dict[int | str, dict[str, Any]] = {
    200: {"content": {"text/plain": {"schema": {"type": "string"}}}, "description": "Yes."},
    503: {"content": {"text/plain": {"schema": {"type": "string"}}}, "description": "Not yet."},
}


def example_request(config: ModelConfig) -> dict[str, Any]:
    """An inference request `config`'s model answers: zeros of each input's datatype, one
    row where the model batches, 1 for each dimension of any size."""
    batch = [1] if config.max_batch_size > 0 else []
    inputs = []
    for spec in config.inputs:
        shape = [*batch, *(1 if d < 0 else d for d in spec.dims)]
        count = 1
        for d in shape:
            count *= d
        zero: Any = "" if spec.datatype == "BYTES" else False if spec.datatype == "BOOL" else 0
        inputs.append(
            {"name": spec.name, "shape": shape, "datatype": spec.datatype, "data": [zero] * count}
        )
    outputs = [{"name": spec.name} for spec in config.outputs]
    return {"id": "example", "inputs": inputs, "outputs": outputs}


def with_examples(document: dict[str, Any], configs: Mapping[str, ModelConfig]) -> dict[str, Any]:
    """`document` with an example inference request for each model of `configs`."""
    document = copy.deepcopy(document)
    examples = {
        name: {"summary": name, "value": example_request(config)}
        for name, config in sorted(configs.items())
    }
    if not examples:
        return document
    names = sorted(configs)
    for path, operations in document["paths"].items():
        if path.endswith("/infer"):
            content = operations["post"]["requestBody"]["content"]
            content["application/json"]["examples"] = examples
        if path.startswith("/v2/repository/"):
            continue  # loads and unloads name their model on purpose
        for operation in operations.values():
            for parameter in operation.get("parameters", ()):
                if parameter["in"] == "path" and parameter["name"] == "model":
                    parameter["schema"]["examples"] = names
    return document
