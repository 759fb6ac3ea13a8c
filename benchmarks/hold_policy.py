"""`hold_for_returns: bounded` against `until_quiet` on `mlp`, closed loop and open loop.

    python benchmarks/hold_policy.py [--concurrency 1,4,16,64] [--rates 500,1000]
                                     [--rounds 2] [--write]

The demo `mlp` is served alone twice over, once with each policy (the rest of its config
as committed), by a fresh `salvo serve --torch-threads 1` per round and policy, the order
reversed every other round. Each server gets the closed-loop loads first (perf_analyzer
--async, a 1 s warm-up window, then one measured run per concurrency), then the open-loop
loads (`salvo bench --rate`, Poisson arrivals, 6 s after a 1 s warm-up). A perf_analyzer
client waits for each answer before it sends again, as a fixed pool of workers does;
`salvo bench --rate` sends on a schedule, as independent callers do. The avg batch is
the server's rows per forward pass over the run (ModelStatistics).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    ServerProcess,
    batch_counts,
    machine,
    perf_analyzer,
    set_hold_for_returns,
    stable_perf_analyzer,
    today,
    write_section,
)

POLICIES = ("bounded", "until_quiet")
MODEL = "mlp"


def policy_repos(root: Path) -> dict[str, Path]:
    """The demo `mlp` alone, once per policy."""
    from salvo.demo import build_demo_repo

    demo = root / "demo"
    build_demo_repo(demo)
    repos = {}
    for policy in POLICIES:
        repo = root / policy
        repo.mkdir()
        shutil.copytree(demo / MODEL, repo / MODEL)
        config = repo / MODEL / "config.yaml"
        if not set_hold_for_returns(config, policy):
            raise SystemExit(f"{config}: the demo {MODEL} has no dynamic_batching block")
        repos[policy] = repo
    return repos


def closed_loop(target: str, concurrency: int) -> dict[str, float]:
    perf_analyzer(target, MODEL, concurrency, window_ms=1000, extra=("-s", "50"))  # warm-up
    before = batch_counts(target, MODEL)
    row = stable_perf_analyzer(target, MODEL, concurrency, extra=("-s", "50"))
    return {
        "throughput": float(row["Inferences/Second"]),
        "p50_ms": int(row["p50 latency"]) / 1e3,
        "p99_ms": int(row["p99 latency"]) / 1e3,
        "batch": avg_batch(before, batch_counts(target, MODEL)),
    }


def open_loop(target: str, rate: int, seed: int) -> dict[str, float]:
    before = batch_counts(target, MODEL)
    cmd = [
        sys.executable, "-m", "salvo_client.bench", "-m", MODEL, "-u", target,
        "--rate", str(rate), "--duration-s", "6", "--warmup-s", "1", "--seed", str(seed),
        "--json", "--quiet",
    ]  # fmt: skip
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=True)
    doc = json.loads(result.stdout)
    if doc["latency_ms"] is None:
        raise SystemExit(f"salvo bench --rate {rate}: no request succeeded: {doc['errors']}")
    return {
        "throughput": doc["throughput_infer_per_s"],
        "p50_ms": doc["latency_ms"]["p50"],
        "p99_ms": doc["latency_ms"]["p99"],
        "batch": avg_batch(before, batch_counts(target, MODEL)),
    }


def avg_batch(before: tuple[int, int], after: tuple[int, int]) -> float:
    inferences, executions = after[0] - before[0], after[1] - before[1]
    return inferences / max(executions, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concurrency", default="1,4,16,64")
    parser.add_argument("--rates", default="500,1000")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--write", action="store_true", help="add the result to RESULTS.md")
    args = parser.parse_args()
    loads = [("c", int(c)) for c in args.concurrency.split(",")]
    loads += [("rate", int(r)) for r in args.rates.split(",")]

    runs: dict[tuple[str, str, int], list[dict[str, float]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        repos = policy_repos(Path(tmp))
        for round_ in range(args.rounds):
            order = POLICIES if round_ % 2 == 0 else POLICIES[::-1]
            for policy in order:
                with ServerProcess(repos[policy], "--torch-threads", "1") as server:
                    for kind, level in loads:
                        if kind == "c":
                            result = closed_loop(server.grpc_target, level)
                        else:
                            result = open_loop(server.grpc_target, level, seed=round_)
                        runs.setdefault((policy, kind, level), []).append(result)
                        print(
                            f"round {round_ + 1} {policy} {kind}={level}: "
                            f"{result['throughput']:,.0f}/s p50 {result['p50_ms']:.2f} "
                            f"p99 {result['p99_ms']:.2f} ms batch {result['batch']:.2f}",
                            flush=True,
                        )
    text = report(runs, loads, args)
    print(text)
    if args.write:
        write_section("Holding for returns: bounded against until_quiet (mlp)", text)


def report(runs: dict, loads: list[tuple[str, int]], args: argparse.Namespace) -> str:
    def med(policy: str, kind: str, level: int, key: str) -> float:
        return statistics.median(r[key] for r in runs[(policy, kind, level)])

    lines = [
        f"Command: `python benchmarks/hold_policy.py --concurrency {args.concurrency} "
        f"--rates {args.rates} --rounds {args.rounds}`, {today()}.",
        f"Machine: {machine()}.",
        "Server: `salvo serve --torch-threads 1`, the demo `mlp` alone (its config as "
        "committed), once with each `dynamic_batching.hold_for_returns`; a fresh server per "
        "round and policy, the order reversed every other round. Closed loop: perf_analyzer "
        "--async -b 1 at each concurrency (1 s warm-up window, then one measured run). Open "
        "loop: `salvo bench --rate R` (Poisson, 6 s after 1 s warm-up; its avg batch includes "
        "the warm-up), whose Python client shares the machine's cores with the server. "
        "Medians over rounds.",
        "",
        "| load | bounded infer/s | until_quiet infer/s | ratio | bounded p50 ms | "
        "until_quiet p50 ms | bounded p99 ms | until_quiet p99 ms | avg batch bounded / "
        "until_quiet |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for kind, level in loads:
        b = {k: med("bounded", kind, level, k) for k in ("throughput", "p50_ms", "p99_ms")}
        q = {k: med("until_quiet", kind, level, k) for k in ("throughput", "p50_ms", "p99_ms")}
        label = f"concurrency {level}" if kind == "c" else f"{level}/s open loop"
        lines.append(
            f"| {label} | {b['throughput']:,.0f} | {q['throughput']:,.0f} | "
            f"{q['throughput'] / b['throughput']:.2f}× | {b['p50_ms']:.2f} | "
            f"{q['p50_ms']:.2f} | {b['p99_ms']:.2f} | {q['p99_ms']:.2f} | "
            f"{med('bounded', kind, level, 'batch'):.2f} / "
            f"{med('until_quiet', kind, level, 'batch'):.2f} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
