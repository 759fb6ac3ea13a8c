"""An OTLP receiver (traces and metrics over gRPC) built from opentelemetry-proto: what a
collector would receive from Salvo, for tests and benchmarks."""

from __future__ import annotations

import threading
from concurrent import futures

import grpc
from opentelemetry.proto.collector.metrics.v1 import (
    metrics_service_pb2,
    metrics_service_pb2_grpc,
)
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

INFER = "inference.GRPCInferenceService/ModelInfer"


class Receiver(
    trace_service_pb2_grpc.TraceServiceServicer, metrics_service_pb2_grpc.MetricsServiceServicer
):
    """Collects what arrives; events fire when the spans and metrics looked for are in."""

    def __init__(self) -> None:
        self.spans: list = []
        self.metric_names: set[str] = set()
        self.metric_models: set[str] = set()
        self.got_spans = threading.Event()
        self.got_metrics = threading.Event()
        self._lock = threading.Lock()

    def Export(self, request, context):  # noqa: N802  (both services call it Export)
        with self._lock:
            if isinstance(request, trace_service_pb2.ExportTraceServiceRequest):
                for rs in request.resource_spans:
                    for ss in rs.scope_spans:
                        self.spans.extend(ss.spans)
                if sum(s.name == INFER for s in self.spans) >= 3 and any(
                    s.name == "batch mlp" for s in self.spans
                ):
                    self.got_spans.set()
                return trace_service_pb2.ExportTraceServiceResponse()
            for rm in request.resource_metrics:
                for sm in rm.scope_metrics:
                    for m in sm.metrics:
                        self.metric_names.add(m.name)
                        if m.name == "salvo.requests":
                            for p in m.sum.data_points:
                                for a in p.attributes:
                                    if a.key == "model":
                                        self.metric_models.add(a.value.string_value)
            if "mlp" in self.metric_models and "rpc.server.call.duration" in self.metric_names:
                self.got_metrics.set()
            return metrics_service_pb2.ExportMetricsServiceResponse()


def start_receiver() -> tuple[Receiver, grpc.Server, int]:
    """A Receiver serving on a free loopback port: (receiver, server, port)."""
    receiver = Receiver()
    server = grpc.server(futures.ThreadPoolExecutor(4))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(receiver, server)
    metrics_service_pb2_grpc.add_MetricsServiceServicer_to_server(receiver, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    return receiver, server, port


def start_http_receiver() -> tuple[Receiver, object, int]:
    """The same Receiver behind OTLP/HTTP (protobuf bodies on /v1/traces and /v1/metrics)."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    receiver = Receiver()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802  (http.server's naming)
            body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            if self.path == "/v1/traces":
                reply = receiver.Export(
                    trace_service_pb2.ExportTraceServiceRequest.FromString(body), None
                )
            elif self.path == "/v1/metrics":
                reply = receiver.Export(
                    metrics_service_pb2.ExportMetricsServiceRequest.FromString(body), None
                )
            else:
                self.send_error(404)
                return
            payload = reply.SerializeToString()
            self.send_response(200)
            self.send_header("Content-Type", "application/x-protobuf")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return receiver, server, server.server_address[1]
