"""Access logs: one JSON line per request served, with its trace and span ids, at most a
set number a second (a token bucket), so that a flood of requests cannot flood the log."""

from __future__ import annotations

import json
import logging
import time
from typing import Any

log = logging.getLogger("salvo.access")


class AccessLog:
    """Writes access-log lines, `per_s` a second at most (0: none)."""

    def __init__(self, per_s: float) -> None:
        self._rate = per_s
        self._tokens = per_s
        self._refill = time.monotonic()

    def take(self) -> bool:
        """Whether a line may be written now (its token is spent)."""
        if self._rate <= 0:
            return False
        now = time.monotonic()
        self._tokens = min(self._rate, self._tokens + (now - self._refill) * self._rate)
        self._refill = now
        if self._tokens < 1:
            return False
        self._tokens -= 1
        return True

    def write(self, method: str, probe: Any, code: str, duration_s: float, peer: str) -> None:
        """One line for a request that `probe` (a telemetry Probe) describes."""
        entry: dict[str, Any] = {
            "event": "access",
            "method": method,
            "model": probe.model,
            "version": probe.version,
            "status": code,
            "duration_ms": round(duration_s * 1000, 3),
            "peer": peer,
        }
        if probe.batch_rows:
            entry["batch_size"] = probe.batch_rows
        if probe.cache:
            entry["cache"] = probe.cache
        if probe.span is not None:
            ctx = probe.span.get_span_context()
            if ctx.is_valid:
                entry["trace_id"] = format(ctx.trace_id, "032x")
                entry["span_id"] = format(ctx.span_id, "016x")
        log.info(json.dumps(entry))
