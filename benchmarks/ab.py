"""This checkout's server against another commit's, same load, alternating rounds.

A change to the hot path is worth what it measures against the code before it, on the same
machine, at the same time. This checks the other commit out into a temporary git worktree,
then in each round starts `salvo serve` from one tree and then the other (the order
reversed every other round), drives each with the same perf_analyzer load, and reports the
per-round ratios and their median. Both servers use this checkout's virtualenv; the other
tree's `server/` and `client/` come first on PYTHONPATH.

    python benchmarks/ab.py --base REV [--model mlp] [--concurrency 16] [--streaming]
                            [--hold-for-returns bounded|until_quiet]
                            [--rounds 6] [--write]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    ROOT,
    ServerProcess,
    machine,
    perf_analyzer,
    set_hold_for_returns,
    today,
    write_section,
)


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
        load = {"streaming": args.streaming, "extra": ("-s", "50")}
        perf_analyzer(server.grpc_target, args.model, args.concurrency, window_ms=1000, **load)
        row = perf_analyzer(server.grpc_target, args.model, args.concurrency, **load)
    return {"throughput": float(row["Inferences/Second"]), "p99_ms": int(row["p99 latency"]) / 1e3}


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
    parser.add_argument("--write", action="store_true", help="add the result to RESULTS.md")
    args = parser.parse_args()

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
        write_section(f"A/B: {head} against {base} ({args.model}{alone}, {mode}{hold})", text)


def report(runs: dict, args: argparse.Namespace, base: str, head: str) -> str:
    pairs = list(zip(runs["this"], runs["base"], strict=True))
    ratios = [t["throughput"] / b["throughput"] for t, b in pairs]
    p99 = [t["p99_ms"] / b["p99_ms"] for t, b in pairs]
    flags = f" --model {args.model} --concurrency {args.concurrency}"
    flags += " --streaming" if args.streaming else ""
    flags += " --alone" if args.alone else ""
    flags += f" --hold-for-returns {args.hold_for_returns}" if args.hold_for_returns else ""
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
            + ". Load: perf_analyzer "
            f"{mode} -b 1 at concurrency {args.concurrency} on `{args.model}`, a 1 s warm-up "
            f"window, then one measured run; {args.rounds} rounds, the order reversed every "
            "other round.",
            "",
            f"- throughput, this / base per round: {', '.join(f'{r:.3f}' for r in ratios)}; "
            f"median **{statistics.median(ratios):.3f}**",
            f"- p99, this / base per round: {', '.join(f'{r:.3f}' for r in p99)}; "
            f"median {statistics.median(p99):.3f}",
            f"- medians: this {statistics.median(r['throughput'] for r in runs['this']):,.0f}/s, "
            f"base {statistics.median(r['throughput'] for r in runs['base']):,.0f}/s",
        ]
    )


if __name__ == "__main__":
    main()
