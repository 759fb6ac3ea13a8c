"""`salvo batch` run as users run it (`python -m salvo batch`, a process of its own) against
real servers: every input format scored like direct calls, per-row errors, resuming after
SIGKILL and after Ctrl-C with every row exactly once, a server restarted mid-job, and the
in-process server.

Format tests use the shared demo server (`mlp`, `digits`). Kill, interrupt and restart tests
use an in-process Salvo whose model (tests/gated.py, y = 2x) waits for the test to release
each forward pass, so "mid-run" is a state the test holds the job in, not a moment it hopes
to hit; the model records every row it ran, the witness that no journalled row ran twice.
"""

from __future__ import annotations

import csv
import json
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from salvo_client import InferenceClient
from salvo_client.batch.journal import encode_record, journal_path, read_journal
from salvo_client.batch.rows import RowResult
from tests.gated import GatedLoader, GatedModule, write_model
from tests.servers import InProcessServer

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")
Image = pytest.importorskip("PIL.Image")

RUN_TIMEOUT_S = 60
WAIT_S = 30

GATED = """\
max_batch_size: 8
inputs: [{name: x, datatype: FP32, dims: [4]}]
outputs: [{name: y, datatype: FP32, dims: [4]}]
dynamic_batching: {max_queue_delay_us: 100}
"""


def command(*args: object) -> list[str]:
    return [sys.executable, "-m", "salvo", "batch", *map(str, args), "--no-progress"]


