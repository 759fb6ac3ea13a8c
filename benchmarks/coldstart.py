"""Cold start: from a server process's spawn to its first answer, Salvo against MLServer.

    .venv/bin/python benchmarks/coldstart.py [--rounds 5] [--no-write]

What a scale-to-zero deployment (serverless, Knative, KEDA) makes its first caller wait,
less the container's own start: each contestant is spawned on fresh ports with `mlp` (the
demo model) as its whole repository, and a client sends the same REST inference
(JSON tensors, the format both accept) from the moment of the spawn, again at once on a
refused connection or an error status, until one is answered 200. The time to that answer
and the server's resident memory then (its whole process tree) are recorded, and the server
is stopped. Contestants alternate for `--rounds` rounds; the table gives the median and the
best of each.

MLServer 1.7.1 runs in-process (benchmarks/mlserver, as committed), from its own venv
(benchmarks/setup_mlserver.sh). The page cache is warm for both after the first round.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from common import ROOT, add_run_options, machine, measure_and_publish, today  # noqa: E402
from compare import CANDIDATES, free_port, log, measured_commit, mlserver  # noqa: E402

TITLE = "Cold start: spawn to first answer (mlp, REST)"
MODEL = "mlp"
SALVO = ROOT / ".venv" / "bin" / "salvo"


def request_body() -> bytes:
    return json.dumps(
        {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 64], "data": [0.5] * 64}]}
    ).encode()


def tree_rss_mib(pid: int) -> float:
    """Resident memory of `pid` and every descendant, in MiB (from /proc)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(entry.name))
    total_kib = 0
    todo = [pid]
    while todo:
        current = todo.pop()
        todo.extend(children.get(current, ()))
        try:
            for line in Path(f"/proc/{current}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total_kib += int(line.split()[1])
        except OSError:
            continue
    return total_kib / 1024


def first_answer(cmd: list[str], http_port: int, timeout_s: float = 180) -> tuple[float, float]:
    """Spawn `cmd` and send the inference until it is answered 200: the seconds from the
    spawn to that answer, and the process tree's resident MiB then."""
    body = request_body()
    headers = {"Content-Type": "application/json"}
    started = time.perf_counter()
    process = subprocess.Popen(
        cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    try:
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"{cmd[0]} exited with {process.returncode} before answering")
            if time.perf_counter() - started > timeout_s:
                raise RuntimeError(f"no answer within {timeout_s} s")
            connection = http.client.HTTPConnection("127.0.0.1", http_port, timeout=10)
            try:
                connection.request("POST", f"/v2/models/{MODEL}/infer", body, headers)
                reply = connection.getresponse()
                reply.read()
                if reply.status == 200:
                    elapsed = time.perf_counter() - started
                    return elapsed, tree_rss_mib(process.pid)
            except OSError:
                pass  # not listening yet
            finally:
                connection.close()
            time.sleep(0.002)  # sleep-ok: the next knock on a port that is not open yet
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def run(args: argparse.Namespace) -> dict:
    root = Path(tempfile.mkdtemp(prefix="salvo-coldstart-"))
    try:
        demo = root / "demo"
        subprocess.run([str(SALVO), "demo-repo", str(demo)], check=True, capture_output=True)
        repo = root / "repo"
        shutil.copytree(demo / MODEL, repo / MODEL)
        samples: dict[str, list[tuple[float, float]]] = {"Salvo": [], "MLServer": []}
        for round_ in range(args.rounds):
            for label in samples if round_ % 2 == 0 else reversed(list(samples)):
                if label == "Salvo":
                    http_port = free_port()
                    cmd = [
                        str(SALVO), "serve", "--model-repository", str(repo),
                        "--grpc-port", str(free_port()), "--http-port", str(http_port),
                    ]  # fmt: skip
                else:
                    peer = mlserver(root, repo, MODEL, CANDIDATES[0])
                    cmd, http_port = peer.cmd, peer.http_port
                seconds, rss = first_answer(cmd, http_port)
                samples[label].append((seconds, rss))
                log(f"round {round_ + 1}: {label} answered after {seconds:.2f} s, {rss:.0f} MiB")
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
    lines = [
        f"Command: `make bench-coldstart` (`python benchmarks/coldstart.py --rounds "
        f"{results['rounds']}`), {results['date']}, at commit {results['commit']}.",
        f"Machine: {results['machine']}.",
        "Each server spawned on fresh ports with `mlp` as its whole repository, then sent the "
        "same REST inference (JSON tensors) until one answered 200; MLServer 1.7.1 "
        "in-process (benchmarks/mlserver); the two alternating.",
        "",
        "| server | spawn to first answer, median | best | resident memory then, median |",
        "| --- | --- | --- | --- |",
    ]
    for label, samples in results["samples"].items():
        seconds = [s for s, _ in samples]
        rss = statistics.median(r for _, r in samples)
        lines.append(
            f"| {label} | {statistics.median(seconds):.2f} s | {min(seconds):.2f} s | "
            f"{rss:.0f} MiB |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    add_run_options(parser)
    measure_and_publish(parser.parse_args(), TITLE, run, report)


if __name__ == "__main__":
    main()
