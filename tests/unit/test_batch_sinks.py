"""`salvo batch`'s writers: every row once, in the order given, keyed by id, failed rows
marked, read back with each format's own reader; and where outputs go by default."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from salvo_client.batch.errors import BatchError
from salvo_client.batch.model import TensorSpec
from salvo_client.batch.rows import RowResult
from salvo_client.batch.sinks import default_output, output_format, write_output

pq = pytest.importorskip("pyarrow.parquet")

OUTPUTS = (TensorSpec("logits", "FP32", (3,)), TensorSpec("label", "INT64", (1,)))


def scored(index: int, row_id: int | str) -> RowResult:
    logits = np.array([index, index + 0.5, -index], np.float32) / 3
    return RowResult(index, row_id, {"logits": logits, "label": np.array([index], np.int64)})


def results(ids: list[int | str], failed: int) -> list[RowResult]:
    rows = [scored(i, row_id) for i, row_id in enumerate(ids)]
    rows[failed] = RowResult(failed, ids[failed], None, "INVALID_ARGUMENT: bad shape")
    return rows


def test_default_outputs_sit_beside_the_input(tmp_path: Path):
    assert default_output(tmp_path / "x.npy", "npy") == tmp_path / "x.out.npz"
    assert default_output(tmp_path / "s.npz", "npz") == tmp_path / "s.out.npz"
    assert default_output(tmp_path / "r.jsonl", "jsonl") == tmp_path / "r.out.jsonl"
    assert default_output(tmp_path / "r.csv", "csv") == tmp_path / "r.out.csv"
    assert default_output(tmp_path / "r.pq", "parquet") == tmp_path / "r.out.pq"
    assert default_output(tmp_path / "imgs", "images") == tmp_path / "imgs.out.jsonl"
    assert output_format(tmp_path / "x.out.npz", "npy") == "npz"
    assert output_format(tmp_path / "any.csv", "npy") == "csv"
    assert output_format(tmp_path / "any.bin", "jsonl") == "jsonl"
    assert output_format(tmp_path / "any.bin", "images") == "jsonl"


def test_npz_holds_ids_errors_and_one_array_per_output(tmp_path: Path):
    path = tmp_path / "o.npz"
    write_output(path, "npz", results([0, 1, 2, 3], failed=2), OUTPUTS)
    with np.load(path, allow_pickle=False) as out:
        assert sorted(out.files) == ["error", "id", "label", "logits"]
        assert out["id"].tolist() == [0, 1, 2, 3]
        assert out["error"].tolist() == ["", "", "INVALID_ARGUMENT: bad shape", ""]
        assert out["logits"].dtype == np.float32 and out["logits"].shape == (4, 3)
        np.testing.assert_array_equal(out["logits"][3], scored(3, 3).outputs["logits"])  # type: ignore[index]
        assert np.isnan(out["logits"][2]).all()
        assert out["label"][:, 0].tolist() == [0, 1, 0, 3]
    assert not list(tmp_path.glob(".*tmp"))


def test_npz_ids_are_text_when_any_is_and_bytes_outputs_need_no_pickle(tmp_path: Path):
    spec = TensorSpec("s", "BYTES", (1,))
    rows = [
        RowResult(0, "a", {"s": np.array([b"xy"], dtype=object)}),
        RowResult(1, 7, None, "nope"),
        RowResult(2, "c", {"s": np.array([b"longer"], dtype=object)}),
    ]
    write_output(tmp_path / "o.npz", "npz", rows, [spec])
    with np.load(tmp_path / "o.npz", allow_pickle=False) as out:
        assert out["id"].tolist() == ["a", "7", "c"]
        assert out["s"][:, 0].tolist() == [b"xy", b"", b"longer"]


def test_npz_refuses_outputs_whose_shape_varies(tmp_path: Path):
    spec = TensorSpec("y", "FP32", (-1,))
    rows = [RowResult(0, 0, {"y": np.zeros(2)}), RowResult(1, 1, {"y": np.zeros(3)})]
    with pytest.raises(BatchError, match="differs in shape.*JSONL"):
        write_output(tmp_path / "o.npz", "npz", rows, [spec])
    assert not (tmp_path / "o.npz").exists()


def test_jsonl_has_a_line_per_row_with_outputs_or_its_error(tmp_path: Path):
    path = tmp_path / "o.jsonl"
    write_output(path, "jsonl", results(["a", 5, "c"], failed=1), OUTPUTS)
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert [line["id"] for line in lines] == ["a", 5, "c"]
    assert lines[1] == {"id": 5, "error": "INVALID_ARGUMENT: bad shape"}
    # float32 values as their shortest text: they read back as the same float32s
    assert np.array(lines[2]["outputs"]["logits"], np.float32).tobytes() == (
        scored(2, "c").outputs["logits"].tobytes()  # type: ignore[index]
    )
    assert "0.8333333," in path.read_text()
    assert lines[0]["outputs"]["label"] == [0]


def test_csv_flattens_outputs_into_numbered_columns(tmp_path: Path):
    path = tmp_path / "o.csv"
    write_output(path, "csv", results(["a", "b", "c"], failed=0), OUTPUTS)
    with open(path, newline="") as f:
        records = list(csv.reader(f))
    header = records[0]
    assert header == ["id", "error", "logits_0", "logits_1", "logits_2", "label_0"]
    assert records[1] == ["a", "INVALID_ARGUMENT: bad shape", "", "", "", ""]
    assert records[3][0] == "c" and records[3][1] == ""
    np.testing.assert_array_equal(
        np.array(records[3][2:5], dtype=np.float32),
        scored(2, "c").outputs["logits"],  # type: ignore[index]
    )
    assert records[3][5] == "2"


def test_parquet_has_id_error_and_list_columns(tmp_path: Path):
    path = tmp_path / "o.parquet"
    write_output(path, "parquet", results([10, 11, 12], failed=1), OUTPUTS)
    table = pq.read_table(path)
    assert table.column_names == ["id", "error", "logits", "label"]
    assert str(table.schema.field("logits").type) == "list<element: float>"
    data = table.to_pydict()
    assert data["id"] == [10, 11, 12]
    assert data["error"] == [None, "INVALID_ARGUMENT: bad shape", None]
    assert data["logits"][1] is None and data["label"][2] == [2]
    np.testing.assert_array_equal(
        np.array(data["logits"][2], np.float32),
        scored(2, 12).outputs["logits"],  # type: ignore[index]
    )


@pytest.mark.parametrize("fmt", ["npz", "jsonl", "csv", "parquet"])
def test_no_rows_writes_an_empty_output(tmp_path: Path, fmt: str):
    path = tmp_path / f"o.{fmt}"
    write_output(path, fmt, [], OUTPUTS)
    assert path.exists()
