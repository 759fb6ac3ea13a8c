"""`salvo bench`: a load generator for v2 (KServe / Triton) gRPC inference servers.

Closed loop (`--concurrency N`: N workers, each sending its next request when the previous
one answers) or open loop (`--rate R`: Poisson or constant arrivals sent on schedule whatever
the server does, with a cap on requests in flight), over unary ModelInfer or ModelStreamInfer.
Every latency sample is kept, so percentiles are exact. A sweep over load levels finds the
knee: the highest load whose p99 stays under a bound.

It needs only grpcio, protobuf and numpy (matplotlib for `--plot`), and talks through the
generated stubs: requests are serialized once up front and sent as bytes, so the generator
spends its CPU on gRPC, not on building messages, and disturbs a server on the same machine
as little as it can.

    python -m salvo_client.bench -m mlp -u 127.0.0.1:8001 -c 8 --duration-s 10
    python -m salvo_client.bench -m mlp --rate 500 --seed 1 --json
    python -m salvo_client.bench -m mlp --sweep-concurrency 1,2,4,8,16 --p99-bound-ms 20

Both entry points (`salvo bench` and this module) run with GRPC_EXPERIMENTS set to
`GRPC_EXPERIMENTS` unless the caller set the variable: see there for why.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.util
import itertools
import json
import math
import os
import random
import signal
import sys
import threading
import time
from array import array
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TextIO

import grpc
import grpc.aio
import numpy as np

from salvo_client._common import WIRE_DTYPES
from salvo_client.proto import grpc_service_pb2 as pb
from salvo_client.proto import grpc_service_pb2_grpc as pb_grpc

SERVICE = "/inference.GRPCInferenceService/"
# A send this far behind its scheduled time counts as late (timer granularity is ~1 ms).
LATE_NS = 5_000_000
# Distinct request payloads cycled through with --input-data random.
PAYLOAD_POOL = 16
# The error name for a failure ModelStreamInfer reports in-band: it carries no status code.
STREAM_ERROR = "STREAM_ERROR"
GRPC_EXPERIMENTS = "-event_engine_client"
"""What the generator's process sets GRPC_EXPERIMENTS to, unless the caller set it.

