"""The v2 REST API (the Open Inference Protocol over HTTP), `/metrics` and health: one
FastAPI app over the data plane.

Every route answers JSON; an error is `{"error": "..."}` with the HTTP status mapped from
the core's status (`status.http_status`: 400, 401, 403, 404, 429 with `Retry-After`, 503,
504…). Access is the gRPC port's: the same bearer tokens, checked by the core's admission
under the gRPC method names (so a token's rights read the same on both ports), the same
per-client rate limit, the same rule for repository loads and unloads. Health, `GET /v2`'s
liveness routes and `/metrics` stay open, as gRPC's health does.

An inference's body is read up to the message-size limit (413 past it), gzip or deflate
bodies are inflated up to the same limit, and an answer is compressed when the client
accepts it. A caller that disconnects while its request is queued withdraws it: it never
runs. `Salvo-Timeout-Ms` bounds an inference end to end (504 past it), as a gRPC deadline
does.

The OpenAPI document (`/v2/docs/openapi.json`, rendered at `/v2/docs`) describes every
route's body and answers (`openapi`, `schemas`), with an example request per model.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
import zlib
from collections.abc import Awaitable, Callable, Mapping, MutableMapping
from pathlib import Path
from typing import Any

import orjson
from fastapi import FastAPI, Request
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from starlette.exceptions import HTTPException
from starlette.middleware.cors import CORSMiddleware
from starlette.routing import Route
from starlette.staticfiles import StaticFiles

from salvo.core.admission import Admission
from salvo.core.dataplane import DataPlane
from salvo.domain.config import ModelConfig
from salvo.domain.status import (
    Cancelled,
    DeadlineExceeded,
    InvalidRequest,
    ModelNotFound,
    PermissionDenied,
    SalvoError,
    describe,
)
from salvo.domain.types import InferResponse
from salvo.frontends.http import documents, openapi
from salvo.frontends.http.codec import HEADER_LENGTH, RestRequest, encode_response, read_header
from salvo.frontends.http.status import http_status
from salvo.observability.telemetry import Probe, Telemetry

log = logging.getLogger(__name__)

_SWAGGER_UI = Path(__file__).with_name("swagger-ui")
_JSON = "application/json"
_BINARY = "application/octet-stream"
_REPOSITORY_CHANGES_OFF = "is disabled on this server (SALVO_REPOSITORY_RPCS)"


class PayloadTooLarge(HTTPException):
    def __init__(self, limit: int) -> None:
        super().__init__(413, f"request body: larger than the limit of {limit} bytes")


def _json(document: Any, status: int = 200, headers: Mapping[str, str] | None = None) -> Response:
    return Response(orjson.dumps(document), status, headers, media_type=_JSON)


def _error(exc: BaseException) -> Response:
    """The answer to a request that failed with `exc`: `{"error": ...}` and its status."""
    if isinstance(exc, HTTPException):  # the HTTP layer's own: 413, 415
        return _json({"error": exc.detail}, exc.status_code, exc.headers)
    if not isinstance(exc, SalvoError):
        log.error("unexpected error", exc_info=exc)
    status, message, headers = http_status(exc)
    return _json({"error": message}, status, headers)


def _code(exc: BaseException) -> tuple[str, str]:
    """The core's status name for `exc`, and its message (for spans and metrics)."""
    if isinstance(exc, HTTPException):
        return "INVALID_ARGUMENT", str(exc.detail)
    status, message = describe(exc)
    return status.name, message


def _since(start: float) -> float:
    return time.perf_counter() - start


def _bearer(request: Request) -> str | None:
    value = request.headers.get("authorization")
    if value is None:
        return None
    scheme, _, token = value.partition(" ")
    return token.strip() if scheme.lower() == "bearer" else ""


