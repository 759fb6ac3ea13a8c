"""Where the event loop's time goes under load: py-spy on a real server, perf_analyzer driving.

    make bench-hotpath            (or: .venv/bin/python benchmarks/hotpath.py)

The server runs under `py-spy record` (sampling its threads, on-CPU only) while
perf_analyzer drives `--model` at `--concurrency`. The report is the event-loop thread's
samples: the functions they were in (self time, top `--top`), and how much of the loop
ran Salvo's own code (inclusive), gRPC's, or protobuf's. Run it on two commits to compare
(`--label`); figures go to RESULTS.md under one section per label.
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import ROOT, machine, stable_perf_analyzer, today, write_section  # noqa: E402

from tests.servers import LISTENING  # noqa: E402

PY_SPY = Path(sys.executable).parent / "py-spy"
STARTUP = ("importlib", "SalvoServer.start", "load_all", "build_demo_repo")
FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^:()]+)(?::(?P<line>\d+))?\)$")


def profile(
    repo: Path, model: str, concurrency: int, window_ms: int, out: Path, streaming: bool
) -> dict:
    """Record the server while perf_analyzer runs; returns perf_analyzer's CSV row."""
    cmd = [
        str(PY_SPY), "record", "--threads", "--rate", "250", "--format", "raw",
        "--output", str(out), "--",
        sys.executable, "-m", "salvo", "serve", "--model-repository", str(repo),
        "--grpc-port", "0", "--http-port", "0",
    ]  # fmt: skip
    spy = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert spy.stdout is not None
    port, ready = 0, threading.Event()

    def read() -> None:
        nonlocal port
        for line in spy.stdout:  # type: ignore[union-attr]
            match = LISTENING.search(line)
            if match:
                port = int(match.group(2))
            if '"msg": "ready: ' in line:
                ready.set()
        ready.set()

    threading.Thread(target=read, daemon=True).start()
    if not ready.wait(120) or not port:
        spy.kill()
        raise RuntimeError("server did not start under py-spy")
    try:
        return stable_perf_analyzer(
            f"127.0.0.1:{port}", model, concurrency, window_ms=window_ms, streaming=streaming
        )
    finally:
        server = _child(spy.pid)
        if server:
            subprocess.run(["kill", "-TERM", str(server)], check=False)
        try:
            spy.wait(60)
        except subprocess.TimeoutExpired:
            spy.send_signal(signal.SIGINT)
            spy.wait(30)


def _child(pid: int) -> int | None:
    for path in Path(f"/proc/{pid}/task").glob("*/children"):
        children = path.read_text().split()
        if children:
            return int(children[0])
    return None


def loop_stacks(raw: Path) -> list[tuple[list[str], int]]:
    """The event-loop thread's stacks (root first) and their sample counts: the busiest
    thread that ran the data plane (uvloop's loop has no Python frame of its own)."""
    by_thread: dict[str, list[tuple[list[str], int]]] = collections.defaultdict(list)
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        frames = stack.split(";")
        thread = next((f for f in frames if f.startswith("thread ")), "")
        frames = [f for f in frames if not f.startswith(("thread ", "process "))]
        if not frames or any(marker in f for f in frames for marker in STARTUP):
            continue  # start-up: imports and model loads, not serving
        by_thread[thread].append((frames, int(count)))
    loops = [
        stacks
        for stacks in by_thread.values()
        if any("dataplane.py" in f for frames, _ in stacks for f in frames)
    ]
    return max(loops, key=lambda stacks: sum(c for _, c in stacks)) if loops else []


def _where(frame: str) -> tuple[str, str]:
    match = FRAME.match(frame)
    if not match:
        return frame, ""
    return match.group("func"), match.group("file")


def summarize(stacks: list[tuple[list[str], int]], top: int) -> tuple[list[str], int]:
    total = sum(c for _, c in stacks)
    self_time: collections.Counter[str] = collections.Counter()
    areas: collections.Counter[str] = collections.Counter()
    for frames, count in stacks:
        func, file = _where(frames[-1])
        self_time[f"`{func}` ({Path(file).name})"] += count
        files = [_where(f)[1] for f in frames]
        if any("/salvo/" in f or "/salvo_client/" in f for f in files):
            areas["Salvo's code (inclusive)"] += count
        leaf_func, leaf = _where(frames[-1])
        if leaf_func == "Handle._run":
            areas["gRPC's compiled code (cygrpc, run from loop callbacks)"] += count
        elif leaf_func == "EpollSelector.select":
            areas["in epoll_wait (loop waiting for I/O)"] += count
        elif "grpc" in leaf:
            areas["gRPC's Python code (self)"] += count
        elif "protobuf" in leaf:
            areas["protobuf (self)"] += count
        elif "asyncio" in leaf:
            areas["asyncio's Python code (self)"] += count
    lines = ["| function (self time) | share of loop samples |", "| --- | --- |"]
    lines += [f"| {name} | {count / total:.1%} |" for name, count in self_time.most_common(top)]
    lines += ["", "| area | share of loop samples |", "| --- | --- |"]
    lines += [f"| {name} | {count / total:.1%} |" for name, count in sorted(areas.items())]
    return lines, total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="mlp")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--window-ms", type=int, default=4000)
    parser.add_argument("--top", type=int, default=15)
    parser.add_argument("--streaming", action="store_true", help="drive ModelStreamInfer")
    parser.add_argument("--label", default="HEAD")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    from salvo.demo import build_demo_repo

    commit = (
        os.environ.get("BENCH_COMMIT")
        or subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT
        ).stdout.strip()
    )
    with tempfile.TemporaryDirectory() as tmp:
        repo = Path(tmp) / "repo"
        build_demo_repo(repo)
        raw = Path(tmp) / "profile.txt"
        row = profile(repo, args.model, args.concurrency, args.window_ms, raw, args.streaming)
        lines, samples = summarize(loop_stacks(raw), args.top)
    body = "\n".join(
        [
            f"Command: `python benchmarks/hotpath.py --label {args.label}` at commit {commit}, "
            f"{today()}.",
            f"Machine: {machine()}.",
            f"Load: perf_analyzer `{'--streaming' if args.streaming else '--async'} -b 1 "
            f"--concurrency-range {args.concurrency}` on "
            f"`{args.model}`: {float(row['Inferences/Second']):,.0f} infer/s, p99 "
            f"{float(row['p99 latency']) / 1000:.2f} ms (under py-spy at 250 Hz). "
            f"{samples:,} samples of the event-loop thread. py-spy samples Python frames "
            "only: time in compiled code counts against the Python frame that called "
            "it (gRPC's Cython callbacks against asyncio's `Handle._run`).",
            "",
            *lines,
        ]
    )
    print(body)
    if not args.no_write:
        write_section(f"Hot path profile: {args.label}", body)


if __name__ == "__main__":
    main()
