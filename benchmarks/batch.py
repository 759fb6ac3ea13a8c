"""`salvo batch` against the online path: rows/s on `mlp`, same server, same run.

    make bench-batch            (or: .venv/bin/python benchmarks/batch.py)

One `salvo serve` on the demo repository, and three ways to score rows of `mlp`, in
alternating rounds (each figure is the median of its rounds):

- online: `salvo bench`, a closed loop of unary ModelInfer calls of one row each at
  `--online-concurrency` workers, as online clients call;
- online, batched: `salvo bench --streaming -b N`, requests of `--batch-size` rows on
  `--concurrency` streams: the traffic `salvo batch` sends, without reading, journalling
  or writing anything;
- `salvo batch mlp rows.npy` over `--rows` rows, timed as the whole command (start-up,
  model metadata, reading, scoring, the journal's fsyncs and the output), and as its own
  summary reports the scoring.

Client and server share the machine. Figures go to benchmarks/RESULTS.md unless --no-write.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    ServerProcess,
    add_run_options,
    machine,
    measure_and_publish,
    today,
)

TITLE = "salvo batch vs the online path"
RATE = re.compile(r"s, ([\d,]+) rows/s;")


def online(target: str, args: argparse.Namespace, batched: bool) -> float:
    """Rows/s of a `salvo bench` closed loop (requests/s times rows per request)."""
    rows = args.batch_size if batched else 1
    concurrency = args.concurrency if batched else args.online_concurrency
    cmd = [
        sys.executable, "-m", "salvo_client.bench", "-m", "mlp", "-u", target,
        "-c", str(concurrency), "-b", str(rows), "--duration-s", str(args.seconds),
        "--warmup-s", "1", "--json", "--quiet", *(["--streaming"] if batched else []),
    ]  # fmt: skip
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=True)
    doc = json.loads(run.stdout)
    if doc["errors"]:
        raise RuntimeError(f"salvo bench had errors: {doc['errors']}")
    return float(doc["throughput_rps"]) * rows


def offline(target: str, rows: Path, output: Path, args: argparse.Namespace) -> dict:
    """`salvo batch` over every row: rows/s of the whole command, and of its scoring."""
    cmd = [
        sys.executable, "-m", "salvo", "batch", "mlp", str(rows), "--url", target,
        "--output", str(output), "--batch-size", str(args.batch_size),
        "--concurrency", str(args.concurrency), "--no-progress", "--restart",
    ]  # fmt: skip
    started = time.perf_counter()
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
    wall_s = time.perf_counter() - started
    if run.returncode != 0:
        raise RuntimeError(f"salvo batch failed:\n{run.stderr}")
    match = RATE.search(run.stderr)
    if match is None:
        raise RuntimeError(f"no rows/s in salvo batch's summary:\n{run.stderr}")
    with np.load(output, allow_pickle=False) as out:
        if out["id"].shape[0] != args.rows or (out["error"] != "").any():
            raise RuntimeError("salvo batch's output lacks rows or has errors")
    return {"command": args.rows / wall_s, "scoring": float(match.group(1).replace(",", ""))}


def measure(args: argparse.Namespace) -> dict:
    from salvo.demo import build_demo_repo

    runs: dict[str, list[float]] = {"online": [], "batched": [], "command": [], "scoring": []}
    with tempfile.TemporaryDirectory() as tmp:
        repo = Path(tmp) / "repo"
        build_demo_repo(repo)
        rows = Path(tmp) / "rows.npy"
        np.save(rows, np.random.default_rng(0).random((args.rows, 64), dtype=np.float32))
        with ServerProcess(repo) as server:
            target = server.grpc_target
            for n in range(args.rounds):
                runs["online"].append(online(target, args, batched=False))
                runs["batched"].append(online(target, args, batched=True))
                job = offline(target, rows, Path(tmp) / "rows.out.npz", args)
                runs["command"].append(job["command"])
                runs["scoring"].append(job["scoring"])
                print(
                    f"round {n + 1}: online {runs['online'][-1]:,.0f} rows/s, batched "
                    f"{runs['batched'][-1]:,.0f}, salvo batch {job['command']:,.0f} "
                    f"(scoring {job['scoring']:,.0f})",
                    flush=True,
                )
    return {
        "date": today(),
        "machine": machine(),
        "rows": args.rows,
        "seconds": args.seconds,
        "rounds": args.rounds,
        "batch_size": args.batch_size,
        "concurrency": args.concurrency,
        "online_concurrency": args.online_concurrency,
        "runs": runs,
    }


def report(results: dict) -> str:
    runs = {name: statistics.median(values) for name, values in results["runs"].items()}
    base = runs["online"]
    b, c = results["batch_size"], results["concurrency"]
    lines = [
        f"Command: `make bench-batch` (`python benchmarks/batch.py`), {results['date']}.",
        f"Machine: {results['machine']}.",
        f"Model `mlp` on one `salvo serve`, {results['rows']:,} rows of FP32 [64]; median "
        f"of {results['rounds']} alternating rounds; client and server share the machine.",
        "",
        "| path | rows/request | in flight | rows/s | vs online |",
        "| --- | --- | --- | --- | --- |",
        f"| online: `salvo bench`, unary, {results['seconds']:g} s | 1 | "
        f"{results['online_concurrency']} | {base:,.0f} | 1.00× |",
        f"| online, batched: `salvo bench --streaming -b {b}` | {b} | {c} | "
        f"{runs['batched']:,.0f} | {runs['batched'] / base:.2f}× |",
        f"| `salvo batch`, whole command | {b} | {c} | {runs['command']:,.0f} | "
        f"{runs['command'] / base:.2f}× |",
        f"| `salvo batch`, scoring (its summary) | {b} | {c} | {runs['scoring']:,.0f} | "
        f"{runs['scoring'] / base:.2f}× |",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=500_000, help="rows salvo batch scores")
    parser.add_argument("--seconds", type=float, default=10.0, help="each online run")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=64, help="salvo batch's, and batched")
    parser.add_argument("--concurrency", type=int, default=4, help="salvo batch's, and batched")
    parser.add_argument("--online-concurrency", type=int, default=16)
    add_run_options(parser)
    args = parser.parse_args()
    measure_and_publish(args, TITLE, measure, report)


if __name__ == "__main__":
    main()
