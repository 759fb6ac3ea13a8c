"""Client subcommands of the `salvo` command line: `infer`, `models`, `stats`.

They talk to a running server with `InferenceClient` and import nothing of the server
(no torch), so they work from the light base install. `add_commands` registers them on
the `salvo` parser; `main` runs them on a parser of their own.

    salvo infer mlp input=x.npy --output-dir out/
    salvo infer mlp input='[[0.1, 0.2, ...]]' --datatype FP32
    salvo models [--metadata MODEL] [--json]
    salvo stats [--model MODEL] [--json]
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from google.protobuf.json_format import MessageToDict

from salvo_client.channel import DEFAULT_URL
from salvo_client.client import InferenceClient
from salvo_client.errors import SalvoClientError
from salvo_client.proto import grpc_service_pb2 as pb
from salvo_client.tensors import WIRE_DTYPES

__all__ = ["add_commands", "main"]

# Inline JSON inputs: every v2 datatype but BF16 (numpy has none to parse into).
_JSON_DTYPES = {name: dtype for name, dtype in WIRE_DTYPES.items() if name != "BF16"}


def _targets(url: str) -> str | list[str]:
    """`--url`: one target, or several "host:port" separated by commas (round_robin)."""
    if "," in url and "://" not in url and not url.startswith(("ipv4:", "ipv6:")):
        return [part.strip() for part in url.split(",") if part.strip()]
    return url


def _client(args: argparse.Namespace) -> InferenceClient:
    return InferenceClient(_targets(args.url), timeout_s=args.timeout_s)


def _parse_input(spec: str, datatype: str) -> tuple[str, np.ndarray]:
    """NAME=PATH.npy or NAME=JSON → (name, array)."""
    name, sep, value = spec.partition("=")
    if not sep or not name:
        raise ValueError(f"input {spec!r}: expected NAME=FILE.npy or NAME=JSON")
    if value.endswith(".npy") or (
        not value.lstrip().startswith(("[", "{")) and Path(value).is_file()
    ):
        # Never unpickle: object arrays in .npy files are refused.
        return name, np.load(value, allow_pickle=False)
    try:
        data = json.loads(value)
    except json.JSONDecodeError as exc:
        raise ValueError(f"input '{name}': neither a .npy file nor valid JSON ({exc})") from None
    if datatype == "BYTES":
        array = np.array(data, dtype=object)
        flat = array.reshape(-1)
        for i, item in enumerate(flat):
            if not isinstance(item, str):
                raise ValueError(f"input '{name}': BYTES from JSON takes strings")
            flat[i] = item.encode("utf-8")
        return name, array
    return name, np.array(data, dtype=_JSON_DTYPES[datatype])


def _jsonable(array: np.ndarray) -> Any:
    if array.dtype == object:
        return [
            item.decode("utf-8", "backslashreplace") if isinstance(item, bytes) else item
            for item in array.reshape(-1)
        ]
    return array.reshape(-1).tolist()


def _infer(args: argparse.Namespace) -> int:
    inputs = dict(_parse_input(spec, args.datatype) for spec in args.inputs)
    with _client(args) as client:
        outputs = client.infer(
            args.model, inputs, outputs=args.output or None, version=args.version
        )
    if args.output_dir is not None:
        directory = Path(args.output_dir)
        directory.mkdir(parents=True, exist_ok=True)
        for name, array in outputs.items():
            if "/" in name or "\\" in name or name in ("", ".", ".."):
                raise ValueError(f"output name {name!r} cannot be a file name")
            path = directory / f"{name}.npy"
            # BYTES outputs would need pickle; store them as fixed-width bytes instead.
            np.save(path, array.astype(bytes) if array.dtype == object else array)
            print(f"{name}: {list(array.shape)} {array.dtype} -> {path}")
        return 0
    result = {
        name: {"shape": list(array.shape), "dtype": str(array.dtype), "data": _jsonable(array)}
        for name, array in outputs.items()
    }
    print(json.dumps(result, indent=None if args.compact else 2))
    return 0


def _models(args: argparse.Namespace) -> int:
    with _client(args) as client:
        if args.metadata is not None:
            metadata = client.model_metadata(args.metadata, version=args.version)
            print(json.dumps(MessageToDict(metadata), indent=2))
            return 0
        index = client.repository_index()
        rows = [
            {
                "name": m.name,
                "version": m.version,
                "state": m.state,
                "ready": m.state == "READY" and client.model_ready(m.name, m.version or None),
                "reason": m.reason,
            }
            for m in index
        ]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    header = ("MODEL", "VERSION", "STATE", "READY", "REASON")
    table = [header] + [
        (r["name"], r["version"] or "-", r["state"], "yes" if r["ready"] else "no", r["reason"])
        for r in rows
    ]
    widths = [max(len(str(row[i])) for row in table) for i in range(len(header) - 1)]
    for row in table:
        cells = [str(cell).ljust(width) for cell, width in zip(row, widths, strict=False)]
        print("  ".join([*cells, str(row[-1])]).rstrip())
    return 0


def _mean_ms(duration: pb.StatisticDuration) -> float:
    return duration.ns / duration.count / 1e6 if duration.count else 0.0


def _summary(stats: pb.ModelStatistics) -> dict[str, Any]:
    s = stats.inference_stats
    return {
        "model": stats.name,
        "version": stats.version,
        "requests": s.success.count + s.fail.count,
        "success": s.success.count,
        "fail": s.fail.count,
        "inferences": stats.inference_count,
        "executions": stats.execution_count,
        "mean_request_ms": round(_mean_ms(s.success), 3),
        "mean_queue_ms": round(_mean_ms(s.queue), 3),
        "mean_compute_ms": round(_mean_ms(s.compute_infer), 3),
        "cache_hits": s.cache_hit.count,
        "batch_sizes": {str(b.batch_size): b.compute_infer.count for b in stats.batch_stats},
    }


def _stats(args: argparse.Namespace) -> int:
    with _client(args) as client:
        stats = client.statistics(args.model, version=args.version)
    summaries = [_summary(s) for s in stats]
    if args.json:
        print(json.dumps(summaries, indent=2))
        return 0
    columns = ("model", "version", "requests", "success", "fail", "inferences", "executions")
    columns_ms = ("mean_request_ms", "mean_queue_ms", "mean_compute_ms")
    header = [c.upper() for c in (*columns, *columns_ms)]
    table = [header] + [
        [str(s[c]) for c in columns] + [f"{s[c]:.3f}" for c in columns_ms] for s in summaries
    ]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    for row in table:
        print(
            "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        )
    return 0


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--url",
        default=DEFAULT_URL,
        help=f"server gRPC address, host:port, or several joined by commas (default {DEFAULT_URL})",
    )
    parser.add_argument(
        "--timeout-s", type=float, default=60.0, help="deadline of each call (default 60)"
    )


def _run(handler: Any) -> Any:
    """Run a handler, turning call failures and bad arguments into a message and exit 1."""

    def run(args: argparse.Namespace) -> int:
        try:
            return int(handler(args))
        except SalvoClientError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        except (ValueError, TypeError, OSError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2

    return run


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    """Register `infer`, `models` and `stats` on the `salvo` command's subparsers.

    Each sets `func`, which takes the parsed arguments and returns the exit status.
    """
    infer = subparsers.add_parser(
        "infer",
        help="run a model on inputs from .npy files or inline JSON",
        description="Inputs are NAME=FILE.npy or NAME=JSON (JSON uses --datatype). Outputs "
        "are printed as JSON, or saved as NAME.npy with --output-dir.",
    )
    infer.add_argument("model", help="model name")
    infer.add_argument("inputs", nargs="+", metavar="NAME=VALUE", help="an input")
    infer.add_argument(
        "--datatype",
        default="FP32",
        choices=sorted(_JSON_DTYPES),
        help="v2 datatype of JSON inputs (default FP32)",
    )
    infer.add_argument("--version", help="model version (default: the server's choice)")
    infer.add_argument(
        "--output", action="append", metavar="NAME", help="an output to return (default: all)"
    )
    infer.add_argument("--output-dir", type=Path, help="save each output as NAME.npy here")
    infer.add_argument("--compact", action="store_true", help="JSON on one line")
    _common(infer)
    infer.set_defaults(func=_run(_infer))

    models = subparsers.add_parser(
        "models", help="list the repository's models and whether each is ready"
    )
    models.add_argument("--metadata", metavar="MODEL", help="print MODEL's metadata instead")
    models.add_argument("--version", help="model version for --metadata")
    models.add_argument("--json", action="store_true", help="print JSON")
    _common(models)
    models.set_defaults(func=_run(_models))

    stats = subparsers.add_parser("stats", help="summarise ModelStatistics per model version")
    stats.add_argument("--model", help="only this model")
    stats.add_argument("--version", help="only this version (with --model)")
    stats.add_argument("--json", action="store_true", help="print JSON")
    _common(stats)
    stats.set_defaults(func=_run(_stats))


def build_parser() -> argparse.ArgumentParser:
    """A stand-alone parser holding only the client commands."""
    parser = argparse.ArgumentParser(prog="salvo", description="Salvo client commands.")
    add_commands(parser.add_subparsers(dest="command", required=True))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one client command; returns the exit status (0 ok, 1 the call failed, 2 bad
    arguments or files)."""
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    raise SystemExit(main())
