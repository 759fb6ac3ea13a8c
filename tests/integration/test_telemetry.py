"""Spans and metrics of a real server, read with the SDK's in-memory exporter and reader."""

from __future__ import annotations

import queue

import grpc
import numpy as np
import pytest
import tritonclient.grpc as tc
import tritonclient.http as thttp
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode
from tritonclient.utils import InferenceServerException

from salvo.observability.telemetry import Telemetry
from tests.gated import POISON, GatedLoader, write_model
from tests.servers import InProcessServer

CONFIG = """max_batch_size: 8
inputs: [{name: x, datatype: FP32, dims: [-1]}]
outputs: [{name: y, datatype: FP32, dims: [-1]}]
dynamic_batching: {max_queue_delay_us: 100, max_queue_size: 3}
"""
INFER = "inference.GRPCInferenceService/ModelInfer"
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_SPAN = "00f067aa0ba902b7"


@pytest.fixture()
def spans():
    return InMemorySpanExporter()


@pytest.fixture()
def metrics():
    return InMemoryMetricReader()


@pytest.fixture()
def loader():
    return GatedLoader()


@pytest.fixture()
def server(tmp_path, loader, spans, metrics):
    write_model(tmp_path, "m", CONFIG)
    write_model(tmp_path, "cached", CONFIG + "response_cache: {enable: true}\n")
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(spans))
    telemetry = Telemetry(tracer_provider=provider, metric_readers=[metrics])
    with InProcessServer(tmp_path, loader, telemetry=telemetry) as server:
        yield server


@pytest.fixture()
def client(server):
    with tc.InferenceServerClient(server.grpc_target) as c:
        yield c


def x_input(value: float) -> tc.InferInput:
    x = tc.InferInput("x", [1, 2], "FP32")
    x.set_data_from_numpy(np.full((1, 2), value, np.float32))
    return x


def finished(spans, name):
    return [s for s in spans.get_finished_spans() if s.name == name]


def metric_points(metrics) -> dict[str, list]:
    data = metrics.get_metrics_data()
    out: dict[str, list] = {}
    for rm in data.resource_metrics:
        for sm in rm.scope_metrics:
            for m in sm.metrics:
                out.setdefault(m.name, []).extend(m.data.data_points)
    return out


def test_request_span_continues_the_callers_trace_with_queue_and_compute_children(client, spans):
    headers = {"traceparent": f"00-{TRACE_ID}-{PARENT_SPAN}-01"}
    client.infer("m", [x_input(1.0)], headers=headers)
    (span,) = finished(spans, INFER)
    assert span.kind is SpanKind.SERVER
    assert format(span.context.trace_id, "032x") == TRACE_ID
    assert format(span.parent.span_id, "016x") == PARENT_SPAN
    attrs = dict(span.attributes)
    assert attrs["rpc.system"] == "grpc"
    assert attrs["rpc.service"] == "inference.GRPCInferenceService"
    assert attrs["rpc.method"] == "ModelInfer"
    assert attrs["rpc.grpc.status_code"] == "OK"
    assert attrs["salvo.model.name"] == "m" and attrs["salvo.model.version"] == "1"
    assert attrs["salvo.batch.size"] == 1
    children = {s.name: s for s in spans.get_finished_spans() if s.parent is not None}
    for name in ("queue", "compute"):
        child = children[name]
        assert child.parent.span_id == span.context.span_id
        assert span.start_time <= child.start_time <= child.end_time <= span.end_time
    assert children["queue"].end_time <= children["compute"].start_time


REST_INFER = "POST /v2/models/{model}/infer"


