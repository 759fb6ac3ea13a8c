"""Who may call what: bearer tokens, per-model and repository rights, and rate limits.

One grpc.aio interceptor does both checks, and it is installed only when tokens or a rate
limit are configured: an interceptor costs every RPC some time, and a server without them
must be as fast as one without this module. It wraps each method's handler once, so the
wrapper sees the request (and its model name), not just the call's metadata.

Health (grpc.health.v1, ServerLive, ServerReady) and reflection stay open so that probes and
tools work without credentials. ModelStreamInfer is authenticated once, when it opens (no or
a wrong token aborts it); each of its requests is then checked on its own and a refused one
is answered in-band, like any other failed request of a stream, so one request over the rate
or for a model the token may not use never ends the stream for the others.
"""

from __future__ import annotations

import asyncio
import hashlib
import ipaddress
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import yaml

from salvo_client.errors import STREAM_STATUS_PARAMETER
from salvo_client.proto import grpc_service_pb2 as pb

from .admission import RateLimiter
from .errors import ConfigError
from .settings import Settings

log = logging.getLogger(__name__)

PUSHBACK_KEY = "grpc-retry-pushback-ms"
"""Trailing metadata (and, in a stream, an infer_response parameter) with the wait in ms."""
SERVICE = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name
_OPEN_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")
_OPEN_METHODS = frozenset({f"/{SERVICE}/ServerLive", f"/{SERVICE}/ServerReady"})
_MODEL_FIELD = {
    "ModelInfer": "model_name",
    "ModelStreamInfer": "model_name",
    "ModelMetadata": "name",
    "ModelConfig": "name",
    "ModelStatistics": "name",
    "ModelReady": "name",
    "RepositoryModelLoad": "model_name",
    "RepositoryModelUnload": "model_name",
}
"""The request field naming the model each per-model RPC acts on."""
_REPOSITORY_RPCS = frozenset({"RepositoryIndex", "RepositoryModelLoad", "RepositoryModelUnload"})
_CHANGES = ("RepositoryModelLoad", "RepositoryModelUnload")
ENV_TOKEN_NAME = "SALVO_AUTH_TOKEN"
"""The name (and rate-limit identity) of the token given in that variable."""


@dataclass(frozen=True, slots=True)
class Principal:
    """What one token may do. `models` None means every model."""

    name: str
    models: frozenset[str] | None
    repository: bool

    def may_use(self, model: str) -> bool:
        return self.models is None or model in self.models


@dataclass(frozen=True, slots=True)
class Refusal:
    """Why a request is not served: its status, a message for the caller, the push-back."""

    code: grpc.StatusCode
    message: str
    retry_after_ms: int = 0


def _digest(token: str) -> bytes:
    # Tokens are kept and looked up by digest, so no comparison touches the secret itself.
    return hashlib.sha256(token.encode()).digest()


class Tokens:
    """The accepted bearer tokens and their rights."""

    def __init__(self, principals: Mapping[str, Principal]) -> None:
        self._by_digest = {_digest(token): p for token, p in principals.items()}

    def __len__(self) -> int:
        return len(self._by_digest)

    def get(self, token: str) -> Principal | None:
        return self._by_digest.get(_digest(token))

    @classmethod
    def from_settings(cls, settings: Settings) -> Tokens | None:
        """The tokens of `auth_tokens_file` and `auth_token`, or None when neither is set."""
        principals: dict[str, Principal] = {}
        if settings.auth_tokens_file is not None:
            principals.update(load_tokens(settings.auth_tokens_file))
        if settings.auth_token is not None:
            token = settings.auth_token.get_secret_value()
            principals[token] = Principal(ENV_TOKEN_NAME, None, True)
        return cls(principals) if principals else None


def load_tokens(path: Path) -> dict[str, Principal]:
    """Parse a tokens file: YAML or JSON, token → {name, models: [names] or "*", repository}.

    Errors name the file and the entry by position and name, never the token.
    """
    try:
        text = path.read_text()
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (OSError, ValueError) as exc:  # JSON's messages quote no content
        raise ConfigError(f"auth tokens file {path}: cannot read it: {exc}") from None
    except yaml.YAMLError as exc:
        # YAML's messages quote the offending line, which may hold a token: give its place.
        mark = getattr(exc, "problem_mark", None)
        place = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"auth tokens file {path}: cannot read it: bad YAML{place}") from None
    if not isinstance(data, dict) or not data:
        raise ConfigError(f"auth tokens file {path}: expected a mapping of token to its rights")
    principals: dict[str, Principal] = {}
    for position, (token, entry) in enumerate(data.items(), start=1):
        where = f"auth tokens file {path}: entry {position}"
        if not isinstance(token, str) or not token or any(c.isspace() for c in token):
            raise ConfigError(f"{where}: a token must be a non-empty string without spaces")
        if not isinstance(entry, dict):
            raise ConfigError(f"{where}: expected {{name, models, repository}}")
        unknown = set(entry) - {"name", "models", "repository"}
        name = entry.get("name")
        if not isinstance(name, str) or not name:
            raise ConfigError(f"{where}: 'name' must be a non-empty string")
        where = f"{where} ('{name}')"
        if unknown:
            raise ConfigError(f"{where}: unknown field(s) {sorted(unknown)}")
        models = entry.get("models", [])
        if models != "*" and not (
            isinstance(models, list) and all(isinstance(m, str) and m for m in models)
        ):
            raise ConfigError(f"{where}: 'models' must be \"*\" or a list of model names")
        repository = entry.get("repository", False)
        if not isinstance(repository, bool):
            raise ConfigError(f"{where}: 'repository' must be true or false")
        principals[token] = Principal(
            name, None if models == "*" else frozenset(models), repository
        )
    return principals


