"""Who may call what over gRPC: bearer tokens from the call's metadata, checked by the
core's admission policy (`salvo.core.admission`) in one interceptor.

The interceptor is installed only when tokens or a rate limit are configured: an
interceptor costs every RPC some time, and a server without them must be as fast as one
without this module. It wraps each method's handler once, so the wrapper sees the request
(and its model name), not just the call's metadata.

Health (grpc.health.v1, ServerLive, ServerReady) and reflection stay open so that probes and
tools work without credentials. ModelStreamInfer is authenticated once, when it opens (no or
a wrong token aborts it); each of its requests is then checked on its own and a refused one
is answered in-band, like any other failed request of a stream, so one request over the rate
or for a model the token may not use never ends the stream for the others.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any

import grpc

from salvo.core.admission import Admission, Principal
from salvo.domain.status import SalvoError
from salvo.frontends.grpc.parsing import Undecodable
from salvo.frontends.grpc.status import abort
from salvo.frontends.grpc.wire import stream_error
from salvo.frontends.grpc.wire.templates import parse
from salvo_client.proto import grpc_service_pb2 as pb

log = logging.getLogger(__name__)

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


def refusal_of(
    admission: Admission, principal: Principal | None, identity: str, rpc: str, request: Any
) -> SalvoError | None:
    """Why this call of `rpc` (a short method name) may not be served, or None."""
    field = _MODEL_FIELD.get(rpc)
    # A message that did not parse has no model; the handler inside refuses it (`parsing`).
    # Inference requests come as bytes, parsed here for their model: a template would
    # also do, but bytes shaped to fool a quick look at the name must not.
    if isinstance(request, bytes):
        request = parse(request)
    model = None if field is None else getattr(request, field, None)
    return admission.check(
        principal, identity, rpc, model, rpc in _REPOSITORY_RPCS, time.monotonic()
    )


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


class AccessInterceptor(grpc.aio.ServerInterceptor):
    """Authenticates, authorizes and rate-limits (as `admission` is configured) every RPC
    but the open ones. Identity for the rate limit: the token's name, else the peer's
    address."""

    def __init__(self, admission: Admission) -> None:
        self.admission = admission
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

    async def _caller(self, context: grpc.aio.ServicerContext) -> tuple[Principal | None, str]:
        """The call's principal (aborting UNAUTHENTICATED without a valid token, where
        tokens are on) and its rate-limit identity."""
        if self.admission.tokens is None:  # a rate limit alone: no metadata to read
            return None, peer_host(context.peer())
        try:
            principal = self.admission.authenticate(_bearer(context.invocation_metadata()))
        except SalvoError as exc:
            await abort(context, exc)
        return principal, principal.name if principal else peer_host(context.peer())

    def _guard(self, rpc: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        """`handler` with every call checked first; its (de)serializers are kept."""
        admission = self.admission
        if handler.unary_unary is not None:
            behaviour = handler.unary_unary

            async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
                principal, identity = await self._caller(context)
                refusal = refusal_of(admission, principal, identity, rpc, request)
                if refusal is not None:
                    await abort(context, refusal)
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
    ) -> Callable[..., AsyncIterator[Any]]:
        admission = self.admission

        async def stream(
            requests: AsyncIterator[Any], context: grpc.aio.ServicerContext
        ) -> AsyncIterator[Any]:
            principal, identity = await self._caller(context)
            answers: asyncio.Queue[Any] = asyncio.Queue()

            async def admitted() -> AsyncIterator[Any]:
                async for data in requests:  # bytes (`wire.templates`)
                    request = parse(data)
                    if isinstance(request, Undecodable):  # the stream ends on it, refused
                        yield data
                        continue
                    refusal = refusal_of(admission, principal, identity, rpc, request)
                    if refusal is None:
                        yield data
                    else:
                        answers.put_nowait(stream_error(request, refusal))

            async def pump() -> None:
                # Refusals are queued while the servicer reads the requests, so all of them
                # are in `answers` before its own answers end.
                try:
                    async for answer in behaviour(admitted(), _Deferring(context)):
                        answers.put_nowait(answer)
                finally:
                    answers.put_nowait(None)

            served = asyncio.create_task(pump())
            try:
                while (answer := await answers.get()) is not None:
                    yield answer
                try:
                    await served  # raises what the servicer raised
                except _Abort as abort_:  # ended here, after every answer before it
                    await context.abort(*abort_.args)
            finally:
                served.cancel()

        return stream


class _Abort(Exception):
    """A servicer's abort, carried out of the task that runs it (its arguments)."""


class _Deferring:
    """The call's context for a streaming servicer run in a task of its own: its abort
    raises `_Abort` there, and the call's own task ends the call once the answers written
    before it have left. Aborting from the servicer's task while the call's task writes an
    answer would make two concurrent operations on the call, which gRPC refuses
    (GRPC_CALL_ERROR_TOO_MANY_OPERATIONS), losing the answer and hanging the stream."""

    def __init__(self, context: grpc.aio.ServicerContext) -> None:
        self._context = context

    def __getattr__(self, name: str) -> Any:
        return getattr(self._context, name)

    async def abort(self, code: grpc.StatusCode, details: str = "", trailing_metadata=()) -> None:
        raise _Abort(code, details, trailing_metadata)


def build_interceptors(admission: Admission | None) -> list[grpc.aio.ServerInterceptor]:
    """The access interceptor when tokens or a rate limit are configured, else nothing."""
    return [] if admission is None else [AccessInterceptor(admission)]


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
