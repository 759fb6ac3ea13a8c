"""The `salvo batch` command line: its flags, their checks, and the job they ask for, against
a running server (`--url`) or one the caller starts on a model repository.

The light client cannot start a server (that needs the `salvo` package, with torch): the
`salvo` command passes `add_parser` a `local_server` function that does, and
`python -m salvo_client.batch` has none, so there `--url` is required.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import sys
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

from salvo_client.aio import AsyncInferenceClient
from salvo_client.batch.errors import BatchError
from salvo_client.batch.job import EXIT_STOPPED, EXIT_USAGE, JobOptions, run_job
from salvo_client.batch.retries import Backoff, is_transient
from salvo_client.batch.sources import FORMATS, parse_input_map
from salvo_client.errors import SalvoClientError

__all__ = ["LocalServer", "add_parser", "build_parser", "main", "run_command"]

LocalServer = Callable[[Path], AbstractContextManager[str]]
"""Starts a server on a model repository for as long as the context lasts; yields its gRPC
target."""

TOKEN_ENV = "SALVO_AUTH_TOKEN"

CLOSE_TIMEOUT_S = 5.0
"""How long closing the stream may wait for answers to requests abandoned by a second
Ctrl-C, before the process ends without them."""

# A restarted server is found again within a tenth of a second, not gRPC's default of a
# second or more between connection attempts; retries are the job's (Backoff), not gRPC's.
_CHANNEL_OPTIONS = (
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 2000),
)

_DESCRIPTION = (
    "Score a file of rows (.npy, .npz, JSONL, CSV, Parquet) or a folder of images with a "
    "model, in batches over one gRPC stream, and write the outputs beside the input in the "
    "same format, keyed by row id. Resumable: rerun the same command after a crash or "
    "Ctrl-C. Exit 0: every row scored; 1: some rows got errors; 2: bad flags, input or "
    "model; 3: stopped (Ctrl-C, retries ran out, a server error), resumable."
)


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


def _configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="model name")
    parser.add_argument(
        "input", type=Path, help="a .npy, .npz, .jsonl, .csv or .parquet file, or a folder"
    )
    where = parser.add_argument_group("server (one of)")
    where.add_argument("--url", metavar="HOST:PORT", help="gRPC address of a running server")
    where.add_argument(
        "--model-repository", type=Path, metavar="DIR",
        help="start a server on this repository in-process (loopback), for the job's length",
    )  # fmt: skip
    where.add_argument(
        "--version", metavar="V", help="model version (default: the server's choice)"
    )

    data = parser.add_argument_group("input and output")
    data.add_argument(
        "--format", choices=FORMATS, help="input format (default: by suffix; a folder: images)"
    )
    data.add_argument(
        "--output", type=Path, metavar="PATH",
        help="where to write (default: beside the input, x.npy -> x.out.npz, rows.jsonl -> "
        "rows.out.jsonl, imgs/ -> imgs.out.jsonl); its suffix picks the format",
    )  # fmt: skip
    data.add_argument(
        "--input", action="append", default=[], dest="inputs", metavar="NAME=SPEC",
        help="map a model input: an npz array or JSONL key, or columns (a,b,c or prefix*)",
    )  # fmt: skip
    data.add_argument("--id-column", metavar="C", help="CSV/Parquet column holding each row's id")
    data.add_argument("--outputs", metavar="NAME,...", help="outputs to keep (default: all)")

    sending = parser.add_argument_group("sending")
    sending.add_argument(
        "--batch-size", type=_positive_int, metavar="N",
        help="rows per request (default: the model's max_batch_size, at most 64)",
    )  # fmt: skip
    sending.add_argument(
        "--concurrency",
        type=_positive_int,
        default=4,
        metavar="N",
        help="requests in flight (default 4)",
    )
    sending.add_argument(
        "--retries", type=int, default=5, metavar="N",
        help="retries of a request that failed transiently (default 5), then the job stops",
    )  # fmt: skip
    sending.add_argument(
        "--backoff-s", type=float, default=0.5, metavar="S",
        help="wait before the first retry, doubled each time (default 0.5), with jitter",
    )  # fmt: skip
    sending.add_argument(
        "--max-backoff-s", type=float, default=30.0, metavar="S",
        help="longest wait between retries (default 30)",
    )  # fmt: skip
    sending.add_argument(
        "--timeout-s",
        type=float,
        default=60.0,
        metavar="S",
        help="deadline of each request (default 60)",
    )

    run = parser.add_argument_group("run")
    run.add_argument(
        "--restart", action="store_true", help="discard a journal left by an earlier run"
    )
    run.add_argument("--no-progress", action="store_true", help="no progress bar")

    security = parser.add_argument_group(
        f"security (with --url; a bearer token comes from ${TOKEN_ENV} or --token-file)"
    )
    security.add_argument("--tls", action="store_true", help="connect with TLS")
    security.add_argument("--root-certificates", type=Path, metavar="PEM")
    security.add_argument("--client-certificate", type=Path, metavar="PEM", help="for mTLS")
    security.add_argument("--client-key", type=Path, metavar="PEM", help="for mTLS")
    security.add_argument(
        "--tls-server-name", metavar="NAME", help="name to check the certificate against"
    )
    security.add_argument(
        "--token-file", type=Path, metavar="PATH", help="file holding a bearer token"
    )


def add_parser(subparsers: Any, local_server: LocalServer | None = None) -> None:
    """Register `batch` on the `salvo` command's subparsers; `local_server` starts a server
    when no `--url` is given."""
    parser = subparsers.add_parser(
        "batch", help="score a file or folder of rows offline, resumably", description=_DESCRIPTION
    )
    _configure(parser)
    parser.set_defaults(func=lambda args: run_command(args, local_server))


def build_parser(local_server: LocalServer | None = None) -> argparse.ArgumentParser:
    """The standalone parser (`python -m salvo_client.batch`)."""
    parser = argparse.ArgumentParser(prog="salvo batch", description=_DESCRIPTION)
    _configure(parser)
    parser.set_defaults(func=lambda args: run_command(args, local_server))
    return parser


def _options(args: argparse.Namespace) -> JobOptions:
    try:
        backoff = Backoff(retries=args.retries, initial_s=args.backoff_s, max_s=args.max_backoff_s)
    except ValueError as exc:
        raise BatchError(f"--retries, --backoff-s, --max-backoff-s: {exc}") from None
    if args.timeout_s <= 0:
        raise BatchError("--timeout-s must be positive")
    outputs = None
    if args.outputs is not None:
        outputs = tuple(name.strip() for name in args.outputs.split(",") if name.strip())
        if not outputs:
            raise BatchError("--outputs: name at least one output")
    return JobOptions(
        model=args.model,
        input=args.input,
        format=args.format,
        output=args.output,
        version=args.version,
        batch_size=args.batch_size,
        concurrency=args.concurrency,
        backoff=backoff,
        timeout_s=args.timeout_s,
        id_column=args.id_column,
        inputs=parse_input_map(args.inputs),
        outputs=outputs,
        restart=args.restart,
        progress=not args.no_progress,
    )


def _token(args: argparse.Namespace) -> str | None:
    if args.token_file is not None:
        try:
            return args.token_file.read_text().strip()
        except OSError as exc:
            raise BatchError(f"--token-file: {exc}") from None
    return os.environ.get(TOKEN_ENV) or None


def _client_options(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "timeout_s": args.timeout_s,
        "retries": 0,
        "tls": args.tls,
        "root_certificates": args.root_certificates,
        "client_certificate": args.client_certificate,
        "client_key": args.client_key,
        "tls_server_name": args.tls_server_name,
        "token": _token(args),
        "channel_options": _CHANNEL_OPTIONS,
    }


async def _run(target: str, options: JobOptions, client_options: dict[str, Any]) -> int:
    client = AsyncInferenceClient(target, **client_options)
    try:
        return await run_job(client, options)
    finally:
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(client.close(), CLOSE_TIMEOUT_S)


def _error(message: str) -> None:
    print(f"salvo batch: {message}", file=sys.stderr, flush=True)


def run_command(args: argparse.Namespace, local_server: LocalServer | None = None) -> int:
    """`salvo batch`: the job's exit status (see `salvo_client.batch.job`)."""
    try:
        options = _options(args)
        secure = args.tls or args.root_certificates or args.client_certificate
        if args.url is not None and args.model_repository is not None:
            raise BatchError("give --url or --model-repository, not both")
        if args.url is not None:
            return asyncio.run(_run(args.url, options, _client_options(args)))
        if args.model_repository is None:
            raise BatchError(
                "give --url HOST:PORT of a running server, or --model-repository DIR to "
                "start one for the job"
            )
        if local_server is None:
            raise BatchError(
                "--model-repository starts a server, which needs the server package: "
                "pip install 'salvo[server]' and run `salvo batch`"
            )
        if secure or args.token_file is not None:
            raise BatchError("TLS and token flags apply to --url; the local server is loopback")
        if not args.model_repository.is_dir():
            raise BatchError(f"--model-repository {args.model_repository}: no such directory")
        client_options = {**_client_options(args), "token": None}
        with local_server(args.model_repository) as target:
            return asyncio.run(_run(target, options, client_options))
    except BatchError as exc:
        _error(str(exc))
        return EXIT_USAGE
    except SalvoClientError as exc:
        _error(f"cannot reach the server: {exc}" if is_transient(exc) else str(exc))
        return EXIT_STOPPED if is_transient(exc) else EXIT_USAGE
    except KeyboardInterrupt:
        _error("interrupted")
        return EXIT_STOPPED


def main(argv: list[str] | None = None) -> int:
    """Entry point for `python -m salvo_client.batch` (no local server) and for tests."""
    args = build_parser().parse_args(argv)
    return int(args.func(args))
