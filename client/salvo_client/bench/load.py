"""The load loops: a closed loop (N workers, on asyncio tasks or blocking threads) or an
open loop (arrivals on a seeded schedule, latency measured from the scheduled time), and
`run_level`, which holds one load level and returns its samples."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import random
import signal
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TextIO

import grpc
import grpc.aio

from salvo_client.bench.errors import BenchError
from salvo_client.bench.payloads import with_id
from salvo_client.bench.transports import BlockingUnary, Stream, Transport, Unary
from salvo_client.bench.window import MEASURED, STOP, Recorder, Window

__all__ = [
    "LATE_NS",
    "THREADED_MAX_CONCURRENCY",
    "LoadSpec",
    "OpenLoopStats",
    "RunResult",
    "arrival_offsets_s",
    "run_level",
]

# A send this far behind its scheduled time counts as late (timer granularity is ~1 ms).
LATE_NS = 5_000_000


def arrival_offsets_s(rate: float, distribution: str, seed: int | None) -> Iterator[float]:
    """Scheduled send times (seconds from the start) of an open-loop run, endless.

    Poisson arrivals have exponential gaps with mean 1/rate; constant ones are evenly spaced.
    The same seed gives the same schedule, so a run can be repeated exactly.
    """
    if rate <= 0:
        raise BenchError("--rate must be positive")
    rng = random.Random(seed)
    offset = 0.0
    for n in itertools.count(1):
        if distribution == "poisson":
            offset += rng.expovariate(rate)
            yield offset
        else:
            yield n / rate


@dataclass(frozen=True)
class LoadSpec:
    """One load level and how long to hold it."""

    concurrency: int | None  # closed loop
    rate: float | None  # open loop, requests/s
    warmup_s: float
    duration_s: float | None
    requests: int | None
    distribution: str = "poisson"
    seed: int | None = None
    max_in_flight: int = 1000


@dataclass
class OpenLoopStats:
    """What an open loop could not do on schedule."""

    dropped: int = 0  # arrivals not sent: the in-flight cap was reached
    late: int = 0  # sent more than LATE_NS behind schedule
    max_lag_ns: int = 0


@dataclass
class RunResult:
    """The raw outcome of one load level."""

    spec: LoadSpec
    recorder: Recorder
    t0_ns: int  # the end of the warm-up: where the measured window starts
    duration_ns: int
    open_loop: OpenLoopStats | None = None
    interrupted: bool = False  # stopped early by Ctrl-C


class _Ids:
    """Request ids unique within the process, and round-robin payloads."""

    def __init__(self, payloads: Sequence[bytes]) -> None:
        self._payloads = payloads
        self._n = 0

    def next(self) -> tuple[bytes, str]:
        self._n += 1
        request_id = str(self._n)
        return with_id(self._payloads[self._n % len(self._payloads)], request_id), request_id


async def _closed_loop(
    calls: Sequence[Transport], ids: _Ids, window: Window, recorder: Recorder
) -> None:
    async def worker(call: Transport) -> None:
        while True:
            sent_ns = time.perf_counter_ns()
            state = window.claim(sent_ns)
            if state == STOP:
                return
            payload, request_id = ids.next()
            status = await call(payload, request_id)
            recorder.record(state, sent_ns, time.perf_counter_ns(), status)

    await asyncio.gather(*(worker(call) for call in calls))


THREADED_MAX_CONCURRENCY = 4
"""`--transport auto` runs a closed loop of unary calls at most this concurrent on threads.

