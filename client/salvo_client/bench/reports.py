"""What a run reports: exact latency percentiles, a per-second timeline, the JSON document
of a level, the knee of a sweep, and the same as text or as a PNG (matplotlib, imported only
for a plot)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from salvo_client.bench.load import RunResult
from salvo_client.bench.window import Recorder

__all__ = ["format_text", "knee", "percentiles_ms", "plot", "report", "timeline"]


def percentiles_ms(latency_ns: Sequence[int] | np.ndarray) -> dict[str, float] | None:
    """Exact p50/p90/p99/p99.9 (nearest rank: each is a real sample), max and mean, in ms."""
    values = np.asarray(latency_ns, dtype=np.int64)
    if values.size == 0:
        return None
    ms = values / 1e6
    p50, p90, p99, p999 = np.percentile(ms, [50, 90, 99, 99.9], method="inverted_cdf")
    return {
        "p50": round(float(p50), 4),
        "p90": round(float(p90), 4),
        "p99": round(float(p99), 4),
        "p999": round(float(p999), 4),
        "max": round(float(ms.max()), 4),
        "mean": round(float(ms.mean()), 4),
    }


def timeline(recorder: Recorder, t0_ns: int, duration_ns: int) -> list[dict[str, Any]]:
    """Per second of the measured window, by completion time: throughput, latency
    percentiles of the requests that completed in that second, and errors."""
    seconds = max(1, math.ceil(duration_ns / 1e9))

    def bucket(done_ns: np.ndarray) -> np.ndarray:
        return np.clip((done_ns - t0_ns) // 1_000_000_000, 0, seconds - 1)

    sent = np.frombuffer(recorder.sent_ns, dtype=np.int64)
    latency = np.frombuffer(recorder.latency_ns, dtype=np.int64)
    done_bucket = bucket(sent + latency)
    err_bucket = bucket(np.frombuffer(recorder.error_done_ns, dtype=np.int64))
    rows = []
    for second in range(seconds):
        width_s = min(1.0, duration_ns / 1e9 - second) or 1.0
        mask = done_bucket == second
        pct = percentiles_ms(latency[mask]) if mask.any() else None
        rows.append(
            {
                "t": second,
                "rps": round(int(mask.sum()) / width_s, 2),
                "p50_ms": pct["p50"] if pct else None,
                "p90_ms": pct["p90"] if pct else None,
                "p99_ms": pct["p99"] if pct else None,
                "errors": int((err_bucket == second).sum()),
            }
        )
    return rows


def report(result: RunResult, meta: dict[str, Any]) -> dict[str, Any]:
    """The JSON object of one level; requests == successes + sum(errors) by construction."""
    rec, spec = result.recorder, result.spec
    successes = len(rec.latency_ns)
    errors = dict(sorted(rec.errors.items()))
    requests = successes + sum(errors.values())
    duration_s = result.duration_ns / 1e9
    out: dict[str, Any] = {"mode": "closed" if spec.rate is None else "open", **meta}
    if spec.rate is None:
        out["concurrency"] = spec.concurrency
    else:
        out["rate"] = spec.rate
        out["request_distribution"] = spec.distribution
        out["seed"] = spec.seed
        out["max_in_flight"] = spec.max_in_flight
    throughput = successes / duration_s
    out.update(
        duration_s=round(duration_s, 4),
        warmup_s=spec.warmup_s,
        requests=requests,
        successes=successes,
        errors=errors,
        throughput_rps=round(throughput, 3),
        throughput_infer_per_s=round(throughput * meta.get("batch_size", 1), 3),
        latency_ms=percentiles_ms(rec.latency_ns),
    )
    if result.open_loop is not None:
        out["offered_rate_rps"] = round(requests / duration_s, 3)
        out["dropped"] = result.open_loop.dropped
        out["late"] = result.open_loop.late
        out["max_send_lag_ms"] = round(result.open_loop.max_lag_ns / 1e6, 3)
    if result.interrupted:
        out["interrupted"] = True
    out["timeline"] = timeline(rec, result.t0_ns, result.duration_ns)
    return out


def knee(levels: Sequence[dict[str, Any]], key: str, p99_bound_ms: float) -> dict[str, Any] | None:
    """The highest load level that, like every level below it, kept p99 under the bound with
    no errors (and, in open loop, nothing dropped); None when the lowest already failed."""
    best = None
    for level in sorted(levels, key=lambda x: x[key]):
        latency = level["latency_ms"]
        ok = (
            latency is not None
            and latency["p99"] < p99_bound_ms
            and not level["errors"]
            and not level.get("dropped", 0)
        )
        if not ok:
            break
        best = {
            key: level[key],
            "throughput_rps": level["throughput_rps"],
            "p99_ms": latency["p99"],
        }
    return best


def format_text(doc: dict[str, Any]) -> str:
    """A human-readable report of a run or a sweep."""
    if doc["mode"] == "sweep":
        key = doc["sweep_of"]
        lines = [
            f"salvo bench sweep of {key}: model {doc['model']}, p99 bound {doc['p99_bound_ms']} ms",
            f"{key:>12} {'req/s':>10} {'p50 ms':>9} {'p99 ms':>9} {'errors':>8}",
        ]
        for level in doc["levels"]:
            lat = level["latency_ms"] or {}
            p50, p99 = lat.get("p50", math.nan), lat.get("p99", math.nan)
            lines.append(
                f"{level[key]:>12} {level['throughput_rps']:>10,.1f} {p50:>9.3f} {p99:>9.3f}"
                f" {sum(level['errors'].values()):>8}"
            )
        k = doc["knee"]
        lines.append(
            f"knee: {key} {k[key]} ({k['throughput_rps']:,.1f} req/s, p99 {k['p99_ms']:.3f} ms)"
            if k
            else "knee: none (the lowest level already broke the bound)"
        )
        return "\n".join(lines)
    if doc["mode"] == "closed":
        load = f"concurrency {doc.get('concurrency')}"
    else:
        load = f"rate {doc.get('rate')}/s ({doc.get('request_distribution', 'poisson')})"
    lines = [
        f"salvo bench: model {doc['model']}, {doc['mode']} loop, {load}, "
        f"{'streaming' if doc.get('streaming') else 'unary'}, {doc['duration_s']:.2f} s measured",
        f"requests {doc['requests']:,}  successes {doc['successes']:,}  errors "
        + (", ".join(f"{k} {v:,}" for k, v in doc["errors"].items()) or "0"),
        f"throughput {doc['throughput_rps']:,.1f} req/s",
    ]
    if "error_message" in doc:
        lines.append(f"failed: {doc['error_message']}")
    if doc["mode"] == "open" and "offered_rate_rps" in doc:
        lines.append(
            f"offered {doc['offered_rate_rps']:,.1f} req/s, dropped {doc['dropped']:,} "
            f"(in-flight cap {doc['max_in_flight']}), late {doc['late']:,}, "
            f"max send lag {doc['max_send_lag_ms']:.2f} ms"
        )
    lat = doc.get("latency_ms")
    if lat:
        lines.append(
            "latency ms  " + "  ".join(f"{name} {lat[key]:.3f}" for name, key in _LATENCY_LABELS)
        )
    return "\n".join(lines)


_LATENCY_LABELS = (
    ("p50", "p50"),
    ("p90", "p90"),
    ("p99", "p99"),
    ("p99.9", "p999"),
    ("max", "max"),
    ("mean", "mean"),
)


def plot(doc: dict[str, Any], path: Path) -> None:
    """A PNG: latency percentiles and throughput over time (a run), or against load (a sweep)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(9, 7), sharex=True)
    if doc["mode"] == "sweep":
        key = doc["sweep_of"]
        xs = [level[key] for level in doc["levels"]]
        for name in ("p50", "p90", "p99"):
            ys = [(level["latency_ms"] or {}).get(name, math.nan) for level in doc["levels"]]
            top.plot(xs, ys, marker="o", label=name)
        top.axhline(doc["p99_bound_ms"], color="red", linestyle="--", label="p99 bound")
        top.set_yscale("log")  # latency past the knee grows by orders of magnitude
        bottom.plot(xs, [level["throughput_rps"] for level in doc["levels"]], marker="o")
        if doc["knee"]:
            for axis in (top, bottom):
                axis.axvline(doc["knee"][key], color="grey", linestyle=":", label="knee")
        bottom.set_xlabel(key + (" (requests/s)" if key == "rate" else ""))
        title = f"{doc['model']}: sweep of {key}"
    else:
        rows = doc["timeline"]
        xs = [row["t"] for row in rows]
        for name in ("p50", "p90", "p99"):
            ys = [row[f"{name}_ms"] if row[f"{name}_ms"] is not None else math.nan for row in rows]
            top.plot(xs, ys, marker=".", label=name)
        bottom.plot(xs, [row["rps"] for row in rows], marker=".", label="successes/s")
        if any(row["errors"] for row in rows):
            bottom.plot(xs, [row["errors"] for row in rows], marker=".", label="errors/s")
        bottom.legend()
        bottom.set_xlabel("time since warm-up (s)")
        load = (
            f"concurrency {doc['concurrency']}"
            if doc["mode"] == "closed"
            else f"rate {doc['rate']}/s"
        )
        title = f"{doc['model']}: {doc['mode']} loop, {load}"
    top.set_ylabel("latency (ms)")
    top.legend()
    top.grid(True, alpha=0.3)
    bottom.set_ylabel("throughput (requests/s)")
    bottom.grid(True, alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=100)
    plt.close(fig)
