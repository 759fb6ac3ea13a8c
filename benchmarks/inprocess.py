"""Salvo's own cost per request, without gRPC, and the collector's pauses.

A real `SalvoServer` is started (ports 0, the demo `mlp` with and without the response
cache) and its gRPC front end's ModelInfer path (message to `MessageRequest`, the data
plane, the response encoded) is called in-process by 16 concurrent callers: decode,
validate, route, cache, queue, batch, run, encode, statistics and telemetry, with no
socket. Each setting runs in a fresh process, rounds alternate the order, and every
request is unique (with the cache on, each is a miss and is stored: the cache grows as a
busy server's does). Garbage-collector passes are timed with `gc.callbacks`: "frozen" is
the server as it starts (start-up's objects frozen out of full passes), "not frozen"
thaws them right after start to show what that costs.

    python benchmarks/inprocess.py [--requests 60000] [--rounds 2]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cache import build_repo  # noqa: E402  (mlp with the cache, mlp_nocache without)
from common import machine, today, write_section  # noqa: E402

SETTINGS = {
    "mlp, cache off, frozen": ("mlp_nocache", True),
    "mlp, cache on (all misses), frozen": ("mlp", True),
    "mlp, cache on (all misses), not frozen": ("mlp", False),
}
CONCURRENCY = 16


async def measure(repo: Path, model: str, frozen: bool, requests: int) -> dict:
    import torch

    from salvo.frontends.grpc.messages import MessageRequest, encode_response
    from salvo.observability.telemetry import Probe
    from salvo.ops.settings import Settings
    from salvo.server import SalvoServer
    from salvo_client.proto import grpc_service_pb2 as pb

    torch.set_num_threads(1)
    settings = Settings(model_repository=repo, grpc_port=0, http_port=0, cache_max_bytes=256 << 20)
    server = SalvoServer(settings)
    await server.start()
    if not frozen:
        gc.unfreeze()
    rng = np.random.default_rng(7)
    messages = []
    for _ in range(2 * requests):
        request = pb.ModelInferRequest(model_name=model)
        request.inputs.add(name="input", datatype="FP32", shape=[1, 64])
        request.raw_input_contents.append(rng.random((1, 64), dtype=np.float32).tobytes())
        messages.append(request.SerializeToString())
    dataplane, plans, telemetry = server.dataplane, server.servicer.plans, server.telemetry
    pauses: dict[int, list[float]] = {0: [], 1: [], 2: []}
    started = [0.0]

    def timed(phase: str, info: dict) -> None:
        if phase == "start":
            started[0] = time.perf_counter()
        else:
            pauses[info["generation"]].append((time.perf_counter() - started[0]) * 1e3)

    async def one(message: bytes) -> None:
        request = pb.ModelInferRequest.FromString(message)
        begin = time.perf_counter()
        probe = Probe(telemetry.start_rpc("ModelInfer", tuple)) if telemetry else None
        response = await dataplane.infer(MessageRequest(request, plans, None, probe))
        encode_response(response, plans)  # the serialized response
        if telemetry is not None:
            telemetry.end_rpc("ModelInfer", probe, "OK", "", time.perf_counter() - begin)

    async def caller(first: int, offset: int) -> None:
        for i in range(first, requests, CONCURRENCY):
            await one(messages[offset + i])

    await asyncio.gather(*(caller(k, requests) for k in range(CONCURRENCY)))  # warm-up
    gc.callbacks.append(timed)
    begin = time.perf_counter()
    await asyncio.gather(*(caller(k, 0) for k in range(CONCURRENCY)))
    elapsed = time.perf_counter() - begin
    gc.callbacks.remove(timed)
    await server.stop()
    return {
        "us_per_request": elapsed / requests * 1e6,
        "pauses": {str(g): p for g, p in pauses.items()},
    }


def child(args: argparse.Namespace) -> None:
    model, frozen = SETTINGS[args.child]
    result = asyncio.run(measure(Path(args.repo), model, frozen, args.requests))
    print(json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=60_000)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--no-write", action="store_true")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--repo", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)
    runs: dict[str, list[dict]] = {name: [] for name in SETTINGS}
    with tempfile.TemporaryDirectory() as tmp:
        build_repo(Path(tmp))
        for round_ in range(args.rounds):
            order = list(SETTINGS) if round_ % 2 == 0 else list(SETTINGS)[::-1]
            for name in order:
                out = subprocess.run(
                    [sys.executable, __file__, "--child", name, "--repo", tmp,
                     "--requests", str(args.requests)],
                    check=True, capture_output=True, text=True,
                )  # fmt: skip
                result = json.loads(out.stdout.strip().splitlines()[-1])
                runs[name].append(result)
                full = result["pauses"]["2"]
                print(
                    f"round {round_ + 1} {name}: {result['us_per_request']:.1f} us/request, "
                    f"full passes {len(full)} ({', '.join(f'{p:.0f}' for p in full)} ms)",
                    flush=True,
                )
    text = report(runs, args)
    print(text)
    if not args.no_write:
        write_section("In-process cost per request and collector pauses", text)


def report(runs: dict[str, list[dict]], args: argparse.Namespace) -> str:
    flags = f" --requests {args.requests}" if args.requests != 60_000 else ""
    flags += f" --rounds {args.rounds}" if args.rounds != 2 else ""
    lines = [
        f"Command: `python benchmarks/inprocess.py{flags}`, {today()}.",
        f"Machine: {machine()}.",
        f"Load: {args.requests:,} unique batch-1 `mlp` requests after as many for warm-up, "
        f"{CONCURRENCY} concurrent callers of the gRPC ModelInfer path in the server's "
        "own process (no socket), one torch thread, telemetry on; a fresh process per "
        f"setting, {args.rounds} rounds in alternating order. µs/request is the median "
        "round; collector passes are summed over the rounds.",
        "",
        "| setting | µs/request | young passes (gen 0, 1) | full passes (gen 2) | "
        "longest full pass ms |",
        "| --- | --- | --- | --- | --- |",
    ]
    for name, results in runs.items():
        young = sum(len(r["pauses"]["0"]) + len(r["pauses"]["1"]) for r in results)
        full = [p for r in results for p in r["pauses"]["2"]]
        lines.append(
            f"| {name} | {statistics.median(r['us_per_request'] for r in results):.1f} "
            f"| {young} | {len(full)} | {max(full, default=0):.0f} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
