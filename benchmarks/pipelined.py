"""The client's pipelined mode (many concurrent infers multiplexed over one ModelStreamInfer
stream) against plain unary calls, same server, same callers, one run.

    make bench-pipelined            (or: .venv/bin/python benchmarks/pipelined.py)

`--callers` asyncio tasks share one AsyncInferenceClient and call `infer` on `mlp` back to
back for `--seconds`, unary and pipelined alternating over `--rounds` rounds; each figure is
the median of its rounds. Figures go to benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import ServerProcess, machine, today, write_section  # noqa: E402

from salvo_client import AsyncInferenceClient  # noqa: E402


async def drive(target: str, pipelined: bool, callers: int, seconds: float) -> dict:
    x = {"input": np.ones((1, 64), np.float32)}
    async with AsyncInferenceClient(target) as client:
        call = client.pipelined().infer if pipelined else client.infer
        for _ in range(20):  # warm-up: channel, stream
            await call("mlp", x)
        latencies: list[float] = []
        stop_at = time.perf_counter() + seconds

        async def caller() -> None:
            while time.perf_counter() < stop_at:
                start = time.perf_counter()
                await call("mlp", x)
                latencies.append(time.perf_counter() - start)

        started = time.perf_counter()
        await asyncio.gather(*(caller() for _ in range(callers)))
        elapsed = time.perf_counter() - started
    ms = np.array(latencies) * 1000
    return {
        "throughput": len(latencies) / elapsed,
        "p50_ms": float(np.percentile(ms, 50)),
        "p99_ms": float(np.percentile(ms, 99)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--callers", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    from salvo.demo import build_demo_repo

    runs: dict[str, list[dict]] = {"unary": [], "pipelined": []}
    with tempfile.TemporaryDirectory() as tmp:
        repo = Path(tmp) / "repo"
        build_demo_repo(repo)
        with ServerProcess(repo) as server:
            for _ in range(args.rounds):
                for mode in runs:
                    r = asyncio.run(
                        drive(server.grpc_target, mode == "pipelined", args.callers, args.seconds)
                    )
                    runs[mode].append(r)
                    print(
                        f"{mode}: {r['throughput']:,.0f}/s p50 {r['p50_ms']:.2f} ms "
                        f"p99 {r['p99_ms']:.2f} ms",
                        flush=True,
                    )
    if not args.no_write:
        write_section("Client: pipelined vs unary", report(runs, args))


def report(runs: dict[str, list[dict]], args: argparse.Namespace) -> str:
    def med(mode: str, field: str) -> float:
        return statistics.median(r[field] for r in runs[mode])

    base = med("unary", "throughput")
    lines = [
        f"Command: `make bench-pipelined` (`python benchmarks/pipelined.py`), {today()}.",
        f"Machine: {machine()}.",
        f"Driver: {args.callers} asyncio callers sharing one `AsyncInferenceClient`, `mlp`, "
        f"batch 1, {args.seconds:g} s per run, median of {args.rounds} alternating rounds; "
        "client and server share the machine.",
        "",
        "| mode | infer/s | p50 ms | p99 ms | vs unary |",
        "| --- | --- | --- | --- | --- |",
    ]
    for mode in runs:
        tp = med(mode, "throughput")
        lines.append(
            f"| {mode} | {tp:,.0f} | {med(mode, 'p50_ms'):.2f} | {med(mode, 'p99_ms'):.2f} "
            f"| {tp / base:.2f}× |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