def _deadline_ns(timeout_ms: str | None) -> int | None:
    """The `time.monotonic_ns()` instant a request with this timeout header gives up."""
    if timeout_ms is None:
        return None
    try:
        milliseconds = float(timeout_ms)
    except ValueError:
        milliseconds = -1.0
    if not 0 < milliseconds < 1e12:  # NaN and infinity too
        raise InvalidRequest(
            f"header {openapi.TIMEOUT_HEADER}: {timeout_ms!r} is not a positive number of "
            "milliseconds"
        )
    return time.monotonic_ns() + int(milliseconds * 1e6)


def _inflate(body: bytes, encoding: str, limit: int) -> bytes:
    """A gzip or deflate (zlib, or raw deflate) body, inflated to at most `limit` bytes."""
    if encoding == "gzip":
        wbits = 31
    elif encoding == "deflate":
        wbits = 15 if body[:1] and (body[0] & 0x0F) == 8 else -15
    elif encoding == "identity":
        return body
    else:
        raise HTTPException(415, f"header Content-Encoding: {encoding!r} is not gzip or deflate")
    inflater = zlib.decompressobj(wbits)
    try:
        inflated = inflater.decompress(body, limit + 1)
    except zlib.error as exc:
        raise InvalidRequest(f"request body: not valid {encoding} data: {exc}") from None
    if len(inflated) > limit:
        raise PayloadTooLarge(limit)
    if not inflater.eof:
        raise InvalidRequest(f"request body: {encoding} data ends early")
    return inflated


def _accepted_encoding(accept: str | None) -> str | None:
    """gzip or deflate where the client's Accept-Encoding takes one (gzip first)."""
    if not accept:
        return None
    offered = set()
    for item in accept.split(","):
        name, _, params = item.strip().partition(";")
        if params.strip().replace(" ", "") in ("q=0", "q=0.0", "q=0.00", "q=0.000"):
            continue
        offered.add(name.strip().lower())
    for name in ("gzip", "deflate"):
        if name in offered:
            return name
    return None


def _compressed(content: bytes, encoding: str) -> bytes:
    if encoding == "gzip":
        packer = zlib.compressobj(1, zlib.DEFLATED, 31)
        return packer.compress(content) + packer.flush()
    return zlib.compress(content, 1)


async def _disconnected(
    receive: Callable[[], Awaitable[MutableMapping[str, Any]]], task: Any
) -> None:
    """Cancel `task` when the client goes away (its body was read: only a disconnect is
    left to receive)."""
    while (await receive())["type"] != "http.disconnect":
        pass
    task.cancel()


