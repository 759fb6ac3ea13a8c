"""Locust load test for a v2 (KServe / Triton) gRPC model server such as Salvo.

    locust -f benchmarks/locustfile.py --headless -u 8 -r 8 -t 10s --host 127.0.0.1:8001

Each simulated user holds its own gRPC channel (its own connection, as separate clients
would) and sends ModelInfer requests back to back, or with a think time. Every call fires
locust's `request` event with its name, response time and exception, so locust's statistics,
CSV and web UI work as for HTTP. Inputs come from the model's metadata, built by the same
code as `salvo bench`.

Settings (environment variables; locust's --host wins over SALVO_TARGET):
    SALVO_TARGET      gRPC HOST:PORT (default 127.0.0.1:8001)
    SALVO_MODEL       model name (default mlp)
    SALVO_MODEL_VERSION  version (default: the server's choice)
    SALVO_BATCH_SIZE  rows per request (default 1)
    SALVO_INPUT_DATA  random | zero (default random)
    SALVO_THINK_S     seconds each user waits between its calls (default 0)
"""

from __future__ import annotations

import os
import time
from typing import Any

# grpcio must run on gevent's loop before any channel exists; without it every call blocks
# its OS thread and locust's users silently take turns.
import grpc.experimental.gevent as grpc_gevent

grpc_gevent.init_gevent()

import grpc  # noqa: E402
from locust import User, constant, task  # noqa: E402
from locust.exception import StopUser  # noqa: E402

from salvo_client.bench import build_payloads, resolve_inputs, with_id  # noqa: E402
from salvo_client.proto import grpc_service_pb2 as pb  # noqa: E402

SERVICE = "/inference.GRPCInferenceService/"


class GrpcStatusError(Exception):
    """A failed call, named by its gRPC status so locust groups failures by status."""


def _target(host: str | None) -> str:
    target = host or os.environ.get("SALVO_TARGET", "127.0.0.1:8001")
    for scheme in ("grpc://", "http://", "https://"):
        target = target.removeprefix(scheme)
    return target.rstrip("/")


class SalvoGrpcUser(User):
    """A client calling ModelInfer on one model; one channel per user."""

    wait_time = constant(float(os.environ.get("SALVO_THINK_S", "0")))
    model = os.environ.get("SALVO_MODEL", "mlp")
    model_version = os.environ.get("SALVO_MODEL_VERSION", "")
    batch_size = int(os.environ.get("SALVO_BATCH_SIZE", "1"))
    input_data = os.environ.get("SALVO_INPUT_DATA", "random")

    def __init__(self, environment: Any) -> None:
        super().__init__(environment)
        self.target = _target(self.host)
        self.channel: grpc.Channel | None = None
        self.payloads: list[bytes] = []
        self.sent = 0

    def _fire(self, name: str, started: float, length: int, exc: Exception | None) -> None:
        self.environment.events.request.fire(
            request_type="grpc",
            name=name,
            response_time=(time.perf_counter() - started) * 1000,
            response_length=length,
            exception=exc,
            context={},
        )

    def on_start(self) -> None:
        self.channel = grpc.insecure_channel(
            self.target,
            options=[("grpc.max_receive_message_length", -1), ("grpc.max_send_message_length", -1)],
        )
        metadata_call = self.channel.unary_unary(
            SERVICE + "ModelMetadata",
            request_serializer=pb.ModelMetadataRequest.SerializeToString,
            response_deserializer=pb.ModelMetadataResponse.FromString,
        )
        # Requests go out pre-serialized and answers come back as bytes: the user's CPU goes
        # to gRPC, not to protobuf, so more users fit on one locust process.
        self._infer_rpc = self.channel.unary_unary(SERVICE + "ModelInfer")
        started = time.perf_counter()
        try:
            metadata = metadata_call(
                pb.ModelMetadataRequest(name=self.model, version=self.model_version), timeout=30
            )
        except grpc.RpcError as exc:
            self._fire("ModelMetadata", started, 0, GrpcStatusError(_describe(exc)))
            raise StopUser() from exc
        self._fire("ModelMetadata", started, metadata.ByteSize(), None)
        specs = resolve_inputs(metadata, self.batch_size, {})
        self.payloads = build_payloads(
            self.model, self.model_version, specs, self.input_data, count=16
        )

    @task
    def infer(self) -> None:
        """One ModelInfer call, timed and reported to locust."""
        self.sent += 1
        payload = with_id(self.payloads[self.sent % len(self.payloads)], str(self.sent))
        started = time.perf_counter()
        try:
            response: bytes = self._infer_rpc(payload, timeout=30)
        except grpc.RpcError as exc:
            self._fire(f"ModelInfer {self.model}", started, 0, GrpcStatusError(_describe(exc)))
        else:
            self._fire(f"ModelInfer {self.model}", started, len(response), None)

    def on_stop(self) -> None:
        if self.channel is not None:
            self.channel.close()
            self.channel = None


def _describe(exc: grpc.RpcError) -> str:
    code = exc.code() if isinstance(exc, grpc.Call) else None
    details = exc.details() if isinstance(exc, grpc.Call) else str(exc)
    return f"{code.name if code else 'UNKNOWN'}: {details}"
