"""gRPC health (grpc.health.v1): Check and a Watch that misses no change."""

from __future__ import annotations

import collections
from typing import Any

from grpc_health.v1 import _async as health_async
from grpc_health.v1 import health_pb2


class HealthServicer(health_async.HealthServicer):
    """grpc_health's asyncio servicer with a Watch that misses no change.

    grpcio-health-checking's Watch drops a service's condition whenever any one of its
    watchers leaves, so the others are never told again: a client that stopped watching
    would hide the shutdown's NOT_SERVING from every other. Here the condition stays while
    anyone watches, and the answer is sent outside its lock, so that a client that does not
    read cannot hold up `set` (and with it the shutdown).
    """

    def __init__(self) -> None:
        super().__init__()
        self._watching: collections.Counter[str] = collections.Counter()

    def _status(self, service: str) -> int:
        return self._server_status.get(service, health_pb2.HealthCheckResponse.SERVICE_UNKNOWN)

    async def Watch(self, request: health_pb2.HealthCheckRequest, context: Any) -> None:
        service = request.service
        condition = self._server_watchers[service]
        self._watching[service] += 1
        sent = None
        try:
            while True:
                async with condition:
                    while self._status(service) == sent:
                        await condition.wait()
                    sent = self._status(service)
                await context.write(health_pb2.HealthCheckResponse(status=sent))
        finally:
            self._watching[service] -= 1
            if not self._watching[service]:
                del self._watching[service]
                self._server_watchers.pop(service, None)
