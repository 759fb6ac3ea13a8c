"""The server `salvo batch` starts when it is given a model repository instead of a URL.

A whole Salvo (the same assembly as `salvo serve`) on loopback, on ports the OS picks, in
a background thread with its own event loop, for as long as the job runs. The job talks to
it over gRPC like to any other server, so the in-process mode and the remote one run the
same code. It serves plaintext without tokens, rate limits or connection ageing, whatever
the SALVO_* environment says: nothing but the job on this host can reach it.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Iterator
from pathlib import Path

from salvo.domain.status import ConfigError
from salvo.ops.settings import Settings
from salvo_client.batch.errors import BatchError

__all__ = ["START_TIMEOUT_S", "serve_repository"]

START_TIMEOUT_S = 600.0
"""How long loading the repository's models may take (a compiled model can take minutes)."""

STOP_TIMEOUT_S = 30.0


class _ServerThread:
    """One SalvoServer running on its own event loop in a daemon thread."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.started = threading.Event()
        self.grpc_port = 0
        self.error: BaseException | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._run, name="salvo-batch-server", daemon=True)

    def start(self) -> None:
        self._thread.start()

    async def _serve(self) -> None:
        from salvo.server import SalvoServer

        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        server = SalvoServer(self.settings)
        try:
            await server.start()
            self.grpc_port = server.grpc_port
        finally:
            self.started.set()
        await self._stop.wait()
        await server.stop()

    def _run(self) -> None:
        try:
            asyncio.run(self._serve())
        except BaseException as exc:  # handed to the caller by serve_repository
            self.error = exc
            self.started.set()

    def stop(self) -> None:
        """Stop the server (in-flight requests finish) and wait for its thread."""
        loop, stop = self._loop, self._stop
        if loop is not None and stop is not None:
            with contextlib.suppress(RuntimeError):  # its loop has already ended
                loop.call_soon_threadsafe(stop.set)
        self._thread.join(STOP_TIMEOUT_S)


@contextlib.contextmanager
def serve_repository(repository: Path) -> Iterator[str]:
    """Serve `repository` until the block ends; yields the gRPC target (`127.0.0.1:PORT`)
    once every model has loaded. BatchError for a repository it cannot serve."""
    server = _ServerThread(
        Settings(
            model_repository=repository,
            host="127.0.0.1",
            grpc_port=0,
            http_port=0,
            workers=1,
            shutdown_grace_s=0,
            drain_timeout_s=5,
            telemetry_enabled=False,
            tls_cert_file=None,
            tls_key_file=None,
            tls_client_ca_file=None,
            auth_tokens_file=None,
            auth_token=None,
            rate_limit_per_s=0,
            max_connection_age_s=0,
        )
    )
    server.start()
    try:
        if not server.started.wait(START_TIMEOUT_S):
            raise BatchError(f"the server did not load {repository} in {START_TIMEOUT_S:.0f} s")
        if server.error is not None or not server.grpc_port:
            reason = server.error
            detail = str(reason) if isinstance(reason, ConfigError | OSError) else repr(reason)
            raise BatchError(f"cannot serve {repository}: {detail}")
        yield f"127.0.0.1:{server.grpc_port}"
    finally:
        server.stop()
