"""A gate that refuses the v2 service's new calls once the server drains, at no cost to
a call until then, and finds the calls still running."""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import Mapping
from typing import Any

import grpc

from salvo.domain.status import ModelUnavailable
from salvo.frontends.grpc.status import abort

_BEHAVIOURS = ("unary_unary", "unary_stream", "stream_unary", "stream_stream")
_FIELDS = ("request_streaming", "response_streaming", "request_deserializer",
           "response_serializer", *_BEHAVIOURS)  # fmt: skip


class _Switchable(grpc.RpcMethodHandler):
    """A method handler whose behaviour a Gate can swap while the server runs.

    grpc.aio reads a handler's fields on every call, so plain attributes cost a call
    nothing. `_replace` is the namedtuple API that handler wrappers (interceptors) use.
    """

    __slots__ = (*_FIELDS, "_gate")

    def __init__(self, handler: Any, gate: Gate) -> None:
        for field in _FIELDS:
            setattr(self, field, getattr(handler, field))
        self._gate = gate

    def _replace(self, **changes: Any) -> _Switchable:
        copy = _Switchable(self, self._gate)
        for field, value in changes.items():
            setattr(copy, field, value)
        return self._gate._track(copy)


class Gate:
    """Refuses the calls of one service with UNAVAILABLE once closed, and finds its calls
    still running; until it closes, it costs a call nothing (no wrapper, no interceptor).

    The handlers it wraps, and the copies that interceptors make of them, have their
    behaviour swapped when it closes. Running calls are found from the tasks grpc.aio runs
    them in (named `HandleExceptions[/service/Method]`): counting calls would cost each one.
    """

    def __init__(self, service: str) -> None:
        self.service = service
        self.closed = False
        self._message = ""
        self._streaming: dict[str, bool] = {}
        self._handlers: weakref.WeakSet[_Switchable] = weakref.WeakSet()

    def wrap(self, handlers: Mapping[str, Any]) -> dict[str, grpc.RpcMethodHandler]:
        """`handlers` (method name to handler) as handlers this gate can close."""
        for name, handler in handlers.items():
            task_name = f"HandleExceptions[/{self.service}/{name}]"
            self._streaming[task_name] = handler.request_streaming or handler.response_streaming
        return {name: self._track(_Switchable(h, self)) for name, h in handlers.items()}

    def _track(self, handler: _Switchable) -> _Switchable:
        self._handlers.add(handler)
        if self.closed:
            self._close_one(handler)
        return handler

    def close(self, message: str) -> None:
        """From now on each new call is answered UNAVAILABLE with `message`."""
        self.closed = True
        self._message = message
        for handler in list(self._handlers):
            self._close_one(handler)

    def _close_one(self, handler: _Switchable) -> None:
        for behaviour in _BEHAVIOURS:
            if getattr(handler, behaviour) is not None:
                setattr(handler, behaviour, self._refuse)

    async def _refuse(self, request: object, context: grpc.aio.ServicerContext) -> None:
        # A coroutine function serves every kind of RPC: grpc.aio gives a streaming one
        # its request iterator and lets it answer through the context.
        await abort(context, ModelUnavailable(self._message))

    def calls(self) -> tuple[set[asyncio.Task], set[asyncio.Task]]:
        """The service's calls running now: (unary calls, streams)."""
        unary: set[asyncio.Task] = set()
        streams: set[asyncio.Task] = set()
        for task in asyncio.all_tasks():
            streaming = self._streaming.get(task.get_name())
            if streaming is not None:
                (streams if streaming else unary).add(task)
        return unary, streams
