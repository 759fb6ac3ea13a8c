"""`salvo bench`: a load generator for v2 (KServe / Triton) gRPC inference servers.

The command line: its options (registered on the `salvo` command by `add_parser`, or on a
parser of its own by `build_parser`), their checks, and the run they ask for, one load level
or a sweep, reported as text or JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.util
import json
import os
import random
import sys
from pathlib import Path
from typing import Any

import grpc
import grpc.aio

from salvo_client.bench.errors import BenchError
from salvo_client.bench.load import THREADED_MAX_CONCURRENCY, LoadSpec, run_level
from salvo_client.bench.payloads import build_payloads, parse_shapes, resolve_inputs
from salvo_client.bench.reports import format_text, knee, plot, report
from salvo_client.bench.transports import status_name
from salvo_client.proto import grpc_service_pb2 as pb
from salvo_client.proto import grpc_service_pb2_grpc as pb_grpc

__all__ = [
    "GRPC_EXPERIMENTS",
    "PAYLOAD_POOL",
    "add_parser",
    "bench",
    "build_parser",
    "main",
    "run_command",
]

# Distinct request payloads cycled through with --input-data random.
PAYLOAD_POOL = 16

GRPC_EXPERIMENTS = "-event_engine_client"
"""What the generator's process sets GRPC_EXPERIMENTS to, unless the caller set it.

grpcio's default client reads each response on an EventEngine poller thread, which wakes a
worker thread, which wakes the caller: three threads and four futex calls a round trip. With
`event_engine_client` off the calling thread polls its own socket, as perf_analyzer's C++
client does, and a c=1 round trip to the bare server takes about 0.1 ms less (median p50
0.60 ms against 0.70 ms). A grpc.aio channel in the same process brings the hops back. grpc
reads the variable once, when it is imported, so `salvo.cli` sets it before importing this
package and `python -m salvo_client.bench` starts again with it set."""


def _int_list(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected integers like 1,2,4: {text!r}") from exc
    if not values or any(v <= 0 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive integers like 1,2,4: {text!r}")
    return values


def _float_list(text: str) -> list[float]:
    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected numbers like 100,200: {text!r}") from exc
    if not values or any(v <= 0 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive numbers like 100,200: {text!r}")
    return values


def _configure(parser: argparse.ArgumentParser) -> None:
    target = parser.add_argument_group("target")
    target.add_argument("-m", "--model", required=True, help="model name")
    target.add_argument("-x", "--model-version", default="", help="version (default: latest)")
    target.add_argument(
        "-u", "--url", "--target", dest="target", default="127.0.0.1:8001", metavar="HOST:PORT",
        help="gRPC HOST:PORT (default 127.0.0.1:8001)",
    )  # fmt: skip
    target.add_argument(
        "--streaming", action="store_true",
        help="ModelStreamInfer: one stream per closed-loop worker (one stream in open loop)",
    )  # fmt: skip
    target.add_argument(
        "--timeout-s", type=float, default=30.0, help="per-request deadline (default 30)"
    )
    target.add_argument(
        "--transport", choices=("auto", "asyncio", "threads"), default="auto",
        help="closed-loop unary callers: asyncio tasks, or a blocking thread each; auto: "
        f"threads up to concurrency {THREADED_MAX_CONCURRENCY} (lower latency), else asyncio",
    )  # fmt: skip

    inputs = parser.add_argument_group("inputs (shapes and datatypes from ModelMetadata)")
    inputs.add_argument(
        "-b", "--batch-size", type=int, default=1, help="rows per request (default 1)"
    )
    inputs.add_argument(
        "--shape", action="append", default=[], metavar="NAME=D1,D2",
        help="full shape of an input with variable dims (repeatable)",
    )  # fmt: skip
    inputs.add_argument(
        "--input-data", choices=("random", "zero"), default="random",
        help=f"random: {PAYLOAD_POOL} distinct requests cycled; zero: all zeros",
    )  # fmt: skip

    load = parser.add_argument_group("load")
    load.add_argument("-c", "--concurrency", type=int, help="closed loop: N workers (default 1)")
    load.add_argument("--rate", type=float, help="open loop: requests/s, sent on schedule")
    load.add_argument(
        "--request-distribution", choices=("poisson", "constant"), default="poisson",
        help="open-loop arrivals (default poisson)",
    )  # fmt: skip
    load.add_argument("--seed", type=int, help="seeds the arrivals and the random data")
    load.add_argument(
        "--max-in-flight", type=int, default=1000,
        help="open loop: arrivals beyond this many in flight are dropped and counted",
    )  # fmt: skip
    load.add_argument("--duration-s", type=float, default=10.0, help="measured time (default 10)")
    load.add_argument("--warmup-s", type=float, default=1.0, help="unmeasured warm-up (default 1)")
    load.add_argument(
        "--requests", type=int, help="stop after N measured requests instead of --duration-s"
    )

    sweep = parser.add_argument_group("sweep (finds the knee)")
    sweep.add_argument(
        "--sweep-concurrency", type=_int_list, metavar="1,2,4,...",
        help="closed loop at each concurrency in turn",
    )  # fmt: skip
    sweep.add_argument(
        "--sweep-rate", type=_float_list, metavar="100,200,...",
        help="open loop at each rate (requests/s) in turn",
    )  # fmt: skip
    sweep.add_argument("--p99-bound-ms", type=float, help="the knee's p99 bound (for a sweep)")

    output = parser.add_argument_group("output")
    output.add_argument("--json", action="store_true", help="print one JSON object to stdout")
    output.add_argument("--plot", type=Path, metavar="FILE.png", help="write a PNG (matplotlib)")
    output.add_argument("--quiet", action="store_true", help="no progress line on stderr")
    parser.set_defaults(func=run_command)


def add_parser(subparsers: Any) -> None:
    """Register `bench` on the `salvo` command's subparsers."""
    parser = subparsers.add_parser(
        "bench",
        help="load-test a v2 gRPC model: closed/open loop, exact percentiles, sweeps",
        description=__doc__.split("\n\n")[0],
    )
    _configure(parser)


