"""`salvo bench`: a load generator for v2 (KServe / Triton) gRPC inference servers.

Closed loop (`--concurrency N`: N workers, each sending its next request when the previous
one answers) or open loop (`--rate R`: Poisson or constant arrivals sent on schedule whatever
the server does, with a cap on requests in flight), over unary ModelInfer or ModelStreamInfer.
Every latency sample is kept, so percentiles are exact. A sweep over load levels finds the
knee: the highest load whose p99 stays under a bound.

It needs only grpcio, protobuf and numpy (matplotlib for `--plot`), and talks through the
generated stubs: requests are serialized once up front and sent as bytes, so the generator
spends its CPU on gRPC, not on building messages, and disturbs a server on the same machine
as little as it can.

    python -m salvo_client.bench -m mlp -u 127.0.0.1:8001 -c 8 --duration-s 10
    python -m salvo_client.bench -m mlp --rate 500 --seed 1 --json
    python -m salvo_client.bench -m mlp --sweep-concurrency 1,2,4,8,16 --p99-bound-ms 20

Both entry points (`salvo bench` and `python -m salvo_client.bench`) run with
GRPC_EXPERIMENTS set to `GRPC_EXPERIMENTS` unless the caller set the variable: see there for
why.

The modules, in the order a run uses them: `payloads` (the requests, serialized once),
`window` (which requests are measured, and their samples), `transports` (unary and stream
calls), `load` (the closed and open loops), `reports` (percentiles, knee, text and plot) and
`cli` (the command line).
"""

from salvo_client.bench.cli import (
    GRPC_EXPERIMENTS,
    add_parser,
    bench,
    build_parser,
    main,
    run_command,
)
from salvo_client.bench.errors import BenchError
from salvo_client.bench.load import LoadSpec, RunResult, arrival_offsets_s, run_level
from salvo_client.bench.payloads import (
    TensorSpec,
    build_payloads,
    parse_shapes,
    resolve_inputs,
    with_id,
)
from salvo_client.bench.reports import format_text, knee, percentiles_ms, plot, report, timeline

__all__ = [
    "GRPC_EXPERIMENTS",
    "BenchError",
    "LoadSpec",
    "RunResult",
    "TensorSpec",
    "add_parser",
    "arrival_offsets_s",
    "bench",
    "build_parser",
    "build_payloads",
    "format_text",
    "knee",
    "main",
    "parse_shapes",
    "percentiles_ms",
    "plot",
    "report",
    "resolve_inputs",
    "run_command",
    "run_level",
    "timeline",
    "with_id",
]