class RestApi:
    """The app and what its routes need."""

    def __init__(
        self,
        dataplane: DataPlane,
        registry: CollectorRegistry,
        admission: Admission | None,
        repository_changes: bool,
        max_body_bytes: int,
        cors_origins: tuple[str, ...] = (),
        telemetry: Telemetry | None = None,
    ) -> None:
        self.dataplane = dataplane
        self.telemetry = telemetry
        self.registry = registry
        self.admission = admission
        self.repository_changes = repository_changes
        self.max_body_bytes = max_body_bytes
        self.app = self._build(cors_origins)

    async def _admit(
        self, request: Request, call: str, model: str | None, repository: bool = False
    ) -> None:
        """Raise why this call may not be served (as the gRPC port's access check would)."""
        admission = self.admission
        if admission is None:
            return
        principal = admission.authenticate(_bearer(request))
        client = request.client
        identity = principal.name if principal else (client.host if client else "")
        refusal = admission.check(principal, identity, call, model, repository, time.monotonic())
        if refusal is not None:
            raise refusal

    async def _body(self, request: Request) -> bytes:
        limit = self.max_body_bytes
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            raise PayloadTooLarge(limit)
        chunks = []
        size = 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise PayloadTooLarge(limit)
            chunks.append(chunk)
        body = b"".join(chunks)
        encoding = request.headers.get("content-encoding")
        return body if encoding is None else _inflate(body, encoding.strip().lower(), limit)

    async def infer(
        self, request: Request, probe: Probe | None, model: str, version: str = ""
    ) -> Response:
        await self._admit(request, "ModelInfer", model)
        deadline_ns = _deadline_ns(request.headers.get(openapi.TIMEOUT_HEADER))
        body = await self._body(request)
        header, binary_at = read_header(body, request.headers.get(HEADER_LENGTH))
        rest = RestRequest(model, version, header, body, binary_at, deadline_ns, probe)
        watch = asyncio.ensure_future(_disconnected(request.receive, asyncio.current_task()))
        try:
            if deadline_ns is None:
                response: InferResponse = await self.dataplane.infer(rest)
            else:
                loop = asyncio.get_running_loop()
                at = loop.time() + (deadline_ns - time.monotonic_ns()) / 1e9
                async with asyncio.timeout_at(at):
                    response = await self.dataplane.infer(rest)
        except TimeoutError:
            raise DeadlineExceeded(
                f"header {openapi.TIMEOUT_HEADER}: no answer within "
                f"{request.headers[openapi.TIMEOUT_HEADER]} ms"
            ) from None
        except asyncio.CancelledError:
            if watch.done():  # the client went away: nobody reads an answer
                raise Cancelled("the client disconnected") from None
            raise
        finally:
            watch.cancel()
        content, header_length = encode_response(response, rest.binary_outputs)
        headers = {}
        if header_length is not None:
            headers["Inference-Header-Content-Length"] = str(header_length)
        encoding = _accepted_encoding(request.headers.get("accept-encoding"))
        if encoding is not None:
            content = _compressed(content, encoding)
            headers["Content-Encoding"] = encoding
        media_type = _JSON if header_length is None else _BINARY
        return Response(content, headers=headers, media_type=media_type)

    async def _serve(
        self, request: Request, route: str, handler: Callable[..., Awaitable[Response]], *args: str
    ) -> Response:
        """`handler(request, probe, *args)`'s response, or the error's; with a span and
        metrics where telemetry is on."""
        telemetry = self.telemetry
        if telemetry is None:
            try:
                return await handler(request, None, *args)
            except Exception as exc:
                return _error(exc)
        start = time.perf_counter()
        method = request.method
        probe = Probe(telemetry.start_http(method, route, request.headers.items))
        code, message = "OK", ""
        client = request.client
        peer = f"{client.host}:{client.port}" if client else ""
        try:
            response = await handler(request, probe, *args)
        except asyncio.CancelledError:
            telemetry.end_http(method, route, 499, probe, "CANCELLED", "", _since(start), peer)
            raise
        except Exception as exc:
            response = _error(exc)
            code, message = _code(exc)
        telemetry.end_http(
            method, route, response.status_code, probe, code, message, _since(start), peer
        )
        return response

    def _build(self, cors_origins: tuple[str, ...]) -> FastAPI:
        app = FastAPI(
            title="Salvo",
            summary="The Open Inference Protocol (KServe v2) over HTTP",
            openapi_url=None,  # served below: its examples depend on the caller
            docs_url=None,
            redoc_url=None,
        )
        if cors_origins:
            app.add_middleware(
                CORSMiddleware,
                allow_origins=list(cors_origins),
                allow_methods=["GET", "POST", "PUT", "DELETE"],
                allow_headers=["*"],
                expose_headers=["Inference-Header-Content-Length"],
            )

        # Routes answer their own errors (`_serve`); these answer the router's (an unknown
        # path, a wrong method) and anything that escapes, in the same form.
        @app.exception_handler(HTTPException)
        async def http_error(request: Request, exc: HTTPException) -> Response:
            return _error(exc)

        @app.exception_handler(Exception)
        async def unexpected(request: Request, exc: Exception) -> Response:
            return _error(exc)

        dataplane = self.dataplane
        serve = self._serve

        @app.get("/metrics", include_in_schema=False)
        async def metrics() -> Response:
            return Response(generate_latest(self.registry), media_type=CONTENT_TYPE_LATEST)

        # Health and metrics are neither traced nor measured: probes would drown the rest.
        @app.get("/v2/health/live", tags=["health"], responses={200: openapi.HEALTH[200]})
        async def live() -> Response:
            return Response(b"live\n", media_type="text/plain")

        @app.get("/v2/health/ready", tags=["health"], responses=openapi.HEALTH)
        async def ready() -> Response:
            if dataplane.ready():
                return Response(b"ready\n", media_type="text/plain")
            return Response(b"not ready\n", 503, media_type="text/plain")

        async def server_metadata(request: Request, probe: Probe | None) -> Response:
            await self._admit(request, "ServerMetadata", None)
            return _json(documents.server_metadata())

        async def model_metadata(
            request: Request, probe: Probe | None, model: str, version: str = ""
        ) -> Response:
            await self._admit(request, "ModelMetadata", model)
            return _json(documents.model_metadata(dataplane.model_info(model, version)))

        async def model_ready(
            request: Request, probe: Probe | None, model: str, version: str = ""
        ) -> Response:
            await self._admit(request, "ModelReady", model)
            if not dataplane.model_ready(model, version):
                try:
                    dataplane.model_info(model, version)
                except ModelNotFound:
                    raise  # 404: no such model or version, ready or not
                except SalvoError:
                    return _json({"ready": False}, 503)
            return _json({"ready": True})

        async def model_config(
            request: Request, probe: Probe | None, model: str, version: str = ""
        ) -> Response:
            await self._admit(request, "ModelConfig", model)
            info = dataplane.model_info(model, version)
            # The config itself, as Triton answers over HTTP (gRPC wraps it in a message).
            return _json(documents.model_config(info.config, info.device_type))

        async def model_stats(
            request: Request, probe: Probe | None, model: str = "", version: str = ""
        ) -> Response:
            await self._admit(request, "ModelStatistics", model)
            return _json(documents.statistics(dataplane.statistics(model, version)))

        async def repository_index(request: Request, probe: Probe | None) -> Response:
            await self._admit(request, "RepositoryIndex", None, repository=True)
            body = await self._body(request)
            try:
                options = orjson.loads(body) if body.strip() else {}
            except orjson.JSONDecodeError as exc:
                raise InvalidRequest(f"request body: not valid JSON: {exc}") from None
            if not isinstance(options, dict):
                raise InvalidRequest("request body must be a JSON object")
            ready = options.get("ready", False)
            if not isinstance(ready, bool):
                raise InvalidRequest("'ready' must be true or false")
            ready_only = ready
            return _json(documents.index(dataplane.index(ready_only)))

        async def change(request: Request, model: str, call: str) -> None:
            await self._admit(request, call, model, repository=True)
            if not self.repository_changes:
                raise PermissionDenied(f"{call} {_REPOSITORY_CHANGES_OFF}")

        async def load(request: Request, probe: Probe | None, model: str) -> Response:
            await change(request, model, "RepositoryModelLoad")
            await dataplane.load(model)
            return _json({})

        async def unload(request: Request, probe: Probe | None, model: str) -> Response:
            await change(request, model, "RepositoryModelUnload")
            await dataplane.unload(model)
            return _json({})

        async def traffic(request: Request, probe: Probe | None, model: str) -> Response:
            await self._admit(request, "ModelConfig", model)
            return _json(dataplane.traffic(model))

        async def set_traffic(request: Request, probe: Probe | None, model: str) -> Response:
            await change(request, model, "TrafficPolicy")
            body = await self._body(request)
            try:
                document = orjson.loads(body)
            except orjson.JSONDecodeError as exc:
                raise InvalidRequest(f"request body: not valid JSON: {exc}") from None
            if not isinstance(document, dict):
                raise InvalidRequest("request body must be a JSON object")
            return _json(dataplane.set_traffic(model, document))

        async def clear_traffic(request: Request, probe: Probe | None, model: str) -> Response:
            await change(request, model, "TrafficPolicy")
            return _json(dataplane.clear_traffic(model))

        served: list[Route] = []

        def route(path: str, handler: Callable[..., Awaitable[Response]], method: str,
                  doc: openapi.Doc) -> None:  # fmt: skip
            """Serve `handler` at `path` through `_serve` (its span and metrics name the
            path's template), and describe it in the OpenAPI document as `doc` says.

            Two routes: a Starlette `Route` serves it (it hands over the path's parameters
            as they are, where FastAPI's would solve dependencies for every call, a tenth
            of a REST call's CPU), and a FastAPI route with the same path describes it (it
            is never reached: the first routes match first)."""
            names = re.findall(r"{(\w+)}", path)

            async def serving(request: Request) -> Response:
                parameters = request.path_params
                return await serve(request, path, handler, *[parameters[n] for n in names])

            served.append(Route(path, serving, methods=[method], name=handler.__name__))
            tag = path.split("/")[2] if path.count("/") > 1 else "server"
            app.add_api_route(
                path, doc.endpoint(names), methods=[method], tags=[tag], name=handler.__name__,
                summary=doc.summary, responses=doc.responses(), response_model=None,
            )  # fmt: skip

        # Inference first: routes are matched in order, one regular expression each.
        for prefix in ("/v2/models/{model}", "/v2/models/{model}/versions/{version}"):
            route(prefix + "/infer", self.infer, "POST", openapi.INFER)
        route("/v2", server_metadata, "GET", openapi.SERVER_METADATA)
        # Before the routes with a model in the path, which would take "stats" for a name.
        route("/v2/models/stats", model_stats, "GET", openapi.STATISTICS)
        for suffix, handler, doc in (
            ("", model_metadata, openapi.MODEL_METADATA),
            ("/ready", model_ready, openapi.MODEL_READY),
            ("/config", model_config, openapi.MODEL_CONFIG),
            ("/stats", model_stats, openapi.STATISTICS),
        ):
            for prefix in ("/v2/models/{model}", "/v2/models/{model}/versions/{version}"):
                route(prefix + suffix, handler, "GET", doc)
        for act, method, doc in (
            (traffic, "GET", openapi.TRAFFIC),
            (set_traffic, "PUT", openapi.SET_TRAFFIC),
            (clear_traffic, "DELETE", openapi.CLEAR_TRAFFIC),
        ):
            route("/v2/models/{model}/traffic", act, method, doc)
        route("/v2/repository/index", repository_index, "POST", openapi.INDEX)
        route("/v2/repository/models/{model}/load", load, "POST", openapi.LOAD)
        route("/v2/repository/models/{model}/unload", unload, "POST", openapi.UNLOAD)
        app.router.routes[:0] = served

        described: dict[str, Any] = {}

        @app.get("/v2/docs/openapi.json", include_in_schema=False)
        async def openapi_document(request: Request) -> Response:
            if not described:  # FastAPI's document of every route, made once
                described.update(app.openapi())
            return _json(openapi.with_examples(described, self._configs_shown(request)))

        # Swagger UI from the server itself (tools/vendor_swagger_ui.sh): no CDN, so the
        # docs work where the browser has no internet access.
        app.mount("/v2/docs/static", StaticFiles(directory=_SWAGGER_UI), name="static")

        @app.get("/v2/docs", include_in_schema=False)
        async def docs() -> Response:
            return get_swagger_ui_html(
                openapi_url="/v2/docs/openapi.json",
                title="Salvo: the v2 REST API",
                swagger_js_url="/v2/docs/static/swagger-ui-bundle.js",
                swagger_css_url="/v2/docs/static/swagger-ui.css",
                swagger_favicon_url="/v2/docs/static/favicon-32x32.png",
            )

        return app

    def _configs_shown(self, request: Request) -> dict[str, ModelConfig]:
        """The configs of the models serving that this caller may use (every one where
        tokens are off; none for a caller without a valid token)."""
        principal = None
        if self.admission is not None:
            try:
                principal = self.admission.authenticate(_bearer(request))
            except SalvoError:
                return {}
        configs = {}
        for entry in self.dataplane.index(ready_only=True):
            if entry.name in configs or (principal and not principal.may_use(entry.name)):
                continue
            with contextlib.suppress(SalvoError):  # unloaded since the index was read
                configs[entry.name] = self.dataplane.model_info(entry.name).config
        return configs
