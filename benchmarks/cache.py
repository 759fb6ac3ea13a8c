"""The response cache on vs off, and the hit path against the server's cheapest RPC.

    make bench-cache            (or: .venv/bin/python benchmarks/cache.py)

A closed-loop asyncio driver (raw v2 stubs, one channel, `--concurrency` callers) sends
`mlp` and `resnet` requests whose inputs repeat from a small hot set 90% of the time (the
rest fresh random inputs), or are all unique, to models with the cache on and off; then an
all-hit workload and ServerLive, the ceiling, at the same concurrency. Everything is one
server and one run; figures go to benchmarks/RESULTS.md with the command, machine and date.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import grpc
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import ServerProcess, machine, today, write_section  # noqa: E402

from salvo_client.proto import grpc_service_pb2 as pb  # noqa: E402
from salvo_client.proto import grpc_service_pb2_grpc as pb_grpc  # noqa: E402

SHAPES = {"mlp": (64,), "resnet": (3, 64, 64)}
HOT_SET = 16


def build_repo(root: Path) -> None:
    """The demo models as `<name>` (cache on) and `<name>_nocache`."""
    from salvo.demo import build_demo_repo

    build_demo_repo(root)
    shutil.rmtree(root / "digits")
    for name in SHAPES:
        shutil.copytree(root / name, root / f"{name}_nocache")
        config = root / f"{name}_nocache" / "config.yaml"
        config.write_text(config.read_text().replace(f"name: {name}\n", f"name: {name}_nocache\n"))
        with (root / name / "config.yaml").open("a") as f:
            f.write("response_cache: {enable: true}\n")


def request_for(model: str, data: bytes) -> pb.ModelInferRequest:
    base = model.removesuffix("_nocache")
    request = pb.ModelInferRequest(model_name=model)
    request.inputs.add(name="input", datatype="FP32", shape=[1, *SHAPES[base]])
    request.raw_input_contents.append(data)
    return request


async def drive(target: str, call, concurrency: int, seconds: float) -> dict:
    """Closed loop: `concurrency` callers, each awaiting `call(stub, rng)` back to back."""
    async with grpc.aio.insecure_channel(target) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        latencies: list[float] = []
        errors = 0
        stop_at = 0.0

        async def worker(seed: int) -> None:
            nonlocal errors
            rng = np.random.default_rng(seed)
            while time.perf_counter() < stop_at:
                start = time.perf_counter()
                try:
                    await call(stub, rng)
                except grpc.RpcError:
                    errors += 1
                    continue
                latencies.append(time.perf_counter() - start)

        stop_at = time.perf_counter() + min(1.0, seconds / 4)  # warm-up, not counted
        await asyncio.gather(*(worker(1000 + i) for i in range(concurrency)))
        latencies.clear()
        errors = 0
        started = time.perf_counter()
        stop_at = started + seconds
        await asyncio.gather(*(worker(i) for i in range(concurrency)))
        elapsed = time.perf_counter() - started
    ms = np.array(latencies) * 1000
    return {
        "throughput": len(latencies) / elapsed,
        "p50_ms": float(np.percentile(ms, 50)) if len(ms) else 0.0,
        "p99_ms": float(np.percentile(ms, 99)) if len(ms) else 0.0,
        "errors": errors,
    }


def infer_call(model: str, repeat: float):
    shape = (1, *SHAPES[model.removesuffix("_nocache")])
    hot = [
        np.random.default_rng(10_000 + i).random(shape, dtype=np.float32).tobytes()
        for i in range(HOT_SET)
    ]

    async def call(stub, rng) -> None:
        if rng.random() < repeat:
            data = hot[int(rng.integers(HOT_SET))]
        else:
            data = rng.random(shape, dtype=np.float32).tobytes()
        await stub.ModelInfer(request_for(model, data), timeout=30)

    return call


async def live_call(stub, rng) -> None:
    await stub.ServerLive(pb.ServerLiveRequest(), timeout=30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    results: dict = {"machine": machine(), "date": today(), "runs": {}}
    with tempfile.TemporaryDirectory() as tmp:
        repo = Path(tmp) / "repo"
        build_repo(repo)
        with ServerProcess(repo) as server:
            target = server.grpc_target

            def run(label: str, call) -> None:
                r = asyncio.run(drive(target, call, args.concurrency, args.seconds))
                results["runs"][label] = r
                print(
                    f"{label}: {r['throughput']:,.0f}/s p50 {r['p50_ms']:.2f} ms "
                    f"p99 {r['p99_ms']:.2f} ms errors {r['errors']}",
                    flush=True,
                )

            for name in SHAPES:
                for workload, repeat in (("90% repeats", 0.9), ("all unique", 0.0)):
                    # Alternate on and off so drift on a shared machine touches both alike.
                    run(f"{name} {workload} cache on", infer_call(name, repeat))
                    run(f"{name} {workload} cache off", infer_call(f"{name}_nocache", repeat))
                run(f"{name} all hits", infer_call(name, 1.0))
            run("ServerLive", live_call)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    if not args.no_write:
        write_section("Response cache: on vs off, and the hit path", report(results, args))


def report(results: dict, args: argparse.Namespace) -> str:
    runs = results["runs"]
    live = runs["ServerLive"]["throughput"]
    lines = [
        f"Command: `make bench-cache` (`python benchmarks/cache.py`), {results['date']}.",
        f"Machine: {results['machine']}.",
        f"Driver: benchmarks/cache.py, closed loop, {args.concurrency} callers on one grpc.aio "
        f"channel, {args.seconds:g} s per row after a warm-up, batch-1 requests; hot set of "
        f"{HOT_SET} inputs. Server and driver share the machine.",
        "",
        "| workload | infer/s | p50 ms | p99 ms | errors | vs cache off | vs ServerLive |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for label, r in runs.items():
        off = runs.get(label.replace("cache on", "cache off")) if "cache on" in label else None
        vs_off = f"{r['throughput'] / off['throughput']:.2f}×" if off else ""
        lines.append(
            f"| {label} | {r['throughput']:,.0f} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} "
            f"| {r['errors']} | {vs_off} | {r['throughput'] / live:.0%} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