def build_parser() -> argparse.ArgumentParser:
    """The standalone parser (`python -m salvo_client.bench`)."""
    parser = argparse.ArgumentParser(prog="salvo bench", description=__doc__.split("\n\n")[0])
    _configure(parser)
    return parser


def _validate(args: argparse.Namespace) -> str | None:
    if args.sweep_concurrency and args.sweep_rate:
        return "give --sweep-concurrency or --sweep-rate, not both"
    if args.rate is not None and (args.concurrency is not None or args.sweep_concurrency):
        return "--rate (open loop) and --concurrency (closed loop) exclude each other"
    if args.sweep_rate and args.concurrency is not None:
        return "--sweep-rate is open loop; drop --concurrency"
    if args.sweep_concurrency and args.rate is not None:
        return "--sweep-concurrency is closed loop; drop --rate"
    if (args.sweep_concurrency or args.sweep_rate) and args.p99_bound_ms is None:
        return "a sweep needs --p99-bound-ms"
    if args.concurrency is not None and args.concurrency < 1:
        return "--concurrency must be at least 1"
    if args.rate is not None and args.rate <= 0:
        return "--rate must be positive"
    if args.batch_size < 1:
        return "--batch-size must be at least 1"
    if args.requests is not None and args.requests < 1:
        return "--requests must be at least 1"
    if args.duration_s <= 0 or args.warmup_s < 0:
        return "--duration-s must be positive and --warmup-s not negative"
    if args.max_in_flight < 1:
        return "--max-in-flight must be at least 1"
    if args.plot is not None and importlib.util.find_spec("matplotlib") is None:
        return "--plot needs matplotlib: pip install 'salvo[bench]'"
    return None


def _fetch_metadata(
    channel: grpc.Channel, model: str, version: str, timeout_s: float
) -> pb.ModelMetadataResponse:
    stub = pb_grpc.GRPCInferenceServiceStub(channel)
    request = pb.ModelMetadataRequest(name=model, version=version)
    response: pb.ModelMetadataResponse = stub.ModelMetadata(request, timeout=timeout_s)
    return response


async def bench(args: argparse.Namespace) -> dict[str, Any]:
    """Run what `args` asks for (one level or a sweep) and return its JSON document."""
    meta: dict[str, Any] = {
        "model": args.model,
        "model_version": args.model_version,
        "target": args.target,
        "streaming": args.streaming,
        "batch_size": args.batch_size,
        "input_data": args.input_data,
        "grpc_experiments": os.environ.get("GRPC_EXPERIMENTS"),
    }
    options = [
        ("grpc.max_receive_message_length", -1),
        ("grpc.max_send_message_length", -1),
        # Every failure is counted by its status, never retried out of sight (grpc retries
        # some by itself); without the retry filter a call also costs about 15 us less.
        ("grpc.enable_retries", 0),
    ]
    with contextlib.ExitStack() as stack:
        blocking = stack.enter_context(grpc.insecure_channel(args.target, options=options))
        return await _bench(args, meta, options, blocking)