grpcio's default client reads each response on an EventEngine poller thread, which wakes a
worker thread, which wakes the caller: three threads and four futex calls a round trip. With
`event_engine_client` off the calling thread polls its own socket, as perf_analyzer's C++
client does, and a c=1 round trip to the bare server takes about 0.1 ms less (p50 medians
0.70 and 0.60 ms; RESULTS.md, "salvo bench vs perf_analyzer: reading", tenth session). A
grpc.aio channel in the same process brings the hops back. grpc reads the
variable once, when it is imported, so `salvo.cli` sets it before importing this module and
`python -m` starts again with it set."""


# The request `id` is prepended to each pre-serialized request as its own field: protobuf
# merges concatenated messages, so a fresh id costs a few bytes, not a re-serialization.
_ID_TAG = bytes([(pb.ModelInferRequest.DESCRIPTOR.fields_by_name["id"].number << 3) | 2])


class BenchError(Exception):
    """A setting or a model the generator cannot work with; the message says which."""


# ---------------------------------------------------------------------------------------------
# Inputs


@dataclass(frozen=True)
class TensorSpec:
    """One input as it will be sent: name, v2 datatype and a concrete shape."""

    name: str
    datatype: str
    shape: tuple[int, ...]


def resolve_inputs(
    metadata: pb.ModelMetadataResponse, batch_size: int, shapes: dict[str, tuple[int, ...]]
) -> list[TensorSpec]:
    """Concrete shapes for the model's inputs.

    A leading -1 is the batch dimension and becomes `batch_size`; `shapes` (from `--shape`)
    gives whole shapes and wins; any other variable dimension has to come from `shapes`.
    """
    known = {t.name for t in metadata.inputs}
    unknown = sorted(set(shapes) - known)
    if unknown:
        raise BenchError(f"--shape names unknown inputs {unknown}; the model has {sorted(known)}")
    specs = []
    for tensor in metadata.inputs:
        if tensor.name in shapes:
            shape = shapes[tensor.name]
        else:
            dims = list(tensor.shape)
            if dims and dims[0] == -1:
                dims[0] = batch_size
            if any(d < 0 for d in dims):
                raise BenchError(
                    f"input {tensor.name!r} has variable dims {list(tensor.shape)}: "
                    f"give its shape with --shape {tensor.name}=D1,D2,..."
                )
            shape = tuple(dims)
        specs.append(TensorSpec(tensor.name, tensor.datatype, tuple(shape)))
    return specs


def tensor_bytes(spec: TensorSpec, input_data: str, rng: np.random.Generator) -> bytes:
    """Raw little-endian contents for one input (`raw_input_contents`), zero or random."""
    count = math.prod(spec.shape)
    zero = input_data == "zero"
    if spec.datatype == "BYTES":
        # Each element: a 4-byte little-endian length, then the bytes.
        out = bytearray()
        for _ in range(count):
            item = b"" if zero else rng.integers(0, 256, 8, dtype=np.uint8).tobytes()
            out += len(item).to_bytes(4, "little") + item
        return bytes(out)
    if spec.datatype == "BF16":
        # bfloat16 is the upper half of a float32.
        values = np.zeros(count, np.float32) if zero else rng.random(count, np.float32)
        return (values.view(np.uint32) >> 16).astype("<u2").tobytes()
    dtype = WIRE_DTYPES.get(spec.datatype)
    if dtype is None or dtype.kind == "O":
        raise BenchError(f"input {spec.name!r}: unsupported datatype {spec.datatype}")
    if zero:
        array_ = np.zeros(count, dtype)
    elif dtype.kind == "b":
        array_ = rng.integers(0, 2, count).astype(np.bool_)
    elif np.issubdtype(dtype, np.integer):
        # Small non-negative values: safe for inputs used as indices or token ids.
        array_ = rng.integers(0, 100, count).astype(dtype)
    else:
        array_ = rng.random(count).astype(dtype)
    return array_.astype(np.dtype(dtype).newbyteorder("<"), copy=False).tobytes()


def build_payloads(
    model: str,
    version: str,
    specs: Sequence[TensorSpec],
    input_data: str,
    count: int,
    seed: int | None = None,
) -> list[bytes]:
    """`count` serialized ModelInferRequests (distinct data when random), without an id."""
    rng = np.random.default_rng(seed)
    payloads = []
    for _ in range(count if input_data == "random" else 1):
        request = pb.ModelInferRequest(model_name=model, model_version=version)
        for spec in specs:
            request.inputs.add(name=spec.name, datatype=spec.datatype, shape=spec.shape)
            request.raw_input_contents.append(tensor_bytes(spec, input_data, rng))
        payloads.append(request.SerializeToString())
    return payloads


def with_id(payload: bytes, request_id: str) -> bytes:
    """`payload` with its `id` field set (prepended as a field of its own)."""
    raw = request_id.encode()
    length = len(raw)
    varint = bytearray()
    while True:
        byte = length & 0x7F
        length >>= 7
        if length:
            varint.append(byte | 0x80)
        else:
            varint.append(byte)
            break
    return _ID_TAG + bytes(varint) + raw + payload


def parse_shapes(items: Sequence[str]) -> dict[str, tuple[int, ...]]:
    """`--shape name=1,64` arguments as {name: (1, 64)}."""
    shapes = {}
    for item in items:
        name, sep, dims = item.partition("=")
        try:
            shape = tuple(int(d) for d in dims.split(",") if d.strip())
        except ValueError:
            shape = ()
        if not sep or not name or not shape or any(d < 0 for d in shape):
            raise BenchError(f"--shape {item!r}: expected NAME=D1,D2,... with D >= 0")
        shapes[name] = shape
    return shapes


# ---------------------------------------------------------------------------------------------
# Arrivals and the measurement window


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


WARMUP, MEASURED, STOP = 0, 1, 2


class Window:
    """Which requests are measured: those sent after the warm-up and before the stop.

    The stop is the end of `duration_s`, the `requests`-th measured send, or an interrupt.
    Requests are classified by send time (scheduled time in open loop), so the ones still in
    flight at the stop are waited for and counted.
    """

    def __init__(self, warmup_s: float, duration_s: float | None, requests: int | None) -> None:
        self.warmup_ns = int(warmup_s * 1e9)
        self.duration_ns = None if duration_s is None else int(duration_s * 1e9)
        self.requests = requests
        self.start_ns = self.t0_ns = 0
        self.end_ns: int | None = None
        self.claimed = 0
        self.stopped_ns: int | None = None

    def begin(self) -> None:
        self.start_ns = time.perf_counter_ns()
        self.t0_ns = self.start_ns + self.warmup_ns
        self.end_ns = None if self.duration_ns is None else self.t0_ns + self.duration_ns

    def claim(self, sent_ns: int) -> int:
        """WARMUP, MEASURED or STOP for a request sent (or scheduled) at `sent_ns`."""
        if self.stopped_ns is not None:
            return STOP
        if sent_ns < self.t0_ns:
            return WARMUP
        if self.end_ns is not None and sent_ns >= self.end_ns:
            return STOP
        if self.requests is not None and self.claimed >= self.requests:
            return STOP
        self.claimed += 1
        return MEASURED

    def interrupt(self) -> None:
        """Stop sending now (Ctrl-C); what was measured so far is reported."""
        if self.stopped_ns is None:
            self.stopped_ns = time.perf_counter_ns()


class Recorder:
    """Every measured request: send time and latency of each success; for each failure its
    status name and completion time.

    Kept as flat int64 arrays (16 bytes a success), so hours of samples fit in memory and
    the percentiles are exact.
    """

    def __init__(self) -> None:
        self.sent_ns = array("q")
        self.latency_ns = array("q")
        self.error_done_ns = array("q")
        self.errors: Counter[str] = Counter()
        self.last_done_ns = 0
        # Live counters (warm-up included) for the progress line.
        self.live_done = 0
        self.live_errors = 0

    def record(self, state: int, sent_ns: int, done_ns: int, status: str | None) -> None:
        self.live_done += 1
        if status is not None:
            self.live_errors += 1
        if state != MEASURED:
            return
        self.last_done_ns = max(self.last_done_ns, done_ns)
        if status is None:
            self.sent_ns.append(sent_ns)
            self.latency_ns.append(done_ns - sent_ns)
        else:
            self.error_done_ns.append(done_ns)
            self.errors[status] += 1


# ---------------------------------------------------------------------------------------------
# Transports: one awaitable per request that answers None (success) or a status name


class Transport(Protocol):
    """How a request travels: unary calls, or a stream with answers matched by id."""

    async def __call__(self, payload: bytes, request_id: str) -> str | None: ...

    async def close(self) -> None: ...


def _status_name(exc: BaseException) -> str:
    if isinstance(exc, grpc.aio.AioRpcError):
        return exc.code().name
    if isinstance(exc, grpc.RpcError) and isinstance(exc, grpc.Call):
        return exc.code().name
    if isinstance(exc, asyncio.TimeoutError):
        return grpc.StatusCode.DEADLINE_EXCEEDED.name
    # A client-side failure, not a server status: name the exception so it is not hidden.
    return f"CLIENT_{type(exc).__name__}"


class Unary:
    """ModelInfer calls on a shared channel; requests go out as pre-serialized bytes and the
    responses are not parsed (the status says whether the call succeeded)."""

    def __init__(self, channel: grpc.aio.Channel, timeout_s: float) -> None:
        self._method = channel.unary_unary(SERVICE + "ModelInfer")
        self._timeout_s = timeout_s

    async def __call__(self, payload: bytes, request_id: str) -> str | None:
        try:
            await self._method(payload, timeout=self._timeout_s)
        except Exception as exc:  # counted, never fatal: the run must finish and report
            return _status_name(exc)
        return None

    async def close(self) -> None:
        return None


class BlockingUnary:
    """ModelInfer calls that block a thread each, for the threaded closed loop."""

    def __init__(self, channel: grpc.Channel, timeout_s: float) -> None:
        self._method = channel.unary_unary(SERVICE + "ModelInfer")
        self._timeout_s = timeout_s

    def __call__(self, payload: bytes) -> str | None:
        try:
            self._method(payload, timeout=self._timeout_s)
        except Exception as exc:  # counted, never fatal: the run must finish and report
            return _status_name(exc)
        return None


class Stream:
    """One ModelStreamInfer call; responses are matched to their requests by id.

    Opened on first use and reopened after a failure. A failure of the stream itself fails
    every request waiting on it with the stream's status; an error answered in-band
    (`error_message`) fails its own request only, as STREAM_ERROR.
    """

    def __init__(self, channel: grpc.aio.Channel, timeout_s: float) -> None:
        self._method = channel.stream_stream(
            SERVICE + "ModelStreamInfer",
            response_deserializer=pb.ModelStreamInferResponse.FromString,
        )
        self._timeout_s = timeout_s
        self._call: Any = None
        self._reader: asyncio.Task[None] | None = None
        self._pending: dict[str, asyncio.Future[str | None]] = {}
        self._write_lock = asyncio.Lock()

    async def __call__(self, payload: bytes, request_id: str) -> str | None:
        if self._call is None:
            self._call = self._method()
            self._reader = asyncio.create_task(self._read(self._call))
        future: asyncio.Future[str | None] = asyncio.get_running_loop().create_future()
        self._pending[request_id] = future
        try:
            async with self._write_lock:
                await self._call.write(payload)
            return await asyncio.wait_for(future, self._timeout_s)
        except Exception as exc:  # counted, never fatal: the run must finish and report
            if future.done() and not future.cancelled():
                return future.result()
            return _status_name(exc)
        finally:
            # A guarded pop: a late answer for a request that gave up must find nothing.
            self._pending.pop(request_id, None)

    async def _read(self, call: Any) -> None:
        status = grpc.StatusCode.UNAVAILABLE.name  # the server ended the stream early
        try:
            while True:
                response = await call.read()
                if response is grpc.aio.EOF:
                    break
                future = self._pending.get(response.infer_response.id)
                if future is not None and not future.done():
                    future.set_result(STREAM_ERROR if response.error_message else None)
        except grpc.aio.AioRpcError as exc:
            status = exc.code().name
        finally:
            if self._call is call:
                self._call = None
            for future in list(self._pending.values()):
                if not future.done():
                    future.set_result(status)

    async def close(self) -> None:
        call, reader = self._call, self._reader
        if call is not None:
            with contextlib.suppress(grpc.aio.AioRpcError, asyncio.InvalidStateError):
                await call.done_writing()
        if reader is not None:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(reader, 5)
        if call is not None:
            call.cancel()


# ---------------------------------------------------------------------------------------------
# Load loops


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
(with GRPC_EXPERIMENTS as this module sets it, tenth session); above a few callers the GIL
makes threads the slower choice."""


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


