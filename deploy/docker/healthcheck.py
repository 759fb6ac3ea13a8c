"""Container health check: exit 0 when Salvo's gRPC health (grpc.health.v1) reports SERVING.

Docker's HEALTHCHECK runs it inside the container; it asks the same service that Kubernetes'
native gRPC probes and load balancers ask, so "healthy" means one thing everywhere: every model
loaded and the server not draining. Exit 1 otherwise (NOT_SERVING, unreachable, or no answer
within the timeout), with the reason on stderr, which `docker inspect` shows.

Usage: healthcheck.py [HOST:PORT]   (default: this container's SALVO_GRPC_PORT on loopback)
"""

from __future__ import annotations

import os
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

WILDCARDS = {"", "0.0.0.0", "::", "[::]"}


def default_target() -> str:
    """Where this container's server listens, as seen from inside the container."""
    host = os.environ.get("SALVO_HOST", "127.0.0.1")
    if host in WILDCARDS:
        host = "127.0.0.1"
    elif ":" in host and not host.startswith("["):
        host = f"[{host}]"  # an IPv6 literal
    return f"{host}:{os.environ.get('SALVO_GRPC_PORT', '8001')}"


def check(target: str, timeout_s: float) -> tuple[bool, str]:
    """Whether `target` reports SERVING, and what it said."""
    try:
        with grpc.insecure_channel(target) as channel:
            response = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=""), timeout=timeout_s
            )
    except grpc.RpcError as exc:
        return False, f"{target}: {exc.code().name}: {exc.details()}"
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)
    return response.status == health_pb2.HealthCheckResponse.SERVING, f"{target}: {status}"


def main(argv: list[str]) -> int:
    target = argv[1] if len(argv) > 1 else default_target()
    # Below Docker's own --timeout, so a hung server is reported by us, with a reason.
    healthy, said = check(target, float(os.environ.get("SALVO_HEALTHCHECK_TIMEOUT_S", "3")))
    print(said, file=sys.stdout if healthy else sys.stderr)
    return 0 if healthy else 1


if __name__ == "__main__":
    raise SystemExit(main(sys.argv))
