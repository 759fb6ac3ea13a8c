"""Salvo's REST API against its own gRPC and against Seldon MLServer's REST, driven by h2load.

    .venv/bin/python benchmarks/rest.py [--concurrency 1 4 16 64] [--rounds 2] [--no-write]

Needs h2load (`apt-get install nghttp2-client`; `make test` installs it) and MLServer
(benchmarks/setup_mlserver.sh). `mlp` from the demo repository is served alone by `salvo
serve` (its demo configuration) and by MLServer 1.7.1 in-process with adaptive batching
(benchmarks/mlserver, the configuration benchmarks/compare.py finds best for `mlp`).

h2load is C and spends a few µs a call, where a Python or perf_analyzer client takes 100 µs
or more of the same two cores (perf_analyzer cannot drive MLServer's REST in any case: it
reads the model's config, which MLServer does not serve over HTTP). At each concurrency C it
keeps C calls of one batch-1 request in flight for a second's warm-up, then for `--seconds`:
- over REST (HTTP/1.1, C connections, one call each at a time): Salvo with binary tensor
  data, Salvo with JSON tensors, and MLServer with each (a format it refuses shows as such);
- over gRPC (HTTP/2, one connection, C streams): Salvo's unary ModelInfer, the reference.
Every answer is counted by its HTTP status (REST) or the server's statistics (gRPC); the
server's CPU a call comes from /proc. The contestants take turns in a rotating order for
`--rounds` rounds at each level, and each keeps its best (others' work on a shared machine
only ever takes from a figure). The table goes to stdout as markdown and into RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from common import (  # noqa: E402
    ServerProcess,
    add_run_options,
    answered_count,
    machine,
    measure_and_publish,
    today,
)
from compare import CANDIDATES, log, measured_commit, mlserver  # noqa: E402
from stress import cpu_s, infer_payload  # noqa: E402

from tests import h2load  # noqa: E402

TITLE = "REST: Salvo's against its gRPC and MLServer's REST (h2load, mlp)"
MODEL = "mlp"
CONCURRENCY = (1, 4, 16, 64)
HEADLINE = 16
DONE = re.compile(r"finished in [\d.]+\w*, ([\d.]+) req/s")
STATUSES = re.compile(r"status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx")


@dataclass(frozen=True)
class Contestant:
    label: str
    target: str
    """host:port"""
    pid: int
    """The server process, for its CPU time."""
    body: Path
    """What every call sends."""
    headers: tuple[str, ...] = ()
    """HTTP headers (REST); none for gRPC."""


def rest_bodies(folder: Path) -> dict[str, tuple[Path, tuple[str, ...]]]:
    """One `mlp` request over REST: with binary tensor data, and with JSON tensors."""
    x = np.random.default_rng(0).random((1, 64), dtype=np.float32)
    tensor = {"name": "input", "datatype": "FP32", "shape": [1, 64]}
    output = {"name": "output"}
    header = json.dumps(
        {
            "inputs": [{**tensor, "parameters": {"binary_data_size": x.nbytes}}],
            "outputs": [{**output, "parameters": {"binary_data": True}}],
        }
    ).encode()
    binary = folder / "binary.body"
    binary.write_bytes(header + x.tobytes())
    plain = folder / "json.body"
    plain.write_bytes(
        json.dumps(
            {"inputs": [{**tensor, "data": x.ravel().tolist()}], "outputs": [output]}
        ).encode()
    )
    return {
        "binary": (binary, ("content-type: application/octet-stream",
                            f"inference-header-content-length: {len(header)}")),
        "json": (plain, ("content-type: application/json",)),
    }  # fmt: skip


def rest_point(c: Contestant, concurrency: int, seconds: int, log_file: Path) -> dict:
    """A closed loop of `concurrency` REST calls, one a connection, for `seconds`."""
    headers = [arg for header in c.headers for arg in ("-H", header)]

    def h2load_for(duration_s: int) -> subprocess.CompletedProcess:
        cmd = [
            str(h2load.H2LOAD), "--h1", "-c", str(concurrency), "-m", "1",
            "-D", str(duration_s), "-d", str(c.body), *headers,
            "--log-file", str(log_file), f"http://{c.target}/v2/models/{MODEL}/infer",
        ]  # fmt: skip
        log_file.unlink(missing_ok=True)  # h2load appends
        return subprocess.run(cmd, capture_output=True, text=True, timeout=duration_s + 60)

    h2load_for(1)  # warm-up
    cpu_before = cpu_s(c.pid)
    done = h2load_for(seconds)
    cpu = cpu_s(c.pid) - cpu_before
    rate, statuses = DONE.search(done.stdout), STATUSES.search(done.stdout)
    if done.returncode or rate is None or statuses is None:
        return {"error": f"h2load failed: {done.stdout[-300:]} {done.stderr[-300:]}"}
    ok, failed = int(statuses.group(1)), sum(int(statuses.group(i)) for i in (2, 3, 4))
    if failed or not ok:
        return {"error": f"{failed} of {ok + failed} calls not 2xx"}
    latency_us = [int(line.split("\t")[2]) for line in log_file.read_text().splitlines() if line]
    return {
        "throughput": float(rate.group(1)),
        "p50_ms": float(np.percentile(latency_us, 50)) / 1000,
        "p99_ms": float(np.percentile(latency_us, 99)) / 1000,
        "cpu_us": cpu / len(latency_us) * 1e6,
    }


def grpc_point(c: Contestant, concurrency: int, seconds: int, log_file: Path) -> dict:
    """A closed loop of `concurrency` ModelInfer calls on one connection, for `seconds`."""
    h2load.drive(c.target, c.body, 1, log_file, concurrency=concurrency, connections=1)
    answered = answered_count(c.target, MODEL)
    cpu_before, start = cpu_s(c.pid), time.perf_counter()
    run = h2load.drive(c.target, c.body, seconds, log_file, concurrency=concurrency,
                       connections=1)  # fmt: skip
    elapsed, cpu = time.perf_counter() - start, cpu_s(c.pid) - cpu_before
    answered = answered_count(c.target, MODEL) - answered
    if answered < len(run.latency_ns):
        return {"error": f"{len(run.latency_ns) - answered} calls not answered with success"}
    return {
        "throughput": answered / elapsed,
        "p50_ms": float(np.percentile(run.latency_ns, 50)) / 1e6,
        "p99_ms": float(np.percentile(run.latency_ns, 99)) / 1e6,
        "cpu_us": cpu / answered * 1e6,
    }


def show(label: str, c: int, m: dict) -> None:
    figures = m.get("error") or (
        f"{m['throughput']:,.0f}/s p50 {m['p50_ms']:.2f} ms p99 {m['p99_ms']:.2f} ms "
        f"cpu {m['cpu_us']:.0f} µs"
    )
    log(f"  {label} c={c}: {figures}")


def sweep(contestants: list[Contestant], args: argparse.Namespace, folder: Path) -> dict:
    rows: dict[str, list[dict]] = {c.label: [] for c in contestants}
    for i, concurrency in enumerate(args.concurrency):
        rounds: dict[str, list[dict]] = {label: [] for label in rows}
        for r in range(args.rounds):
            turn = (i + r) % len(contestants)
            for c in contestants[turn:] + contestants[:turn]:
                point = grpc_point if not c.headers else rest_point
                m = point(c, concurrency, args.seconds, folder / "h2load.log")
                show(c.label, concurrency, m)
                rounds[c.label].append(m)
        for label, tried in rounds.items():
            best = max(tried, key=lambda m: m.get("throughput", 0.0))
            rows[label].append(best | {"concurrency": concurrency})
    return rows


def run(args: argparse.Namespace) -> dict:
    results: dict = {
        "machine": machine(),
        "date": today(),
        "commit": measured_commit(),
        "seconds": args.seconds,
        "rounds": args.rounds,
    }
    log(f"measuring {results['commit']}; load average {os.getloadavg()}")
    with tempfile.TemporaryDirectory() as tmp, ExitStack() as stack:
        root = Path(tmp)
        from salvo.demo import build_demo_repo

        demo = root / "demo"
        build_demo_repo(demo)
        repo = root / "repo"
        shutil.copytree(demo / MODEL, repo / MODEL)
        salvo = stack.enter_context(ServerProcess(repo, "--torch-threads", "1"))
        peer = stack.enter_context(mlserver(root, demo, MODEL, CANDIDATES[0]))
        bodies = rest_bodies(root)
        grpc_body = root / "grpc.body"
        grpc_body.write_bytes(h2load.grpc_body(infer_payload(MODEL, "input", (1, 64))))
        salvo_http, peer_http = f"127.0.0.1:{salvo.http_port}", f"127.0.0.1:{peer.http_port}"
        contestants = [
            Contestant("Salvo REST binary", salvo_http, salvo.proc.pid, *bodies["binary"]),
            Contestant("Salvo REST JSON", salvo_http, salvo.proc.pid, *bodies["json"]),
            Contestant("Salvo gRPC", salvo.grpc_target, salvo.proc.pid, grpc_body),
            Contestant("MLServer REST binary", peer_http, peer.proc.pid, *bodies["binary"]),
            Contestant("MLServer REST JSON", peer_http, peer.proc.pid, *bodies["json"]),
        ]
        results["rows"] = sweep(contestants, args, root)
    return results


def cells(m: dict) -> str:
    if "error" in m:
        return f"— ({m['error'][:60]}) | — | —"
    return f"{m['throughput']:,.0f} | {m['p99_ms']:.2f} | {m['cpu_us']:.0f}"


def ratio(a: dict, b: dict) -> str:
    if "throughput" in a and "throughput" in b and b["throughput"] > 0:
        return f"{a['throughput'] / b['throughput']:.2f}×"
    return "—"


def report(results: dict) -> str:
    rows = results["rows"]
    peer = max(
        ("MLServer REST binary", "MLServer REST JSON"),
        key=lambda label: max((m.get("throughput", 0.0) for m in rows[label]), default=0.0),
    )
    lines = [
        f"Command: `python benchmarks/rest.py --rounds {results['rounds']} --seconds "
        f"{results['seconds']}`, {results['date']}.",
        f"Machine: {results['machine']}.",
        f"Servers: `salvo serve --torch-threads 1` at {results['commit']} and MLServer 1.7.1 "
        "in-process with adaptive batching (benchmarks/mlserver), each serving `mlp` alone. "
        f"Load: h2load, a closed loop of C batch-1 calls for {results['seconds']} s after a "
        "1 s warm-up; REST over C HTTP/1.1 connections, gRPC over one HTTP/2 connection; "
        f"the best of {results['rounds']} rounds in rotating order at each level. For each: "
        "calls/s, p99 latency, the server's CPU a call.",
        "",
    ]
    refused = [label for label in rows if all("error" in m for m in rows[label])]
    if refused:
        first_error = {label: rows[label][0]["error"] for label in refused}
        lines[-1:-1] = [
            "Refused at every level: "
            + "; ".join(f"{label} ({error})" for label, error in first_error.items())
            + "."
        ]
    columns = [label for label in rows if label not in refused]
    head = ["C"] + [part for label in columns for part in (f"{label} /s", "p99 ms", "CPU µs")]
    head += [f"REST binary / {peer}", "REST binary / gRPC", "REST JSON / gRPC"]
    lines += ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for i, first in enumerate(rows[columns[0]]):
        line = [str(first["concurrency"])] + [cells(rows[label][i]) for label in columns]
        binary, plain = rows["Salvo REST binary"][i], rows["Salvo REST JSON"][i]
        grpc = rows["Salvo gRPC"][i]
        line += [ratio(binary, rows[peer][i]), ratio(binary, grpc), ratio(plain, grpc)]
        lines.append("| " + " | ".join(line) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concurrency", nargs="+", type=int, default=list(CONCURRENCY))
    parser.add_argument("--seconds", type=int, default=5, help="each measurement's length")
    parser.add_argument("--rounds", type=int, default=2, help="rounds per level; best is kept")
    add_run_options(parser)
    measure_and_publish(parser.parse_args(), TITLE, run, report)


if __name__ == "__main__":
    main()
