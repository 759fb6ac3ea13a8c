"""Server CPU per request at a fixed offered rate: Salvo against the bare gRPC server.

    python benchmarks/cpu_cost.py [--rate 1000] [--duration-s 6] [--rounds 4] [--no-write]

Throughput in a closed loop on this 2-core machine depends on how the client, the server and
whatever else runs there share the cores, so it drifts 10-20% between runs. The CPU a server
spends on each request, at a rate well below saturation, depends much less on that. It is
the figure to watch when trimming Salvo's per-request work (issue 9).

h2load (tests/h2load.py, a few µs of CPU a call) offers `--rate` batch-1 `mlp` requests a
second straight to the server, evenly spaced on one connection (several connections' timers
fire together, which sends bursts), for `--duration-s` after a 2 s warm-up. The
server's CPU time comes from /proc, per thread: the event loop (the main thread) and the
rest (model executor, gRPC's pollers). Salvo serves `mlp` alone with `--torch-threads 1`.
The bare server is benchmarks/bare_server.py: a precomputed answer, the least a Python gRPC
server can do. h2load cannot read gRPC statuses, so Salvo's own statistics must count every
request h2load finished. Each round starts a fresh server of each kind, in alternating order.
No latency is reported: h2load's timing in rate mode reads high (2.1 ms p50 at 200/s for
`mlp` calls that take 0.9 ms in its closed loop).
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

import tritonclient.grpc as tc

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import ServerProcess, machine, today, write_section  # noqa: E402
from compare import bare_server  # noqa: E402
from stress import cpu_s, infer_payload, thread_cpu_s  # noqa: E402

from tests import h2load  # noqa: E402

MODEL = "mlp"


def served(target: str) -> int:
    """Salvo's count of `mlp` requests answered (ModelStatistics)."""
    with tc.InferenceServerClient(target) as client:
        stats = client.get_inference_statistics(MODEL, as_json=True, client_timeout=10)
    return sum(int(s.get("inference_count", 0)) for s in stats.get("model_stats", []))


def measure(server: ServerProcess, body: Path, args: argparse.Namespace, salvo: bool) -> dict:
    """One measured stretch against a started server: CPU µs per request, by thread."""
    pid, target, log = server.proc.pid, server.grpc_target, body.with_name("h2load.log")
    h2load.drive(target, body, 2, log, rate=args.rate, connections=1)  # warm-up
    count_before = served(target) if salvo else 0
    before, process_before = thread_cpu_s(pid), cpu_s(pid)
    run = h2load.drive(target, body, args.duration_s, log, rate=args.rate, connections=1)
    after, process_after = thread_cpu_s(pid), cpu_s(pid)
    finished = len(run.latency_ns)
    if salvo:
        answered = served(target) - count_before
        # Calls h2load reset at its end may have been answered too: between the two.
        if not finished <= answered <= run.started:
            raise RuntimeError(f"Salvo answered {answered} of {finished} finished calls")
    loop = after.get(pid, 0.0) - before.get(pid, 0.0)
    total = process_after - process_before
    return {
        "rate": finished / args.duration_s,
        "us_total": total / finished * 1e6,
        "us_loop": loop / finished * 1e6,
        "us_other": (total - loop) / finished * 1e6,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=float, default=1000.0, help="requests a second")
    parser.add_argument("--duration-s", type=float, default=6.0)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--no-write", action="store_true", help="do not touch RESULTS.md")
    args = parser.parse_args()

    from salvo.demo import build_demo_repo

    runs: dict[str, list[dict]] = {"salvo": [], "bare": []}
    with tempfile.TemporaryDirectory() as tmp:
        repo = Path(tmp) / "repo"
        build_demo_repo(repo)
        for other in repo.iterdir():
            if other.name != MODEL:
                shutil.rmtree(other)
        body = Path(tmp) / "body"
        body.write_bytes(h2load.grpc_body(infer_payload(MODEL, "input", (1, 64))))
        for round_ in range(args.rounds):
            order = ["salvo", "bare"] if round_ % 2 == 0 else ["bare", "salvo"]
            for side in order:
                server = (
                    ServerProcess(repo, "--torch-threads", "1")
                    if side == "salvo"
                    else bare_server(repo)
                )
                with server:
                    result = measure(server, body, args, side == "salvo")
                runs[side].append(result)
                print(
                    f"round {round_ + 1} {side}: {result['us_total']:.0f} µs/request "
                    f"(loop {result['us_loop']:.0f}, other {result['us_other']:.0f})",
                    flush=True,
                )
    text = report(runs, args)
    print(text)
    if not args.no_write:
        write_section(f"Server CPU per request: Salvo against the bare server ({MODEL})", text)
    return 0


def report(runs: dict[str, list[dict]], args: argparse.Namespace) -> str:
    def median(side: str, key: str) -> float:
        return statistics.median(r[key] for r in runs[side])

    pairs = zip(runs["salvo"], runs["bare"], strict=True)
    ratios = [s["us_total"] / b["us_total"] for s, b in pairs]
    rows = [
        "| server | offered/s | CPU µs per request | event loop | other threads |",
        "| --- | --- | --- | --- | --- |",
    ]
    for side, label in (("salvo", "Salvo"), ("bare", "bare gRPC server")):
        rows.append(
            f"| {label} | {median(side, 'rate'):,.0f} | {median(side, 'us_total'):.0f} | "
            f"{median(side, 'us_loop'):.0f} | {median(side, 'us_other'):.0f} |"
        )
    return "\n".join(
        [
            f"Command: `python benchmarks/cpu_cost.py --rate {args.rate:g} --duration-s "
            f"{args.duration_s:g} --rounds {args.rounds}`, {today()}.",
            f"Machine: {machine()}.",
            f"Load: h2load, batch-1 `{MODEL}` ModelInfer at {args.rate:g}/s evenly spaced on one "
            f"connection, straight to the server, {args.duration_s:g} s after a 2 s warm-up; "
            f"a fresh server of each kind per round, {args.rounds} rounds in alternating order. "
            "Salvo: `salvo serve --torch-threads 1` with `mlp` alone. CPU from /proc: the main "
            "thread (the event loop) and every other thread. Medians over rounds.",
            "",
            *rows,
            "",
            f"Salvo / bare, CPU per request, per round: {', '.join(f'{r:.2f}' for r in ratios)}; "
            f"median **{statistics.median(ratios):.2f}**.",
        ]
    )


if __name__ == "__main__":
    sys.exit(main())
