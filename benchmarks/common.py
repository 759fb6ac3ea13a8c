"""Shared pieces of the benchmark scripts: a server process, perf_analyzer runs, raw models,
the machine's description and RESULTS.md sections."""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.servers import ServerProcess  # noqa: E402  (a real `salvo serve`, on port 0)

PERF_ANALYZER = ROOT / "benchmarks" / "perf_analyzer"
RESULTS = ROOT / "benchmarks" / "RESULTS.md"


def machine() -> str:
    cpu = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return (
        f"{os.cpu_count()} cores ({cpu}), {mem_gib:.0f} GiB, {gpu}, "
        f"Python {platform.python_version()}, torch {torch.__version__}"
    )


@dataclass
class Measurement:
    """One perf_analyzer concurrency level."""

    concurrency: int
    throughput: float
    p50_us: float
    p99_us: float
    avg_batch: float


def perf_analyzer(
    target: str,
    model: str,
    concurrency: int,
    *,
    window_ms: int = 2000,
    streaming: bool = False,
    extra: tuple[str, ...] = (),
) -> dict[str, str]:
    """One perf_analyzer run at one concurrency; its CSV row."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "pa.csv"
        cmd = [
            str(PERF_ANALYZER), "-m", model, "-i", "grpc", "-u", target, "-b", "1",
            "--concurrency-range", str(concurrency), "-p", str(window_ms), "-s", "25",
            "--max-trials", "6", "-f", str(out), "--streaming" if streaming else "--async",
            *extra,
        ]  # fmt: skip
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        if result.returncode != 0:
            raise RuntimeError(f"perf_analyzer failed:\n{result.stdout}\n{result.stderr}")
        return next(csv.DictReader(out.open()))


def batch_counts(target: str, model: str) -> tuple[int, int]:
    """(inference_count, execution_count) of a model, from ModelStatistics."""
    import tritonclient.grpc as tc

    with tc.InferenceServerClient(target) as client:
        s = client.get_inference_statistics(model).model_stats[0]
    return s.inference_count, s.execution_count


def answered_count(target: str, model: str) -> int:
    """Requests a model answered with success (cache hits included), from ModelStatistics,
    over all its versions."""
    import tritonclient.grpc as tc

    with tc.InferenceServerClient(target) as client:
        stats = client.get_inference_statistics(model).model_stats
    return sum(s.inference_stats.success.count for s in stats)


# perf_analyzer's stability threshold (-s, percent), loosened on each retry: on a busy
# machine three windows within 25% of each other may never come. A later flag overrides
# an earlier one, so these extend perf_analyzer()'s defaults.
STABILITY_RETRIES = ((), ("-s", "50"), ("-s", "100", "--max-trials", "10"))


def stable_perf_analyzer(
    target: str, model: str, concurrency: int, *, extra: tuple[str, ...] = (), **kwargs
) -> dict[str, str]:
    """perf_analyzer's CSV row, retried with a looser stability check when it finds none."""
    for attempt, looser in enumerate(STABILITY_RETRIES):
        try:
            return perf_analyzer(target, model, concurrency, extra=(*extra, *looser), **kwargs)
        except RuntimeError as exc:
            if "stable" not in str(exc) or attempt == len(STABILITY_RETRIES) - 1:
                raise
            retry = " ".join(STABILITY_RETRIES[attempt + 1])
            print(f"  perf_analyzer: no stable window, retrying with {retry}", flush=True)
    raise AssertionError("unreachable")


def measure(target: str, model: str, concurrency: int, **kwargs) -> Measurement:
    before = batch_counts(target, model)
    row = stable_perf_analyzer(target, model, concurrency, **kwargs)
    after = batch_counts(target, model)
    executions = max(after[1] - before[1], 1)
    return Measurement(
        concurrency,
        float(row["Inferences/Second"]),
        float(row["p50 latency"]),
        float(row["p99 latency"]),
        (after[0] - before[0]) / executions,
    )


