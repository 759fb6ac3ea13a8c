"""Graceful shutdown, in the order load balancers need, on SIGTERM or SIGINT.

1. gRPC health turns NOT_SERVING at once, and Watch streams are told.
2. For `shutdown_grace_s` new calls are still served, so that load balancers that watch
   health, or Kubernetes taking the pod out of its Service, move traffic away first. A
   second signal ends the grace early.
3. Then the v2 service refuses new calls with UNAVAILABLE, which clients retry on another
   replica (`Gate`); the schedulers stop taking requests (an open ModelStreamInfer stream
   gets UNAVAILABLE in-band); queued and running requests finish, within
   `drain_timeout_s`.
4. Telemetry flushes, the HTTP port closes, and the process exits.

The process then exits with its gRPC connections open, instead of through grpc.aio's
`server.stop()`: gRPC core answers CANCELLED to each call that reaches a stopping server
before a handler took it (grpc/grpc#41785), and no retry policy covers CANCELLED. Measured
here (grpcio 1.85; three servers restarted in turn, 9 restarts, under load from a client
with round robin and a retry policy on UNAVAILABLE): `server.stop()` failed 2 calls, 3 when
new calls were refused first, 10 when the process ended by returning from `asyncio.run`
(which tears the server down as well); exiting at once failed none, since a closed
connection fails such a call with UNAVAILABLE, which the client retries elsewhere.
In-process servers (tests) still end with `server.stop()`.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import signal
import sys
import weakref
from collections.abc import Iterable, Mapping
from typing import Any, NoReturn

import grpc
from grpc_health.v1 import _async as health_async
from grpc_health.v1 import health_pb2

from .errors import ModelUnavailable, status_for
from .scheduler import Scheduler

log = logging.getLogger("salvo")

STREAM_LINGER_S = 1.0
"""Once every scheduler is idle, how long open streams get to send answers already computed.
Idle streams (and health Watch streams) never end by themselves, so this bounds the wait."""

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
        code, message = status_for(ModelUnavailable(self._message))
        await context.abort(code, message)

    def calls(self) -> tuple[set[asyncio.Task], set[asyncio.Task]]:
        """The service's calls running now: (unary calls, streams)."""
        unary: set[asyncio.Task] = set()
        streams: set[asyncio.Task] = set()
        for task in asyncio.all_tasks():
            streaming = self._streaming.get(task.get_name())
            if streaming is not None:
                (streams if streaming else unary).add(task)
        return unary, streams


async def finish_admitted(gate: Gate, schedulers: Iterable[Scheduler], timeout_s: float) -> None:
    """Let the requests already admitted finish, within `timeout_s`.

    Every scheduler stops taking requests and runs what it holds (what is left at the
    timeout is answered UNAVAILABLE) while running calls send their answers; then open
    streams get up to STREAM_LINGER_S to send theirs.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    unary, streams = gate.calls()
    await asyncio.gather(
        *(scheduler.stop(timeout_s) for scheduler in schedulers),
        _wait(unary, timeout_s),
    )
    await _wait(streams, min(deadline - loop.time(), STREAM_LINGER_S))


async def _wait(tasks: set[asyncio.Task], timeout_s: float) -> None:
    if tasks:
        await asyncio.wait(tasks, timeout=max(timeout_s, 0))


async def grace(timeout_s: float, hurry: asyncio.Event | None) -> None:
    """Wait out the grace: `timeout_s`, or less if `hurry` is set."""
    if hurry is None:
        await asyncio.sleep(timeout_s)
        return
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(hurry.wait(), timeout_s)


class Signals:
    """SIGTERM and SIGINT on the running loop: the first asks for a shutdown (`stop`), the
    next one for haste (`hurry`: the grace ends at once)."""

    def __init__(self) -> None:
        self.stop = asyncio.Event()
        self.hurry = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._received, sig)

    def _received(self, sig: signal.Signals) -> None:
        if not self.stop.is_set():
            log.info("%s: shutting down", sig.name)
            self.stop.set()
        elif not self.hurry.is_set():
            log.info("%s again: ending the grace now, if it still runs", sig.name)
            self.hurry.set()


def exit_process(code: int = 0) -> NoReturn:
    """End the process now, gRPC connections open (see the module docstring for why)."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


class HealthServicer(health_async.HealthServicer):
    """grpc_health's asyncio servicer with a Watch that misses no change.

    grpcio-health-checking's Watch drops a service's condition whenever any one of its
    watchers leaves, so the others are never told again: a client that stopped watching
    would hide the shutdown's NOT_SERVING from every other. Here the condition stays while
    anyone watches, and the answer is sent outside its lock, so that a client that does not
    read cannot hold up `set` (and with it the shutdown).
    """

    def __init__(self) -> None:
        super().__init__()
        self._watching: collections.Counter[str] = collections.Counter()

    def _status(self, service: str) -> int:
        return self._server_status.get(service, health_pb2.HealthCheckResponse.SERVICE_UNKNOWN)

    async def Watch(self, request: health_pb2.HealthCheckRequest, context: Any) -> None:
        service = request.service
        condition = self._server_watchers[service]
        self._watching[service] += 1
        sent = None
        try:
            while True:
                async with condition:
                    while self._status(service) == sent:
                        await condition.wait()
                    sent = self._status(service)
                await context.write(health_pb2.HealthCheckResponse(status=sent))
        finally:
            self._watching[service] -= 1
            if not self._watching[service]:
                del self._watching[service]
                self._server_watchers.pop(service, None)
