"""Soak: ten minutes of mixed traffic; does memory stay flat, does every answer make sense?

    make bench-soak            (or: .venv/bin/python benchmarks/soak.py --duration-s 600)

`salvo serve --torch-threads 1` on the demo repository gets an open loop (Poisson, `--rate`
requests/s, `--clients` spawned processes) mixing `mlp` and `digits`, `resnet` at a low
rate, malformed requests (wrong shape, wrong datatype, unknown model, bytes that do not
parse) and calls the client cancels a few milliseconds in. Each kind has the statuses it
may get (a valid request OK, a malformed one its own error, a cancelled one OK or
CANCELLED); anything else is unexpected. Reported: the status histogram per kind, the
unexpected count (target 0), and server RSS growth from the end of the warm-up to the end
(target under 5%). Figures go to benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import ServerProcess, machine, today, write_section  # noqa: E402
from stress import (  # noqa: E402
    CODES,
    Clients,
    Kind,
    Load,
    ServerSampler,
    infer_payload,
    summary,
    unexpected,
)

from tests.fuzzing import UNEXPECTED_LOG  # noqa: E402

MLP = ("mlp", "input", (1, 64))
KINDS = (
    Kind("mlp", infer_payload(*MLP), 55),
    Kind("digits", infer_payload("digits", "image", (1, 8, 8)), 25),
    Kind("resnet", infer_payload("resnet", "input", (1, 3, 64, 64)), 2),
    Kind("mlp, cancelled within 2 ms", infer_payload(*MLP), 8, 2.0, ("OK", "CANCELLED")),
    Kind(
        "resnet, cancelled within 20 ms",
        infer_payload("resnet", "input", (1, 3, 64, 64)),
        1,
        20.0,
        ("OK", "CANCELLED"),
    ),
    Kind(
        "mlp, wrong shape",
        infer_payload("mlp", "input", (1, 63)),
        1.5,
        expect=("INVALID_ARGUMENT",),
    ),
    Kind(
        "mlp, wrong datatype",
        infer_payload("mlp", "input", (1, 64), "FP64"),
        1.5,
        expect=("INVALID_ARGUMENT",),
    ),
    Kind("unknown model", infer_payload("nope", "input", (1, 64)), 1.5, expect=("NOT_FOUND",)),
    Kind("bytes that do not parse", b"\xff\xff\xff", 1.5, expect=("INVALID_ARGUMENT",)),
)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration-s", type=float, default=600.0)
    parser.add_argument("--warmup-s", type=float, default=60.0)
    parser.add_argument("--rate", type=float, default=150.0)
    parser.add_argument("--clients", type=int, default=2)
    parser.add_argument("--no-write", action="store_true", help="do not update RESULTS.md")
    args = parser.parse_args()

    from salvo.demo import build_demo_repo

    clients = Clients(args.clients)
    with tempfile.TemporaryDirectory() as tmp:
        repo = Path(tmp)
        build_demo_repo(repo)
        with ServerProcess(repo, "--torch-threads", "1") as server:
            sampler = ServerSampler(server.proc.pid, interval_s=1.0)
            load_start = os.getloadavg()
            sampler.phase = "warm-up"

            def tick(elapsed_s: float) -> None:
                if elapsed_s >= args.warmup_s:
                    sampler.phase = "measured"
                if int(elapsed_s) % 60 == 0 and sampler.samples:
                    print(f"  {elapsed_s:4.0f} s: RSS {sampler.samples[-1][2]:.0f} MiB", flush=True)

            load = Load(server.grpc_target, KINDS, 0, args.duration_s, rate=args.rate)
            records = clients.run(load, tick=tick)
            sampler.stop()
            alive = server.proc.poll() is None
            load_end = os.getloadavg()
            logged = [line for line in server.lines if any(w in line for w in UNEXPECTED_LOG)]
    clients.close()

    measured = sampler.rss("measured")
    rss_start, rss_end, rss_max = measured[0], measured[-1], max(measured)
    growth = (rss_end - rss_start) / rss_start
    bad = unexpected(records, KINDS)
    codes = sorted({CODES[int(c)] for c in np.unique(records["code"])})
    rows = [
        "| kind | " + " | ".join(codes) + " | OK p99 ms |",
        "| --- | " + " | ".join("---" for _ in codes) + " | --- |",
    ]
    for index, kind in enumerate(KINDS):
        stats = summary(records, index)
        latency = stats["latency_ms"]
        rows.append(
            f"| {kind.name} | "
            + " | ".join(f"{stats['statuses'].get(c, 0):,}" for c in codes)
            + (f" | {latency['p99']:.1f} |" if latency else " | - |")
        )
    table = "\n".join(rows)
    minutes = [f"{mib:.0f}" for t, _, mib, _ in sampler.samples if int(t) % 60 == 0 and t >= 59]
    verdict = (
        f"{len(records):,} requests in {args.duration_s:.0f} s; unexpected statuses: {bad}. "
        f"Server RSS {rss_start:.0f} MiB at the end of the {args.warmup_s:.0f} s warm-up, "
        f"{rss_end:.0f} MiB at the end, {rss_max:.0f} MiB at most: growth {growth:+.1%} "
        f"(target under 5%). RSS each minute: {', '.join(minutes)} MiB. Server CPU "
        f"{sampler.cpu_share('measured'):.2f} of a core. Server alive at the end: "
        f"{'yes' if alive else 'NO'}; unexpected errors logged: {len(logged)}."
    )
    print(table)
    print(verdict)
    if not args.no_write:
        body = f"""
Command: `make bench-soak` (`python benchmarks/soak.py --duration-s {args.duration_s:g}
--warmup-s {args.warmup_s:g} --rate {args.rate:g} --clients {args.clients}`), {today()}.
Machine: {machine()}; load average {load_start[0]:.1f} at the start, {load_end[0]:.1f} at
the end (a shared machine: other work ran alongside).
Server: `salvo serve --torch-threads 1` on the demo repository. Load: Poisson arrivals at
{args.rate:g}/s from {args.clients} client processes; per kind, the share of arrivals is
its weight ({", ".join(f"{k.name} {k.weight:g}" for k in KINDS)}).

{table}

{verdict}
"""
        write_section("Soak: ten minutes of mixed traffic", body)
    healthy = alive and not logged and bad == 0
    return 0 if healthy and growth < 0.05 else 1


if __name__ == "__main__":
    sys.exit(main())
