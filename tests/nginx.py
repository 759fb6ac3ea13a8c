"""nginx, run from a folder of its own with deploy/nginx's config rendered for loopback
replicas: the load balancer the end-to-end tests and benchmarks/overload.py put in front of
real `salvo serve` processes."""

from __future__ import annotations

import functools
import importlib.util
import shutil
import signal
import socket
import subprocess
import threading
from pathlib import Path
from typing import IO

ROOT = Path(__file__).resolve().parents[1]
RENDER = ROOT / "deploy" / "nginx" / "render.py"
NGINX = shutil.which("nginx")


@functools.cache
def _render_module():
    spec = importlib.util.spec_from_file_location("render", RENDER)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


MAX_IN_FLIGHT_PER_REPLICA: int = _render_module().MAX_IN_FLIGHT_PER_REPLICA
"""render.py's default: calls nginx lets through at once, per replica."""


def _render(listen: str, backends: list[str], **options: int) -> str:
    return _render_module().render(listen, backends, **options)


def _free_port() -> int:
    # nginx cannot report a port picked by the OS, so pick one and hand it over; another
    # process taking it in between makes nginx fail to start, loudly.
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Nginx:
    """nginx in the foreground from its own prefix folder, with the rendered config."""

    def __init__(self, prefix: Path, backends: list[str], **options: int) -> None:
        self.prefix = prefix
        self.port = _free_port()
        self.config = prefix / "nginx.conf"
        self.config.write_text(_render(f"127.0.0.1:{self.port}", backends, **options))
        self.lines: list[str] = []
        """nginx's error log (stderr)."""
        self.access: list[str] = []
        """The access log (the config logs each call to stdout), a line a call, in order."""
        self._changed = threading.Condition()

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 30) -> Nginx:
        assert NGINX is not None
        cmd = [
            NGINX, "-p", f"{self.prefix}/", "-e", "stderr", "-c", str(self.config),
            "-g", "daemon off;",
        ]  # fmt: skip
        self.proc = subprocess.Popen(
            cmd,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self._readers = [
            threading.Thread(target=self._read, args=(self.proc.stderr, self.lines), daemon=True),
            threading.Thread(target=self._read, args=(self.proc.stdout, self.access), daemon=True),
        ]
        for reader in self._readers:
            reader.start()
        # The master binds the listening socket, then logs this (error_log ... notice).
        with self._changed:
            started = self._changed.wait_for(
                lambda: (
                    any("start worker process" in x for x in self.lines)
                    or self.proc.poll() is not None
                ),
                timeout_s,
            )
        if not started or self.proc.poll() is not None:
            self.stop()
            raise RuntimeError("nginx did not start:\n" + "".join(self.lines))
        return self

    def _read(self, stream: IO[str], into: list[str]) -> None:
        for line in stream:
            with self._changed:
                into.append(line)
                self._changed.notify_all()
        with self._changed:
            self._changed.notify_all()

    def wait_logged(self, count: int, timeout_s: float = 30) -> None:
        """Block until the access log holds `count` lines. nginx logs a call once its answer
        has left, so a client can see the answer a moment before its line exists."""
        with self._changed:
            self._changed.wait_for(
                lambda: len(self.access) >= count or self.proc.poll() is not None, timeout_s
            )
            if len(self.access) < count:
                raise AssertionError(f"nginx logged {len(self.access)} calls, wanted {count}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGQUIT)  # graceful: finish open calls
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        for reader in self._readers:
            reader.join(10)
        for stream in (self.proc.stdout, self.proc.stderr):
            if stream is not None:
                stream.close()
