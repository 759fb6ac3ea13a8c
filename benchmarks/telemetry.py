"""What telemetry costs: off, 1% and 100% sampled traces to a live OTLP receiver, and a
collector that accepts connections and never answers — one run, on `mlp`, perf_analyzer.

    make bench-telemetry            (or: .venv/bin/python benchmarks/telemetry.py)

Each setting is its own server process on the same demo repository; settings alternate
over `--rounds` rounds so drift on a shared machine touches them alike, and each figure is
the median of its rounds. Figures go to benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import socket
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import ServerProcess, machine, measure, today, write_section  # noqa: E402

from tests.otlp import start_receiver  # noqa: E402


def settings(receiver_port: int, black_hole_port: int) -> dict[str, dict[str, str]]:
    live = {
        "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{receiver_port}",
        "OTEL_EXPORTER_OTLP_INSECURE": "true",
        "OTEL_TRACES_SAMPLER": "parentbased_traceidratio",
    }
    return {
        "telemetry off": {"SALVO_TELEMETRY_ENABLED": "false"},
        "metrics only (no OTLP endpoint)": {},
        "traces 1% sampled": {**live, "OTEL_TRACES_SAMPLER_ARG": "0.01"},
        "traces 100% sampled": {**live, "OTEL_TRACES_SAMPLER_ARG": "1.0"},
        **{
            f"collector never answers, {label} sampled": {
                **live,
                "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{black_hole_port}",
                "OTEL_EXPORTER_OTLP_TIMEOUT": "1",
                "OTEL_TRACES_SAMPLER_ARG": ratio,
            }
            for label, ratio in (("1%", "0.01"), ("100%", "1.0"))
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--window-ms", type=int, default=3000)
    parser.add_argument(
        "--only", nargs="+", metavar="LABEL", help="just these settings (labels start with)"
    )
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    from salvo.demo import build_demo_repo

    receiver, receiver_server, receiver_port = start_receiver()
    black_hole = socket.socket()
    black_hole.bind(("127.0.0.1", 0))
    black_hole.listen(1024)
    runs: dict[str, list] = {}
    try:
        with tempfile.TemporaryDirectory() as tmp:
            repo = Path(tmp) / "repo"
            build_demo_repo(repo)
            configs = settings(receiver_port, black_hole.getsockname()[1])
            if args.only:
                configs = {
                    k: v for k, v in configs.items() if any(k.startswith(o) for o in args.only)
                }
            for round_ in range(args.rounds):
                # Every other round runs the settings in reverse, so none always goes first.
                order = list(configs.items())
                for label, env in order if round_ % 2 == 0 else order[::-1]:
                    with ServerProcess(repo, env=env) as server:
                        m = measure(
                            server.grpc_target, "mlp", args.concurrency, window_ms=args.window_ms
                        )
                    runs.setdefault(label, []).append(m)
                    print(
                        f"round {round_ + 1} {label}: {m.throughput:,.0f}/s "
                        f"p50 {m.p50_us / 1000:.2f} ms p99 {m.p99_us / 1000:.2f} ms",
                        flush=True,
                    )
    finally:
        black_hole.close()
        receiver_server.stop(0)
    spans = len(receiver.spans)
    print(f"receiver got {spans} spans")
    if not args.no_write:
        title = "Telemetry overhead (perf_analyzer, mlp)"
        if args.only:
            title += f": {', '.join(runs)}, {args.rounds} rounds"
        write_section(title, report(runs, args, spans))


def report(runs: dict, args: argparse.Namespace, spans: int) -> str:
    def med(label: str, field: str) -> float:
        return statistics.median(getattr(m, field) for m in runs[label])

    def paired(label: str, field: str) -> float:
        """The median over rounds of this setting's figure / telemetry off's, same round."""
        off = runs["telemetry off"]
        return statistics.median(
            getattr(m, field) / getattr(o, field) for m, o in zip(runs[label], off, strict=True)
        )

    lines = [
        f"Command: `make bench-telemetry` (`python benchmarks/telemetry.py`), {today()}.",
        f"Machine: {machine()}.",
        f"Driver: perf_analyzer 2.51, `--async -b 1 --concurrency-range {args.concurrency} "
        f"-p {args.window_ms}`; {args.rounds} rounds, the settings in turn (reversed every "
        "other round), a fresh server per setting; figures are medians over rounds, ratios "
        "the median of each round's ratio to telemetry off in that round. "
        "The OTLP receiver (Python gRPC, tests/otlp.py) runs on the same "
        f"machine and received {spans:,} spans in all.",
        "",
        "| setting | infer/s | p50 ms | p99 ms | throughput vs off | p99 vs off |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for label in runs:
        tp, p99 = med(label, "throughput"), med(label, "p99_us")
        lines.append(
            f"| {label} | {tp:,.0f} | {med(label, 'p50_us') / 1000:.2f} | {p99 / 1000:.2f} "
            f"| {paired(label, 'throughput'):.0%} | {paired(label, 'p99_us'):.0%} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