def test_a_rest_request_continues_the_callers_trace_with_http_conventions(server, spans):
    rest = thttp.InferenceServerClient(f"127.0.0.1:{server.server.http_port}")
    x = thttp.InferInput("x", [1, 2], "FP32")
    x.set_data_from_numpy(np.full((1, 2), 1.0, np.float32))
    rest.infer("m", [x], headers={"traceparent": f"00-{TRACE_ID}-{PARENT_SPAN}-01"})
    (span,) = finished(spans, REST_INFER)
    assert span.kind is SpanKind.SERVER
    assert format(span.context.trace_id, "032x") == TRACE_ID
    assert format(span.parent.span_id, "016x") == PARENT_SPAN
    attrs = dict(span.attributes)
    assert attrs["http.request.method"] == "POST"
    assert attrs["http.route"] == "/v2/models/{model}/infer"
    assert attrs["http.response.status_code"] == 200
    assert attrs["salvo.model.name"] == "m" and attrs["salvo.batch.size"] == 1
    children = {s.name for s in spans.get_finished_spans() if s.parent is not None}
    assert {"queue", "compute"} <= children
    # A caller's mistake is not the server's error (OTel's HTTP conventions): only 5xx are.
    bad = thttp.InferInput("x", [1, 2], "FP64")  # the model takes FP32
    bad.set_data_from_numpy(np.zeros((1, 2), np.float64))
    with pytest.raises(InferenceServerException):
        rest.infer("m", [bad])
    assert rest.is_server_ready()  # health: not traced
    spans_of = finished(spans, REST_INFER)
    assert len(spans_of) == 2
    assert spans_of[1].attributes["http.response.status_code"] == 400
    assert spans_of[1].status.status_code is not StatusCode.ERROR
    rest.close()


def test_a_caller_that_did_not_sample_gets_no_spans(client, spans):
    headers = {"traceparent": f"00-{TRACE_ID}-{PARENT_SPAN}-00"}  # flags 00: not sampled
    result = client.infer("m", [x_input(1.0)], headers=headers)
    assert result.as_numpy("y").shape == (1, 2)
    client.infer("m", [x_input(2.0)])  # a root request is sampled (always on here)
    assert [s.name for s in spans.get_finished_spans()].count(INFER) == 1
    assert all(format(s.context.trace_id, "032x") != TRACE_ID for s in spans.get_finished_spans())


def test_health_rpcs_are_not_traced_but_other_rpcs_are(client, spans):
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready("m")
    client.get_model_metadata("m")
    names = [s.name for s in spans.get_finished_spans()]
    assert names == ["inference.GRPCInferenceService/ModelMetadata"]


def test_a_batch_span_links_every_request_span_in_it(server, client, loader, spans):
    model = loader.modules["m"]
    model.hold()
    answers: queue.Queue = queue.Queue()

    def send(value: float) -> None:
        client.async_infer("m", [x_input(value)], lambda result, error: answers.put(error))

    send(0)
    model.wait_batches(1)
    send(1)
    send(2)
    server.wait_queued("m", 2)
    model.open()
    assert [answers.get(timeout=30) for _ in range(3)] == [None, None, None]
    batches = sorted(finished(spans, "batch m"), key=lambda s: s.start_time)
    assert [len(b.links) for b in batches] == [1, 2]
    requests = {s.context.span_id: s for s in finished(spans, INFER)}
    linked = [link.context.span_id for link in batches[1].links]
    assert all(span_id in requests for span_id in linked)
    assert {requests[i].attributes["salvo.batch.size"] for i in linked} == {2}


def test_cache_outcome_is_an_attribute(client, spans):
    client.infer("cached", [x_input(3.0)])
    client.infer("cached", [x_input(3.0)])
    outcomes = [s.attributes["salvo.cache"] for s in finished(spans, INFER)]
    assert outcomes == ["miss", "hit"]


