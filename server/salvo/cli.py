"""The `salvo` command line: serve and demo-repo; infer, models, stats, bench, batch and traffic
(client)."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
import time
from collections.abc import Coroutine
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if _WORKER is not None:
            entry["worker"] = _WORKER
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry)


# The index of this process under `salvo serve --workers N` (salvo.workers sets it).
_WORKER = int(os.environ["SALVO_WORKER_ID"]) if "SALVO_WORKER_ID" in os.environ else None


def run_event_loop(main: Coroutine[Any, Any, None], kind: str) -> None:
    """Run `main` on uvloop (`uvloop`, or `auto` where it is installed) or asyncio's loop."""
    if kind != "asyncio":
        try:
            import uvloop
        except ImportError:
            if kind == "uvloop":
                raise
        else:
            uvloop.run(main)
            return
    asyncio.run(main)


def _setup_logging(level: str) -> None:
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(_JsonFormatter())
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)


_ACCESS_FLAGS: dict[str, tuple[type, str]] = {
    "tls_cert_file": (Path, "PEM certificate chain: serve gRPC over TLS"),
    "tls_key_file": (Path, "PEM private key of --tls-cert-file"),
    "tls_client_ca_file": (Path, "PEM CA that client certificates must chain to (mutual TLS)"),
    "auth_tokens_file": (Path, "YAML/JSON bearer tokens and their rights (see README)"),
    "repository_rpcs": (str, "auto, enabled or disabled: RepositoryModelLoad/Unload"),
    "rate_limit_per_s": (float, "requests/s per client, token name or peer (0: off)"),
    "rate_limit_burst": (int, "requests a client may send at once (0: one second's worth)"),
    "max_concurrent_rpcs": (int, "RPCs served at once, more get RESOURCE_EXHAUSTED (0: no cap)"),
    "max_connection_age_s": (float, "age after which clients are told to reconnect (0: never)"),
}
"""Flags for the security, admission and connection settings (SALVO_AUTH_TOKEN is env only:
a secret on a command line is visible to every user of the machine)."""


def _serve(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from salvo.domain.status import ConfigError
    from salvo.ops.settings import Settings

    overrides = {
        key: value
        for key, value in {
            "model_repository": args.model_repository,
            "repository_poll_s": args.repository_poll_s,
            "grpc_port": args.grpc_port,
            "http_port": args.http_port,
            "host": args.host,
            "shutdown_grace_s": args.shutdown_grace_s,
            "drain_timeout_s": args.drain_timeout_s,
            "torch_threads": args.torch_threads,
            "workers": args.workers,
            "log_level": args.log_level,
            **{name: getattr(args, name) for name in _ACCESS_FLAGS},
        }.items()
        if value is not None
    }
    try:
        settings = Settings(**overrides)
    except ValidationError as exc:
        print(f"salvo serve: {exc}", file=sys.stderr)
        return 2
    _setup_logging(settings.log_level)
    if settings.workers > 1:
        from salvo.supervisor import Supervisor

        run_event_loop(Supervisor(settings, settings.workers).run_until_signalled(), "asyncio")
        return 0
    if settings.torch_threads:
        import torch

        torch.set_num_threads(settings.torch_threads)
    from salvo.server import SalvoServer

    async def main() -> None:
        await SalvoServer(settings).run_until_signalled()

    try:
        run_event_loop(main(), settings.event_loop)
    except ConfigError as exc:  # a TLS file or the tokens file: say which, no traceback
        logging.getLogger("salvo").error("cannot start: %s", exc)
        return 2
    return 0


def _demo_repo(args: argparse.Namespace) -> int:
    from salvo.demo import build_demo_repo

    started = time.monotonic()
    build_demo_repo(Path(args.directory))
    print(
        f"demo model repository written to {args.directory} in {time.monotonic() - started:.1f} s"
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="salvo", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser(
        "serve",
        help="serve a model repository over gRPC (v2 protocol) and HTTP (metrics, health)",
        description="Flags override the SALVO_* environment variables of the same name.",
    )
    serve.add_argument("--model-repository", type=Path, help="model repository directory")
    serve.add_argument(
        "--repository-poll-s",
        type=float,
        help="load new and changed models (and versions) this often; 0: never (default)",
    )
    serve.add_argument("--grpc-port", type=int, help="gRPC port (default 8001; 0 picks one)")
    serve.add_argument("--http-port", type=int, help="HTTP port (default 8002; 0 picks one)")
    serve.add_argument("--host", help="address to bind (default 127.0.0.1)")
    serve.add_argument(
        "--shutdown-grace-s", type=float, help="on SIGTERM, serve on this long (default 5)"
    )
    serve.add_argument("--drain-timeout-s", type=float, help="then finish calls within this")
    serve.add_argument("--torch-threads", type=int, help="torch intra-op threads (0: default)")
    serve.add_argument(
        "--workers",
        type=int,
        help="server processes sharing the gRPC port, each with its own models (default 1)",
    )
    serve.add_argument("--log-level", help="DEBUG, INFO, WARNING, ERROR")
    for name, (kind, text) in _ACCESS_FLAGS.items():
        serve.add_argument(f"--{name.replace('_', '-')}", type=kind, help=text)
    serve.set_defaults(func=_serve)

    demo = sub.add_parser("demo-repo", help="write the demo model repository (offline, seeded)")
    demo.add_argument("directory", help="where to write it")
    demo.set_defaults(func=_demo_repo)

    # Client-side commands (infer, models, stats, bench, batch) need no torch: they live in
    # the light client package and work from the base install. `batch` without --url starts
    # a server here, which only this package can.
    from salvo_client import batch, bench, traffic
    from salvo_client.commands import add_commands

    add_commands(sub)
    bench.add_parser(sub)
    traffic.add_parser(sub)
    batch.add_parser(sub, local_server=_batch_server)
    return parser


def _batch_server(repository: Path) -> AbstractContextManager[str]:
    """`salvo batch --model-repository DIR`: a server on DIR for the job's length."""
    from salvo.batchserver import serve_repository

    return serve_repository(repository)


def main(argv: list[str] | None = None) -> int:
    arguments = sys.argv[1:] if argv is None else argv
    if arguments[:1] == ["bench"] and "grpc" not in sys.modules:
        # Before grpc is imported, which reads it once: salvo_client.bench.GRPC_EXPERIMENTS
        # says why (the calling thread polls its own socket, as perf_analyzer's client does).
        os.environ.setdefault("GRPC_EXPERIMENTS", "-event_engine_client")
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    raise SystemExit(main())
