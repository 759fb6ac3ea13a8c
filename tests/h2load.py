"""h2load (Debian's nghttp2-client) as a gRPC load generator, and nginx's access log as the
record of what each call got.

A Python gRPC client spends about 200 µs of CPU a call; at 5x the saturating load of `mlp`
on a 2-core machine that is more than one of its cores, taken from the server it measures.
h2load is C and spends a few µs a call, so the rate it is asked for is the rate it sends.
It speaks HTTP/2, not gRPC: every call posts the same length-prefixed ModelInferRequest, and
it cannot read gRPC statuses (they are in trailers, after HTTP 200). So it is used only
through deploy/nginx, whose access log records each call's gRPC status and how long nginx
held it.
"""

from __future__ import annotations

import re
import resource
import shutil
import struct
import subprocess
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np

H2LOAD = shutil.which("h2load")
INFER_PATH = "/inference.GRPCInferenceService/ModelInfer"
STATUS_NAMES = {str(code.value[0]): code.name for code in grpc.StatusCode}
LOG_LINE = re.compile(
    r"\] (?P<at>[\d.]+) \"[^\"]*\" \d+ grpc_status=(?P<status>\d*) .* request_s=(?P<s>[\d.]+)"
)
STARTED = re.compile(r"requests: \d+ total, (\d+) started")
CLIENT_CLOSED = "CLIENT_CLOSED"
"""No gRPC status: the client reset the call before its end (nginx logs HTTP 499, or 200 or
400 when it was part way). h2load does so to the calls still open when its time is up."""


def grpc_body(message: bytes) -> bytes:
    """A serialized message as one gRPC frame: uncompressed flag, 4-byte length, the bytes."""
    return b"\0" + struct.pack(">I", len(message)) + message


@dataclass(frozen=True)
class Run:
    """One h2load run."""

    latency_ns: np.ndarray
    """Every finished call, from h2load sending it to the end of its answer (shed ones too)."""
    cpu_s: float
    """h2load's own CPU time."""
    started: int
    """Calls sent, finished or not: nginx logs each one, those h2load reset at the end too."""


def drive(
    target: str,
    body: Path,
    duration_s: float,
    log: Path,
    *,
    concurrency: int = 0,
    rate: float = 0.0,
    connections: int = 8,
    requests: int = 0,
) -> Run:
    """Send `body` to ModelInfer at `target` for `duration_s` (or, with `requests`, that many
    calls): a closed loop of `concurrency` calls, or `rate` calls a second spread evenly over
    `connections` connections (each may hold 256 calls open, far more than nginx lets
    through, so arrivals never wait on answers)."""
    if H2LOAD is None:
        raise RuntimeError("h2load not found: apt-get install nghttp2-client")
    if not requests and round(duration_s) < 1:
        raise ValueError(f"h2load runs for whole seconds, at least 1: {duration_s}")
    if rate <= 0 and concurrency <= 0:
        raise ValueError("give a rate (open loop) or a concurrency (closed loop)")
    if rate:
        shape = ["-c", str(connections), "-m", "256", "--rps", f"{rate / connections:.3f}"]
    else:
        connections = min(connections, concurrency)
        if concurrency % connections:
            raise ValueError(f"concurrency {concurrency} is not a multiple of {connections}")
        shape = ["-c", str(connections), "-m", str(concurrency // connections)]
    length = ["-n", str(requests)] if requests else ["-D", str(round(duration_s))]
    cmd = [
        H2LOAD, *shape, *length, "-d", str(body),
        "-H", "content-type: application/grpc", "-H", "te: trailers",
        "--log-file", str(log), f"http://{target}{INFER_PATH}",
    ]  # fmt: skip
    log.unlink(missing_ok=True)  # h2load appends
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    done = subprocess.run(cmd, capture_output=True, text=True)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode:
        raise RuntimeError(f"h2load failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
    cpu_s = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    # Columns: start (µs since the epoch), HTTP status, µs to the end of the answer.
    latency_us = [int(line.split("\t")[2]) for line in log.read_text().splitlines() if line]
    started = STARTED.search(done.stdout)
    if started is None:
        raise RuntimeError(f"h2load's summary has no request counts:\n{done.stdout}")
    return Run(np.array(latency_us, dtype=np.int64) * 1000, cpu_s, int(started.group(1)))


@dataclass(frozen=True)
class Logged:
    """The calls nginx logged in a stretch of its access log."""

    statuses: Counter[str]
    """Calls by gRPC status name."""
    ok_ns: np.ndarray
    """OK calls: how long nginx held each (millisecond resolution)."""
    ok_at_s: np.ndarray
    """OK calls: when each ended (seconds since the epoch, to the millisecond)."""


def logged(lines: Iterable[str]) -> Logged:
    """What lines of nginx's access log (deploy/nginx's `grpc` format) say of their calls."""
    statuses: Counter[str] = Counter()
    ok_s, ok_at = [], []
    for line in lines:
        match = LOG_LINE.search(line)
        if match is None:
            continue
        statuses[STATUS_NAMES.get(match["status"], match["status"]) or CLIENT_CLOSED] += 1
        if match["status"] == "0":
            ok_s.append(float(match["s"]))
            ok_at.append(float(match["at"]))
    return Logged(statuses, np.array(ok_s) * 1e9, np.array(ok_at))
