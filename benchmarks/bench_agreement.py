"""Does `salvo bench` measure what perf_analyzer measures? Both, interleaved, on one server.

    .venv/bin/python benchmarks/bench_agreement.py     (needs `make perf-venv`)

Starts `salvo serve` on the demo repository, then for each (model, concurrency) runs
perf_analyzer and `salvo bench` in closed loop at the same concurrency, alternating which
goes first in each round, so drift on a shared machine touches both alike. `salvo bench`
measures for as long as perf_analyzer's three stable windows. Writes the ratios
salvo-bench / perf_analyzer for throughput, p50 and p99 to benchmarks/RESULTS.md, with the
client processes' CPU use (on a small machine the generator competes with the server).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    STABILITY_RETRIES,
    ServerProcess,
    batch_counts,
    machine,
    perf_analyzer,
    today,
    write_section,
)

CASES = (("mlp", 1), ("mlp", 8), ("resnet", 1), ("resnet", 2))
TITLE = "salvo bench vs perf_analyzer (agreement)"


def children_cpu_s() -> float:
    """CPU seconds used so far by finished child processes (perf_analyzer, salvo bench)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_perf_analyzer(target: str, model: str, concurrency: int, window_ms: int) -> dict:
    """perf_analyzer's stable measurement, with a looser stability check on each retry."""
    for attempt, extra in enumerate(STABILITY_RETRIES):
        cpu, wall = children_cpu_s(), time.monotonic()
        try:
            row = perf_analyzer(target, model, concurrency, window_ms=window_ms, extra=extra)
        except RuntimeError as exc:
            if "stable" not in str(exc) or attempt == len(STABILITY_RETRIES) - 1:
                raise
            retry = " ".join(STABILITY_RETRIES[attempt + 1])
            print(f"  perf_analyzer: no stable window, retrying with {retry}", flush=True)
            continue
        return {
            "throughput": float(row["Inferences/Second"]),
            "p50_ms": float(row["p50 latency"]) / 1000,
            "p99_ms": float(row["p99 latency"]) / 1000,
            "cpu": (children_cpu_s() - cpu) / (time.monotonic() - wall),
            "stability": " ".join(extra) or "-s 25",
        }
    raise AssertionError("unreachable")


def bench_command(target: str, model: str, concurrency: int, duration_s: float) -> list[str]:
    return [
        sys.executable, "-m", "salvo_client.bench", "-m", model, "-u", target,
        "-c", str(concurrency), "--duration-s", f"{duration_s:g}", "--warmup-s", "1",
        "--json", "--quiet",
    ]  # fmt: skip


