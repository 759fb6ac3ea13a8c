"""Dynamic batching on vs off, on `mlp` and `resnet`, driven by perf_analyzer.

    make bench-batching            (or: .venv/bin/python benchmarks/batching.py)

One run: the raw model in a tight loop at each batch size (the ceiling), then Salvo with
batching on and off at concurrency 1 to 64. Throughput, p50, p99 and the average batch size
(from ModelStatistics) go to benchmarks/RESULTS.md with the command, machine and date.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import ServerProcess, machine, measure, raw_throughput, today, write_section  # noqa: E402

MODELS = {
    "mlp": ((64,), (1, 8, 32, 128)),
    "resnet": ((3, 64, 64), (1, 8, 16, 32)),
}
CONCURRENCY = (1, 2, 4, 8, 16, 32, 64)


def build_repo(root: Path) -> None:
    """The demo models twice: as configured (batching on) and as `<name>_nobatch`."""
    from salvo.demo import build_demo_repo

    build_demo_repo(root)
    for name in MODELS:
        shutil.copytree(root / name, root / f"{name}_nobatch")
        config = root / f"{name}_nobatch" / "config.yaml"
        text = config.read_text().replace(f"name: {name}\n", f"name: {name}_nobatch\n")
        config.write_text(text.split("dynamic_batching:")[0])
    shutil.rmtree(root / "digits")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--concurrency", nargs="+", type=int, default=list(CONCURRENCY))
    parser.add_argument("--window-ms", type=int, default=3000)
    parser.add_argument("--json", type=Path, help="also write the raw figures here")
    parser.add_argument("--no-write", action="store_true", help="do not touch RESULTS.md")
    args = parser.parse_args()

    results: dict = {"machine": machine(), "date": today(), "models": {}}
    with tempfile.TemporaryDirectory() as tmp:
        repo = Path(tmp) / "repo"
        build_repo(repo)
        for name in args.models:
            shape, batches = MODELS[name]
            raw = {b: raw_throughput(repo / name / "1" / "model.pt", shape, b) for b in batches}
            results["models"][name] = {"raw": raw}
            print(
                f"{name} raw: " + ", ".join(f"b{b} {v:.0f}/s" for b, v in raw.items()), flush=True
            )
        with ServerProcess(repo) as server:
            for name in args.models:
                on, off = results["models"][name]["on"], results["models"][name]["off"] = [], []
                for c in args.concurrency:
                    # On and off alternate at each level, so drift on a shared machine
                    # touches both alike.
                    for mode, model, rows in (("on", name, on), ("off", f"{name}_nobatch", off)):
                        m = measure(server.grpc_target, model, c, window_ms=args.window_ms)
                        rows.append(m.__dict__)
                        print(
                            f"{name} batching {mode} c={c}: {m.throughput:.0f}/s "
                            f"p50 {m.p50_us / 1000:.2f} ms p99 {m.p99_us / 1000:.2f} ms "
                            f"batch {m.avg_batch:.1f}",
                            flush=True,
                        )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    if not args.no_write:
        write_section("Dynamic batching: on vs off (perf_analyzer)", report(results, args))


def report(results: dict, args: argparse.Namespace) -> str:
    lines = [
        f"Command: `make bench-batching` (`python benchmarks/batching.py`), {results['date']}.",
        f"Machine: {results['machine']}.",
        "Driver: perf_analyzer 2.51 (`--async -b 1 -p "
        f"{args.window_ms} -s 25 --max-trials 6`), on the same machine as the server.",
        "Raw: the model file in a tight loop under `torch.inference_mode` with torch's default "
        "threads, the same as the server's.",
        "",
    ]
    for name, data in results["models"].items():
        raw = data["raw"]
        best_batch = max(raw, key=raw.get)
        lines += [
            f"### {name}",
            "",
            "Raw model: "
            + ", ".join(f"batch {b}: {v:,.0f} samples/s" for b, v in raw.items())
            + f"; best {raw[best_batch]:,.0f}/s at batch {best_batch}.",
            "",
            "| concurrency | on: infer/s | on: p50 ms | on: p99 ms | on: avg batch "
            "| off: infer/s | off: p50 ms | off: p99 ms | on / off | on / raw best |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        for on, off in zip(data["on"], data["off"], strict=True):
            lines.append(
                f"| {on['concurrency']} | {on['throughput']:,.0f} | {on['p50_us'] / 1000:.2f} "
                f"| {on['p99_us'] / 1000:.2f} | {on['avg_batch']:.1f} | {off['throughput']:,.0f} "
                f"| {off['p50_us'] / 1000:.2f} | {off['p99_us'] / 1000:.2f} "
                f"| {on['throughput'] / off['throughput']:.2f} "
                f"| {on['throughput'] / raw[best_batch]:.0%} |"
            )
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
