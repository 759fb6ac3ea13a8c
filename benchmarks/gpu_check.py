"""The GPU figures of `benchmarks/gpu_check.sh`: `resnet` at fp32 and fp16, with and without
CUDA graphs, first as the raw model (LoadedModel.run, in process, at batch 1, 8 and 32),
then served by `salvo serve` and swept with `salvo bench` at concurrency 1 to 256.

    python benchmarks/gpu_check.py OUT_DIR [--duration-s 4]

Writes OUT_DIR/gpu_check.json (every level of every sweep) and OUT_DIR/summary.md (the
tables RESULTS.md takes), and prints the summary last.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from salvo.demo import build_demo_repo  # noqa: E402
from salvo.domain.config import load_config  # noqa: E402
from salvo.engine.backend import LoadedModel  # noqa: E402
from tests.servers import ServerProcess  # noqa: E402

VARIANTS = [  # (label, optimization)
    ("fp32", {"precision": "fp32", "channels_last": True}),
    ("fp32 + graphs", {"precision": "fp32", "channels_last": True, "cuda_graphs": True}),
    ("fp16", {"precision": "fp16", "channels_last": True}),
    ("fp16 + graphs", {"precision": "fp16", "channels_last": True, "cuda_graphs": True}),
]
RAW_BATCHES = (1, 8, 32)
CONCURRENCY = "1,4,16,64,256"


def raw_throughput(repo: Path, device: str, optimization: dict, seconds: float) -> dict[int, float]:
    """Rows per second of LoadedModel.assemble + run, one caller, at each batch size: the
    model with its copies in and out, no server."""
    config = load_config(repo / "resnet")
    update = config.optimization.model_copy(update=optimization)
    model = LoadedModel.load(
        config.model_copy(update={"device": device, "optimization": update}), repo / "resnet" / "1"
    )
    rates = {}
    for rows in RAW_BATCHES:
        x = np.random.default_rng(rows).uniform(0, 1, (rows, 3, 64, 64)).astype(np.float32)
        for _ in range(5):
            model.run(model.assemble([[x]]))
        done, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            model.run(model.assemble([[x]]))
            done += rows
        rates[rows] = done / (time.perf_counter() - start)
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    return rates


def sweep(repo: Path, duration_s: float, *extra: str) -> dict:
    with ServerProcess(repo) as server:
        result = subprocess.run(
            [sys.executable, "-m", "salvo_client.bench", "-m", "resnet", "-u",
             server.grpc_target, "--sweep-concurrency", CONCURRENCY,
             "--duration-s", str(duration_s), "--warmup-s", "1", "--p99-bound-ms", "100",
             "--json", "--quiet", *extra],
            capture_output=True, text=True, check=False,
        )  # fmt: skip
    if not result.stdout.strip():
        raise SystemExit(f"salvo bench failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--duration-s", type=float, default=4.0)
    parser.add_argument("--raw-s", type=float, default=1.0)
    parser.add_argument(
        "--device", default="cuda", help="cpu: a dry run of this script where there is no GPU"
    )
    parser.add_argument(
        "--variants", help="comma-separated labels to run (default: all of them)", default=""
    )
    parser.add_argument(
        "--streaming", action="store_true", help="sweep ModelStreamInfer too, after unary"
    )
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    report: dict = {
        "card": torch.cuda.get_device_name(0) if args.device == "cuda" else "cpu (dry run)",
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "date": time.strftime("%Y-%m-%d"),
        "variants": {},
    }
    with tempfile.TemporaryDirectory() as tmp:
        repo = Path(tmp) / "repo"
        build_demo_repo(repo)
        for name in ("digits", "mlp"):
            shutil.rmtree(repo / name)
        config = repo / "resnet" / "config.yaml"
        base = config.read_text()
        chosen = [v for v in args.variants.split(",") if v]
        for label, optimization in VARIANTS:
            if chosen and label not in chosen:
                continue
            started = time.perf_counter()
            raw = raw_throughput(repo, args.device, optimization, args.raw_s)
            config.write_text(
                base + f"device: {args.device}\noptimization: {json.dumps(optimization)}\n"
            )
            served = sweep(repo, args.duration_s)
            report["variants"][label] = {"optimization": optimization, "raw_rows_per_s": raw,
                                         "levels": served["levels"]}  # fmt: skip
            if args.streaming:
                streamed = sweep(repo, args.duration_s, "--streaming")
                report["variants"][label]["streaming_levels"] = streamed["levels"]
            print(f"{label}: done in {time.perf_counter() - started:.0f} s", flush=True)
            (args.out / "gpu_check.json").write_text(json.dumps(report, indent=2))  # so far
    summary = render(report)
    (args.out / "summary.md").write_text(summary)
    print(summary)


def render(report: dict) -> str:
    lines = [
        f"{report['card']}, torch {report['torch']} (CUDA {report['cuda']}), {report['date']}",
        "",
        "Raw model (LoadedModel.assemble + run, one caller), rows/s:",
        "",
        "| variant | " + " | ".join(f"batch {b}" for b in RAW_BATCHES) + " |",
        "|---|" + "---:|" * len(RAW_BATCHES),
    ]
    for label, v in report["variants"].items():
        rates = v["raw_rows_per_s"]
        lines.append(f"| {label} | " + " | ".join(f"{rates[b]:,.0f}" for b in RAW_BATCHES) + " |")
    levels = CONCURRENCY.split(",")
    for key, how in (("levels", "unary"), ("streaming_levels", "ModelStreamInfer")):
        rows = [(label, v[key]) for label, v in report["variants"].items() if key in v]
        if not rows:
            continue
        lines += ["", f"Served (salvo serve, salvo bench, {how}, batch 1 per request):", ""]
        lines.append(
            "| variant | " + " | ".join(f"c={c} req/s (p50 / p99 ms)" for c in levels) + " |"
        )
        lines.append("|---|" + "---:|" * len(levels))
        for label, swept in rows:
            cells = []
            for level in swept:
                lat = level.get("latency_ms") or {}
                cells.append(
                    f"{level['throughput_rps']:,.0f} ({lat.get('p50', float('nan')):.2f} / "
                    f"{lat.get('p99', float('nan')):.2f})"
                )
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
