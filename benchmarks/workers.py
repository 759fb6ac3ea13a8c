"""`salvo serve --workers N` against one process, on `mlp` and `resnet`, driven by perf_analyzer.

    make bench-workers            (or: .venv/bin/python benchmarks/workers.py)

Each setting is a fresh server on the same demo repository; settings alternate over
`--rounds` rounds so drift on a shared machine touches them alike, and each figure is the
median of its rounds. One worker keeps torch's default threads (one per core); N workers
share the cores out (salvo.workers.threads_per_worker). The raw model's best throughput
(a tight loop at batch 32, torch's default threads) is the ceiling for `resnet`.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    ServerProcess,
    machine,
    raw_throughput,
    stable_perf_analyzer,
    today,
    write_section,
)

CASES = (("mlp", 16), ("mlp", 64), ("resnet", 32))
RESNET_ONLY = (("resnet", 32),)
TITLE = "Workers: several processes on one port (perf_analyzer)"


def _raw_one_thread(model_file: str) -> float:
    import torch

    torch.set_num_threads(1)
    return raw_throughput(Path(model_file), (3, 64, 64), 32)


def raw_side_by_side(model_file: Path, processes: int) -> float:
    """Samples/s of `processes` single-thread loops at batch 32 running at once: the raw
    model with the threads `--workers N` gives its workers."""
    import multiprocessing

    with multiprocessing.get_context("spawn").Pool(processes) as pool:
        return sum(pool.map(_raw_one_thread, [str(model_file)] * processes))


def start(repo: Path, workers: int) -> ServerProcess:
    if workers == 1:
        return ServerProcess(repo).start()
    server = ServerProcess(repo, "--workers", str(workers))
    server.start(wait_ready=False)
    for index in range(workers):
        server.wait_for_line(rf"worker {index} ready")
    return server


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--window-ms", type=int, default=3000)
    parser.add_argument("--resnet-only", action="store_true", help="just resnet at c=32")
    parser.add_argument("--no-write", action="store_true", help="do not touch RESULTS.md")
    args = parser.parse_args()
    from salvo.demo import build_demo_repo

    runs: dict[tuple[int, str, int], list[dict[str, float]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        repo = Path(tmp) / "repo"
        build_demo_repo(repo)
        shutil.rmtree(repo / "digits")
        model_file = repo / "resnet" / "1" / "model.pt"
        raw = raw_throughput(model_file, (3, 64, 64), 32)
        raw_split = {n: raw_side_by_side(model_file, n) for n in args.workers if n > 1}
        print(f"resnet raw at batch 32: {raw:,.0f}/s; split: {raw_split}", flush=True)
        for round_ in range(args.rounds):
            order = args.workers if round_ % 2 == 0 else list(reversed(args.workers))
            for workers in order:
                server = start(repo, workers)
                try:
                    for model, concurrency in RESNET_ONLY if args.resnet_only else CASES:
                        row = stable_perf_analyzer(
                            server.grpc_target, model, concurrency, window_ms=args.window_ms
                        )
                        figures = {
                            "throughput": float(row["Inferences/Second"]),
                            "p50_ms": float(row["p50 latency"]) / 1000,
                            "p99_ms": float(row["p99 latency"]) / 1000,
                        }
                        runs.setdefault((workers, model, concurrency), []).append(figures)
                        print(
                            f"round {round_ + 1} workers={workers} {model} c={concurrency}: "
                            f"{figures['throughput']:,.0f}/s p50 {figures['p50_ms']:.2f} ms "
                            f"p99 {figures['p99_ms']:.2f} ms",
                            flush=True,
                        )
                finally:
                    server.stop()
    body = report(runs, args, raw, raw_split)
    print(body)
    if not args.no_write:
        write_section(
            TITLE + (": resnet, raw on the same threads" if args.resnet_only else ""), body
        )


def report(runs: dict, args: argparse.Namespace, raw: float, raw_split: dict[int, float]) -> str:
    def med(key: tuple[int, str, int], field: str) -> float:
        return statistics.median(r[field] for r in runs[key])

    lines = [
        f"Command: `make bench-workers` (`python benchmarks/workers.py`), {today()}.",
        f"Machine: {machine()}.",
        f"Driver: perf_analyzer 2.51, `--async -b 1 -p {args.window_ms}` on the same machine; "
        f"median of {args.rounds} alternating rounds, a fresh server per setting. "
        f"resnet's raw best (batch 32, torch's default threads): {raw:,.0f} samples/s"
        + "".join(
            f"; {n} single-thread loops side by side (the threads of {n} workers): "
            f"{r:,.0f} samples/s"
            for n, r in raw_split.items()
        )
        + ". `vs raw` compares each setting with the raw loop on the same threads.",
        "",
        "| model | concurrency | workers | infer/s | p50 ms | p99 ms | vs 1 worker | vs raw |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for model, concurrency in RESNET_ONLY if args.resnet_only else CASES:
        base = med((1, model, concurrency), "throughput") if 1 in args.workers else None
        for workers in args.workers:
            key = (workers, model, concurrency)
            tp = med(key, "throughput")
            ratio = f"{tp / base:.2f}×" if base else ""
            of_raw = f"{tp / raw_split.get(workers, raw):.0%}" if model == "resnet" else ""
            lines.append(
                f"| {model} | {concurrency} | {workers} | {tp:,.0f} | {med(key, 'p50_ms'):.2f} "
                f"| {med(key, 'p99_ms'):.2f} | {ratio} | {of_raw} |"
            )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