A blocking gRPC call answers sooner than an asyncio one (Python's asyncio gRPC adds a loop
hop each way): at c=1 against the bare server, p50 0.45 to 0.50 ms against 0.50 to 0.52
(with GRPC_EXPERIMENTS as `salvo bench` sets it); above a few callers the GIL makes
threads the slower choice."""


def _closed_loop_threads(
    channel: grpc.Channel,
    count: int,
    ids: _Ids,
    window: Window,
    recorder: Recorder,
    timeout_s: float,
) -> None:
    """The closed loop with one blocking caller thread per worker."""
    call = BlockingUnary(channel, timeout_s)
    lock = threading.Lock()

    def worker() -> None:
        while True:
            sent_ns = time.perf_counter_ns()
            with lock:
                state = window.claim(sent_ns)
                if state == STOP:
                    return
                payload, _ = ids.next()
            status = call(payload)
            done_ns = time.perf_counter_ns()
            with lock:
                recorder.record(state, sent_ns, done_ns, status)

    threads = [threading.Thread(target=worker, name=f"bench-{i}") for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


async def _open_loop(
    call: Transport,
    ids: _Ids,
    window: Window,
    recorder: Recorder,
    spec: LoadSpec,
    stats: OpenLoopStats,
) -> None:
    assert spec.rate is not None
    in_flight: set[asyncio.Task[None]] = set()

    async def one(scheduled_ns: int, state: int) -> None:
        payload, request_id = ids.next()
        status = await call(payload, request_id)
        # Latency from the scheduled time, not the actual send: a generator or server that
        # falls behind shows up in the latency instead of being hidden (coordinated omission).
        recorder.record(state, scheduled_ns, time.perf_counter_ns(), status)

    for offset_s in arrival_offsets_s(spec.rate, spec.distribution, spec.seed):
        scheduled_ns = window.start_ns + int(offset_s * 1e9)
        now = time.perf_counter_ns()
        if scheduled_ns > now:
            await asyncio.sleep((scheduled_ns - now) / 1e9)
            now = time.perf_counter_ns()
        state = window.claim(scheduled_ns)
        if state == STOP:
            break
        if len(in_flight) >= spec.max_in_flight:
            if state == MEASURED:
                stats.dropped += 1
                # Not sent, so not a request: undo the claim so --requests counts sends.
                window.claimed -= 1
            continue
        lag = now - scheduled_ns
        if state == MEASURED:
            stats.max_lag_ns = max(stats.max_lag_ns, lag)
            stats.late += lag > LATE_NS
        task = asyncio.create_task(one(scheduled_ns, state))
        in_flight.add(task)
        task.add_done_callback(in_flight.discard)
    if in_flight:
        await asyncio.gather(*in_flight)


async def _progress(window: Window, recorder: Recorder, out: TextIO, label: str) -> None:
    """A status line about once a second on a terminal (rewritten in place), every 5 s as
    plain lines otherwise, so a CI log stays readable."""
    tty = out.isatty()
    interval_s = 1.0 if tty else 5.0
    last_done, last_ns = 0, time.perf_counter_ns()
    try:
        while True:
            await asyncio.sleep(interval_s)
            now = time.perf_counter_ns()
            done = recorder.live_done
            rate = (done - last_done) / max((now - last_ns) / 1e9, 1e-9)
            last_done, last_ns = done, now
            phase = "warm-up" if now < window.t0_ns else "measuring"
            line = (
                f"{label} {(now - window.start_ns) / 1e9:6.1f}s {phase:9} "
                f"requests {done:,} rate {rate:,.0f}/s errors {recorder.live_errors:,}"
            )
            out.write(f"\r{line}\x1b[K" if tty else line + "\n")
            out.flush()
    finally:
        if tty:
            out.write("\r\x1b[K")
            out.flush()


async def run_level(
    channel: grpc.aio.Channel | None,
    payloads: Sequence[bytes],
    spec: LoadSpec,
    *,
    streaming: bool = False,
    timeout_s: float = 30.0,
    progress: TextIO | None = None,
    label: str = "bench",
    blocking_channel: grpc.Channel | None = None,
) -> RunResult:
    """Hold one load level (closed or open loop) and return every measured sample.

    With `blocking_channel`, a closed loop of unary calls runs on threads (see
    THREADED_MAX_CONCURRENCY) instead of asyncio tasks, and `channel` may be None.
    """
    window = Window(spec.warmup_s, spec.duration_s, spec.requests)
    recorder = Recorder()
    ids = _Ids(payloads)
    transport: type[Unary] | type[Stream] = Stream if streaming else Unary
    # Closed loop: one transport (one stream) per worker. Open loop: unary calls on the
    # shared channel, or one stream.
    count = (spec.concurrency or 1) if spec.rate is None else 1
    stats = OpenLoopStats() if spec.rate is not None else None
    on_threads = stats is None and blocking_channel is not None and not streaming
    if channel is None and not on_threads:
        raise ValueError("run_level: this load needs the asyncio channel")
    calls: list[Transport] = (
        [] if channel is None else [transport(channel, timeout_s) for _ in range(count)]
    )

    loop = asyncio.get_running_loop()
    with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
        loop.add_signal_handler(signal.SIGINT, window.interrupt)
    window.begin()
    ticker = (
        asyncio.create_task(_progress(window, recorder, progress, label))
        if progress is not None
        else None
    )
    try:
        if on_threads:
            assert blocking_channel is not None
            await asyncio.to_thread(
                _closed_loop_threads, blocking_channel, count, ids, window, recorder, timeout_s
            )
        elif stats is None:
            await _closed_loop(calls, ids, window, recorder)
        else:
            await _open_loop(calls[0], ids, window, recorder, spec, stats)
    finally:
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            loop.remove_signal_handler(signal.SIGINT)
        if ticker is not None:
            ticker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await ticker
        for call in calls:
            await call.close()

    if window.stopped_ns is not None:
        end_ns = window.stopped_ns
    elif window.end_ns is not None:
        end_ns = window.end_ns
    else:
        # Count-bound: the window ends with the last measured answer.
        end_ns = recorder.last_done_ns or time.perf_counter_ns()
    return RunResult(
        spec,
        recorder,
        window.t0_ns,
        max(end_ns - window.t0_ns, 1),
        stats,
        interrupted=window.stopped_ns is not None,
    )