def refusal_of(principal: Principal, rpc: str, request: Any) -> Refusal | None:
    """Why `principal` may not make this call of `rpc` (a short method name), or None."""
    if rpc in _REPOSITORY_RPCS and not principal.repository:
        return Refusal(
            grpc.StatusCode.PERMISSION_DENIED,
            f"token '{principal.name}' may not call {rpc}: it has no repository rights",
        )
    field = _MODEL_FIELD.get(rpc)
    if field is None:
        return None
    # A message that did not parse has no model; the handler inside refuses it (`parsing`).
    model = getattr(request, field, None)
    if model is None or principal.may_use(model):
        return None
    if not model:  # ModelStatistics without a name covers every model
        message = f"token '{principal.name}' may not call {rpc} for every model: name one"
    else:
        message = f"token '{principal.name}' may not use model '{model}' ({rpc})"
    return Refusal(grpc.StatusCode.PERMISSION_DENIED, message)


def peer_host(peer: str) -> str:
    """The address part of a gRPC peer ("ipv4:10.0.0.7:51234" → "10.0.0.7"): the port
    changes with every connection, so it must not make a new identity."""
    scheme, _, rest = peer.partition(":")
    if scheme in ("ipv4", "ipv6"):
        return rest.rpartition(":")[0].strip("[]")
    return peer


def _bearer(metadata: Any) -> str | None:
    for key, value in metadata or ():
        if key == "authorization":
            scheme, _, token = value.partition(" ")
            # The scheme is case-insensitive (RFC 6750).
            return token.strip() if scheme.lower() == "bearer" else ""
    return None


def _stream_error(request: pb.ModelInferRequest, refusal: Refusal) -> pb.ModelStreamInferResponse:
    """A stream's in-band answer to a refused request, shaped as the servicer's own errors."""
    failed = pb.ModelInferResponse(
        model_name=request.model_name, model_version=request.model_version, id=request.id
    )
    failed.parameters[STREAM_STATUS_PARAMETER].int64_param = refusal.code.value[0]
    if refusal.retry_after_ms:
        failed.parameters[PUSHBACK_KEY].int64_param = refusal.retry_after_ms
    return pb.ModelStreamInferResponse(error_message=refusal.message, infer_response=failed)


