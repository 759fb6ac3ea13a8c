"""Where telemetry leaves the process: OTLP exporters from the standard OTEL_* variables,
Salvo's own draw for sampled roots, and the count of what a collector never got.

A collector that is down, slow or refusing costs dropped spans, counted in
`salvo_telemetry_dropped_total` and logged at most once a minute; it never blocks a request.
"""

from __future__ import annotations

import logging
import os
import random
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from opentelemetry.sdk.metrics.export import MetricReader, PeriodicExportingMetricReader
from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult

log = logging.getLogger(__name__)


@dataclass(slots=True)
class DropCounter:
    """Telemetry lost to a collector that is down, slow or refusing, or to full queues."""

    spans: int = 0
    _last_log: float = field(default=0.0)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, count: int, why: str) -> None:
        with self._lock:
            self.spans += count
            now = time.monotonic()
            if now - self._last_log < 60:
                return
            self._last_log = now
        log.warning("telemetry dropped %d spans so far (%s)", self.spans, why)


class CountingExporter(SpanExporter):
    """Counts the spans of exports that failed; never raises into the SDK."""

    def __init__(self, inner: SpanExporter, drops: DropCounter) -> None:
        self.inner = inner
        self.drops = drops

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        try:
            result = self.inner.export(spans)
        except Exception as exc:  # an exporter bug must not kill the export thread
            self.drops.add(len(spans), f"export raised {type(exc).__name__}")
            return SpanExportResult.FAILURE
        if result is not SpanExportResult.SUCCESS:
            self.drops.add(len(spans), "export failed")
        return result

    def shutdown(self) -> None:
        self.inner.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self.inner.force_flush(timeout_millis)


class CountingProcessor(SpanProcessor):
    """A BatchSpanProcessor that counts the spans its full queue turns away."""

    def __init__(self, inner: BatchSpanProcessor, drops: DropCounter, max_queue: int) -> None:
        self.inner = inner
        self.drops = drops
        self.max_queue = max_queue
        batch = getattr(inner, "_batch_processor", None)
        self._queue = getattr(batch, "_queue", None)

    def on_start(self, span: Any, parent_context: Any = None) -> None:
        self.inner.on_start(span, parent_context)

    def on_end(self, span: ReadableSpan) -> None:
        if self._queue is not None and len(self._queue) >= self.max_queue:
            self.drops.add(1, "span queue full")
            return
        self.inner.on_end(span)

    def shutdown(self) -> None:
        self.inner.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self.inner.force_flush(timeout_millis)


def env(name: str, default: str = "") -> str:
    return os.environ.get(name, default).strip()


def _otlp_endpoint(signal: str) -> str:
    return env(f"OTEL_EXPORTER_OTLP_{signal}_ENDPOINT") or env("OTEL_EXPORTER_OTLP_ENDPOINT")


def _protocol(signal: str) -> str:
    return (
        env(f"OTEL_EXPORTER_OTLP_{signal}_PROTOCOL") or env("OTEL_EXPORTER_OTLP_PROTOCOL")
    ) or "grpc"


draw = random.random
"""The draw for sampled roots (a seam for tests)."""


def root_ratio() -> float | None:
    """The ratio at which Salvo samples roots itself, for the parent-based ratio samplers.

    With `OTEL_TRACES_SAMPLER` `parentbased_traceidratio` (or `parentbased_always_off`), a
    request without a `traceparent` is sampled at the ratio by Salvo before any span exists,
    so the ones dropped (99 in 100 at 1%) cost no span, trace id or attributes; the provider
    then gets a parent-based sampler that keeps every root it is handed. A random draw at
    the ratio keeps roots at the rate the trace-id ratio would. None leaves every decision
    to the SDK's sampler from the environment.
    """
    name = env("OTEL_TRACES_SAMPLER", "parentbased_always_on").strip().lower()
    if name == "parentbased_always_off":
        return 0.0
    if name != "parentbased_traceidratio":
        return None
    try:
        ratio = float(env("OTEL_TRACES_SAMPLER_ARG", "1.0"))
    except ValueError:
        return None  # the SDK's sampler falls back and says why
    return ratio if 0.0 <= ratio <= 1.0 else None


def span_exporter() -> SpanExporter | None:
    if env("OTEL_TRACES_EXPORTER", "otlp") == "none" or not _otlp_endpoint("TRACES"):
        return None
    if _protocol("TRACES") == "http/protobuf":
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        return OTLPSpanExporter()
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import (
        OTLPSpanExporter as GrpcSpanExporter,
    )

    return GrpcSpanExporter()


def metric_push_reader() -> MetricReader | None:
    if env("OTEL_METRICS_EXPORTER", "otlp") == "none" or not _otlp_endpoint("METRICS"):
        return None
    if _protocol("METRICS") == "http/protobuf":
        from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter

        exporter: Any = OTLPMetricExporter()
    else:
        from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import (
            OTLPMetricExporter as GrpcMetricExporter,
        )

        exporter = GrpcMetricExporter()
    return PeriodicExportingMetricReader(exporter)