# ---------------------------------------------------------------------------------------------
# Reports


def percentiles_ms(latency_ns: Sequence[int] | np.ndarray) -> dict[str, float] | None:
    """Exact p50/p90/p99/p99.9 (nearest rank: each is a real sample), max and mean, in ms."""
    values = np.asarray(latency_ns, dtype=np.int64)
    if values.size == 0:
        return None
    ms = values / 1e6
    p50, p90, p99, p999 = np.percentile(ms, [50, 90, 99, 99.9], method="inverted_cdf")
    return {
        "p50": round(float(p50), 4),
        "p90": round(float(p90), 4),
        "p99": round(float(p99), 4),
        "p999": round(float(p999), 4),
        "max": round(float(ms.max()), 4),
        "mean": round(float(ms.mean()), 4),
    }


def timeline(recorder: Recorder, t0_ns: int, duration_ns: int) -> list[dict[str, Any]]:
    """Per second of the measured window, by completion time: throughput, latency
    percentiles of the requests that completed in that second, and errors."""
    seconds = max(1, math.ceil(duration_ns / 1e9))

    def bucket(done_ns: np.ndarray) -> np.ndarray:
        return np.clip((done_ns - t0_ns) // 1_000_000_000, 0, seconds - 1)

    sent = np.frombuffer(recorder.sent_ns, dtype=np.int64)
    latency = np.frombuffer(recorder.latency_ns, dtype=np.int64)
    done_bucket = bucket(sent + latency)
    err_bucket = bucket(np.frombuffer(recorder.error_done_ns, dtype=np.int64))
    rows = []
    for second in range(seconds):
        width_s = min(1.0, duration_ns / 1e9 - second) or 1.0
        mask = done_bucket == second
        pct = percentiles_ms(latency[mask]) if mask.any() else None
        rows.append(
            {
                "t": second,
                "rps": round(int(mask.sum()) / width_s, 2),
                "p50_ms": pct["p50"] if pct else None,
                "p90_ms": pct["p90"] if pct else None,
                "p99_ms": pct["p99"] if pct else None,
                "errors": int((err_bucket == second).sum()),
            }
        )
    return rows


def report(result: RunResult, meta: dict[str, Any]) -> dict[str, Any]:
    """The JSON object of one level; requests == successes + sum(errors) by construction."""
    rec, spec = result.recorder, result.spec
    successes = len(rec.latency_ns)
    errors = dict(sorted(rec.errors.items()))
    requests = successes + sum(errors.values())
    duration_s = result.duration_ns / 1e9
    out: dict[str, Any] = {"mode": "closed" if spec.rate is None else "open", **meta}
    if spec.rate is None:
        out["concurrency"] = spec.concurrency
    else:
        out["rate"] = spec.rate
        out["request_distribution"] = spec.distribution
        out["seed"] = spec.seed
        out["max_in_flight"] = spec.max_in_flight
    throughput = successes / duration_s
    out.update(
        duration_s=round(duration_s, 4),
        warmup_s=spec.warmup_s,
        requests=requests,
        successes=successes,
        errors=errors,
        throughput_rps=round(throughput, 3),
        throughput_infer_per_s=round(throughput * meta.get("batch_size", 1), 3),
        latency_ms=percentiles_ms(rec.latency_ns),
    )
    if result.open_loop is not None:
        out["offered_rate_rps"] = round(requests / duration_s, 3)
        out["dropped"] = result.open_loop.dropped
        out["late"] = result.open_loop.late
        out["max_send_lag_ms"] = round(result.open_loop.max_lag_ns / 1e6, 3)
    if result.interrupted:
        out["interrupted"] = True
    out["timeline"] = timeline(rec, result.t0_ns, result.duration_ns)
    return out


def knee(levels: Sequence[dict[str, Any]], key: str, p99_bound_ms: float) -> dict[str, Any] | None:
    """The highest load level that, like every level below it, kept p99 under the bound with
    no errors (and, in open loop, nothing dropped); None when the lowest already failed."""
    best = None
    for level in sorted(levels, key=lambda x: x[key]):
        latency = level["latency_ms"]
        ok = (
            latency is not None
            and latency["p99"] < p99_bound_ms
            and not level["errors"]
            and not level.get("dropped", 0)
        )
        if not ok:
            break
        best = {
            key: level[key],
            "throughput_rps": level["throughput_rps"],
            "p99_ms": latency["p99"],
        }
    return best


def format_text(doc: dict[str, Any]) -> str:
    """A human-readable report of a run or a sweep."""
    if doc["mode"] == "sweep":
        key = doc["sweep_of"]
        lines = [
            f"salvo bench sweep of {key}: model {doc['model']}, p99 bound {doc['p99_bound_ms']} ms",
            f"{key:>12} {'req/s':>10} {'p50 ms':>9} {'p99 ms':>9} {'errors':>8}",
        ]
        for level in doc["levels"]:
            lat = level["latency_ms"] or {}
            p50, p99 = lat.get("p50", math.nan), lat.get("p99", math.nan)
            lines.append(
                f"{level[key]:>12} {level['throughput_rps']:>10,.1f} {p50:>9.3f} {p99:>9.3f}"
                f" {sum(level['errors'].values()):>8}"
            )
        k = doc["knee"]
        lines.append(
            f"knee: {key} {k[key]} ({k['throughput_rps']:,.1f} req/s, p99 {k['p99_ms']:.3f} ms)"
            if k
            else "knee: none (the lowest level already broke the bound)"
        )
        return "\n".join(lines)
    if doc["mode"] == "closed":
        load = f"concurrency {doc.get('concurrency')}"
    else:
        load = f"rate {doc.get('rate')}/s ({doc.get('request_distribution', 'poisson')})"
    lines = [
        f"salvo bench: model {doc['model']}, {doc['mode']} loop, {load}, "
        f"{'streaming' if doc.get('streaming') else 'unary'}, {doc['duration_s']:.2f} s measured",
        f"requests {doc['requests']:,}  successes {doc['successes']:,}  errors "
        + (", ".join(f"{k} {v:,}" for k, v in doc["errors"].items()) or "0"),
        f"throughput {doc['throughput_rps']:,.1f} req/s",
    ]
    if "error_message" in doc:
        lines.append(f"failed: {doc['error_message']}")
    if doc["mode"] == "open" and "offered_rate_rps" in doc:
        lines.append(
            f"offered {doc['offered_rate_rps']:,.1f} req/s, dropped {doc['dropped']:,} "
            f"(in-flight cap {doc['max_in_flight']}), late {doc['late']:,}, "
            f"max send lag {doc['max_send_lag_ms']:.2f} ms"
        )
    lat = doc.get("latency_ms")
    if lat:
        lines.append(
            "latency ms  " + "  ".join(f"{name} {lat[key]:.3f}" for name, key in _LATENCY_LABELS)
        )
    return "\n".join(lines)


_LATENCY_LABELS = (
    ("p50", "p50"),
    ("p90", "p90"),
    ("p99", "p99"),
    ("p99.9", "p999"),
    ("max", "max"),
    ("mean", "mean"),
)


def plot(doc: dict[str, Any], path: Path) -> None:
    """A PNG: latency percentiles and throughput over time (a run), or against load (a sweep)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(9, 7), sharex=True)
    if doc["mode"] == "sweep":
        key = doc["sweep_of"]
        xs = [level[key] for level in doc["levels"]]
        for name in ("p50", "p90", "p99"):
            ys = [(level["latency_ms"] or {}).get(name, math.nan) for level in doc["levels"]]
            top.plot(xs, ys, marker="o", label=name)
        top.axhline(doc["p99_bound_ms"], color="red", linestyle="--", label="p99 bound")
        top.set_yscale("log")  # latency past the knee grows by orders of magnitude
        bottom.plot(xs, [level["throughput_rps"] for level in doc["levels"]], marker="o")
        if doc["knee"]:
            for axis in (top, bottom):
                axis.axvline(doc["knee"][key], color="grey", linestyle=":", label="knee")
        bottom.set_xlabel(key + (" (requests/s)" if key == "rate" else ""))
        title = f"{doc['model']}: sweep of {key}"
    else:
        rows = doc["timeline"]
        xs = [row["t"] for row in rows]
        for name in ("p50", "p90", "p99"):
            ys = [row[f"{name}_ms"] if row[f"{name}_ms"] is not None else math.nan for row in rows]
            top.plot(xs, ys, marker=".", label=name)
        bottom.plot(xs, [row["rps"] for row in rows], marker=".", label="successes/s")
        if any(row["errors"] for row in rows):
            bottom.plot(xs, [row["errors"] for row in rows], marker=".", label="errors/s")
        bottom.legend()
        bottom.set_xlabel("time since warm-up (s)")
        load = (
            f"concurrency {doc['concurrency']}"
            if doc["mode"] == "closed"
            else f"rate {doc['rate']}/s"
        )
        title = f"{doc['model']}: {doc['mode']} loop, {load}"
    top.set_ylabel("latency (ms)")
    top.legend()
    top.grid(True, alpha=0.3)
    bottom.set_ylabel("throughput (requests/s)")
    bottom.grid(True, alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=100)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------
# The command


def _int_list(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected integers like 1,2,4: {text!r}") from exc
    if not values or any(v <= 0 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive integers like 1,2,4: {text!r}")
    return values


def _float_list(text: str) -> list[float]:
    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected numbers like 100,200: {text!r}") from exc
    if not values or any(v <= 0 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive numbers like 100,200: {text!r}")
    return values


def _configure(parser: argparse.ArgumentParser) -> None:
    target = parser.add_argument_group("target")
    target.add_argument("-m", "--model", required=True, help="model name")
    target.add_argument("-x", "--model-version", default="", help="version (default: latest)")
    target.add_argument(
        "-u", "--url", "--target", dest="target", default="127.0.0.1:8001", metavar="HOST:PORT",
        help="gRPC HOST:PORT (default 127.0.0.1:8001)",
    )  # fmt: skip
    target.add_argument(
        "--streaming", action="store_true",
        help="ModelStreamInfer: one stream per closed-loop worker (one stream in open loop)",
    )  # fmt: skip
    target.add_argument(
        "--timeout-s", type=float, default=30.0, help="per-request deadline (default 30)"
    )
    target.add_argument(
        "--transport", choices=("auto", "asyncio", "threads"), default="auto",
        help="closed-loop unary callers: asyncio tasks, or a blocking thread each; auto: "
        f"threads up to concurrency {THREADED_MAX_CONCURRENCY} (lower latency), else asyncio",
    )  # fmt: skip

    inputs = parser.add_argument_group("inputs (shapes and datatypes from ModelMetadata)")
    inputs.add_argument(
        "-b", "--batch-size", type=int, default=1, help="rows per request (default 1)"
    )
    inputs.add_argument(
        "--shape", action="append", default=[], metavar="NAME=D1,D2",
        help="full shape of an input with variable dims (repeatable)",
    )  # fmt: skip
    inputs.add_argument(
        "--input-data", choices=("random", "zero"), default="random",
        help=f"random: {PAYLOAD_POOL} distinct requests cycled; zero: all zeros",
    )  # fmt: skip

    load = parser.add_argument_group("load")
    load.add_argument("-c", "--concurrency", type=int, help="closed loop: N workers (default 1)")
    load.add_argument("--rate", type=float, help="open loop: requests/s, sent on schedule")
    load.add_argument(
        "--request-distribution", choices=("poisson", "constant"), default="poisson",
        help="open-loop arrivals (default poisson)",
    )  # fmt: skip
    load.add_argument("--seed", type=int, help="seeds the arrivals and the random data")
    load.add_argument(
        "--max-in-flight", type=int, default=1000,
        help="open loop: arrivals beyond this many in flight are dropped and counted",
    )  # fmt: skip
    load.add_argument("--duration-s", type=float, default=10.0, help="measured time (default 10)")
    load.add_argument("--warmup-s", type=float, default=1.0, help="unmeasured warm-up (default 1)")
    load.add_argument(
        "--requests", type=int, help="stop after N measured requests instead of --duration-s"
    )

    sweep = parser.add_argument_group("sweep (finds the knee)")
    sweep.add_argument(
        "--sweep-concurrency", type=_int_list, metavar="1,2,4,...",
        help="closed loop at each concurrency in turn",
    )  # fmt: skip
    sweep.add_argument(
        "--sweep-rate", type=_float_list, metavar="100,200,...",
        help="open loop at each rate (requests/s) in turn",
    )  # fmt: skip
    sweep.add_argument("--p99-bound-ms", type=float, help="the knee's p99 bound (for a sweep)")

    output = parser.add_argument_group("output")
    output.add_argument("--json", action="store_true", help="print one JSON object to stdout")
    output.add_argument("--plot", type=Path, metavar="FILE.png", help="write a PNG (matplotlib)")
    output.add_argument("--quiet", action="store_true", help="no progress line on stderr")
    parser.set_defaults(func=run_command)


def add_parser(subparsers: Any) -> None:
    """Register `bench` on the `salvo` command's subparsers."""
    parser = subparsers.add_parser(
        "bench",
        help="load-test a v2 gRPC model: closed/open loop, exact percentiles, sweeps",
        description=__doc__.split("\n\n")[0],
    )
    _configure(parser)


def build_parser() -> argparse.ArgumentParser:
    """The standalone parser (`python -m salvo_client.bench`)."""
    parser = argparse.ArgumentParser(prog="salvo bench", description=__doc__.split("\n\n")[0])
    _configure(parser)
    return parser


def _validate(args: argparse.Namespace) -> str | None:
    if args.sweep_concurrency and args.sweep_rate:
        return "give --sweep-concurrency or --sweep-rate, not both"
    if args.rate is not None and (args.concurrency is not None or args.sweep_concurrency):
        return "--rate (open loop) and --concurrency (closed loop) exclude each other"
    if args.sweep_rate and args.concurrency is not None:
        return "--sweep-rate is open loop; drop --concurrency"
    if args.sweep_concurrency and args.rate is not None:
        return "--sweep-concurrency is closed loop; drop --rate"
    if (args.sweep_concurrency or args.sweep_rate) and args.p99_bound_ms is None:
        return "a sweep needs --p99-bound-ms"
    if args.concurrency is not None and args.concurrency < 1:
        return "--concurrency must be at least 1"
    if args.rate is not None and args.rate <= 0:
        return "--rate must be positive"
    if args.batch_size < 1:
        return "--batch-size must be at least 1"
    if args.requests is not None and args.requests < 1:
        return "--requests must be at least 1"
    if args.duration_s <= 0 or args.warmup_s < 0:
        return "--duration-s must be positive and --warmup-s not negative"
    if args.max_in_flight < 1:
        return "--max-in-flight must be at least 1"
    if args.plot is not None and importlib.util.find_spec("matplotlib") is None:
        return "--plot needs matplotlib: pip install 'salvo[bench]'"
    return None


def _fetch_metadata(
    channel: grpc.Channel, model: str, version: str, timeout_s: float
) -> pb.ModelMetadataResponse:
    stub = pb_grpc.GRPCInferenceServiceStub(channel)
    request = pb.ModelMetadataRequest(name=model, version=version)
    response: pb.ModelMetadataResponse = stub.ModelMetadata(request, timeout=timeout_s)
    return response


async def bench(args: argparse.Namespace) -> dict[str, Any]:
    """Run what `args` asks for (one level or a sweep) and return its JSON document."""
    meta: dict[str, Any] = {
        "model": args.model,
        "model_version": args.model_version,
        "target": args.target,
        "streaming": args.streaming,
        "batch_size": args.batch_size,
        "input_data": args.input_data,
        "grpc_experiments": os.environ.get("GRPC_EXPERIMENTS"),
    }
    options = [
        ("grpc.max_receive_message_length", -1),
        ("grpc.max_send_message_length", -1),
        # Every failure is counted by its status, never retried out of sight (grpc retries
        # some by itself); without the retry filter a call also costs about 15 us less.
        ("grpc.enable_retries", 0),
    ]
    with contextlib.ExitStack() as stack:
        blocking = stack.enter_context(grpc.insecure_channel(args.target, options=options))
        return await _bench(args, meta, options, blocking)


async def _bench(
    args: argparse.Namespace,
    meta: dict[str, Any],
    options: list[tuple[str, int]],
    blocking: grpc.Channel,
) -> dict[str, Any]:
    shapes = parse_shapes(args.shape)
    # The asyncio channel opens only for a level that needs it: once grpc.aio has started,
    # its poller thread takes the blocking calls' responses too, and a round trip on threads
    # pays two more thread wake-ups (GRPC_EXPERIMENTS says why those matter).
    async with contextlib.AsyncExitStack() as stack:
        aio: list[grpc.aio.Channel] = []

        async def aio_channel() -> grpc.aio.Channel:
            if not aio:
                channel = grpc.aio.insecure_channel(args.target, options=options)
                aio.append(await stack.enter_async_context(channel))
            return aio[0]

        try:
            metadata = await asyncio.to_thread(
                _fetch_metadata, blocking, args.model, args.model_version,
                min(args.timeout_s, 30.0),
            )  # fmt: skip
        except grpc.RpcError as exc:
            # Nothing to load-test: report the one request made, by its status, and stop.
            status = _status_name(exc)
            details = exc.details() if isinstance(exc, grpc.Call) else str(exc)
            closed = args.rate is None and not args.sweep_rate
            load = {"concurrency": args.concurrency or 1} if closed else {"rate": args.rate}
            return {
                "mode": "closed" if closed else "open",
                **meta,
                **load,
                "duration_s": 0.0,
                "requests": 1,
                "successes": 0,
                "errors": {status: 1},
                "throughput_rps": 0.0,
                "latency_ms": None,
                "timeline": [],
                "failed_at": "ModelMetadata",
                "error_message": f"ModelMetadata: {status}: {details}",
            }
        specs = resolve_inputs(metadata, args.batch_size, shapes)
        meta["inputs"] = [
            {"name": s.name, "datatype": s.datatype, "shape": list(s.shape)} for s in specs
        ]
        # Without --seed, draw one and report it, so any run can be repeated exactly.
        seed = args.seed if args.seed is not None else random.SystemRandom().randrange(2**31)
        payloads = build_payloads(
            args.model, args.model_version, specs, args.input_data, PAYLOAD_POOL, seed
        )
        progress = None if args.quiet else sys.stderr

        def threaded(concurrency: int | None) -> bool:
            if args.streaming or concurrency is None or args.transport == "asyncio":
                return False
            return args.transport == "threads" or concurrency <= THREADED_MAX_CONCURRENCY

        async def level(concurrency: int | None, rate: float | None, label: str) -> dict:
            spec = LoadSpec(
                concurrency=concurrency,
                rate=rate,
                warmup_s=args.warmup_s,
                duration_s=None if args.requests is not None else args.duration_s,
                requests=args.requests,
                distribution=args.request_distribution,
                seed=seed,
                max_in_flight=args.max_in_flight,
            )
            on_threads = threaded(concurrency)
            result = await run_level(
                None if on_threads else await aio_channel(),
                payloads,
                spec,
                streaming=args.streaming,
                timeout_s=args.timeout_s,
                progress=progress,
                label=label,
                blocking_channel=blocking if on_threads else None,
            )
            doc = report(result, meta)
            doc["transport"] = "threads" if on_threads else "asyncio"
            if result.interrupted:
                interrupted.append(doc)
            return doc

        interrupted: list[dict[str, Any]] = []

        if args.sweep_concurrency or args.sweep_rate:
            key = "concurrency" if args.sweep_concurrency else "rate"
            values = sorted(args.sweep_concurrency or args.sweep_rate)
            levels = []
            for value in values:
                label = f"[{key} {value}]"
                if key == "concurrency":
                    levels.append(await level(int(value), None, label))
                else:
                    levels.append(await level(None, float(value), label))
                if interrupted:  # Ctrl-C ends the sweep, not just this level
                    break
            return {
                "mode": "sweep",
                "sweep_of": key,
                **meta,
                "p99_bound_ms": args.p99_bound_ms,
                "levels": levels,
                "knee": knee(levels, key, args.p99_bound_ms),
            }
        if args.rate is not None:
            return await level(None, args.rate, f"[rate {args.rate:g}]")
        return await level(args.concurrency or 1, None, f"[concurrency {args.concurrency or 1}]")


def run_command(args: argparse.Namespace) -> int:
    """`salvo bench`: 0 when every request succeeded (or a sweep ran), 1 on errors, 2 on
    settings it cannot use."""
    problem = _validate(args)
    if problem:
        print(f"salvo bench: {problem}", file=sys.stderr)
        return 2
    try:
        doc = asyncio.run(bench(args))
    except BenchError as exc:
        print(f"salvo bench: {exc}", file=sys.stderr)
        return 2
    if args.plot is not None and doc.get("failed_at") is None:
        plot(doc, args.plot)
    print(json.dumps(doc) if args.json else format_text(doc), flush=True)
    if doc.get("failed_at") is not None:
        return 1
    if doc["mode"] == "sweep":
        return 0
    return 1 if doc["errors"] else 0


def main(argv: list[str] | None = None) -> int:
    """Entry point for `python -m salvo_client.bench` and for tests."""
    args = build_parser().parse_args(argv)
    return run_command(args)


if __name__ == "__main__":
    if "GRPC_EXPERIMENTS" not in os.environ:
        # grpc, imported with this package, has read the environment already: start again.
        os.environ["GRPC_EXPERIMENTS"] = GRPC_EXPERIMENTS
        os.execv(sys.executable, [sys.executable, "-m", "salvo_client.bench", *sys.argv[1:]])
    raise SystemExit(main())
