"""The measurement window of one load level (which requests count) and the recorder of
every measured request's outcome."""

from __future__ import annotations

import time
from array import array
from collections import Counter

__all__ = ["MEASURED", "STOP", "WARMUP", "Recorder", "Window"]

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
