"""This checkout's server against another commit's, same load, alternating rounds.

A change to the hot path is worth what it measures against the code before it, on the same
machine, at the same time. This checks the other commit out into a temporary git worktree,
then in each round starts `salvo serve` from one tree and then the other (the order
reversed every other round), drives each with the same perf_analyzer load (or h2load's,
whose client costs the 2 cores almost nothing), and reports the per-round ratios and their
median. Both servers use this checkout's virtualenv; the other tree's `server/` and
`client/` come first on PYTHONPATH.

    python benchmarks/ab.py --base REV [--model mlp] [--concurrency 16] [--streaming]
                            [--hold-for-returns bounded|until_quiet] [--cache]
                            [--driver perf_analyzer|h2load] [--request plain|perf_analyzer]
                            [--torch-threads 1] [--rounds 6] [--write]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    ROOT,
    ServerProcess,
    answered_count,
    machine,
    perf_analyzer,
    set_hold_for_returns,
    today,
    write_section,
)
from stress import cpu_s, infer_payload  # noqa: E402

from salvo.domain.config import load_config  # noqa: E402
from salvo_client.proto import grpc_service_pb2 as pb  # noqa: E402
from tests import h2load  # noqa: E402

H2LOAD_CALLS = 20_000
"""Calls in one h2load measurement (a fifth as many warm it up first)."""


def revision(rev: str) -> str:
    out = subprocess.run(
        ["git", "-C", str(ROOT), "rev-parse", "--short", rev],
        check=True, capture_output=True, text=True,
    )  # fmt: skip
    return out.stdout.strip()


def dirty() -> bool:
    out = subprocess.run(
        ["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"],
        check=True, capture_output=True, text=True,
    )  # fmt: skip
    return bool(out.stdout.strip())


def measure(tree: Path | None, repo: Path, args: argparse.Namespace) -> dict[str, float]:
    """One server from `tree` (None: this checkout), warmed up, then one measured window."""
    env = {"PYTHONPATH": f"{tree / 'server'}:{tree / 'client'}"} if tree else {}
    with ServerProcess(repo, "--torch-threads", str(args.torch_threads), env=env) as server:
        if args.driver == "h2load":
            return measure_h2load(server, repo, args)
        load = {"streaming": args.streaming, "extra": ("-s", "50")}
        perf_analyzer(server.grpc_target, args.model, args.concurrency, window_ms=1000, **load)
        row = perf_analyzer(server.grpc_target, args.model, args.concurrency, **load)
    return {"throughput": float(row["Inferences/Second"]), "p99_ms": int(row["p99 latency"]) / 1e3}


def measure_h2load(server: ServerProcess, repo: Path, args: argparse.Namespace) -> dict[str, float]:
    """A closed loop of `args.concurrency` calls on one connection from h2load (a few µs of
    client CPU a call, where perf_analyzer's is 100 µs or more and shares the 2 cores):
    H2LOAD_CALLS calls after a warm-up, and the server's CPU per call. h2load cannot read
    gRPC statuses, so Salvo's statistics must count every call as a success. Every call
    sends the same request: with `--cache`, all but the first are cache hits."""
    target, body = server.grpc_target, repo.parent / "h2load.body"
    config = load_config(repo / args.model)
    shape = (1, *config.inputs[0].dims)
    payload = infer_payload(args.model, config.inputs[0].name, shape)
    if args.request == "perf_analyzer":  # what perf_analyzer adds to every request
        request = pb.ModelInferRequest.FromString(payload)
        request.parameters["triton_enable_empty_final_response"].bool_param = True
        for output in config.outputs:
            request.outputs.add(name=output.name)
        payload = request.SerializeToString()
    body.write_bytes(h2load.grpc_body(payload))
    log = body.with_name("h2load.log")
    h2load.drive(target, body, 0, log, concurrency=args.concurrency, connections=1,
                 requests=H2LOAD_CALLS // 5)  # fmt: skip
    answered_before = answered_count(target, args.model)
    cpu_before, start = cpu_s(server.proc.pid), time.perf_counter()
    run = h2load.drive(target, body, 0, log, concurrency=args.concurrency, connections=1,
                       requests=H2LOAD_CALLS)  # fmt: skip
    elapsed, cpu = time.perf_counter() - start, cpu_s(server.proc.pid) - cpu_before
    answered = answered_count(target, args.model) - answered_before
    if answered != H2LOAD_CALLS or len(run.latency_ns) != H2LOAD_CALLS:
        raise RuntimeError(f"{answered} answered, {len(run.latency_ns)} of {H2LOAD_CALLS} done")
    return {
        "throughput": H2LOAD_CALLS / elapsed,
        "p99_ms": float(np.percentile(run.latency_ns, 99)) / 1e6,
        "cpu_us": cpu / H2LOAD_CALLS * 1e6,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", required=True, help="the commit to compare against")
    parser.add_argument("--model", default="mlp")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--streaming", action="store_true", help="perf_analyzer --streaming")
    parser.add_argument("--torch-threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument(
        "--alone",
        action="store_true",
        help="serve the model alone, as a one-model deployment does (default: the demo repository)",
    )
    parser.add_argument(
        "--hold-for-returns",
        choices=("bounded", "until_quiet"),
        help="set the model's dynamic_batching.hold_for_returns (default: its config's)",
    )
    parser.add_argument(
        "--driver",
        choices=("perf_analyzer", "h2load"),
        default="perf_analyzer",
        help="h2load: a closed loop with almost no client CPU, unary only (default: perf_analyzer)",
    )
    parser.add_argument(
        "--request",
        choices=("plain", "perf_analyzer"),
        default="plain",
        help="h2load's request: inputs only, or as perf_analyzer sends it (a parameter, "
        "triton_enable_empty_final_response, and every output named)",
    )
    parser.add_argument(
        "--cache",
        action="store_true",
        help="enable the model's response cache (with h2load's one request: every call a hit)",
    )
    parser.add_argument("--write", action="store_true", help="add the result to RESULTS.md")
    args = parser.parse_args()
    if args.driver == "h2load" and args.streaming:
        parser.error("h2load drives unary calls only")
    if args.driver != "h2load" and args.request != "plain":
        parser.error("--request sets h2load's request; perf_analyzer makes its own")

    base, head = revision(args.base), revision("HEAD") + (" plus changes" if dirty() else "")
    runs: dict[str, list[dict[str, float]]] = {"base": [], "this": []}
    with tempfile.TemporaryDirectory() as tmp:
        tree = Path(tmp) / "base"
        subprocess.run(
            ["git", "-C", str(ROOT), "worktree", "add", "--detach", str(tree), base],
            check=True, capture_output=True,
        )  # fmt: skip
        try:
            from salvo.demo import build_demo_repo

            repo = Path(tmp) / "repo"
            build_demo_repo(repo)
            if args.alone:
                for other in repo.iterdir():
                    if other.name != args.model:
                        shutil.rmtree(other)
            config = repo / args.model / "config.yaml"
            if args.hold_for_returns and not set_hold_for_returns(config, args.hold_for_returns):
                raise SystemExit(f"{args.model} does not batch: no hold_for_returns to set")
            if args.cache:
                with config.open("a") as f:
                    f.write("response_cache: {enable: true}\n")
            for round_ in range(args.rounds):
                order = ["base", "this"] if round_ % 2 == 0 else ["this", "base"]
                for side in order:
                    result = measure(tree if side == "base" else None, repo, args)
                    runs[side].append(result)
                    print(
                        f"round {round_ + 1} {side}: {result['throughput']:,.0f}/s "
                        f"p99 {result['p99_ms']:.2f} ms",
                        flush=True,
                    )
        finally:
            subprocess.run(
                ["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tree)],
                check=False, capture_output=True,
            )  # fmt: skip
    text = report(runs, args, base, head)
    print(text)
    if args.write:
        mode = "streaming" if args.streaming else "unary"
        alone = " alone" if args.alone else ""
        hold = f", {args.hold_for_returns}" if args.hold_for_returns else ""
        driver = ", h2load" if args.driver == "h2load" else ""
        cache = ", cache hits" if args.cache else ""
        write_section(
            f"A/B: {head} against {base} ({args.model}{alone}, {mode}{hold}{cache}{driver})",
            text,
        )


def report(runs: dict, args: argparse.Namespace, base: str, head: str) -> str:
    pairs = list(zip(runs["this"], runs["base"], strict=True))
    ratios = [t["throughput"] / b["throughput"] for t, b in pairs]
    p99 = [t["p99_ms"] / b["p99_ms"] for t, b in pairs]
    flags = f" --model {args.model} --concurrency {args.concurrency}"
    flags += " --streaming" if args.streaming else ""
    flags += " --alone" if args.alone else ""
    flags += f" --hold-for-returns {args.hold_for_returns}" if args.hold_for_returns else ""
    flags += " --cache" if args.cache else ""
    flags += " --driver h2load" if args.driver == "h2load" else ""
    flags += f" --request {args.request}" if args.request != "plain" else ""
    flags += f" --torch-threads {args.torch_threads}" if args.torch_threads != 1 else ""
    flags += f" --rounds {args.rounds}"
    mode = "--streaming" if args.streaming else "--async"
    return "\n".join(
        [
            f"Command: `python benchmarks/ab.py --base {base}{flags}`, {today()}.",
            f"Machine: {machine()}.",
            f"Servers: `salvo serve --torch-threads {args.torch_threads}` from {head} (this) "
            f"and from {base} (base), a fresh one per measurement, serving "
            + (f"`{args.model}` alone" if args.alone else "the demo repository")
            + (
                f" with `hold_for_returns: {args.hold_for_returns}`"
                if args.hold_for_returns
                else ""
            )
            + (" with its response cache on" if args.cache else "")
            + ". Load: "
            + (
                f"h2load, a closed loop of {args.concurrency} batch-1 calls to `{args.model}` "
                + ("as perf_analyzer makes them " if args.request == "perf_analyzer" else "")
                + "on "
                f"one connection, {H2LOAD_CALLS // 5:,} calls to warm up, then "
                f"{H2LOAD_CALLS:,} measured (each counted as answered by the server's "
                "statistics), server CPU from /proc"
                if args.driver == "h2load"
                else f"perf_analyzer {mode} -b 1 at concurrency {args.concurrency} on "
                f"`{args.model}`, a 1 s warm-up window, then one measured run"
            )
            + f"; {args.rounds} rounds, the order reversed every other round.",
            "",
            f"- throughput, this / base per round: {', '.join(f'{r:.3f}' for r in ratios)}; "
            f"median **{statistics.median(ratios):.3f}**",
            f"- p99, this / base per round: {', '.join(f'{r:.3f}' for r in p99)}; "
            f"median {statistics.median(p99):.3f}",
            f"- medians: this {statistics.median(r['throughput'] for r in runs['this']):,.0f}/s, "
            f"base {statistics.median(r['throughput'] for r in runs['base']):,.0f}/s",
            *(
                [
                    "- server CPU µs per call, medians: "
                    f"this {statistics.median(r['cpu_us'] for r in runs['this']):.0f}, "
                    f"base {statistics.median(r['cpu_us'] for r in runs['base']):.0f}"
                ]
                if args.driver == "h2load"
                else []
            ),
        ]
    )


if __name__ == "__main__":
    main()
