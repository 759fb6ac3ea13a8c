"""The HTTP port: an ASGI app (the v2 REST API, or the supervisor's merged metrics and
health) served by uvicorn on the process's one event loop, beside grpc.aio.

uvicorn runs without its own signal handlers (Salvo's lifecycle owns SIGTERM and SIGINT
and drains both ports), without its access log (Salvo's telemetry writes one), and on a
socket bound here, so a port of 0 reports the port it got. TLS, where the settings
configure it for gRPC, serves this port too, with the same certificate and client CA: an
inference must not be readable on one port when it is protected on the other. A worker
of `salvo serve --workers` binds it on loopback, plaintext (`http_private`): only its
supervisor reads it.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
from collections.abc import Iterator
from typing import Any

import uvicorn

from salvo.ops.settings import Settings


class _Uvicorn(uvicorn.Server):
    """uvicorn's server, minus its signal handling; `up` is set once it listens."""

    def __init__(self, config: uvicorn.Config) -> None:
        super().__init__(config)
        self.up = asyncio.Event()

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        self.up.set()


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP named, not left 0: asyncio sets TCP_NODELAY only on sockets that say TCP,
    # and without it every answer written in two parts waits out the client's delayed ACK.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.set_inheritable(True)
    return sock


class HttpFrontEnd:
    """Serves `app` on the settings' host and HTTP port."""

    def __init__(self, app: Any, settings: Settings) -> None:
        self.app = app
        self.settings = settings
        private = settings.http_private
        self.host = "127.0.0.1" if private else settings.host
        self.tls = settings.tls_cert_file is not None and not private
        self._server: _Uvicorn | None = None
        self._task: asyncio.Task | None = None

    async def start(self) -> int:
        """Listen; returns the bound port."""
        s = self.settings
        options: dict[str, Any] = {}
        if self.tls:
            options = {"ssl_certfile": str(s.tls_cert_file), "ssl_keyfile": str(s.tls_key_file)}
            if s.tls_client_ca_file is not None:
                options["ssl_ca_certs"] = str(s.tls_client_ca_file)
                options["ssl_cert_reqs"] = ssl.CERT_REQUIRED
        config = uvicorn.Config(
            self.app,
            lifespan="off",
            log_config=None,
            access_log=False,
            server_header=False,
            http="httptools",
            timeout_graceful_shutdown=max(1, round(s.drain_timeout_s)),
            **options,
        )
        sock = _bind(self.host, s.http_port)
        server = self._server = _Uvicorn(config)
        self._task = asyncio.create_task(server.serve(sockets=[sock]))
        up = asyncio.create_task(server.up.wait())
        done, _ = await asyncio.wait((self._task, up), return_when=asyncio.FIRST_COMPLETED)
        if self._task in done:  # it failed to start: say why
            up.cancel()
            self._task.result()
            raise RuntimeError("the HTTP server stopped as it started")
        return sock.getsockname()[1]

    async def stop(self) -> None:
        """Stop listening; answers being written get up to the drain timeout."""
        if self._server is None or self._task is None:
            return
        self._server.should_exit = True
        with contextlib.suppress(Exception):
            await self._task
