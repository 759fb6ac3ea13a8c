"""Load for the overload and soak benchmarks: open and closed loops over a mix of requests,
in several client processes, and the server's RSS sampled alongside.

Each request kind is a pre-serialized ModelInfer payload sent through a generic method
(no per-call protobuf work in the client). Open-loop latency is measured from the
scheduled send time, so a server that falls behind shows in the latency (no coordinated
omission). Every answer is recorded: its kind, when it was scheduled, its latency, its
status, and for RESOURCE_EXHAUSTED whether it carried `grpc-retry-pushback-ms`. Client
processes are spawned (never forked: gRPC does not survive a fork), and split the rate.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np

from salvo_client.bench import arrival_offsets_s, percentiles_ms
from salvo_client.proto import grpc_service_pb2 as pb

INFER = "/inference.GRPCInferenceService/ModelInfer"
RECORD = np.dtype(
    [
        ("kind", "u1"),
        ("scheduled_ns", "i8"),
        ("latency_ns", "i8"),
        ("code", "i1"),
        ("pushback", "?"),
    ]
)
NOT_SENT = -1
"""Code of an arrival the generator dropped: too many of its own requests in flight."""
CODES = {code.value[0]: code.name for code in grpc.StatusCode}
CODES[NOT_SENT] = "NOT_SENT"


@dataclass(frozen=True)
class Kind:
    """One kind of request in the mix."""

    name: str
    payload: bytes
    weight: float = 1.0
    cancel_within_ms: float = 0.0
    """Above 0: the client cancels the call after a uniform random delay up to this."""
    expect: tuple[str, ...] = ("OK",)
    """The statuses it may get; any other is unexpected."""


@dataclass(frozen=True)
class Load:
    """What one client process sends."""

    target: str
    kinds: tuple[Kind, ...]
    start_ns: int
    """Monotonic time (system-wide on Linux) at which the run starts, in every process."""
    duration_s: float
    rate: float = 0.0
    """Open loop: arrivals per second for this process. 0: closed loop."""
    concurrency: int = 1
    """Closed loop: callers in this process."""
    max_in_flight: int = 5000
    timeout_s: float = 30.0
    seed: int = 0


async def _call(method, kind: Kind, rng: random.Random, timeout_s: float) -> tuple[int, bool]:
    call = method(kind.payload, timeout=timeout_s)
    if kind.cancel_within_ms:
        asyncio.get_running_loop().call_later(
            rng.uniform(0, kind.cancel_within_ms) / 1000, call.cancel
        )
    try:
        await call
    except asyncio.CancelledError:
        return grpc.StatusCode.CANCELLED.value[0], False
    except grpc.aio.AioRpcError as exc:
        pushback = any(k == "grpc-retry-pushback-ms" for k, _ in exc.trailing_metadata() or ())
        return exc.code().value[0], pushback
    return grpc.StatusCode.OK.value[0], False


async def _drive(load: Load) -> np.ndarray:
    rng = random.Random(load.seed)
    weights = [k.weight for k in load.kinds]
    out: list[tuple[int, int, int, int, bool]] = []
    async with grpc.aio.insecure_channel(load.target) as channel:
        method = channel.unary_unary(INFER, request_serializer=None, response_deserializer=None)
        end_ns = load.start_ns + int(load.duration_s * 1e9)
        await asyncio.sleep(max(load.start_ns - time.monotonic_ns(), 0) / 1e9)

        async def one(index: int, scheduled_ns: int) -> None:
            code, pushback = await _call(method, load.kinds[index], rng, load.timeout_s)
            out.append((index, scheduled_ns, time.monotonic_ns() - scheduled_ns, code, pushback))

        if not load.rate:

            async def caller() -> None:
                while (now := time.monotonic_ns()) < end_ns:
                    await one(rng.choices(range(len(weights)), weights)[0], now)

            await asyncio.gather(*(caller() for _ in range(load.concurrency)))
            return np.array(out, dtype=RECORD)

        in_flight: set[asyncio.Task] = set()
        for offset_s in arrival_offsets_s(load.rate, "poisson", load.seed):
            scheduled_ns = load.start_ns + int(offset_s * 1e9)
            if scheduled_ns >= end_ns:
                break
            delay_ns = scheduled_ns - time.monotonic_ns()
            if delay_ns > 0:
                await asyncio.sleep(delay_ns / 1e9)  # pacing the open loop
            index = rng.choices(range(len(weights)), weights)[0]
            if len(in_flight) >= load.max_in_flight:
                out.append((index, scheduled_ns, 0, NOT_SENT, False))
                continue
            task = asyncio.create_task(one(index, scheduled_ns))
            in_flight.add(task)
            task.add_done_callback(in_flight.discard)
        if in_flight:
            await asyncio.gather(*in_flight)
    return np.array(out, dtype=RECORD)


def infer_payload(
    model: str, name: str, shape: tuple[int, ...], datatype: str = "FP32", seed: int = 0
) -> bytes:
    """A serialized ModelInferRequest with one random input (FP32 or FP64)."""
    request = pb.ModelInferRequest(model_name=model)
    request.inputs.add(name=name, datatype=datatype, shape=shape)
    dtype = np.float32 if datatype == "FP32" else np.float64
    data = np.random.default_rng(seed).random(shape).astype(dtype)
    request.raw_input_contents.append(data.tobytes())
    return request.SerializeToString()


def _run(load: Load) -> np.ndarray:
    return asyncio.run(_drive(load))


class Clients:
    """A pool of spawned client processes; `run` splits one load across all of them."""

    def __init__(self, processes: int) -> None:
        self.processes = processes
        self.pool = multiprocessing.get_context("spawn").Pool(processes)

    def run(
        self, load: Load, lead_s: float = 1.0, tick: Callable[[float], None] | None = None
    ) -> np.ndarray:
        """Run `load` (rate and concurrency for all processes together); every record.

        `tick`, if given, is called about once a second with the seconds since the start.
        """
        start_ns = time.monotonic_ns() + int(lead_s * 1e9)
        n = self.processes
        parts = [
            Load(
                load.target,
                load.kinds,
                start_ns,
                load.duration_s,
                load.rate / n,
                max(load.concurrency // n, 1),
                load.max_in_flight,
                load.timeout_s,
                load.seed * 1000 + i,
            )
            for i in range(n)
        ]
        result = self.pool.map_async(_run, parts)
        while tick is not None and not result.ready():
            result.wait(1.0)
            tick((time.monotonic_ns() - start_ns) / 1e9)
        records = np.concatenate(result.get())
        records["scheduled_ns"] -= start_ns
        return records

    def close(self) -> None:
        self.pool.close()
        self.pool.join()


def rss_mib(pid: int) -> float:
    """Resident set size of process `pid`, MiB (0 once it has gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def cpu_s(pid: int, tid: int | None = None) -> float:
    """CPU seconds (user + system) process `pid`, or its thread `tid`, has used (0 once it
    has gone)."""
    stat = Path(f"/proc/{pid}/stat" if tid is None else f"/proc/{pid}/task/{tid}/stat")
    try:
        fields = stat.read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def thread_cpu_s(pid: int) -> dict[int, float]:
    """CPU seconds each thread of process `pid` has used so far, by thread id."""
    tids = [int(task.name) for task in Path(f"/proc/{pid}/task").iterdir()]
    return {tid: cpu_s(pid, tid) for tid in tids}


class ServerSampler:
    """The server's RSS every `interval_s`, and its CPU time, by phase (set `phase`)."""

    def __init__(self, pid: int, interval_s: float = 0.5) -> None:
        self.pid = pid
        self.interval_s = interval_s
        self.phase = "start"
        self.samples: list[tuple[float, str, float, float]] = []
        """(seconds since start, phase, RSS MiB, CPU seconds used so far)."""
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        start = time.monotonic()
        while not self._stop.wait(self.interval_s):
            now = time.monotonic() - start
            self.samples.append((now, self.phase, rss_mib(self.pid), cpu_s(self.pid)))

    def rss(self, phase: str) -> list[float]:
        return [mib for _, p, mib, _ in self.samples if p == phase]

    def cpu_share(self, phase: str) -> float:
        """CPU seconds per wall second during `phase` (1.0 = one core busy)."""
        points = [(t, cpu) for t, p, _, cpu in self.samples if p == phase]
        if len(points) < 2:
            return 0.0
        (t0, c0), (t1, c1) = points[0], points[-1]
        return (c1 - c0) / (t1 - t0)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def unexpected(records: np.ndarray, kinds: tuple[Kind, ...]) -> int:
    """Answers whose status their kind does not allow."""
    count = 0
    for index, kind in enumerate(kinds):
        codes = records[records["kind"] == index]["code"]
        count += sum(CODES[int(code)] not in kind.expect for code in codes)
    return count


def summary(records: np.ndarray, kind: int | None = None, duration_s: float = 0) -> dict:
    """Counts per status, throughput of OK answers, and OK latency percentiles (ms)."""
    if kind is not None:
        records = records[records["kind"] == kind]
    codes, counts = np.unique(records["code"], return_counts=True)
    ok = records[records["code"] == 0]
    return {
        "statuses": {CODES[int(c)]: int(n) for c, n in zip(codes, counts, strict=True)},
        "ok_per_s": len(ok) / duration_s if duration_s else 0.0,
        "latency_ms": percentiles_ms(ok["latency_ns"]),
        "pushback": int(records["pushback"].sum()),
    }


def windows_p99_ms(records: np.ndarray, duration_s: float, window_s: float) -> list[float]:
    """p99 of OK latency per window of scheduled time: flat means bounded."""
    ok = records[records["code"] == 0]
    out = []
    for start in np.arange(0, duration_s, window_s):
        lo, hi = int(start * 1e9), int((start + window_s) * 1e9)
        part = ok[(ok["scheduled_ns"] >= lo) & (ok["scheduled_ns"] < hi)]["latency_ns"]
        stats = percentiles_ms(part)
        out.append(stats["p99"] if stats else float("nan"))
    return out