class AccessInterceptor(grpc.aio.ServerInterceptor):
    """Authenticates (when `tokens` is set), authorizes, and rate-limits (when `limiter` is
    set) every RPC but the open ones. Identity for the rate limit: the token's name, else
    the peer's address."""

    def __init__(self, tokens: Tokens | None, limiter: RateLimiter | None) -> None:
        self.tokens = tokens
        self.limiter = limiter
        self._handlers: dict[str, grpc.RpcMethodHandler] = {}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        method: str = handler_call_details.method  # type: ignore[attr-defined]
        handler = self._handlers.get(method)
        if handler is not None:
            return handler
        handler = await continuation(handler_call_details)
        if handler is None:  # unknown method: UNIMPLEMENTED, which reveals nothing
            return handler
        if method not in _OPEN_METHODS and not method.startswith(_OPEN_PREFIXES):
            handler = self._guard(method.rpartition("/")[2], handler)
        # Handlers are registered before the server starts, so each is wrapped only once.
        self._handlers[method] = handler
        return handler

    async def _authenticate(self, context: grpc.aio.ServicerContext) -> Principal | None:
        if self.tokens is None:
            return None
        token = _bearer(context.invocation_metadata())
        if token is None:
            await context.abort(
                grpc.StatusCode.UNAUTHENTICATED,
                "missing 'authorization: Bearer <token>' metadata",
            )
        principal = self.tokens.get(token) if token else None
        if principal is None:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "invalid bearer token")
        return principal

    def _refusal(
        self, principal: Principal | None, identity: str, rpc: str, request: Any
    ) -> Refusal | None:
        if principal is not None:
            refusal = refusal_of(principal, rpc, request)
            if refusal is not None:
                return refusal
        if self.limiter is None:
            return None
        wait_ms = self.limiter.admit(identity, time.monotonic())
        if not wait_ms:
            return None
        return Refusal(
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            f"rate limit: client '{identity}' is over {self.limiter.rate_per_s:g} requests/s;"
            f" retry in {wait_ms} ms",
            wait_ms,
        )

    def _guard(self, rpc: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        """`handler` with every call checked first; its (de)serializers are kept."""
        if handler.unary_unary is not None:
            behaviour = handler.unary_unary

            async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
                principal = await self._authenticate(context)
                identity = principal.name if principal else peer_host(context.peer())
                refusal = self._refusal(principal, identity, rpc, request)
                if refusal is not None:
                    trailing = (
                        ((PUSHBACK_KEY, str(refusal.retry_after_ms)),)
                        if refusal.retry_after_ms
                        else ()
                    )
                    await context.abort(refusal.code, refusal.message, trailing_metadata=trailing)
                return await behaviour(request, context)

            return handler._replace(unary_unary=unary)  # type: ignore[attr-defined]
        if rpc == "ModelStreamInfer":
            return handler._replace(  # type: ignore[attr-defined]
                stream_stream=self._guard_stream(rpc, handler.stream_stream)
            )
        # A new streaming RPC must be thought through here, not let through unchecked.
        raise TypeError(f"no access check for the streaming RPC {rpc}")

    def _guard_stream(
        self, rpc: str, behaviour: Callable[..., AsyncIterator[Any]]
    ) -> Callable[..., AsyncIterator[pb.ModelStreamInferResponse]]:
        async def stream(
            requests: AsyncIterator[pb.ModelInferRequest], context: grpc.aio.ServicerContext
        ) -> AsyncIterator[pb.ModelStreamInferResponse]:
            principal = await self._authenticate(context)
            identity = principal.name if principal else peer_host(context.peer())
            answers: asyncio.Queue[pb.ModelStreamInferResponse | None] = asyncio.Queue()

            async def admitted() -> AsyncIterator[pb.ModelInferRequest]:
                async for request in requests:
                    refusal = self._refusal(principal, identity, rpc, request)
                    if refusal is None:
                        yield request
                    else:
                        answers.put_nowait(_stream_error(request, refusal))

            async def pump() -> None:
                # Refusals are queued while the servicer reads the requests, so all of them
                # are in `answers` before its own answers end.
                try:
                    async for answer in behaviour(admitted(), context):
                        answers.put_nowait(answer)
                finally:
                    answers.put_nowait(None)

            served = asyncio.create_task(pump())
            try:
                while (answer := await answers.get()) is not None:
                    yield answer
                await served  # raises what the servicer raised (an abort, say)
            finally:
                served.cancel()

        return stream


def build_interceptors(settings: Settings) -> list[grpc.aio.ServerInterceptor]:
    """The access interceptor when tokens or a rate limit are configured, else nothing."""
    tokens = Tokens.from_settings(settings)
    limiter = (
        RateLimiter(settings.rate_limit_per_s, settings.rate_limit_burst)
        if settings.rate_limit_per_s
        else None
    )
    log.info(
        "access: auth=%s rate_limit=%s repository_rpcs=%s",
        f"{len(tokens)} token(s)" if tokens else "off",
        f"{limiter.rate_per_s:g}/s burst {limiter.burst:g}" if limiter else "off",
        "enabled" if repository_changes_allowed(settings) else "disabled",
    )
    if tokens is None and limiter is None:
        return []
    return [AccessInterceptor(tokens, limiter)]


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def repository_changes_allowed(settings: Settings) -> bool:
    """Whether RepositoryModelLoad/Unload are served (see `Settings.repository_rpcs`)."""
    if settings.repository_rpcs != "auto":
        return settings.repository_rpcs == "enabled"
    auth = settings.auth_tokens_file is not None or settings.auth_token is not None
    return auth or _is_loopback(settings.host)


def refuse_repository_changes(
    handlers: Mapping[str, grpc.RpcMethodHandler],
) -> dict[str, grpc.RpcMethodHandler]:
    """`handlers` with load and unload answering PERMISSION_DENIED, at no cost to any other
    RPC (no interceptor): the models are those loaded at start-up."""

    def refuse(rpc: str) -> Callable[..., Awaitable[Any]]:
        async def refused(request: Any, context: grpc.aio.ServicerContext) -> Any:
            await context.abort(
                grpc.StatusCode.PERMISSION_DENIED,
                f"{rpc} is disabled on this server (SALVO_REPOSITORY_RPCS)",
            )

        return refused

    out = dict(handlers)
    for rpc in _CHANGES:
        out[rpc] = out[rpc]._replace(unary_unary=refuse(rpc))  # type: ignore[attr-defined]
    return out
