"""`salvo bench` against a real server: closed and open loop, streaming, errors by status,
the plot and the sweep's knee.

The generator runs in-process through `main(argv)` (its own asyncio loop, real sockets);
the server is the shared `salvo serve` of `demo_server`. The server's ModelStatistics is
the independent witness of what was really sent.
"""

from __future__ import annotations

import json
import math
import os
import struct
import subprocess
import sys
from itertools import islice
from pathlib import Path
from typing import Any

import grpc
import pytest

from salvo_client.bench import GRPC_EXPERIMENTS, arrival_offsets_s, knee, main
from salvo_client.proto import grpc_service_pb2 as pb
from salvo_client.proto import grpc_service_pb2_grpc as pb_grpc

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def bench(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, dict[str, Any]]:
    """Run `salvo bench ... --json --quiet`; its exit code and JSON document."""
    capsys.readouterr()
    code = main([*argv, "--json", "--quiet"])
    out, err = capsys.readouterr()
    assert "Traceback" not in err, err
    return code, json.loads(out)


def inference_count(target: str, model: str = "mlp") -> int:
    """Rows the server has run for `model` (ModelStatistics), summed over versions."""
    with grpc.insecure_channel(target) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        stats = stub.ModelStatistics(pb.ModelStatisticsRequest(name=model), timeout=10)
    return sum(s.inference_count for s in stats.model_stats)


def assert_consistent(doc: dict[str, Any]) -> None:
    assert doc["requests"] == doc["successes"] + sum(doc["errors"].values())
    if doc["successes"]:
        lat = doc["latency_ms"]
        assert 0 < lat["p50"] <= lat["p90"] <= lat["p99"] <= lat["p999"] <= lat["max"]
        assert lat["mean"] <= lat["max"]
        assert doc["throughput_rps"] == pytest.approx(doc["successes"] / doc["duration_s"], 1e-3)


def test_closed_loop_reports_and_plots(demo_server, capsys, tmp_path: Path):
    pytest.importorskip("matplotlib")
    png = tmp_path / "run.png"
    before = inference_count(demo_server.grpc_target)
    code, doc = bench(
        capsys,
        *("-m", "mlp", "-u", demo_server.grpc_target, "-c", "4"),
        *("--duration-s", "3", "--warmup-s", "0.5", "--plot", str(png)),
    )
    sent = inference_count(demo_server.grpc_target) - before

    assert code == 0
    assert doc["mode"] == "closed" and doc["model"] == "mlp" and doc["concurrency"] == 4
    assert doc["transport"] == "threads"  # --transport auto, at concurrency 4
    assert doc["errors"] == {} and doc["successes"] > 100
    assert_consistent(doc)
    assert doc["duration_s"] == pytest.approx(3.0)
    # The server ran every measured request, plus the warm-up ones the report leaves out.
    assert doc["requests"] < sent
    assert [row["t"] for row in doc["timeline"]] == [0, 1, 2]
    assert sum(row["rps"] for row in doc["timeline"]) == pytest.approx(doc["successes"], abs=1)

    data = png.read_bytes()
    assert data.startswith(PNG_SIGNATURE)
    width, height = struct.unpack(">II", data[16:24])  # the IHDR chunk comes first
    assert (width, height) == (900, 700)
    assert b"Matplotlib" in data[:200]  # its Software text chunk
    assert len(data) > 20_000  # two panels of lines and labels, not an empty canvas


@pytest.mark.parametrize("distribution", ["constant", "poisson"])
def test_open_loop_keeps_to_the_schedule(demo_server, capsys, distribution):
    rate, warmup_s, duration_s, seed = 100.0, 0.5, 3.0, 7
    before = inference_count(demo_server.grpc_target)
    code, doc = bench(
        capsys,
        *("-m", "mlp", "-u", demo_server.grpc_target, "--rate", str(rate)),
        *("--request-distribution", distribution, "--seed", str(seed)),
        *("--duration-s", str(duration_s), "--warmup-s", str(warmup_s)),
    )
    server_ran = inference_count(demo_server.grpc_target) - before

    assert code == 0
    assert doc["mode"] == "open" and doc["rate"] == rate and doc["seed"] == seed
    assert doc["errors"] == {} and doc["dropped"] == 0
    assert_consistent(doc)
    # Every arrival of the seeded schedule inside the window was sent and counted, even when
    # the loop woke late (requests are counted by scheduled time)...
    offsets = []
    for offset in arrival_offsets_s(rate, distribution, seed):
        if offset >= warmup_s + duration_s:
            break
        offsets.append(offset)
    measured = sum(1 for o in offsets if o >= warmup_s)
    assert doc["requests"] == measured
    # ...and the server saw exactly the schedule: warm-up and measured requests, no more.
    assert server_ran == len(offsets)
    observed_rps = doc["requests"] / doc["duration_s"]
    assert doc["offered_rate_rps"] == pytest.approx(observed_rps, rel=1e-3)
    if distribution == "constant":
        assert observed_rps == pytest.approx(rate, rel=0.05)
    else:
        # A Poisson count over 3 s at 100/s has a standard deviation of sqrt(300) = 17.
        assert abs(doc["requests"] - rate * duration_s) < 4 * math.sqrt(rate * duration_s)