def salvo_batch(*args: object) -> subprocess.CompletedProcess[str]:
    run = subprocess.run(command(*args), capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    assert "Traceback" not in run.stderr, run.stderr
    return run


def wait_until(condition: Callable[[], bool], what: str, timeout_s: float = WAIT_S) -> None:
    """Poll `condition` (a file another process writes) until it holds, or fail."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)  # sleep-ok: another process writes the file; nothing to wait on


def mlp_rows(count: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random((count, 64), dtype=np.float32)


def direct(target: str, model: str, **inputs: np.ndarray) -> dict[str, np.ndarray]:
    """The model's answers for these rows, from one plain ModelInfer call."""
    with InferenceClient(target) as client:
        return client.infer(model, inputs)


def read_output(path: Path) -> list[tuple[Any, dict[str, np.ndarray] | str]]:
    """(id, outputs or error) per row of an output file, in file order, read with each
    format's own library."""
    if path.suffix == ".npz":
        with np.load(path, allow_pickle=False) as out:
            names = [n for n in out.files if n not in ("id", "error")]
            return [
                (row_id.item(), str(error) or {n: out[n][i] for n in names})
                for i, (row_id, error) in enumerate(zip(out["id"], out["error"], strict=True))
            ]
    if path.suffix == ".jsonl":
        lines = [json.loads(line) for line in path.read_text().splitlines()]
        return [
            (d["id"], d["error"] if "error" in d else {
                n: np.array(v) for n, v in d["outputs"].items()
            })
            for d in lines
        ]  # fmt: skip
    if path.suffix == ".csv":
        with open(path, newline="") as f:
            records = list(csv.DictReader(f))
        columns = [c for c in records[0] if c not in ("id", "error")] if records else []
        names = sorted({c.rsplit("_", 1)[0] for c in columns})
        return [
            (r["id"], r["error"] or {
                n: np.array([float(r[c]) for c in columns if c.rsplit("_", 1)[0] == n])
                for n in names
            })
            for r in records
        ]  # fmt: skip
    table = pq.read_table(path).to_pydict()
    names = [n for n in table if n not in ("id", "error")]
    return [
        (row_id, table["error"][i] or {n: np.array(table[n][i]) for n in names})
        for i, row_id in enumerate(table["id"])
    ]


def assert_scored(rows: list[tuple[Any, Any]], expected: dict[str, np.ndarray]) -> None:
    """Row i has outputs, each close to row i of `expected` (batched and unbatched CPU
    kernels may differ in the last bits)."""
    assert len(rows) == len(next(iter(expected.values())))
    for i, (row_id, outputs) in enumerate(rows):
        assert isinstance(outputs, dict), f"row {row_id}: {outputs}"
        for name, want in expected.items():
            np.testing.assert_allclose(outputs[name], want[i], rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- formats


@pytest.mark.parametrize("batch_size", ["1", "7"])
def test_npy_scores_like_direct_calls(demo_server, tmp_path: Path, batch_size: str):
    x = mlp_rows(40)
    np.save(tmp_path / "x.npy", x)
    run = salvo_batch(
        "mlp", tmp_path / "x.npy", "--url", demo_server.grpc_target, "--batch-size", batch_size
    )
    assert run.returncode == 0, run.stderr
    assert "rows scored 40, with errors 0" in run.stderr
    rows = read_output(tmp_path / "x.out.npz")
    assert [row_id for row_id, _ in rows] == list(range(40))
    assert_scored(rows, direct(demo_server.grpc_target, "mlp", input=x))
    assert not journal_path(tmp_path / "x.out.npz").exists()


def test_npz_with_a_mapped_array_and_an_output_in_another_format(demo_server, tmp_path: Path):
    x = mlp_rows(30, seed=1)
    np.savez(tmp_path / "s.npz", features=x, unrelated=np.arange(3))
    out = tmp_path / "elsewhere" / "scores.parquet"
    run = salvo_batch(
        "mlp", tmp_path / "s.npz", "--url", demo_server.grpc_target,
        "--input", "input=features", "--output", out, "--concurrency", "2",
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    rows = read_output(out)
    assert [row_id for row_id, _ in rows] == list(range(30))
    assert_scored(rows, direct(demo_server.grpc_target, "mlp", input=x))


def test_jsonl_named_rows_and_v2_requests(demo_server, tmp_path: Path):
    x = mlp_rows(12, seed=2)
    lines = []
    for i, row in enumerate(x[:8]):
        named = {"input": row.tolist()}
        lines.append({"id": f"row-{i}", **named} if i % 2 else named)
    lines.append({"id": "pair", "inputs": [
        {"name": "input", "datatype": "FP32", "shape": [2, 64], "data": x[8:10].ravel().tolist()}
    ]})  # fmt: skip
    lines.append({"inputs": [
        {"name": "input", "datatype": "FP32", "shape": [1, 64], "data": x[10].tolist()}
    ]})  # fmt: skip
    lines.append({"input": x[11].reshape(8, 8).tolist()})  # nested, filled into [64]
    path = tmp_path / "rows.jsonl"
    path.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    run = salvo_batch("mlp", path, "--url", demo_server.grpc_target, "--batch-size", "4")
    assert run.returncode == 0, run.stderr
    rows = read_output(tmp_path / "rows.out.jsonl")
    ids = [row_id for row_id, _ in rows]
    assert ids == [1, "row-1", 3, "row-3", 5, "row-5", 7, "row-7", "pair", 10, 11]
    want = direct(demo_server.grpc_target, "mlp", input=x)["output"]
    outputs = [o["output"] for _, o in rows if isinstance(o, dict)]
    assert len(outputs) == 11
    for i in range(8):
        np.testing.assert_allclose(outputs[i], want[i], rtol=1e-5, atol=1e-6)
    # A v2 request keeps its batch dimension, as its own answer would have it.
    np.testing.assert_allclose(outputs[8], want[8:10], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(outputs[9], want[10:11], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(outputs[10], want[11], rtol=1e-5, atol=1e-6)


def test_csv_columns_with_an_id_column(demo_server, tmp_path: Path):
    x = mlp_rows(25, seed=3)
    path = tmp_path / "rows.csv"
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["key", *(f"input_{i}" for i in range(64)), "comment"])
        for i, row in enumerate(x):
            writer.writerow([f"k{i:02d}", *(repr(float(v)) for v in row), "a, b"])
    run = salvo_batch("mlp", path, "--url", demo_server.grpc_target, "--id-column", "key")
    assert run.returncode == 0, run.stderr
    rows = read_output(tmp_path / "rows.out.csv")
    assert [row_id for row_id, _ in rows] == [f"k{i:02d}" for i in range(25)]
    assert_scored(rows, direct(demo_server.grpc_target, "mlp", input=x))


def test_parquet_list_columns(demo_server, tmp_path: Path):
    x = mlp_rows(33, seed=4)
    table = pa.table({"input": pa.array(x.tolist(), type=pa.list_(pa.float32()))})
    pq.write_table(table, tmp_path / "rows.parquet", row_group_size=10)
    run = salvo_batch(
        "mlp", tmp_path / "rows.parquet", "--url", demo_server.grpc_target, "--outputs", "output"
    )
    assert run.returncode == 0, run.stderr
    out = pq.read_table(tmp_path / "rows.out.parquet")
    assert out.column_names == ["id", "error", "output"]
    rows = read_output(tmp_path / "rows.out.parquet")
    assert [row_id for row_id, _ in rows] == list(range(33))
    assert_scored(rows, direct(demo_server.grpc_target, "mlp", input=x))


def test_a_folder_of_images_scores_with_the_models_preprocessing(demo_server, tmp_path: Path):
    from salvo.demo import digits_split

    images, labels, _, test_idx = digits_split()
    folder = tmp_path / "scans"
    chosen = test_idx[:24]
    for n, i in enumerate(chosen):
        name = folder / ("more" if n % 3 == 0 else "") / f"{n:02d}-{i}.png"
        name.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.rint(images[i] * 255 / 16).astype(np.uint8), mode="L").save(name)
    run = salvo_batch("digits", folder, "--url", demo_server.grpc_target)
    assert run.returncode == 0, run.stderr
    rows = read_output(tmp_path / "scans.out.jsonl")
    files = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*.png"))
    assert [row_id for row_id, _ in rows] == files
    # The same preprocessing, done here: grey pixels 0..255 onto 0..16.
    pixels = np.stack(
        [np.asarray(Image.open(folder / f).convert("L"), np.float32) * 16 / 255 for f in files]
    )
    want = direct(demo_server.grpc_target, "digits", image=pixels)
    assert_scored(rows, want)
    truth = [int(labels[int(f.rsplit("-", 1)[1].removesuffix(".png"))]) for f in files]
    predicted = [int(o["label"][0]) for _, o in rows if isinstance(o, dict)]
    assert sum(p == t for p, t in zip(predicted, truth, strict=True)) >= 0.85 * len(files)

    refused = salvo_batch("mlp", folder, "--url", demo_server.grpc_target)
    assert refused.returncode == 2
    assert "declares no image preprocessing" in refused.stderr


# ----------------------------------------------------------------------------- row errors


def test_rows_with_errors_are_reported_and_the_rest_scored(demo_server, tmp_path: Path):
    x = mlp_rows(12, seed=5)
    bad: dict[int, str] = {
        2: json.dumps({"input": x[2][:63].tolist()}),  # wrong shape
        4: "{this is not json",
        5: json.dumps(
            {"inputs": [{"name": "input", "datatype": "INT32", "shape": [1, 64], "data": [1] * 64}]}
        ),  # fmt: skip
        7: json.dumps({"input": ["abc"] * 64}),
        8: json.dumps({"input": x[8][:63].tolist()}),  # stacks with row 2: refused together
    }
    lines = [bad.get(i, json.dumps({"input": row.tolist()})) for i, row in enumerate(x)]
    path = tmp_path / "rows.jsonl"
    path.write_text("\n".join(lines) + "\n")
    run = salvo_batch("mlp", path, "--url", demo_server.grpc_target, "--batch-size", "4")
    assert run.returncode == 1, run.stderr
    assert "rows scored 7, with errors 5" in run.stderr
    rows = dict(read_output(tmp_path / "rows.out.jsonl"))
    assert list(rows) == list(range(1, 13))  # ids: line numbers
    errors = {line - 1: v for line, v in rows.items() if isinstance(v, str)}
    assert set(errors) == set(bad)
    assert errors[2] == "INVALID_ARGUMENT: input 'input': expected shape [-1, 64], got [1, 63]"
    assert errors[8] == errors[2]
    assert errors[4].startswith("line 5: not valid JSON")
    assert errors[5] == "INVALID_ARGUMENT: input 'input': expected datatype FP32, got INT32"
    assert errors[7] == "line 8: input 'input': cannot read 'abc' as FP32"
    want = direct(demo_server.grpc_target, "mlp", input=x)["output"]
    for i in set(range(12)) - set(bad):
        np.testing.assert_allclose(rows[i + 1]["output"], want[i], rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- resuming


@pytest.fixture(scope="module")
def gated(tmp_path_factory: pytest.TempPathFactory):
    """An in-process Salvo serving gated y = 2x models, one per test that holds one."""
    loader = GatedLoader()
    root = tmp_path_factory.mktemp("gated-batch")
    for name in ("killed", "interrupted"):
        write_model(root, name, GATED)
    write_model(root, "unbatched", GATED.replace("max_batch_size: 8", "max_batch_size: 0"))
    with InProcessServer(root, loader) as server:
        yield server, loader


def numbered_rows(count: int) -> np.ndarray:
    """Rows whose first value is their index: the gated model records it per row run."""
    return np.arange(count, dtype=np.float32)[:, None] + np.array([0, 0.25, 0.5, 0.75], np.float32)


def journalled(path: Path) -> set[int]:
    return set(read_journal(path).results) if path.exists() else set()


def ran(module: GatedModule, since: int = 0) -> list[int]:
    """Indices of the rows in the forward passes from the `since`th on."""
    return [int(v) for batch in module.batches[since:] for v in batch]


def assert_doubled_once(output: Path, x: np.ndarray) -> None:
    with np.load(output, allow_pickle=False) as out:
        assert out["id"].tolist() == list(range(len(x)))
        assert (out["error"] == "").all()
        np.testing.assert_array_equal(out["y"], x * 2)


def test_a_killed_job_resumes_without_losing_or_repeating_a_row(gated, tmp_path: Path):
    server, loader = gated
    module = loader.modules["killed"]
    x = numbered_rows(200)
    np.save(tmp_path / "x.npy", x)
    output = tmp_path / "x.out.npz"
    journal = journal_path(output)
    argv = command(
        "killed", tmp_path / "x.npy", "--url", server.grpc_target,
        "--batch-size", "4", "--concurrency", "1",
    )  # fmt: skip
    module.hold()
    try:
        job = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        module.wait_batches(1)
        module.release(3)
        module.wait_batches(4)  # three answered; the job waits on the fourth
        wait_until(lambda: len(journalled(journal)) >= 12, "three batches journalled")
        job.kill()
        assert job.wait(WAIT_S) == -signal.SIGKILL
    finally:
        module.open()
    done = journalled(journal)
    assert done == set(range(12)) and not output.exists()
    # As if the kill had come in the middle of writing the next record.
    with open(journal, "ab") as f:
        f.write(encode_record([RowResult(12, 12, None, "torn")])[:-3])

    before = len(module.batches)
    run = subprocess.run(argv, capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    assert run.returncode == 0, run.stderr
    assert "dropped a torn last record" in run.stderr
    assert "skipped (journalled before) 12" in run.stderr
    rerun = ran(module, before)
    assert sorted(rerun) == sorted(set(range(200)) - done)  # each once, no journalled row
    assert_doubled_once(output, x)
    assert not journal.exists()


def test_ctrl_c_journals_what_is_in_flight_and_the_rerun_finishes(gated, tmp_path: Path):
    server, loader = gated
    module = loader.modules["interrupted"]
    x = numbered_rows(100)
    np.save(tmp_path / "x.npy", x)
    output = tmp_path / "x.out.npz"
    journal = journal_path(output)
    argv = command(
        "interrupted", tmp_path / "x.npy", "--url", server.grpc_target,
        "--batch-size", "4", "--concurrency", "1",
    )  # fmt: skip
    stderr = tmp_path / "stderr.txt"
    module.hold()
    try:
        with open(stderr, "w") as err:
            job = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=err)
        module.wait_batches(1)
        module.release(2)
        module.wait_batches(3)
        wait_until(lambda: len(journalled(journal)) >= 8, "two batches journalled")
        in_flight = set(ran(module, 2))  # the third batch, held in its forward pass
        job.send_signal(signal.SIGINT)
        wait_until(lambda: "SIGINT: stopping" in stderr.read_text(), "the job to stop")
    finally:
        module.open()
    assert job.wait(WAIT_S) == 3
    text = stderr.read_text()
    assert "stopped: interrupted (SIGINT); 12 of 100 rows journalled" in text
    assert "rerun the same command to resume" in text and "Traceback" not in text
    assert journalled(journal) == set(range(12)) and in_flight == set(range(8, 12))
    assert not output.exists()

    np.save(tmp_path / "other.npy", x + 1)
    other = salvo_batch(
        "interrupted", tmp_path / "other.npy", "--url", server.grpc_target, "--output", output
    )
    assert other.returncode == 2 and "another input" in other.stderr and "--restart" in other.stderr

    before = len(module.batches)
    run = subprocess.run(argv, capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    assert run.returncode == 0, run.stderr
    assert sorted(ran(module, before)) == list(range(12, 100))
    assert_doubled_once(output, x)


def test_a_model_without_batching_gets_one_row_a_request(gated, tmp_path: Path):
    server, loader = gated
    module = loader.modules["unbatched"]
    x = numbered_rows(10)
    np.save(tmp_path / "x.npy", x)
    before = len(module.shapes)
    run = salvo_batch("unbatched", tmp_path / "x.npy", "--url", server.grpc_target)
    assert run.returncode == 0, run.stderr
    assert module.shapes[before:] == [(4,)] * 10  # no batch dimension, one row each
    assert_doubled_once(tmp_path / "x.out.npz", x)
    refused = salvo_batch(
        "unbatched", tmp_path / "x.npy", "--url", server.grpc_target, "--batch-size", "2"
    )
    assert refused.returncode == 2 and "does not batch" in refused.stderr


class PinnedServer(InProcessServer):
    """An in-process Salvo on a given gRPC port (a restart of another one)."""

    def __init__(self, repository: Path, loader: GatedLoader, port: int) -> None:
        super().__init__(repository, loader)
        self.settings = self.settings.model_copy(update={"grpc_port": port})


def test_a_server_restarted_mid_job_is_retried(tmp_path: Path):
    loader = GatedLoader()
    root = tmp_path / "repo"
    write_model(root, "restarted", GATED)
    x = numbered_rows(64)
    np.save(tmp_path / "x.npy", x)
    first = InProcessServer(root, loader).__enter__()
    port = first.server.grpc_port
    module = loader.modules["restarted"]
    argv = command(
        "restarted", tmp_path / "x.npy", "--url", first.grpc_target,
        "--batch-size", "4", "--concurrency", "2",
        "--retries", "100", "--backoff-s", "0.05", "--max-backoff-s", "0.2",
    )  # fmt: skip
    module.hold()
    stopping = threading.Thread(target=first.__exit__, args=(None, None, None))
    try:
        job = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        module.wait_batches(1)
        stopping.start()
        wait_until(lambda: not first.server.dataplane.accepting, "the server to refuse requests")
    finally:
        module.open()  # the batch in its forward pass finishes; later ones are refused
    stopping.join(WAIT_S)
    with PinnedServer(root, loader, port):
        _, err = job.communicate(timeout=RUN_TIMEOUT_S)
    assert job.returncode == 0, err
    assert "UNAVAILABLE" in err and "retrying" in err
    assert "Traceback" not in err
    assert_doubled_once(tmp_path / "x.out.npz", x)


# ----------------------------------------------------------------------------- in-process


def test_without_a_url_the_job_starts_its_own_server(demo_server, demo_repo: Path, tmp_path):
    repository = tmp_path / "repo"
    shutil.copytree(demo_repo / "mlp", repository / "mlp")
    x = mlp_rows(50, seed=6)
    np.save(tmp_path / "x.npy", x)
    run = salvo_batch("mlp", tmp_path / "x.npy", "--model-repository", repository)
    assert run.returncode == 0, run.stderr
    rows = read_output(tmp_path / "x.out.npz")
    # The same model files as the shared server's: the same answers.
    assert_scored(rows, direct(demo_server.grpc_target, "mlp", input=x))

    missing = salvo_batch("nope", tmp_path / "x.npy", "--model-repository", repository)
    assert missing.returncode == 2 and "model 'nope'" in missing.stderr
