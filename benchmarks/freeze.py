"""`optimization.freeze` on the demo `resnet`: the model as saved against frozen, raw and served.

    make bench-freeze            (or: .venv/bin/python benchmarks/freeze.py)

One run: the raw TorchScript file in a tight loop at batch 1, 8 and 32 (torch's default
threads), as saved and frozen and optimized for inference (`torch.jit.freeze` +
`torch.jit.optimize_for_inference`, what `optimization.freeze` does at load); then Salvo
serving `resnet` alone with `freeze` off and on, driven by perf_analyzer at one concurrency,
a fresh server per measurement, in alternating order for `--rounds` rounds. Ratios are
frozen against as saved, per round and their median. Written to benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    ServerProcess,
    machine,
    model_alone,
    perf_analyzer,
    publish,
    raw_throughput,
    today,
)

TITLE = "Frozen TorchScript: resnet as saved against frozen"
BATCHES = (1, 8, 32)
VARIANTS = {"as saved": False, "frozen": True}


def repositories(root: Path) -> dict[str, Path]:
    """`resnet` alone, its demo config but for `freeze`, once per variant."""
    from salvo.demo import build_demo_repo

    demo = root / "demo"
    build_demo_repo(demo)

    def edit(frozen: bool):
        def change(doc: dict) -> None:
            if not doc.get("optimization", {}).get("freeze"):
                raise SystemExit("the demo resnet config no longer freezes; update this script")
            doc["optimization"]["freeze"] = frozen
            doc["dynamic_batching"]["hold_for_returns"] = "until_quiet"

        return change

    return {
        label: model_alone(demo, "resnet", root / label.replace(" ", "-"), edit(frozen))
        for label, frozen in VARIANTS.items()
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--window-ms", type=int, default=3000)
    parser.add_argument("--no-write", action="store_true", help="do not touch RESULTS.md")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        repos = repositories(Path(tmp))
        model_file = repos["as saved"] / "resnet" / "1" / "model.pt"
        raw = {
            label: {b: raw_throughput(model_file, (3, 64, 64), b, frozen=f) for b in BATCHES}
            for label, f in VARIANTS.items()
        }
        for label, rates in raw.items():
            print(f"raw {label}: " + ", ".join(f"b{b} {v:,.0f}/s" for b, v in rates.items()))
        served: dict[str, list[dict]] = {label: [] for label in VARIANTS}
        for round_ in range(args.rounds):
            order = list(VARIANTS) if round_ % 2 == 0 else list(reversed(VARIANTS))
            for label in order:
                with ServerProcess(repos[label]) as server:
                    row = perf_analyzer(
                        server.grpc_target, "resnet", args.concurrency,
                        window_ms=args.window_ms, extra=("--input-data", "zero", "-s", "50"),
                    )  # fmt: skip
                measured = {
                    "throughput": float(row["Inferences/Second"]),
                    "p50_ms": int(row["p50 latency"]) / 1e3,
                    "p99_ms": int(row["p99 latency"]) / 1e3,
                }
                served[label].append(measured)
                print(
                    f"round {round_ + 1} {label}: {measured['throughput']:,.0f}/s "
                    f"p99 {measured['p99_ms']:.1f} ms",
                    flush=True,
                )

    ratios = [
        f["throughput"] / s["throughput"]
        for f, s in zip(served["frozen"], served["as saved"], strict=True)
    ]
    lines = [
        f"Command: `python benchmarks/freeze.py --concurrency {args.concurrency} "
        f"--rounds {args.rounds}`, {today()}.",
        f"Machine: {machine()}.",
        "Raw: the demo `resnet` TorchScript file in a tight loop, torch's default threads, "
        "rows/s. Served: `salvo serve` with `resnet` alone (its demo config, "
        "`hold_for_returns: until_quiet`, `freeze` off or on), perf_analyzer `-b 1 "
        f"--async --concurrency-range {args.concurrency} --input-data zero`, a fresh server "
        "per measurement, the order reversed every other round.",
        "",
        "| raw | " + " | ".join(f"batch {b}" for b in BATCHES) + " |",
        "|---|" + "---:|" * len(BATCHES),
        *(
            f"| {label} | " + " | ".join(f"{v:,.0f}" for v in rates.values()) + " |"
            for label, rates in raw.items()
        ),
        "| frozen / as saved | "
        + " | ".join(f"{raw['frozen'][b] / raw['as saved'][b]:.2f}×" for b in BATCHES)
        + " |",
        "",
        "| served | median infer/s | median p50 ms | median p99 ms |",
        "|---|---:|---:|---:|",
        *(
            f"| {label} | {statistics.median(m['throughput'] for m in runs):,.0f} | "
            f"{statistics.median(m['p50_ms'] for m in runs):.1f} | "
            f"{statistics.median(m['p99_ms'] for m in runs):.1f} |"
            for label, runs in served.items()
        ),
        "",
        "- served throughput, frozen / as saved per round: "
        + ", ".join(f"{r:.3f}" for r in ratios)
        + f"; median **{statistics.median(ratios):.3f}**",
    ]
    publish(TITLE, lines, write=not args.no_write)


if __name__ == "__main__":
    main()