def test_metrics_after_a_known_sequence(server, client, loader, metrics):
    client.infer("m", [x_input(1.0)])
    client.infer("m", [x_input(1.0)])
    with pytest.raises(tc.InferenceServerException):  # invalid: wrong dtype → error
        bad = tc.InferInput("x", [1, 2], "FP64")
        bad.set_data_from_numpy(np.zeros((1, 2), np.float64))
        client.infer("m", [bad])
    with pytest.raises(tc.InferenceServerException):  # the model raises → error
        client.infer("m", [x_input(POISON)])
    # Queue full → rejected; timed out in the queue → timeout.
    model = loader.modules["m"]
    model.hold()
    answers: queue.Queue = queue.Queue()
    client.async_infer("m", [x_input(5.0)], lambda result, error: answers.put(error))
    model.wait_batches(4)
    client.async_infer("m", [x_input(6.0)], lambda result, error: answers.put(error))
    server.wait_queued("m", 1)
    client.async_infer("m", [x_input(7.0)], lambda result, error: answers.put(error))
    server.wait_queued("m", 2)
    client.async_infer(
        "m", [x_input(9.0)], lambda result, error: answers.put(error), timeout=1_000_000
    )  # the v2 timeout parameter (µs): the server answers it, so the outcome is "timeout".
    # A second: the queue must still be full when the next request comes, on a busy machine.
    server.wait_queued("m", 3)  # the queue is full (max_queue_size 3)
    client.async_infer("m", [x_input(8.0)], lambda result, error: answers.put(error))
    assert answers.get(timeout=30).status() == "StatusCode.RESOURCE_EXHAUSTED"
    assert answers.get(timeout=30).status() == "StatusCode.DEADLINE_EXCEEDED"
    server.wait_queued("m", 2)
    model.open()
    assert [answers.get(timeout=30) for _ in range(3)] == [None, None, None]
    client.infer("cached", [x_input(1.0)])
    client.infer("cached", [x_input(1.0)])

    points = metric_points(metrics)
    outcomes = {
        (p.attributes["model"], p.attributes["outcome"]): p.value for p in points["salvo.requests"]
    }
    assert outcomes[("m", "success")] == 5
    assert outcomes[("m", "error")] == 2
    assert outcomes[("m", "rejected")] == 1
    assert outcomes[("m", "timeout")] == 1
    assert outcomes[("cached", "success")] == 2
    rpc = {
        (p.attributes["rpc.method"], p.attributes["rpc.grpc.status_code"]): p.count
        for p in points["rpc.server.call.duration"]
    }
    assert rpc[("ModelInfer", "OK")] == 7
    assert rpc[("ModelInfer", "INVALID_ARGUMENT")] == 1
    assert rpc[("ModelInfer", "INTERNAL")] == 1
    batches = {p.attributes["model"]: p for p in points["salvo.batch.size"]}
    assert batches["m"].sum == batches["m"].count + 1  # one batch of two rows
    cache = {p.attributes["model"]: p.value for p in points["salvo.cache.hits"]}
    assert cache["cached"] == 1
    depth = {p.attributes["model"]: p.value for p in points["salvo.queue.depth"]}
    assert depth["m"] == 0
    assert {p.attributes["model"]: p.value for p in points["salvo.model.ready"]}["m"] == 1
    queue_points = {p.attributes["model"]: p for p in points["salvo.queue.duration"]}
    assert queue_points["m"].count == 6  # every request that reached a batch


def test_metrics_tell_rest_from_grpc(server, client, metrics):
    rest = thttp.InferenceServerClient(f"127.0.0.1:{server.server.http_port}")
    x = thttp.InferInput("x", [1, 2], "FP32")
    x.set_data_from_numpy(np.full((1, 2), 1.0, np.float32))
    rest.infer("m", [x])
    rest.infer("m", [x])
    with pytest.raises(InferenceServerException):
        rest.infer("nope", [x])
    client.infer("m", [x_input(1.0)])
    rest.close()
    points = metric_points(metrics)
    requests = {
        (p.attributes["protocol"], p.attributes["outcome"]): p.value
        for p in points["salvo.requests"]
        if p.attributes["model"] == "m"
    }
    assert requests == {("http", "success"): 2, ("grpc", "success"): 1}
    durations = {p.attributes["protocol"]: p.count for p in points["salvo.request.duration"]}
    assert durations == {"http": 2, "grpc": 1}
    http = {
        (p.attributes["http.route"], p.attributes["http.response.status_code"]): p.count
        for p in points["http.server.request.duration"]
    }
    assert http == {("/v2/models/{model}/infer", "200"): 2, ("/v2/models/{model}/infer", "404"): 1}


def test_prometheus_endpoint_exposes_the_same_instruments(demo_server):
    import urllib.request

    with grpc.insecure_channel(demo_server.grpc_target):
        pass
    with tc.InferenceServerClient(demo_server.grpc_target) as c:
        x = tc.InferInput("input", [1, 64], "FP32")
        x.set_data_from_numpy(np.zeros((1, 64), np.float32))
        c.infer("mlp", [x])
    with urllib.request.urlopen(demo_server.http_url + "/metrics", timeout=5) as reply:
        text = reply.read().decode()
    for name in (
        "rpc_server_call_duration_seconds_bucket",
        "salvo_requests_total",
        "salvo_request_duration_seconds_bucket",
        "salvo_queue_duration_seconds_bucket",
        "salvo_batch_size",
        "salvo_queue_depth",
        "salvo_model_ready",
    ):
        assert name in text, name
    assert 'salvo_requests_total{model="mlp",outcome="success",protocol="grpc",version="1"}' in text
