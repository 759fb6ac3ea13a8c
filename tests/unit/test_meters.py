"""The hot-path instruments: bucket edges, label sets, and the seam into the SDK's readers."""

from __future__ import annotations

from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from prometheus_client import CollectorRegistry, generate_latest

from salvo.observability.meters import Meters

SCOPE = InstrumentationScope("salvo", "test")


def meters() -> Meters:
    return Meters(Resource.create({"service.name": "t"}), SCOPE)


def test_buckets_hold_values_up_to_and_including_their_bound():
    histogram = meters().histogram("h", "s", "", (1.0, 2.0, 5.0))
    point = histogram.bind({"model": "m"})
    for value in (0.5, 1.0, 1.5, 2.0, 4.0, 5.0, 7.0):
        point.record(value)
    (data,) = histogram.metric(0, 1).data.data_points  # type: ignore[union-attr]
    assert list(data.bucket_counts) == [2, 2, 2, 1]
    assert data.count == 7
    assert data.sum == 21.0
    assert (data.min, data.max) == (0.5, 7.0)


def test_binding_the_same_labels_twice_gives_the_same_point():
    counter = meters().counter("c", "{request}", "")
    counter.bind({"model": "m", "version": "1"}).add()
    counter.bind({"version": "1", "model": "m"}).add(2)
    counter.bind({"model": "n", "version": "1"}).add()
    values = {
        dict(p.attributes)["model"]: p.value
        for p in counter.metric(0, 1).data.data_points  # type: ignore[union-attr]
    }
    assert values == {"m": 3, "n": 1}


def test_instruments_without_records_are_left_out():
    m = meters()
    m.histogram("h", "s", "", (1.0,)).bind({"model": "m"})
    m.counter("c", "1", "")
    assert m.metrics() == []


def test_readers_see_the_sdk_instruments_and_these_in_one_collection():
    """The seam: if the SDK stops feeding readers through `_set_collect_callback`, this fails."""
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    provider.get_meter("salvo", "test").create_counter("sdk.counter").add(4)
    m = meters()
    m.attach([reader])
    m.counter("salvo.requests", "{request}", "").bind({"model": "m"}).add(3)

    data = reader.get_metrics_data()
    names = {
        metric.name: metric
        for rm in data.resource_metrics  # type: ignore[union-attr]
        for sm in rm.scope_metrics
        for metric in sm.metrics
    }
    assert names["sdk.counter"].data.data_points[0].value == 4
    assert names["salvo.requests"].data.data_points[0].value == 3
    provider.shutdown()


def test_prometheus_reads_cumulative_histograms_with_seconds_in_the_name():
    from opentelemetry.exporter.prometheus import PrometheusMetricReader

    registry = CollectorRegistry()
    reader = PrometheusMetricReader(
        disable_target_info=True, scope_info_enabled=False, registry=registry
    )
    provider = MeterProvider(metric_readers=[reader])
    m = meters()
    m.attach([reader])
    point = m.histogram("salvo.request.duration", "s", "latency", (0.1, 1.0)).bind({"model": "m"})
    point.record(0.05)
    point.record(0.5)
    text = generate_latest(registry).decode()
    assert 'salvo_request_duration_seconds_bucket{le="0.1",model="m"} 1.0' in text
    assert 'salvo_request_duration_seconds_bucket{le="+Inf",model="m"} 2.0' in text
    point.record(0.5)  # cumulative: a second scrape counts everything since the start
    assert (
        'salvo_request_duration_seconds_count{model="m"} 3.0' in generate_latest(registry).decode()
    )
    provider.shutdown()
