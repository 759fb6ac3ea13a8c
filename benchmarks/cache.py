"""The response cache on vs off, and the hit path against the server's cheapest RPC.

    make bench-cache            (or: .venv/bin/python benchmarks/cache.py)

A closed-loop asyncio driver (ready request bytes, one channel, `--concurrency` callers) sends
`mlp` and `resnet` requests whose inputs repeat from a small hot set 90% of the time (the
rest fresh random inputs), or are all unique, to models with the cache on and off; then an
all-hit workload and ServerLive, the ceiling, at the same concurrency. Everything is one
server and one run; figures go to benchmarks/RESULTS.md with the command, machine and date.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import grpc
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import ServerProcess, machine, today, write_section  # noqa: E402

from salvo_client.proto import grpc_service_pb2 as pb  # noqa: E402

SHAPES = {"mlp": (64,), "resnet": (3, 64, 64)}
HOT_SET = 16
INFER = "/inference.GRPCInferenceService/ModelInfer"
LIVE = "/inference.GRPCInferenceService/ServerLive"
LIVE_REQUEST = pb.ServerLiveRequest().SerializeToString()


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


def request_bytes(model: str, data: bytes) -> bytes:
    """A serialized batch-1 ModelInferRequest for `model` with `data` as its raw input."""
    base = model.removesuffix("_nocache")
    request = pb.ModelInferRequest(model_name=model)
    request.inputs.add(name="input", datatype="FP32", shape=[1, *SHAPES[base]])
    request.raw_input_contents.append(data)
    return request.SerializeToString()


async def drive(target: str, call, concurrency: int, seconds: float) -> dict:
    """Closed loop: `concurrency` callers, each awaiting `call(channel, n)` back to back.

    Requests go out as ready bytes and answers are not parsed, so the driver's own cost
    per call is the same for ModelInfer and ServerLive and does not decide the ratios (it
    shares the machine with the server).
    """
    async with grpc.aio.insecure_channel(target) as channel:
        latencies: list[float] = []
        errors = 0
        stop_at = 0.0
        counter = itertools.count()

        async def worker() -> None:
            nonlocal errors
            while time.perf_counter() < stop_at:
                start = time.perf_counter()
                try:
                    await call(channel, next(counter))
                except grpc.RpcError:
                    errors += 1
                    continue
                latencies.append(time.perf_counter() - start)

        stop_at = time.perf_counter() + min(1.0, seconds / 4)  # warm-up, not counted
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        latencies.clear()
        errors = 0
        started = time.perf_counter()
        stop_at = started + seconds
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
    ms = np.array(latencies) * 1000
    return {
        "throughput": len(latencies) / elapsed,
        "p50_ms": float(np.percentile(ms, 50)) if len(ms) else 0.0,
        "p99_ms": float(np.percentile(ms, 99)) if len(ms) else 0.0,
        "errors": errors,
    }


def infer_call(model: str, repeat: float, seed: int):
    """Requests for `model`: a hot-set input with probability `repeat`, else a fresh one.

    A fresh input is a hot-set input with its first value replaced by a counter that never
    repeats within a run (so unique without generating random tensors per call); the choice
    of each call is drawn from one seeded stream.
    """
    shape = (1, *SHAPES[model.removesuffix("_nocache")])
    hot_data = [
        np.random.default_rng(10_000 + i).random(shape, dtype=np.float32).tobytes()
        for i in range(HOT_SET)
    ]
    hot = [request_bytes(model, data) for data in hot_data]
    rng = np.random.default_rng(seed)
    fresh_tag = np.float32(seed)  # a different seed per run: no run repeats another's

    async def call(channel: grpc.aio.Channel, n: int) -> None:
        if rng.random() < repeat:
            payload = hot[int(rng.integers(HOT_SET))]
        else:
            data = hot_data[n % HOT_SET]
            # n as float32 (exact below 2**24) and the run's tag: no call repeats another
            unique = np.array([n, fresh_tag], dtype=np.float32).tobytes()
            payload = request_bytes(model, unique + data[len(unique) :])
        await channel.unary_unary(INFER)(payload, timeout=30)

    return call


async def live_call(channel: grpc.aio.Channel, n: int) -> None:
    await channel.unary_unary(LIVE)(LIVE_REQUEST, timeout=30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--rounds", type=int, default=3, help="each row's figure: the median")
    parser.add_argument(
        "--torch-threads", type=int, default=1,
        help="the server's (1 leaves the second core of a small machine to the driver)",
    )  # fmt: skip
    parser.add_argument("--json", type=Path)
    parser.add_argument("--no-write", action="store_true")
    parser.add_argument(
        "--from-json", type=Path, help="measure nothing: report a run saved with --json"
    )
    args = parser.parse_args()
    if args.from_json:
        results = json.loads(args.from_json.read_text())
        text = report(results, args)
        print(text)
        if not args.no_write:
            write_section("Response cache: on vs off, and the hit path", text)
        return
    results: dict = {"machine": machine(), "date": today(), "rounds": [], "runs": {}}
    seeds = itertools.count(1)
    with tempfile.TemporaryDirectory() as tmp:
        repo = Path(tmp) / "repo"
        build_repo(repo)
        with ServerProcess(repo, "--torch-threads", str(args.torch_threads)) as server:
            target = server.grpc_target
            for round_ in range(args.rounds):
                runs: dict[str, dict] = {}

                def run(label: str, call, runs=runs, round_=round_) -> None:
                    r = asyncio.run(drive(target, call, args.concurrency, args.seconds))
                    runs[label] = r
                    print(
                        f"round {round_ + 1} {label}: {r['throughput']:,.0f}/s "
                        f"p50 {r['p50_ms']:.2f} ms p99 {r['p99_ms']:.2f} ms errors {r['errors']}",
                        flush=True,
                    )

                for name in SHAPES:
                    for workload, repeat in (("90% repeats", 0.9), ("all unique", 0.0)):
                        # Alternate on and off so drift on a shared machine touches both alike.
                        on, off = f"{name} {workload} cache on", f"{name} {workload} cache off"
                        pair = [(on, name), (off, f"{name}_nocache")]
                        for label, model in pair if round_ % 2 == 0 else pair[::-1]:
                            run(label, infer_call(model, repeat, next(seeds)))
                    # The hit path and its ceiling back to back, in alternating order.
                    pair = [(f"{name} all hits", infer_call(name, 1.0, next(seeds)))]
                    pair.append((f"ServerLive (beside {name} all hits)", live_call))
                    for label, call in pair if round_ % 2 == 0 else pair[::-1]:
                        run(label, call)
                results["rounds"].append(runs)
    results["runs"] = medians(results["rounds"])
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    text = report(results, args)
    print(text)
    if not args.no_write:
        write_section("Response cache: on vs off, and the hit path", text)


def medians(rounds: list[dict[str, dict]]) -> dict[str, dict]:
    """Each row's median round by throughput (with that round's latencies)."""
    out = {}
    for label in rounds[0]:
        ordered = sorted((r[label] for r in rounds), key=lambda r: r["throughput"])
        out[label] = ordered[len(ordered) // 2]
    return out


def _paired(rounds: list[dict[str, dict]], label: str, base: str) -> float:
    """The median over rounds of label's throughput / base's in the same round."""
    return statistics.median(r[label]["throughput"] / r[base]["throughput"] for r in rounds)


def report(results: dict, args: argparse.Namespace) -> str:
    runs, rounds = results["runs"], results["rounds"]
    flags = f" --rounds {len(rounds)}" if len(rounds) != 3 else ""
    flags += f" --torch-threads {args.torch_threads}" if args.torch_threads != 1 else ""
    command = f"python benchmarks/cache.py{flags}"
    make = "`make bench-cache` (`python benchmarks/cache.py`)"
    lines = [
        f"Command: {make if not flags else f'`{command}`'}, {results['date']}.",
        f"Machine: {results['machine']}.",
        f"Server: `salvo serve --torch-threads {args.torch_threads}` on the demo `mlp` and "
        "`resnet`, each also copied as `<name>_nocache` without the cache.",
        f"Driver: benchmarks/cache.py, closed loop, {args.concurrency} callers on one grpc.aio "
        f"channel, {args.seconds:g} s per row after a warm-up, batch-1 requests sent as ready "
        f"bytes, answers not parsed; hot set of {HOT_SET} inputs. Server and driver share the "
        f"machine. {len(rounds)} rounds, on/off and hit/ServerLive order alternating; each "
        "figure is the row's median round, each ratio the median of the rounds' ratios.",
        "",
        "| workload | infer/s | p50 ms | p99 ms | errors | vs cache off | vs ServerLive |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for label, r in runs.items():
        model = label.split()[0]
        live = f"ServerLive (beside {model} all hits)"
        off = label.replace("cache on", "cache off") if "cache on" in label else None
        vs_off = f"{_paired(rounds, label, off):.2f}×" if off else ""
        vs_live = f"{_paired(rounds, label, live):.0%}" if live in runs else ""
        lines.append(
            f"| {label} | {r['throughput']:,.0f} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} "
            f"| {r['errors']} | {vs_off} | {vs_live} |"
        )
    lines += ["", "Targets (issue 4), from this run (each round's ratio in brackets):", ""]
    on, off = "resnet 90% repeats cache on", "resnet 90% repeats cache off"
    ratio = _paired(rounds, on, off)
    each = ", ".join(f"{r[on]['throughput'] / r[off]['throughput']:.2f}×" for r in rounds)
    lines.append(
        f"- {'met' if ratio >= 5 else '**not met**'}: resnet with 90% repeats, cache on at "
        f"5× cache off or more: {ratio:.2f}× ({each})"
    )
    for model in SHAPES:
        hits, live = f"{model} all hits", f"ServerLive (beside {model} all hits)"
        share = _paired(rounds, hits, live)
        each = ", ".join(f"{r[hits]['throughput'] / r[live]['throughput']:.0%}" for r in rounds)
        lines.append(
            f"- {'met' if share >= 0.8 else '**not met**'}: {model} all-hit path at 80% of "
            f"ServerLive or more: {share:.0%} ({each})"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
