"""What traffic policies cost the hot path: `mlp` with no policy, a policy that sends every
request to the version no policy would (the router's own cost), a 50/50 split between two
versions, and every request on one version with 10% shadowed to the other.

    make bench-evaluation      (or: .venv/bin/python benchmarks/evaluation.py [--rounds 6])

Version 2 of `mlp` is a copy of version 1, so only routing differs. Each measurement is a
fresh `salvo serve --torch-threads 1` serving `mlp` alone (`version_policy: all`), driven
by h2load with a closed loop of 16 unary ModelInfer calls on one connection (a few µs of
client CPU a call): a warm-up of 4,000 calls, then 20,000 measured, each counted as
answered by the server's statistics; the server's CPU a call comes from /proc. The
contestants take turns in an order that rotates every round; each figure is the median
of its rounds, as a ratio to no policy's median. Shadow copies are real inferences: they
add work, which the server's CPU a call shows.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    ServerProcess,
    add_run_options,
    answered_count,
    edit_config,
    machine,
    measure_and_publish,
    today,
)
from compare import measured_commit  # noqa: E402
from stress import cpu_s, infer_payload  # noqa: E402

from tests import h2load  # noqa: E402

TITLE = "Traffic policies: the hot path's cost (mlp, concurrency 16)"
MODEL = "mlp"
CONCURRENCY = 16
WARMUP_CALLS = 4_000
CALLS = 20_000
POLICIES: dict[str, dict | None] = {
    "no policy": None,
    "a policy sending everything to one version": {"weights": {2: 1}},
    "split 50/50 between two versions": {"weights": {1: 1, 2: 1}},
    "one version, 10% shadowed to the other": {
        "weights": {1: 1},
        "shadow": {"version": 2, "share": 0.1},
    },
}


def repository(demo: Path, root: Path, policy: dict | None) -> Path:
    """`mlp` alone with versions 1 and 2 (the same model) and `policy` as its traffic."""
    shutil.copytree(demo / MODEL, root / MODEL)
    shutil.copytree(root / MODEL / "1", root / MODEL / "2")

    def change(doc: dict) -> None:
        doc["version_policy"] = {"all": True}
        if policy is not None:
            doc["traffic"] = policy

    edit_config(root / MODEL / "config.yaml", change)
    return root


def measure(repo: Path, body: Path) -> dict[str, float]:
    with ServerProcess(repo, "--torch-threads", "1") as server:
        target, log = server.grpc_target, body.with_name("h2load.log")
        h2load.drive(target, body, 0, log, concurrency=CONCURRENCY, connections=1,
                     requests=WARMUP_CALLS)  # fmt: skip
        before = answered_count(target, MODEL)
        cpu_before, start = cpu_s(server.proc.pid), time.perf_counter()
        run = h2load.drive(target, body, 0, log, concurrency=CONCURRENCY, connections=1,
                           requests=CALLS)  # fmt: skip
        elapsed, cpu = time.perf_counter() - start, cpu_s(server.proc.pid) - cpu_before
        answered = answered_count(target, MODEL) - before
    if answered < CALLS or len(run.latency_ns) != CALLS:
        raise RuntimeError(f"{answered} answered, {len(run.latency_ns)} of {CALLS} done")
    return {"throughput": CALLS / elapsed, "cpu_us": cpu / CALLS * 1e6}


def run(args: argparse.Namespace) -> dict:
    root = Path(tempfile.mkdtemp(prefix="salvo-evaluation-"))
    try:
        demo = root / "demo"
        from salvo.demo import build_demo_repo

        build_demo_repo(demo)
        repos = {
            label: repository(demo, root / f"repo-{i}", policy)
            for i, (label, policy) in enumerate(POLICIES.items())
        }
        body = root / "h2load.body"
        body.write_bytes(h2load.grpc_body(infer_payload(MODEL, "input", (1, 64))))
        labels = list(POLICIES)
        samples: dict[str, list[dict[str, float]]] = {label: [] for label in labels}
        for round_ in range(args.rounds):
            shift = round_ % len(labels)
            for label in labels[shift:] + labels[:shift]:
                figure = measure(repos[label], body)
                samples[label].append(figure)
                print(f"round {round_ + 1}: {label}: {figure['throughput']:,.0f}/s, "
                      f"{figure['cpu_us']:.0f} µs a call", file=sys.stderr)  # fmt: skip
        return {
            "machine": machine(),
            "date": today(),
            "commit": measured_commit(),
            "rounds": args.rounds,
            "samples": samples,
        }
    finally:
        shutil.rmtree(root, ignore_errors=True)


def report(results: dict) -> str:
    samples = results["samples"]
    medians = {
        label: {k: statistics.median(s[k] for s in rounds) for k in ("throughput", "cpu_us")}
        for label, rounds in samples.items()
    }
    base = medians["no policy"]
    lines = [
        f"Command: `make bench-evaluation` (`python benchmarks/evaluation.py --rounds "
        f"{results['rounds']}`), {results['date']}, at commit {results['commit']}.",
        f"Machine: {results['machine']}.",
        f"Load: h2load, a closed loop of {CONCURRENCY} unary calls of one row on one "
        f"connection, {CALLS:,} measured after {WARMUP_CALLS:,}; a fresh server per "
        "measurement; medians of the rounds.",
        "",
        "| policy | calls/s | vs no policy | server CPU a call | vs no policy |",
        "| --- | --- | --- | --- | --- |",
    ]
    for label, figure in medians.items():
        lines.append(
            f"| {label} | {figure['throughput']:,.0f} | "
            f"{figure['throughput'] / base['throughput']:.3f} | {figure['cpu_us']:.0f} µs | "
            f"{figure['cpu_us'] / base['cpu_us']:.3f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=6)
    add_run_options(parser)
    measure_and_publish(parser.parse_args(), TITLE, run, report)


if __name__ == "__main__":
    main()
