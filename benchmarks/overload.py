"""Overload: 5x the saturating load for 30 s against a bounded queue, then normal load again.

    make bench-overload        (or: .venv/bin/python benchmarks/overload.py)

A demo model (`--model`: `mlp`, bound by the server's per-request cost, or `resnet`, bound
by its forward pass) gets `dynamic_batching.max_queue_size` (`--max-queue-size`) in a
temporary copy of the demo repository, served alone by `salvo serve --torch-threads 1`.
Phases, one server, one run:

1. saturation: a closed loop (`--concurrency` callers, fewer than the queue holds) finds
   the throughput the server sustains with these clients on this machine: X.
2. normal: an open loop at `--normal-fraction` of X.
3. burst: an open loop at `--factor` x X for `--burst-s` seconds.
4. normal again, then saturation again: does throughput recover?

Reported: admitted (OK) p99 during the burst, per 5 s window (flat = bounded); the shed
count (RESOURCE_EXHAUSTED) and how many carried `grpc-retry-pushback-ms`; server RSS
before, during (max) and after; throughput before vs after. Clients run in `--clients`
spawned processes on the same machine as the server, so the rate the generator actually
offered is reported too. Figures go to benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import ServerProcess, machine, today, write_section  # noqa: E402
from stress import (  # noqa: E402
    Clients,
    Kind,
    Load,
    ServerSampler,
    infer_payload,
    summary,
    windows_p99_ms,
)

SHAPES = {"mlp": (1, 64), "resnet": (1, 3, 64, 64)}
CANCELLED_BY_CORE = """
Where the CANCELLED answers come from: gRPC core holds the calls that the server's event
loop has not taken up yet, and past about a thousand of them it cancels new ones (status
CANCELLED, details "CANCELLED", no push-back) before Salvo's handler, and so its bounded
queue, ever sees them. A bare grpc.aio server with no Salvo code does the same: 8,000
simultaneous calls from another process got 3,991 CANCELLED after 1.5 to 2.4 s; with
`grpc.server.max_pending_requests` 5,000 and `grpc.server.max_pending_requests_hard_limit`
20,000, 126. Under a burst the event loop, which parses, admits and rejects every call, is
the bottleneck: admitted requests first wait seconds in that backlog, so their p99 is
bounded by gRPC's backlog limit, not by `max_queue_size`."""
ALL_REACHED_THE_QUEUE = """
No CANCELLED: the event loop took up every call, so the bounded queue did all the shedding.
"""


def build_repo(root: Path, model: str, max_queue_size: int) -> dict:
    """The demo `model` alone, its queue bounded; returns its dynamic_batching block."""
    from salvo.demo import build_demo_repo

    build_demo_repo(root)
    for other in ("digits", "mlp", "resnet"):
        if other != model:
            shutil.rmtree(root / other)
    path = root / model / "config.yaml"
    config = yaml.safe_load(path.read_text())
    config["dynamic_batching"]["max_queue_size"] = max_queue_size
    path.write_text(yaml.safe_dump(config))
    return config["dynamic_batching"]


