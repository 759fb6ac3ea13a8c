"""Traces, metrics and access logs: the cross-cutting observability layer.

Metrics come from one set of instruments read two ways: pulled by Prometheus from the HTTP
port's /metrics, and pushed over OTLP when an endpoint is configured. Gauges and counters
read at collection time are OpenTelemetry observable instruments; the ones recorded per
request are `salvo.observability.meters` points (an SDK record costs ~7 µs, these under
1 µs), which the same OpenTelemetry readers collect. Traces go over OTLP (gRPC, or
HTTP/protobuf by OTEL_EXPORTER_OTLP_PROTOCOL) when an endpoint is configured; sampling
follows OTEL_TRACES_SAMPLER. The standard OTEL_* variables configure both;
OTEL_SDK_DISABLED=true turns traces and OTLP pushes off (/metrics stays).

Telemetry never costs serving: spans and metrics leave through bounded queues on the SDK's
own threads (`export`), and shutdown flushes within a bound. A front end starts and ends
each request's SERVER span itself, lean and sampled (OpenTelemetry's gRPC instrumentation
costs a fifth to a quarter of the throughput); the data plane and the batcher fill in the
request's `Probe`, and queue and compute spans are written after the fact from the
batcher's timestamps, so they cost nothing unless sampled.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.metrics import CallbackOptions, Observation
from opentelemetry.propagate import extract
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import MetricReader
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.sdk.trace.sampling import ALWAYS_ON, ParentBased
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import Link, SpanKind, Status, StatusCode

from salvo import __version__
from salvo.observability import export
from salvo.observability.access_log import AccessLog
from salvo.observability.export import (
    CountingExporter,
    CountingProcessor,
    DropCounter,
    env,
    metric_push_reader,
    root_ratio,
    span_exporter,
)
from salvo.observability.meters import CounterPoint, HistogramPoint, Meters

log = logging.getLogger(__name__)

SECONDS_BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
    2.5, 5.0, 10.0,
)  # fmt: skip
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


# Monotonic clocks time the work; spans need wall-clock nanoseconds.
def wall_ns(monotonic_ns: int) -> int:
    """A monotonic_ns() reading as Unix-epoch nanoseconds, for span timestamps.

    The offset between the clocks is read now, not once at start: the wall clock can be
    stepped (NTP) while a server runs, and spans OTel stamps with the wall clock (a
    request's own) must still enclose the children written from monotonic readings."""
    return monotonic_ns + time.time_ns() - time.monotonic_ns()


@dataclass(slots=True)
class Probe:
    """What the batcher learns about one request, for its spans and metrics."""

    span: Any = None
    """The request's SERVER span, or None when it is not traced."""
    model: str = ""
    """The model and version that served it, once resolved (unknown names stay out of
    metric labels, so strangers cannot blow up their cardinality)."""
    version: str = ""
    cache: str = ""
    """hit, miss or coalesced when the cache was consulted."""
    enqueued_ns: int = 0
    started_ns: int = 0
    finished_ns: int = 0
    batch_rows: int = 0


OUTCOMES = {
    "OK": "success",
    "RESOURCE_EXHAUSTED": "rejected",
    "CANCELLED": "cancelled",
    "DEADLINE_EXCEEDED": "timeout",
}


class _ModelPoints:
    """The bound metric points of one model version's batches and queue."""

    __slots__ = ("queue", "compute", "batch_size")

    def __init__(self, telemetry: Telemetry, labels: dict[str, str]) -> None:
        self.queue = telemetry.queue_duration.bind(labels)
        self.compute = telemetry.compute_duration.bind(labels)
        self.batch_size = telemetry.batch_size.bind(labels)


class _RequestPoints:
    """The bound metric points of one model version's requests over one protocol."""

    __slots__ = ("_telemetry", "_labels", "_outcomes", "duration")

    def __init__(self, telemetry: Telemetry, labels: dict[str, str]) -> None:
        self._telemetry = telemetry
        self._labels = labels
        self._outcomes: dict[str, CounterPoint] = {}
        self.duration = telemetry.request_duration.bind(labels)

    def outcome(self, code: str) -> CounterPoint:
        point = self._outcomes.get(code)
        if point is None:
            outcome = OUTCOMES.get(code, "error")
            point = self._telemetry.requests.bind({**self._labels, "outcome": outcome})
            self._outcomes[code] = point
        return point


class Telemetry:
    """Every signal Salvo emits, behind a few cheap calls from the front ends, the data
    plane and the batcher."""

    def __init__(
        self,
        registry: Any = None,
        *,
        tracer_provider: TracerProvider | None = None,
        metric_readers: Iterable[MetricReader] = (),
        access_logs_per_s: float = 10.0,
    ) -> None:
        """Build from the OTEL_* environment; tests pass in-memory providers and readers."""
        self.drops = DropCounter()
        self._root_ratio: float | None = None
        disabled = env("OTEL_SDK_DISABLED").lower() == "true"
        resource = Resource.create(
            {"service.name": env("OTEL_SERVICE_NAME", "salvo"), "service.version": __version__}
        )
        if tracer_provider is None and not disabled:
            exporter = span_exporter()
            if exporter is not None:
                self._root_ratio = root_ratio()
                tracer_provider = (
                    TracerProvider(resource=resource)
                    if self._root_ratio is None
                    else TracerProvider(resource=resource, sampler=ParentBased(ALWAYS_ON))
                )
                max_queue = int(env("OTEL_BSP_MAX_QUEUE_SIZE", "8192"))
                batch = BatchSpanProcessor(
                    CountingExporter(exporter, self.drops), max_queue_size=max_queue
                )
                tracer_provider.add_span_processor(CountingProcessor(batch, self.drops, max_queue))
        self.tracer_provider = tracer_provider
        self.tracer = tracer_provider.get_tracer("salvo", __version__) if tracer_provider else None

        readers = list(metric_readers)
        if registry is not None:
            from opentelemetry.exporter.prometheus import PrometheusMetricReader

            readers.append(
                PrometheusMetricReader(
                    disable_target_info=True, scope_info_enabled=False, registry=registry
                )
            )
        push = None if disabled else metric_push_reader()
        if push is not None:
            readers.append(push)
        self.meter_provider = MeterProvider(metric_readers=readers, resource=resource)
        meter = self.meter_provider.get_meter("salvo", __version__)
        # The per-request instruments are plain Python points (salvo.meters): an SDK
        # record costs ~7 µs on the event loop, these well under 1 µs.
        self.meters = Meters(resource, InstrumentationScope("salvo", __version__))
        self.meters.attach(readers)
        self.rpc_duration = self.meters.histogram(
            "rpc.server.call.duration", "s", "Duration of RPCs served", SECONDS_BUCKETS
        )
        self.http_duration = self.meters.histogram(
            "http.server.request.duration", "s", "Duration of HTTP requests served",
            SECONDS_BUCKETS,
        )  # fmt: skip
        self.requests = self.meters.counter(
            "salvo.requests", "{request}", "Inference requests by outcome"
        )
        self.request_duration = self.meters.histogram(
            "salvo.request.duration", "s", "End-to-end inference latency", SECONDS_BUCKETS
        )
        self.queue_duration = self.meters.histogram(
            "salvo.queue.duration", "s", "Time requests wait in the batch queue", SECONDS_BUCKETS
        )
        self.compute_duration = self.meters.histogram(
            "salvo.compute.duration", "s", "Forward pass time per batch", SECONDS_BUCKETS
        )
        self.batch_size = self.meters.histogram(
            "salvo.batch.size", "{row}", "Rows per executed batch", BATCH_BUCKETS
        )
        self.sources: list[Callable[[], Iterable[tuple[str, float, dict[str, str]]]]] = []
        meter.create_observable_gauge(
            "salvo.queue.depth", [self._observe("queue_depth")], description="Requests queued"
        )
        meter.create_observable_gauge(
            "salvo.inflight", [self._observe("inflight")], description="Requests running"
        )
        meter.create_observable_gauge(
            "salvo.model.ready", [self._observe("ready")], description="1 when a model serves"
        )
        meter.create_observable_gauge(
            "salvo.model.load.duration",
            [self._observe("load_s")],
            unit="s",
            description="How long the model's last load took",
        )
        for name, what in (
            ("salvo.cache.hits", "cache_hits"),
            ("salvo.cache.misses", "cache_misses"),
            ("salvo.cache.coalesced", "cache_coalesced"),
            ("salvo.cache.evictions", "cache_evictions"),
        ):
            meter.create_observable_counter(name, [self._observe(what)], unit="{request}")
        for name, what, text in (
            ("salvo.shadow.compared", "shadow_compared", "Shadow copies compared"),
            ("salvo.shadow.agreed", "shadow_agreed", "Shadow copies that agreed"),
            ("salvo.shadow.failed", "shadow_failed", "Shadow copies dropped or failed"),
        ):
            meter.create_observable_counter(
                name, [self._observe(what)], unit="{request}", description=text
            )
        meter.create_observable_counter(
            "salvo.shadow.difference",
            [self._observe("shadow_difference")],
            description="Sum of the compared copies' mean absolute differences",
        )
        meter.create_observable_gauge(
            "salvo.cache.bytes", [self._observe("cache_bytes")], unit="By"
        )
        meter.create_observable_gauge(
            "salvo.cache.entries", [self._observe("cache_entries")], unit="{entry}"
        )
        meter.create_observable_counter(
            "salvo.telemetry.dropped",
            [lambda options: [Observation(self.drops.spans, {"signal": "traces"})]],
            unit="{span}",
            description="Telemetry dropped because the collector or a queue could not take it",
        )
        meter.create_observable_gauge(
            "salvo.cuda.memory.allocated",
            [_cuda_memory("memory_allocated")],
            unit="By",
            description="CUDA memory held by tensors, per device",
        )
        meter.create_observable_gauge(
            "salvo.cuda.memory.reserved",
            [_cuda_memory("memory_reserved")],
            unit="By",
            description="CUDA memory held by torch's caching allocator (tensors, cached "
            "blocks, CUDA graphs' pools), per device",
        )
        self.access_log = AccessLog(access_logs_per_s)

    # -- observations --------------------------------------------------------------------

    def add_source(self, source: Callable[[], Iterable[tuple[str, float, dict[str, str]]]]) -> None:
        """Register a callable yielding (what, value, attributes) for the observable metrics."""
        self.sources.append(source)

    def _observe(self, what: str) -> Callable[[CallbackOptions], Iterable[Observation]]:
        def callback(options: CallbackOptions) -> Iterable[Observation]:
            out = []
            for source in self.sources:
                for kind, value, attributes in source():
                    if kind == what:
                        out.append(Observation(value, attributes))
            return out

        return callback

    # -- requests --------------------------------------------------------------------------

    def start_rpc(
        self, method: str, metadata: Callable[[], Iterable[tuple[str, Any]] | None]
    ) -> Any:
        """The SERVER span of one RPC (its parent from `traceparent`), or None if untraced.

        `metadata` is called only when tracing is on: reading it costs on the hot path. A
        span the sampler dropped is None too, so an unsampled request costs no child spans,
        batch links or attributes downstream (and its access log line carries no trace id:
        the trace would not be found in the backend).
        """
        if self.tracer is None:
            return None
        service, _, name = method.rpartition("/")
        attributes = {"rpc.system": "grpc", "rpc.service": service, "rpc.method": name}
        return self._server_span(method, metadata, attributes)

    def start_http(
        self, method: str, route: str, headers: Callable[[], Iterable[tuple[str, Any]]]
    ) -> Any:
        """The SERVER span of one HTTP request (named by its method and route template, as
        OTel's HTTP conventions say), its parent from `traceparent`; or None, as for RPCs."""
        if self.tracer is None:
            return None
        attributes = {"http.request.method": method, "http.route": route}
        return self._server_span(f"{method} {route}", headers, attributes)

    def _server_span(
        self,
        name: str,
        carrier_items: Callable[[], Iterable[tuple[str, Any]] | None],
        attributes: dict[str, str],
    ) -> Any:
        assert self.tracer is not None
        carrier = {k: v for k, v in carrier_items() or () if isinstance(v, str)}
        if "traceparent" in carrier:
            parent = extract(carrier)
        elif self._root_ratio is not None and export.draw() >= self._root_ratio:
            return None  # a root Salvo's own draw dropped (see _root_ratio)
        else:
            parent = otel_context.Context()
        span = self.tracer.start_span(
            name, context=parent, kind=SpanKind.SERVER, attributes=attributes
        )
        return span if span.is_recording() else None

    def end_rpc(
        self,
        method: str,
        probe: Probe,
        code: str,
        message: str,
        duration_s: float,
        peer: Callable[[], str] | str = "",
    ) -> None:
        """Finish an RPC: its span, its duration metric, and (for inferences) the rest.

        `probe` carries the span and, once the model was resolved, the model, version,
        cache outcome and batch timings.
        """
        self._rpc_point(method, code).record(duration_s)
        self._end(method, "grpc", probe, code, message, duration_s, peer)

    def end_http(
        self,
        method: str,
        route: str,
        status: int,
        probe: Probe,
        code: str,
        message: str,
        duration_s: float,
        peer: str = "",
    ) -> None:
        """Finish an HTTP request: `status` is the HTTP status sent, `code` the core's
        status name behind it ("OK" for a success), as for RPCs."""
        self._http_point(method, route, status).record(duration_s)
        self._end(f"{method} {route}", "http", probe, code, message, duration_s, peer, status)

    def _end(
        self,
        name: str,
        protocol: str,
        probe: Probe,
        code: str,
        message: str,
        duration_s: float,
        peer: Callable[[], str] | str,
        http_status: int = 0,
    ) -> None:
        if probe.model:
            points = self._request_points(probe.model, probe.version, protocol)
            points.outcome(code).add()
            points.duration.record(duration_s)
        if probe.span is not None:
            self._finish_span(probe, code, message, http_status)
        if probe.model and self.access_log.take():
            who = peer() if callable(peer) else peer
            self.access_log.write(name, probe, code, duration_s, who)

    # Points are bound once per label set; label values come only from resolved models and
    # the fixed sets of methods and status codes, so their number stays small.
    @functools.lru_cache(maxsize=4096)  # noqa: B019  (one Telemetry per process)
    def _rpc_point(self, method: str, code: str) -> HistogramPoint:
        return self.rpc_duration.bind(
            {"rpc.method": method.rpartition("/")[2], "rpc.grpc.status_code": code}
        )

    @functools.lru_cache(maxsize=4096)  # noqa: B019
    def _http_point(self, method: str, route: str, status: int) -> HistogramPoint:
        return self.http_duration.bind(
            {"http.request.method": method, "http.route": route,
             "http.response.status_code": str(status)}
        )  # fmt: skip

    @functools.lru_cache(maxsize=4096)  # noqa: B019
    def _request_points(self, model: str, version: str, protocol: str) -> _RequestPoints:
        return _RequestPoints(self, {"model": model, "version": version, "protocol": protocol})

    @functools.lru_cache(maxsize=4096)  # noqa: B019
    def _model_points(self, model: str, version: str) -> _ModelPoints:
        return _ModelPoints(self, {"model": model, "version": version})

    def _finish_span(self, probe: Probe, code: str, message: str, http_status: int = 0) -> None:
        span = probe.span
        if span.is_recording():
            attributes: dict[str, Any] = (
                {"http.response.status_code": http_status}
                if http_status
                else {"rpc.grpc.status_code": code}
            )
            if probe.model:
                attributes["salvo.model.name"] = probe.model
                attributes["salvo.model.version"] = probe.version
            if probe.cache:
                attributes["salvo.cache"] = probe.cache
            if probe.started_ns:
                attributes["salvo.batch.size"] = probe.batch_rows
                parent = trace.set_span_in_context(span)
                for name, start, end in (
                    ("queue", probe.enqueued_ns, probe.started_ns),
                    ("compute", probe.started_ns, probe.finished_ns),
                ):
                    if end:
                        child = self.tracer.start_span(  # type: ignore[union-attr]
                            name, context=parent, start_time=wall_ns(start)
                        )
                        child.end(end_time=wall_ns(end))
            span.set_attributes(attributes)
            # An HTTP server span is an error for a 5xx only (OTel's HTTP conventions): a
            # 4xx is the caller's. An RPC's is an error for any status but OK.
            if (http_status >= 500) if http_status else code != "OK":
                span.set_status(Status(StatusCode.ERROR, message))
        span.end()

    def batch_span(
        self, model: str, version: int, probes: Sequence[Probe], start_ns: int, end_ns: int
    ) -> None:
        """A span for one executed batch, linked to the span of every request in it."""
        if self.tracer is None:
            return
        links = [
            Link(p.span.get_span_context())
            for p in probes
            if p.span is not None and p.span.get_span_context().is_valid
        ]
        if not links:
            return
        span = self.tracer.start_span(
            f"batch {model}",
            context=otel_context.Context(),
            links=links,
            start_time=wall_ns(start_ns),
            attributes={
                "salvo.model.name": model,
                "salvo.model.version": str(version),
                "salvo.batch.requests": len(probes),
            },
        )
        span.end(end_time=wall_ns(end_ns))

    def record_batch(self, model: str, version: int, rows: int, compute_s: float) -> None:
        points = self._model_points(model, str(version))
        points.batch_size.record(rows)
        points.compute.record(compute_s)

    def record_queue(self, model: str, version: int, seconds: float) -> None:
        self._model_points(model, str(version)).queue.record(seconds)

    def shutdown(self, timeout_s: float = 2.0) -> None:
        """Flush and stop within about `timeout_s`, whatever the collector does."""
        if self.tracer_provider is not None:
            done = threading.Event()

            def flush() -> None:
                self.tracer_provider.shutdown()  # type: ignore[union-attr]
                done.set()

            # TracerProvider.shutdown has no timeout of its own: bound it from outside.
            threading.Thread(target=flush, daemon=True, name="salvo-trace-shutdown").start()
            done.wait(timeout_s / 2)
        self.meter_provider.shutdown(timeout_millis=timeout_s * 500)


def _cuda_memory(what: str) -> Callable[[CallbackOptions], Iterable[Observation]]:
    """A callback observing `torch.cuda.<what>(device)` for each device, where torch is
    loaded and sees CUDA (never importing torch itself)."""

    def observe(options: CallbackOptions) -> Iterable[Observation]:
        import sys

        torch = sys.modules.get("torch")
        if torch is None or not torch.cuda.is_available():
            return []
        read = getattr(torch.cuda, what)
        return [
            Observation(read(i), {"device": f"cuda:{i}"}) for i in range(torch.cuda.device_count())
        ]

    return observe
