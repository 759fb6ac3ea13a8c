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

With `--via-nginx` every phase goes through nginx with deploy/nginx's config (Debian's nginx
on loopback, as tests/nginx.py runs it), which sheds calls past `--max-in-flight` with
RESOURCE_EXHAUSTED and push-back before they reach the server's event loop; nginx's access
log then also gives each OK call's latency as nginx saw it, without the client's own delays.

Load generators (`--generator`):
- `python` (the default): `--clients` spawned processes of grpc.aio, Poisson arrivals,
  latency from the scheduled send, every status and push-back seen by the client. About
  200 µs of CPU a call, on the server's two cores: at 5x `mlp` it cannot send what it is
  asked for, nor read answers as fast as they come.
- `h2load` (implies `--via-nginx`): Debian's h2load (tests/h2load.py), a few µs a call,
  evenly spaced arrivals; statuses and OK latency come from nginx's access log (h2load's
  own timing reads high in rate mode: trust nginx's).

Reported: admitted (OK) p99 during the burst, per 5 s window (flat = bounded); the shed
count (RESOURCE_EXHAUSTED) and, with the Python clients, how many carried
`grpc-retry-pushback-ms`; server RSS before, during (max) and after; throughput before vs
after; the CPU of the server, nginx and the generator. Figures go to benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import sys
import tempfile
import time
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
    cpu_s,
    infer_payload,
    summary,
    windows_p99_ms,
)

from salvo_client.bench import percentiles_ms  # noqa: E402
from tests import h2load  # noqa: E402
from tests.nginx import MAX_IN_FLIGHT_PER_REPLICA, Nginx  # noqa: E402

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
SHED_BY_NGINX = """
nginx answered the calls past its limit itself (RESOURCE_EXHAUSTED with push-back, in C), so
the server's event loop only ever held the calls it could serve.
"""
PYTHON_CLIENTS = """\
Clients: {clients} processes on the same machine, batch-1 requests through a generic
grpc.aio method; open-loop arrivals are Poisson and latency counts from the scheduled send."""
H2LOAD_CLIENT = """\
Client: h2load (nghttp2-client) on the same machine, batch-1 ModelInfer posts on 8
connections: a closed loop, or evenly spaced arrivals; its latency column counts every
call, shed ones included; CLIENT_CLOSED counts the calls still open when h2load's time
was up, which it resets. Statuses and OK latency at nginx come from nginx's
access log. nginx's answer to a shed call carries `grpc-retry-pushback-ms: 100`
(tests/e2e/test_nginx_shedding.py); h2load cannot read it."""


def nginx_cpu_s(master: int) -> float:
    """CPU seconds used by nginx's master `master` and its worker processes."""
    pids = [master]
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == master:
                pids.append(int(stat.parent.name))
        except (OSError, ValueError, IndexError):
            continue  # a process that ended while being read
    return sum(cpu_s(pid) for pid in pids)


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