def test_poisson_arrivals_have_the_requested_rate():
    """The schedule itself: exponential gaps with mean 1/rate (coefficient of variation 1)."""
    gaps, last = [], 0.0
    for n, offset in enumerate(arrival_offsets_s(250.0, "poisson", seed=3)):
        gaps.append(offset - last)
        last = offset
        if n == 100_000:
            break
    mean = sum(gaps) / len(gaps)
    sd = math.sqrt(sum((g - mean) ** 2 for g in gaps) / len(gaps))
    assert mean == pytest.approx(1 / 250, rel=0.01)
    assert sd / mean == pytest.approx(1.0, rel=0.02)
    # A seed fixes the schedule, so a run can be repeated exactly.
    first = list(islice(arrival_offsets_s(250.0, "poisson", seed=3), 5))
    assert first == list(islice(arrival_offsets_s(250.0, "poisson", seed=3), 5))
    assert first != list(islice(arrival_offsets_s(250.0, "poisson", seed=4), 5))


def test_streaming_matches_answers_to_requests(demo_server, capsys):
    before = inference_count(demo_server.grpc_target)
    code, doc = bench(
        capsys,
        *("-m", "mlp", "-u", demo_server.grpc_target, "-c", "4", "--streaming"),
        *("--requests", "400", "--warmup-s", "0"),
    )
    assert code == 0
    assert doc["streaming"] is True
    assert doc["requests"] == doc["successes"] == 400 and doc["errors"] == {}
    assert_consistent(doc)
    assert inference_count(demo_server.grpc_target) - before == 400


@pytest.mark.parametrize("entry", [["salvo", "bench"], ["salvo_client.bench"]])
@pytest.mark.parametrize("preset", [None, ""])
def test_both_entry_points_start_grpc_polling_in_the_caller(demo_server, entry, preset):
    # grpc reads GRPC_EXPERIMENTS once, on import: `salvo bench` sets it first, and
    # `python -m salvo_client.bench` starts again with it set. A caller's own value stands.
    env = {key: value for key, value in os.environ.items() if key != "GRPC_EXPERIMENTS"}
    if preset is not None:
        env["GRPC_EXPERIMENTS"] = preset
    argv = ["-m", "mlp", "-u", demo_server.grpc_target, "-c", "1", "--requests", "20"]
    done = subprocess.run(
        [sys.executable, "-m", *entry, *argv, "--warmup-s", "0", "--json", "--quiet"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    doc = json.loads(done.stdout)
    assert doc["successes"] == 20
    assert doc["grpc_experiments"] == (GRPC_EXPERIMENTS if preset is None else preset)
    assert "Unknown experiment" not in done.stderr  # this grpcio still has it


def test_unknown_model_is_reported_by_status(demo_server, capsys):
    code, doc = bench(capsys, "-m", "no_such_model", "-u", demo_server.grpc_target, "-c", "2")
    assert code == 1
    assert doc["errors"] == {"NOT_FOUND": 1} and doc["successes"] == 0
    assert_consistent(doc)
    assert "no_such_model" in doc["error_message"]


@pytest.mark.parametrize(
    "mode", [["--transport", "threads"], ["--transport", "asyncio"], ["--streaming"]]
)
def test_failed_requests_are_counted_by_status(demo_server, capsys, mode):
    # A shape the model does not take: every request is refused by the server.
    streaming = mode == ["--streaming"]
    code, doc = bench(
        capsys,
        *("-m", "mlp", "-u", demo_server.grpc_target, "-c", "2", "--shape", "input=1,63"),
        *("--requests", "50", "--warmup-s", "0", *mode),
    )
    assert code == 1
    assert doc["requests"] == 50 and doc["successes"] == 0 and doc["latency_ms"] is None
    # ModelStreamInfer reports errors in-band, without a status code.
    assert doc["errors"] == {("STREAM_ERROR" if streaming else "INVALID_ARGUMENT"): 50}
    assert_consistent(doc)


def test_sweep_finds_the_knee(demo_server, capsys, tmp_path: Path):
    pytest.importorskip("matplotlib")
    code, doc = bench(
        capsys,
        *("-m", "mlp", "-u", demo_server.grpc_target, "--sweep-concurrency", "4,1,2"),
        *("--p99-bound-ms", "10000", "--duration-s", "1", "--warmup-s", "0.3"),
        *("--plot", str(tmp_path / "sweep.png")),
    )
    assert code == 0
    assert doc["mode"] == "sweep" and doc["sweep_of"] == "concurrency"
    assert [level["concurrency"] for level in doc["levels"]] == [1, 2, 4]
    for level in doc["levels"]:
        assert level["errors"] == {} and level["successes"] > 0
        assert_consistent(level)
    # Every level is far under a 10 s bound, so the knee is the highest one.
    top = doc["levels"][-1]
    assert doc["knee"] == {
        "concurrency": 4,
        "throughput_rps": top["throughput_rps"],
        "p99_ms": top["latency_ms"]["p99"],
    }
    assert knee(doc["levels"], "concurrency", p99_bound_ms=1e-6) is None
    assert (tmp_path / "sweep.png").read_bytes().startswith(PNG_SIGNATURE)


def test_knee_is_the_last_level_before_the_first_breach():
    def level(rate: int, p99: float, errors: dict[str, int] | None = None) -> dict[str, Any]:
        return {
            "rate": rate,
            "throughput_rps": float(rate),
            "latency_ms": {"p99": p99},
            "errors": errors or {},
        }

    levels = [level(400, 5.0), level(100, 1.0), level(300, 30.0), level(200, 2.0)]
    # 400 is under the bound again, but the curve broke at 300 already.
    assert knee(levels, "rate", 10.0) == {"rate": 200, "throughput_rps": 200.0, "p99_ms": 2.0}
    # A level with errors breaks the curve whatever its latency.
    levels[3]["errors"] = {"RESOURCE_EXHAUSTED": 3}
    assert knee(levels, "rate", 10.0) == {"rate": 100, "throughput_rps": 100.0, "p99_ms": 1.0}
    levels[1]["latency_ms"]["p99"] = 11.0
    assert knee(levels, "rate", 10.0) is None
