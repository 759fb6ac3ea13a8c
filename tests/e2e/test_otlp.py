"""Salvo's real OTLP exports, received over the network by an OTLP receiver built from
opentelemetry-proto inside the test; and a collector that never answers costs nothing."""

from __future__ import annotations

import re
import socket
import urllib.request

import numpy as np
import pytest
import tritonclient.grpc as tc

from tests.otlp import INFER, start_http_receiver, start_receiver
from tests.servers import ServerProcess

TRACE_ID = "0af7651916cd43dd8448eb211c80319c"


@pytest.fixture()
def receiver():
    receiver, server, port = start_receiver()
    receiver.port = port
    yield receiver
    server.stop(0)


def infer(target: str, n: int, headers: dict | None = None) -> None:
    with tc.InferenceServerClient(target) as client:
        for _ in range(n):
            x = tc.InferInput("input", [1, 64], "FP32")
            x.set_data_from_numpy(np.ones((1, 64), np.float32))
            client.infer("mlp", [x], headers=headers)


def test_spans_and_metrics_reach_a_real_otlp_receiver(demo_repo, receiver):
    env = {
        "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{receiver.port}",
        "OTEL_EXPORTER_OTLP_INSECURE": "true",
        "OTEL_BSP_SCHEDULE_DELAY": "100",
        "OTEL_METRIC_EXPORT_INTERVAL": "300",
        "OTEL_SERVICE_NAME": "salvo-under-test",
    }
    with ServerProcess(demo_repo, env=env) as server:
        infer(server.grpc_target, 3, {"traceparent": f"00-{TRACE_ID}-b7ad6b7169203331-01"})
        assert receiver.got_spans.wait(30), [s.name for s in receiver.spans]
        assert receiver.got_metrics.wait(30), receiver.metric_names
    requests = [s for s in receiver.spans if s.name == INFER]
    assert all(s.trace_id.hex() == TRACE_ID for s in requests)
    assert all(s.parent_span_id.hex() == "b7ad6b7169203331" for s in requests)
    attributes = {a.key: a.value for a in requests[0].attributes}
    assert attributes["rpc.system"].string_value == "grpc"
    assert attributes["salvo.model.name"].string_value == "mlp"
    assert {"queue", "compute"} <= {s.name for s in receiver.spans}
    assert {
        "salvo.queue.duration",
        "salvo.batch.size",
        "salvo.queue.depth",
    } <= receiver.metric_names


def test_otlp_over_http_protobuf(demo_repo):
    receiver, http_server, port = start_http_receiver()
    env = {
        "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{port}",
        "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
        "OTEL_BSP_SCHEDULE_DELAY": "100",
        "OTEL_METRIC_EXPORT_INTERVAL": "300",
    }
    try:
        with ServerProcess(demo_repo, env=env) as server:
            infer(server.grpc_target, 3)
            assert receiver.got_spans.wait(30), [s.name for s in receiver.spans]
            assert receiver.got_metrics.wait(30), receiver.metric_names
    finally:
        http_server.shutdown()


def test_a_collector_that_never_answers_costs_dropped_spans_only(demo_repo):
    black_hole = socket.socket()
    black_hole.bind(("127.0.0.1", 0))
    black_hole.listen(128)  # the kernel accepts connections; nobody ever answers
    port = black_hole.getsockname()[1]
    env = {
        "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{port}",
        "OTEL_EXPORTER_OTLP_INSECURE": "true",
        "OTEL_EXPORTER_OTLP_TIMEOUT": "1",
        "OTEL_BSP_SCHEDULE_DELAY": "100",
        "OTEL_METRIC_EXPORT_INTERVAL": "500",
    }
    try:
        server = ServerProcess(demo_repo, "--drain-timeout-s", "2", env=env).start()
        try:
            infer(server.grpc_target, 20)  # every request served; no error
            server.wait_for_line(r"telemetry dropped \d+ spans", 60)
            infer(server.grpc_target, 5)
            with urllib.request.urlopen(server.http_url + "/metrics", timeout=5) as reply:
                text = reply.read().decode()
            dropped = re.search(r'salvo_telemetry_dropped_total\{signal="traces"\} (\S+)', text)
            assert dropped and float(dropped.group(1)) > 0
        finally:
            # Shutdown flushes within a bound even though the collector never answers.
            code = server.stop(timeout_s=20)
        assert code == 0, server.log()
    finally:
        black_hole.close()