async def _bench(
    args: argparse.Namespace,
    meta: dict[str, Any],
    options: list[tuple[str, int]],
    blocking: grpc.Channel,
) -> dict[str, Any]:
    shapes = parse_shapes(args.shape)
    # The asyncio channel opens only for a level that needs it: once grpc.aio has started,
    # its poller thread takes the blocking calls' responses too, and a round trip on threads
    # pays two more thread wake-ups (GRPC_EXPERIMENTS says why those matter).
    async with contextlib.AsyncExitStack() as stack:
        aio: list[grpc.aio.Channel] = []

        async def aio_channel() -> grpc.aio.Channel:
            if not aio:
                channel = grpc.aio.insecure_channel(args.target, options=options)
                aio.append(await stack.enter_async_context(channel))
            return aio[0]

        try:
            metadata = await asyncio.to_thread(
                _fetch_metadata, blocking, args.model, args.model_version,
                min(args.timeout_s, 30.0),
            )  # fmt: skip
        except grpc.RpcError as exc:
            # Nothing to load-test: report the one request made, by its status, and stop.
            status = status_name(exc)
            details = exc.details() if isinstance(exc, grpc.Call) else str(exc)
            closed = args.rate is None and not args.sweep_rate
            load = {"concurrency": args.concurrency or 1} if closed else {"rate": args.rate}
            return {
                "mode": "closed" if closed else "open",
                **meta,
                **load,
                "duration_s": 0.0,
                "requests": 1,
                "successes": 0,
                "errors": {status: 1},
                "throughput_rps": 0.0,
                "latency_ms": None,
                "timeline": [],
                "failed_at": "ModelMetadata",
                "error_message": f"ModelMetadata: {status}: {details}",
            }
        specs = resolve_inputs(metadata, args.batch_size, shapes)
        meta["inputs"] = [
            {"name": s.name, "datatype": s.datatype, "shape": list(s.shape)} for s in specs
        ]
        # Without --seed, draw one and report it, so any run can be repeated exactly.
        seed = args.seed if args.seed is not None else random.SystemRandom().randrange(2**31)
        payloads = build_payloads(
            args.model, args.model_version, specs, args.input_data, PAYLOAD_POOL, seed
        )
        progress = None if args.quiet else sys.stderr

        def threaded(concurrency: int | None) -> bool:
            if args.streaming or concurrency is None or args.transport == "asyncio":
                return False
            return args.transport == "threads" or concurrency <= THREADED_MAX_CONCURRENCY

        async def level(concurrency: int | None, rate: float | None, label: str) -> dict:
            spec = LoadSpec(
                concurrency=concurrency,
                rate=rate,
                warmup_s=args.warmup_s,
                duration_s=None if args.requests is not None else args.duration_s,
                requests=args.requests,
                distribution=args.request_distribution,
                seed=seed,
                max_in_flight=args.max_in_flight,
            )
            on_threads = threaded(concurrency)
            result = await run_level(
                None if on_threads else await aio_channel(),
                payloads,
                spec,
                streaming=args.streaming,
                timeout_s=args.timeout_s,
                progress=progress,
                label=label,
                blocking_channel=blocking if on_threads else None,
            )
            doc = report(result, meta)
            doc["transport"] = "threads" if on_threads else "asyncio"
            if result.interrupted:
                interrupted.append(doc)
            return doc

        interrupted: list[dict[str, Any]] = []

        if args.sweep_concurrency or args.sweep_rate:
            key = "concurrency" if args.sweep_concurrency else "rate"
            values = sorted(args.sweep_concurrency or args.sweep_rate)
            levels = []
            for value in values:
                label = f"[{key} {value}]"
                if key == "concurrency":
                    levels.append(await level(int(value), None, label))
                else:
                    levels.append(await level(None, float(value), label))
                if interrupted:  # Ctrl-C ends the sweep, not just this level
                    break
            return {
                "mode": "sweep",
                "sweep_of": key,
                **meta,
                "p99_bound_ms": args.p99_bound_ms,
                "levels": levels,
                "knee": knee(levels, key, args.p99_bound_ms),
            }
        if args.rate is not None:
            return await level(None, args.rate, f"[rate {args.rate:g}]")
        return await level(args.concurrency or 1, None, f"[concurrency {args.concurrency or 1}]")


def run_command(args: argparse.Namespace) -> int:
    """`salvo bench`: 0 when every request succeeded (or a sweep ran), 1 on errors, 2 on
    settings it cannot use."""
    problem = _validate(args)
    if problem:
        print(f"salvo bench: {problem}", file=sys.stderr)
        return 2
    try:
        doc = asyncio.run(bench(args))
    except BenchError as exc:
        print(f"salvo bench: {exc}", file=sys.stderr)
        return 2
    if args.plot is not None and doc.get("failed_at") is None:
        plot(doc, args.plot)
    print(json.dumps(doc) if args.json else format_text(doc), flush=True)
    if doc.get("failed_at") is not None:
        return 1
    if doc["mode"] == "sweep":
        return 0
    return 1 if doc["errors"] else 0


def main(argv: list[str] | None = None) -> int:
    """Entry point for `python -m salvo_client.bench` and for tests."""
    args = build_parser().parse_args(argv)
    return run_command(args)