def raw_throughput(
    model_file: Path, shape: tuple[int, ...], batch: int, seconds: float = 2.0, frozen: bool = False
):
    """Samples per second of the model file in a tight loop at `batch` (torch's threads);
    `frozen`: a TorchScript model frozen and optimized for inference first, as Salvo's
    `optimization.freeze` serves it."""
    import torch

    if model_file.suffix == ".pt":
        module = torch.jit.load(str(model_file))
        if frozen:
            module = torch.jit.optimize_for_inference(torch.jit.freeze(module.eval()))
    else:
        module = torch.export.load(str(model_file)).module()
    x = torch.rand((batch, *shape))
    with torch.inference_mode():
        for _ in range(3):
            module(x)
        count, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            module(x)
            count += 1
        elapsed = time.perf_counter() - start
    return count * batch / elapsed


def publish(title: str, lines: list[str], write: bool) -> None:
    """Print a benchmark's report and, if `write`, make it RESULTS.md's `## title` section."""
    text = "\n".join(lines)
    print(text)
    if write:
        write_section(title, text)


def add_run_options(parser: argparse.ArgumentParser) -> None:
    """--json, --from-json and --no-write, for a benchmark that `measure_and_publish`es."""
    parser.add_argument("--json", type=Path, help="also write the raw figures here")
    parser.add_argument("--from-json", type=Path, help="render a saved run, measure nothing")
    parser.add_argument("--no-write", action="store_true", help="do not touch RESULTS.md")


def measure_and_publish(
    args: argparse.Namespace,
    title: str,
    run: Callable[[argparse.Namespace], dict],
    report: Callable[[dict], str],
) -> None:
    """Measure (or read a saved run), keep the raw figures where asked, print the report
    and make it RESULTS.md's `## title` section unless told not to."""
    results = json.loads(args.from_json.read_text()) if args.from_json else run(args)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    text = report(results)
    print(text)
    if not args.no_write:
        write_section(title, text)


def write_section(title: str, body: str) -> None:
    """Replace (or append) the `## title` section of RESULTS.md."""
    text = RESULTS.read_text() if RESULTS.exists() else "# Benchmark results\n"
    section = f"## {title}\n\n{body.strip()}\n"
    pattern = re.compile(rf"^## {re.escape(title)}\n.*?(?=^## |\Z)", re.S | re.M)
    text = (
        pattern.sub(lambda _: section + "\n", text)
        if pattern.search(text)
        else (text.rstrip() + "\n\n" + section)
    )
    RESULTS.write_text(text.rstrip() + "\n")


def edit_config(config: Path, edit: Callable[[dict], bool | None]) -> bool:
    """Change a model's config.yaml through `edit`, given the parsed document to change in
    place; False (and the file untouched) where `edit` returns False."""
    import yaml

    doc = yaml.safe_load(config.read_text())
    if edit(doc) is False:
        return False
    config.write_text(yaml.safe_dump(doc, sort_keys=False))
    return True


def model_alone(demo: Path, model: str, out: Path, edit: Callable[[dict], None]) -> Path:
    """A repository at `out` holding the demo repository's `model` alone, its config.yaml
    changed by `edit` (see `edit_config`); `out` returned."""
    shutil.copytree(demo / model, out / model)
    edit_config(out / model / "config.yaml", edit)
    return out


def set_hold_for_returns(config: Path, policy: str) -> bool:
    """Set `dynamic_batching.hold_for_returns` in a model's config.yaml to `policy`; False
    (and the file untouched) if the model has no dynamic_batching block."""

    def change(doc: dict) -> bool:
        batching = doc.get("dynamic_batching")
        if batching is None:
            return False
        batching["hold_for_returns"] = policy
        return True

    return edit_config(config, change)


def today() -> str:
    return date.today().isoformat()


__all__ = [
    "ServerProcess",
    "machine",
    "measure",
    "raw_throughput",
    "set_hold_for_returns",
    "stable_perf_analyzer",
    "write_section",
    "today",
]