def fmt_latency(lat: dict | None) -> str:
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
    parser.add_argument("--clients", type=int, default=2, help="Python client processes")
    parser.add_argument("--generator", choices=("python", "h2load"), default="python")
    parser.add_argument(
        "--via-nginx",
        action="store_true",
        help="send every phase through nginx (deploy/nginx), which sheds past --max-in-flight",
    )
    parser.add_argument(
        "--max-in-flight",
        type=int,
        default=MAX_IN_FLIGHT_PER_REPLICA,
        help="with --via-nginx: calls nginx lets through at once (default: render.py's)",
    )
    parser.add_argument("--no-write", action="store_true", help="do not update RESULTS.md")
    args = parser.parse_args()
    h2 = args.generator == "h2load"
    args.via_nginx = args.via_nginx or h2

    payload = infer_payload(args.model, "input", SHAPES[args.model])
    kinds = (Kind(args.model, payload),)
    clients = Clients(args.clients)
    phases: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as running:
        repo = Path(tmp) / "repo"
        batching = build_repo(repo, args.model, args.max_queue_size)
        body = Path(tmp) / "body"
        body.write_bytes(h2load.grpc_body(payload))
        with ServerProcess(repo, "--torch-threads", "1") as server:
            target = server.grpc_target
            proxy = None
            if args.via_nginx:
                (Path(tmp) / "nginx").mkdir()
                proxy = Nginx(Path(tmp) / "nginx", [target], max_in_flight=args.max_in_flight)
                target = proxy.start().target
                running.callback(proxy.stop)  # before the server, whatever happens
            sampler = ServerSampler(server.proc.pid)
            load_start = os.getloadavg()
            clients.run(Load(target, kinds, 0, 2.0, concurrency=args.concurrency))  # warm-up

            def phase(name: str, duration_s: float, **load) -> dict:
                sampler.phase = name
                nginx_before = nginx_cpu_s(proxy.proc.pid) if proxy else 0.0
                logged_from = len(proxy.access) if proxy else 0
                started_at = time.time()
                if h2:
                    run = h2load.drive(target, body, duration_s, Path(tmp) / "h2load.log", **load)
                    latency_ns, generator_cpu = run.latency_ns, run.cpu_s
                    assert proxy is not None
                    # The calls h2load reset at its end are logged a moment later.
                    proxy.wait_logged(logged_from + run.started)
                else:
                    records = clients.run(Load(target, kinds, 0, duration_s, **load))
                    stats = summary(records, duration_s=duration_s)
                    latency_ns = records[records["code"] == 0]["latency_ns"]
                    generator_cpu = float("nan")  # pool processes outlive the phase
                if proxy:
                    seen = h2load.logged(proxy.access[logged_from:])
                    nginx_cpu = (nginx_cpu_s(proxy.proc.pid) - nginx_before) / duration_s
                if h2:
                    stats = {
                        "statuses": dict(seen.statuses),
                        "ok_per_s": seen.statuses["OK"] / duration_s,
                        "pushback": None,
                    }
                    p99s = windows_of(seen.ok_at_s - started_at, seen.ok_ns, duration_s)
                else:
                    p99s = windows_p99_ms(records, duration_s, 5.0)
                stats["latency_ms"] = percentiles_ms(latency_ns)
                stats["window_p99_ms"] = p99s
                if proxy:
                    stats["nginx_ok_ms"] = percentiles_ms(seen.ok_ns)
                    stats["nginx_cpu"] = nginx_cpu
                stats["generator_cpu"] = generator_cpu / duration_s
                stats["server_cpu"] = sampler.cpu_share(name)
                print(f"{name}: {stats}", file=sys.stderr, flush=True)
                phases[name] = stats
                return stats

            closed = dict(concurrency=args.concurrency)
            x = phase("saturation before", args.phase_s, **closed)["ok_per_s"]
            normal = dict(rate=args.normal_fraction * x)
            phase("normal before", args.phase_s, **normal)
            during = phase("burst", args.burst_s, rate=args.factor * x)
            phase("normal after", args.phase_s, **normal)
            phase("saturation after", args.phase_s, **closed)
            sampler.phase = "end"
            sampler.stop()
            alive = server.proc.poll() is None
            load_end = os.getloadavg()
            running.close()
    clients.close()
    for name in phases:  # the server's CPU share needs the sampler's last sample of each
        phases[name]["server_cpu"] = sampler.cpu_share(name)

    statuses = during["statuses"]
    sent = sum(n for code, n in statuses.items() if code != "NOT_SENT")
    shed = statuses.get("RESOURCE_EXHAUSTED", 0)
    other = {c: n for c, n in statuses.items() if c not in ("OK", "RESOURCE_EXHAUSTED")}
    core_shed = "CANCELLED" in statuses
    rss_before = max(sampler.rss("normal before"))
    rss_during = max(sampler.rss("burst"))
    rss_after = max(sampler.rss("saturation after"))
    how = {"saturation": "closed loop", "normal": "open loop", "burst": "open loop"}
    latency_label = "h2load latency, every call" if h2 else "OK latency"
    columns = ["phase", "OK answers/s", latency_label, "statuses", "server CPU"]
    if args.via_nginx:
        columns += ["OK latency at nginx", "nginx CPU"]
    if h2:
        columns += ["h2load CPU"]

    def row(name: str, s: dict) -> str:
        cells = [
            f"{name} ({how[name.split()[0]]})",
            f"{s['ok_per_s']:,.0f}",
            fmt_latency(s["latency_ms"]),
            ", ".join(f"{c} {n:,}" for c, n in sorted(s["statuses"].items())),
            f"{s['server_cpu']:.2f}",
        ]
        if args.via_nginx:
            cells += [fmt_latency(s["nginx_ok_ms"]), f"{s['nginx_cpu']:.2f}"]
        if h2:
            cells += [f"{s['generator_cpu']:.2f}"]
        return "| " + " | ".join(cells) + " |"

    table = "\n".join(
        [
            "| " + " | ".join(columns) + " |",
            "|" + " --- |" * len(columns),
            *(row(name, s) for name, s in phases.items()),
        ]
    )
    where = "at nginx" if h2 else "at the client"
    pushback = (
        "each with nginx's grpc-retry-pushback-ms"
        if h2
        else f"{during['pushback']:,} of them with grpc-retry-pushback-ms"
    )
    sat_after = phases["saturation after"]["ok_per_s"]
    normal_ratio = phases["normal after"]["ok_per_s"] / max(
        phases["normal before"]["ok_per_s"], 1e-9
    )
    verdict = (
        f"Saturation X = {x:,.0f}/s. Burst: {args.factor:g}x X = {args.factor * x:,.0f}/s "
        f"scheduled for {args.burst_s:.0f} s; the generator sent {sent / args.burst_s:,.0f}/s "
        f"({statuses.get('NOT_SENT', 0):,} arrivals not sent: its own in-flight cap). "
        f"Admitted {statuses.get('OK', 0):,} ({during['ok_per_s']:,.0f}/s), OK p99 {where} per "
        f"5 s window: {', '.join(f'{p:.0f}' for p in during['window_p99_ms'])} ms. "
        f"Shed {shed:,} with RESOURCE_EXHAUSTED, {pushback}; other statuses: {other or 'none'}"
        + (" (no client cancels in this run: explained below). " if core_shed else ". ")
        + f"Server RSS {rss_before:.0f} MiB before, {rss_during:.0f} MiB at most during, "
        f"{rss_after:.0f} MiB after. Throughput after / before: saturation "
        f"{sat_after / x:.2f}, normal load {normal_ratio:.2f}. "
        f"Server alive at the end: {'yes' if alive else 'NO'}."
    )
    print(table)
    print(verdict)
    if not args.no_write:
        options = (
            f"--model {args.model} --max-queue-size {args.max_queue_size} "
            f"--concurrency {args.concurrency} --factor {args.factor:g} --burst-s "
            f"{args.burst_s:g} --phase-s {args.phase_s:g}"
        )
        if h2:
            options += f" --generator h2load --max-in-flight {args.max_in_flight}"
        else:
            options += f" --clients {args.clients}"
            if args.via_nginx:
                options += f" --via-nginx --max-in-flight {args.max_in_flight}"
        via = (
            f"\nIn front: Debian's nginx with deploy/nginx's config, at most {args.max_in_flight}"
            " calls in flight (`render.py --max-in-flight`); the clients call nginx."
            if args.via_nginx
            else ""
        )
        if core_shed:
            ending = CANCELLED_BY_CORE
        elif args.via_nginx:
            ending = SHED_BY_NGINX if shed else ""
        else:
            ending = ALL_REACHED_THE_QUEUE
        generator = H2LOAD_CLIENT if h2 else PYTHON_CLIENTS.format(clients=args.clients)
        body_text = f"""
Command: `python benchmarks/overload.py {options}`, {today()}.
Machine: {machine()}.
Load average {load_start[0]:.1f} at the start, {load_end[0]:.1f} at the end (a shared
machine: other work ran alongside).
Server: `salvo serve --torch-threads 1`, the demo `{args.model}` alone with
`dynamic_batching: {batching}`.{via}
{generator}

{table}

{verdict}
{ending}"""
        title = f"Overload: 5x saturation against a bounded queue ({args.model})"
        if args.via_nginx:
            title = (
                "Overload: 5x saturation through nginx's in-flight limit "
                f"({args.model}, {args.generator} clients)"
            )
        write_section(title, body_text)
    return 0 if alive else 1


def windows_of(at_s: np.ndarray, latency_ns: np.ndarray, duration_s: float) -> list[float]:
    """p99 of `latency_ns` per 5 s window of `at_s` (seconds into the phase)."""
    out = []
    for start in np.arange(0, duration_s, 5.0):
        part = latency_ns[(at_s >= start) & (at_s < start + 5.0)]
        stats = percentiles_ms(part)
        out.append(stats["p99"] if stats else float("nan"))
    return out


if __name__ == "__main__":
    sys.exit(main())