def run_bench(target: str, model: str, concurrency: int, duration_s: float) -> dict:
    cpu, wall = children_cpu_s(), time.monotonic()
    cmd = bench_command(target, model, concurrency, duration_s)
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if result.returncode != 0:
        raise RuntimeError(f"salvo bench failed:\n{result.stdout}\n{result.stderr}")
    doc = json.loads(result.stdout)
    return {
        "throughput": doc["throughput_infer_per_s"],
        "p50_ms": doc["latency_ms"]["p50"],
        "p99_ms": doc["latency_ms"]["p99"],
        "cpu": (children_cpu_s() - cpu) / (time.monotonic() - wall),
        "grpc_experiments": doc.get("grpc_experiments"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3, help="interleaved runs per case")
    parser.add_argument("--window-ms", type=int, default=3000, help="perf_analyzer's -p")
    parser.add_argument("--warmup-s", type=float, default=5.0, help="unmeasured, per case")
    parser.add_argument("--json", type=Path, help="also write every run here")
    parser.add_argument("--no-write", action="store_true", help="do not touch RESULTS.md")
    parser.add_argument(
        "--pin",
        action="store_true",
        help="the server on CPU 0 and the clients on CPU 1, so neither takes the other's CPU",
    )
    parser.add_argument(
        "--cases",
        nargs="+",
        default=[f"{m}:{c}" for m, c in CASES],
        help="MODEL:CONCURRENCY pairs (default: %(default)s)",
    )
    parser.add_argument(
        "--from-json", type=Path, help="measure nothing: report a run saved with --json"
    )
    args = parser.parse_args()
    if args.from_json:
        results = json.loads(args.from_json.read_text())
    else:
        results = measure(args)
        if args.json:
            args.json.write_text(json.dumps(results, indent=2))
    text = report(results)
    print(text)
    if not args.no_write:
        pinned = results.get("settings", {}).get("pin")
        write_section(TITLE[:-1] + ", pinned)" if pinned else TITLE, text)


def measure(args: argparse.Namespace) -> dict[str, Any]:
    """Every case and round, interleaved, on one fresh server."""
    # perf_analyzer reports the average of its last three stable windows.
    duration_s = 3 * args.window_ms / 1000
    results: dict[str, Any] = {
        "machine": machine(),
        "date": today(),
        "settings": {
            "rounds": args.rounds,
            "window_ms": args.window_ms,
            "warmup_s": args.warmup_s,
            "pin": args.pin,
            "cases": args.cases,
        },
        "load_average_at_start": os.getloadavg(),
        "cases": [],
    }
    from salvo.demo import build_demo_repo

    cases = [parse_case(text) for text in args.cases]
    with tempfile.TemporaryDirectory() as tmp:
        repo = Path(tmp) / "repo"
        build_demo_repo(repo)
        # One torch thread leaves the second core of a small machine to the client.
        cpus = os.sched_getaffinity(0)
        if args.pin and not {0, 1} <= cpus:
            raise SystemExit(f"--pin needs CPUs 0 and 1; this process may use {sorted(cpus)}")
        try:
            if args.pin:
                os.sched_setaffinity(0, {0})  # the server's threads inherit CPU 0...
            with ServerProcess(repo, "--torch-threads", "1") as server:
                if args.pin:
                    os.sched_setaffinity(0, {1})  # ...and the clients, CPU 1
                for model, concurrency in cases:
                    results["cases"].append(
                        measure_case(args, server.grpc_target, model, concurrency, duration_s)
                    )
        finally:
            os.sched_setaffinity(0, cpus)
    results["load_average_at_end"] = os.getloadavg()
    return results


def measure_case(
    args: argparse.Namespace, target: str, model: str, concurrency: int, duration_s: float
) -> dict[str, Any]:
    """One case's rounds, perf_analyzer and salvo bench alternating which goes first."""
    case: dict[str, Any] = {
        "model": model,
        "concurrency": concurrency,
        "perf_analyzer": [],
        "salvo_bench": [],
    }
    # Unmeasured: the server meets this load's batch sizes before either client is timed (the
    # first forward pass at a new input shape is slow).
    run_bench(target, model, concurrency, args.warmup_s)
    for round_ in range(args.rounds):
        order = ["perf_analyzer", "salvo_bench"]
        for name in order if round_ % 2 == 0 else order[::-1]:
            before = batch_counts(target, model)
            if name == "perf_analyzer":
                m = run_perf_analyzer(target, model, concurrency, args.window_ms)
            else:
                m = run_bench(target, model, concurrency, duration_s)
            after = batch_counts(target, model)
            # Rows per forward pass (warm-up and retries included): a client that is slow to
            # send the next request leaves the batcher less to batch.
            m["avg_batch"] = (after[0] - before[0]) / max(after[1] - before[1], 1)
            case[name].append(m)
            print(
                f"{model} c={concurrency} round {round_ + 1} {name}: "
                f"{m['throughput']:,.0f}/s p50 {m['p50_ms']:.2f} ms "
                f"p99 {m['p99_ms']:.2f} ms client CPU {m['cpu']:.2f} "
                f"batch {m['avg_batch']:.2f}",
                flush=True,
            )
    return case


def parse_case(text: str) -> tuple[str, int]:
    """`MODEL:CONCURRENCY`, as --cases takes it."""
    model, _, concurrency = text.partition(":")
    if not model or not concurrency.isdigit() or int(concurrency) < 1:
        raise SystemExit(f"--cases: {text!r} is not MODEL:CONCURRENCY (mlp:8, say)")
    return model, int(concurrency)


def _flags(settings: dict) -> str:
    flags = f" --rounds {settings['rounds']}" if settings["rounds"] != 3 else ""
    if settings.get("pin"):
        flags += " --pin"
    if settings.get("cases") and settings["cases"] != [f"{m}:{c}" for m, c in CASES]:
        flags += " --cases " + " ".join(settings["cases"])
    return flags


def _median(runs: list[dict], key: str) -> float:
    return statistics.median(run[key] for run in runs)


def report(results: dict) -> str:
    """The RESULTS.md section: settings, then one row per case with the ratios."""
    settings = results.get("settings", {"rounds": 3, "window_ms": 3000, "warmup_s": 5.0})
    window_ms, rounds = settings["window_ms"], settings["rounds"]
    experiments = sorted(
        {str(run.get("grpc_experiments")) for c in results["cases"] for run in c["salvo_bench"]}
    )
    load = ", ".join(f"{x:.1f}" for x in results["load_average_at_start"])
    end = ", ".join(f"{x:.1f}" for x in results["load_average_at_end"])
    lines = [
        f"Command: `.venv/bin/python benchmarks/bench_agreement.py{_flags(settings)}`, "
        f"{results['date']}.",
        f"Machine: {results['machine']}; load average {load} at the start and "
        f"{end} at the end (a shared machine: other processes ran alongside).",
        "Server: `salvo serve --torch-threads 1` on the demo repository"
        + (", pinned to CPU 0, the clients to CPU 1" if settings.get("pin") else "")
        + ". perf_analyzer 2.51: "
        f"`--async -b 1 -p {window_ms} -s 25 --max-trials 6` (retried with `-s 50`, then "
        "`-s 100 --max-trials 10`, when it found no stable windows). salvo bench: "
        f"`salvo bench -c N --duration-s {3 * window_ms / 1000:g} --warmup-s 1` "
        "(as long as perf_analyzer's three stable windows), its GRPC_EXPERIMENTS "
        + ", ".join(f"`{value}`" for value in experiments)
        + ".",
        f"Each case began with {settings['warmup_s']:g} s of unmeasured load, then ran "
        f"{rounds} rounds, perf_analyzer and salvo bench alternating "
        "which went first; the figures are the medians. Client CPU is the load generator's "
        "own CPU time over its wall time (1.0 = one core); avg batch is the server's rows per "
        "forward pass during that client's run (ModelStatistics).",
        "",
        "| model | concurrency | perf_analyzer infer/s | salvo bench infer/s | ratio "
        "| PA p50 ms | bench p50 ms | ratio | difference | PA p99 ms | bench p99 ms | ratio "
        "| client CPU PA / bench | avg batch PA / bench |",
        "|" + " --- |" * 14,
    ]
    worst = {"throughput": 0.0, "p50_ms": 0.0, "p99_ms": 0.0}
    for case in results["cases"]:
        pa, sb = case["perf_analyzer"], case["salvo_bench"]
        cells = [case["model"], str(case["concurrency"])]
        for key, fmt in (("throughput", "{:,.0f}"), ("p50_ms", "{:.2f}"), ("p99_ms", "{:.2f}")):
            a, b = _median(pa, key), _median(sb, key)
            worst[key] = max(worst[key], abs(b / a - 1))
            cells += [fmt.format(a), fmt.format(b), f"{b / a:.2f}"]
            if key == "p50_ms":  # at sub-millisecond latency a ratio hides how small it is
                cells.append(f"{b - a:+.2f} ms")
        cells.append(f"{_median(pa, 'cpu'):.2f} / {_median(sb, 'cpu'):.2f}")
        cells.append(f"{_median(pa, 'avg_batch'):.2f} / {_median(sb, 'avg_batch'):.2f}")
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        f"Largest disagreement (target: within 15%): throughput {worst['throughput']:.0%}, "
        f"p50 {worst['p50_ms']:.0%}, p99 {worst['p99_ms']:.0%}.",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
