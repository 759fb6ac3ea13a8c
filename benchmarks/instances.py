"""One CPU instance against two on the demo `resnet`: served throughput and latency.

    make bench-instances            (or: .venv/bin/python benchmarks/instances.py)

Salvo serves `resnet` alone with its demo config but for `instance_count` (1 or 2), torch's
default threads. With two, each batch runs on the intra-op threads divided by the instances
busy when it starts (salvo.scheduler.Scheduler.shares_cores): one alone has every core,
two at once have half each. perf_analyzer drives each at every concurrency, a fresh
server per setting and concurrency, in alternating order for `--rounds` rounds; each figure
is the median round, and the ratio is two instances against one, per round and median.
Written to benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    ServerProcess,
    batch_counts,
    machine,
    model_alone,
    perf_analyzer,
    publish,
    today,
)

TITLE = "Instances: resnet on one CPU instance against two (perf_analyzer)"
INSTANCES = (1, 2)


def repositories(root: Path) -> dict[int, Path]:
    """`resnet` alone, its demo config but for `instance_count`, once per setting."""
    from salvo.demo import build_demo_repo

    demo = root / "demo"
    build_demo_repo(demo)

    def edit(count: int):
        return lambda doc: doc.update(instance_count=count, device="cpu")

    return {c: model_alone(demo, "resnet", root / f"instances-{c}", edit(c)) for c in INSTANCES}


def measure(repo: Path, concurrency: int, window_ms: int) -> dict:
    with ServerProcess(repo) as server:
        target = server.grpc_target
        warm = ("--input-data", "zero", "-s", "100", "--max-trials", "3")
        perf_analyzer(target, "resnet", concurrency, window_ms=1000, extra=warm)
        before = batch_counts(target, "resnet")
        row = perf_analyzer(
            target, "resnet", concurrency, window_ms=window_ms,
            extra=("--input-data", "zero", "-s", "50"),
        )  # fmt: skip
        after = batch_counts(target, "resnet")
    return {
        "throughput": float(row["Inferences/Second"]),
        "p50_ms": int(row["p50 latency"]) / 1e3,
        "p99_ms": int(row["p99 latency"]) / 1e3,
        "rows_per_batch": (after[0] - before[0]) / max(after[1] - before[1], 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concurrency", default="1,8,32,64")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--window-ms", type=int, default=3000)
    parser.add_argument("--no-write", action="store_true", help="do not touch RESULTS.md")
    args = parser.parse_args()
    levels = [int(c) for c in args.concurrency.split(",")]

    runs: dict[tuple[int, int], list[dict]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        repos = repositories(Path(tmp))
        for round_ in range(args.rounds):
            for concurrency in levels:
                order = INSTANCES if round_ % 2 == 0 else tuple(reversed(INSTANCES))
                for count in order:
                    m = measure(repos[count], concurrency, args.window_ms)
                    runs.setdefault((count, concurrency), []).append(m)
                    print(
                        f"round {round_ + 1} c={concurrency} instances={count}: "
                        f"{m['throughput']:,.0f}/s p50 {m['p50_ms']:.1f} ms "
                        f"p99 {m['p99_ms']:.1f} ms, {m['rows_per_batch']:.1f} rows a batch",
                        flush=True,
                    )

    def median(count: int, concurrency: int, key: str) -> float:
        return statistics.median(m[key] for m in runs[(count, concurrency)])

    lines = [
        f"Command: `python benchmarks/instances.py --concurrency {args.concurrency} "
        f"--rounds {args.rounds}`, {today()}.",
        f"Machine: {machine()}.",
        "Salvo serving the demo `resnet` alone on the CPU (its config: frozen, `bounded` "
        "holds) with `instance_count` 1 or 2, torch's default threads; perf_analyzer `-b 1 "
        "--async --input-data zero`, a fresh server per measurement, the order reversed "
        "every other round. Figures are medians over the rounds; rows a batch from "
        "ModelStatistics over the measured run.",
        "",
        "| concurrency | instances | infer/s | p50 ms | p99 ms | rows a batch | 2 / 1 per round |",
        "|---:|---:|---:|---:|---:|---:|---|",
    ]
    for concurrency in levels:
        ratios = [
            two["throughput"] / one["throughput"]
            for one, two in zip(runs[(1, concurrency)], runs[(2, concurrency)], strict=True)
        ]
        for count in INSTANCES:
            ratio = (
                ", ".join(f"{r:.2f}×" for r in ratios)
                + f"; median **{statistics.median(ratios):.2f}×**"
                if count == 2
                else ""
            )
            lines.append(
                f"| {concurrency} | {count} | {median(count, concurrency, 'throughput'):,.0f} | "
                f"{median(count, concurrency, 'p50_ms'):.1f} | "
                f"{median(count, concurrency, 'p99_ms'):.1f} | "
                f"{median(count, concurrency, 'rows_per_batch'):.1f} | {ratio} |"
            )
    publish(TITLE, lines, write=not args.no_write)


if __name__ == "__main__":
    main()
