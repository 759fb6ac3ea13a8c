"""Graceful shutdown, in the order load balancers need, on SIGTERM or SIGINT.

1. gRPC health turns NOT_SERVING at once, and Watch streams are told.
2. For `shutdown_grace_s` new calls are still served, so that load balancers that watch
   health, or Kubernetes taking the pod out of its Service, move traffic away first. A
   second signal ends the grace early.
3. Then the front ends refuse new calls with UNAVAILABLE, which clients retry on another
   replica (gRPC's `Gate`); the schedulers stop taking requests (an open ModelStreamInfer stream
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
import contextlib
import logging
import os
import signal
import sys
from collections.abc import Iterable
from typing import NoReturn, Protocol

log = logging.getLogger("salvo")

STREAM_LINGER_S = 1.0
"""Once every scheduler is idle, how long open streams get to send answers already computed.
Idle streams (and health Watch streams) never end by themselves, so this bounds the wait."""


class _Stoppable(Protocol):
    async def stop(self, timeout_s: float = ...) -> None: ...


async def finish_admitted(
    calls: tuple[set[asyncio.Task], set[asyncio.Task]],
    schedulers: Iterable[_Stoppable],
    timeout_s: float,
) -> None:
    """Let the requests already admitted finish, within `timeout_s`: `calls` are the
    unary calls and the streams running when the front ends closed.

    Every scheduler stops taking requests and runs what it holds (what is left at the
    timeout is answered UNAVAILABLE) while running calls send their answers; then open
    streams get up to STREAM_LINGER_S to send theirs.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    unary, streams = calls
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