def fmt_latency(stats: dict) -> str:
    lat = stats["latency_ms"]
    return f"p50 {lat['p50']:.1f} ms, p99 {lat['p99']:.1f} ms" if lat else "no answers"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=sorted(SHAPES), default="mlp")
    parser.add_argument("--max-queue-size", type=int, default=64)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--factor", type=float, default=5.0)
    parser.add_argument("--normal-fraction", type=float, default=0.5)
    parser.add_argument("--burst-s", type=float, default=30.0)
    parser.add_argument("--phase-s", type=float, default=10.0)
    parser.add_argument("--clients", type=int, default=2)
    parser.add_argument("--no-write", action="store_true", help="do not update RESULTS.md")
    args = parser.parse_args()

    kinds = (Kind(args.model, infer_payload(args.model, "input", SHAPES[args.model])),)
    clients = Clients(args.clients)
    with tempfile.TemporaryDirectory() as tmp:
        repo = Path(tmp)
        batching = build_repo(repo, args.model, args.max_queue_size)
        with ServerProcess(repo, "--torch-threads", "1") as server:
            target = server.grpc_target
            sampler = ServerSampler(server.proc.pid)
            load_start = os.getloadavg()
            clients.run(Load(target, kinds, 0, 2.0, concurrency=args.concurrency))  # warm-up

            def phase(name: str, duration_s: float, **load) -> tuple[np.ndarray, dict]:
                sampler.phase = name
                records = clients.run(Load(target, kinds, 0, duration_s, **load))
                stats = summary(records, duration_s=duration_s)
                print(f"{name}: {stats}", file=sys.stderr, flush=True)
                return records, stats

            _, sat_before = phase("saturation before", args.phase_s, concurrency=args.concurrency)
            x = sat_before["ok_per_s"]
            normal = dict(rate=args.normal_fraction * x)
            _, normal_before = phase("normal before", args.phase_s, **normal)
            burst, during = phase("burst", args.burst_s, rate=args.factor * x)
            _, normal_after = phase("normal after", args.phase_s, **normal)
            _, sat_after = phase("saturation after", args.phase_s, concurrency=args.concurrency)
            sampler.phase = "end"
            sampler.stop()
            alive = server.proc.poll() is None
            load_end = os.getloadavg()
    clients.close()

    statuses = during["statuses"]
    sent = sum(n for code, n in statuses.items() if code != "NOT_SENT")
    shed = statuses.get("RESOURCE_EXHAUSTED", 0)
    other = {c: n for c, n in statuses.items() if c not in ("OK", "RESOURCE_EXHAUSTED")}
    p99s = windows_p99_ms(burst, args.burst_s, 5.0)
    core_shed = "CANCELLED" in statuses
    rss_before = max(sampler.rss("normal before"))
    rss_during = max(sampler.rss("burst"))
    rss_after = max(sampler.rss("saturation after"))
    rows = [
        ("saturation before", "closed loop", sat_before),
        ("normal before", "open loop", normal_before),
        ("burst", "open loop", during),
        ("normal after", "open loop", normal_after),
        ("saturation after", "closed loop", sat_after),
    ]
    table = "\n".join(
        [
            "| phase | OK answers/s | OK latency | statuses | server CPU |",
            "| --- | --- | --- | --- | --- |",
            *(
                f"| {name} ({how}) | {s['ok_per_s']:,.0f} | {fmt_latency(s)} | "
                + ", ".join(f"{c} {n:,}" for c, n in sorted(s["statuses"].items()))
                + f" | {sampler.cpu_share(name):.2f} |"
                for name, how, s in rows
            ),
        ]
    )
    verdict = (
        f"Saturation X = {x:,.0f}/s. Burst: {args.factor:g}x X = {args.factor * x:,.0f}/s "
        f"scheduled for {args.burst_s:.0f} s; the generator sent {sent / args.burst_s:,.0f}/s "
        f"({statuses.get('NOT_SENT', 0):,} arrivals not sent: its own in-flight cap). "
        f"Admitted {statuses.get('OK', 0):,} ({during['ok_per_s']:,.0f}/s), "
        f"OK p99 per 5 s window: {', '.join(f'{p:.0f}' for p in p99s)} ms. "
        f"Shed {shed:,} with RESOURCE_EXHAUSTED, {during['pushback']:,} of them with "
        f"grpc-retry-pushback-ms; other statuses: {other or 'none'}"
        + (" (no client cancels in this run: explained below). " if core_shed else ". ")
        + f"Server RSS {rss_before:.0f} MiB before, {rss_during:.0f} MiB at most during, "
        f"{rss_after:.0f} MiB after. Throughput after / before: saturation "
        f"{sat_after['ok_per_s'] / x:.2f}, normal load "
        f"{normal_after['ok_per_s'] / max(normal_before['ok_per_s'], 1e-9):.2f}. "
        f"Server alive at the end: {'yes' if alive else 'NO'}."
    )
    print(table)
    print(verdict)
    if not args.no_write:
        options = (
            f"--model {args.model} --max-queue-size {args.max_queue_size} "
            f"--concurrency {args.concurrency} --factor {args.factor:g} --burst-s "
            f"{args.burst_s:g} --phase-s {args.phase_s:g} --clients {args.clients}"
        )
        body = f"""
Command: `make bench-overload` (`python benchmarks/overload.py {options}`), {today()}.
Machine: {machine()}.
Load average {load_start[0]:.1f} at the start, {load_end[0]:.1f} at the end (a shared
machine: other work ran alongside).
Server: `salvo serve --torch-threads 1`, the demo `{args.model}` alone with
`dynamic_batching: {batching}`.
Clients: {args.clients} processes on the same machine, batch-1 requests through a generic
grpc.aio method; open-loop arrivals are Poisson and latency counts from the scheduled send.

{table}

{verdict}
{CANCELLED_BY_CORE if core_shed else ALL_REACHED_THE_QUEUE}"""
        write_section(f"Overload: 5x saturation against a bounded queue ({args.model})", body)
    return 0 if alive else 1


if __name__ == "__main__":
    sys.exit(main())
