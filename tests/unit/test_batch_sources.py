"""`salvo batch`'s readers, one per format: rows, their ids and tensors, input mappings,
rows that cannot be read (reported, not raised), inputs that cannot be used at all
(BatchError), and the image preprocessing a model declares."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import numpy as np
import pytest

from salvo_client.batch.errors import BatchError
from salvo_client.batch.images import image_prep, load_image
from salvo_client.batch.model import ModelSpec, TensorSpec
from salvo_client.batch.sources import detect_format, open_source, parse_input_map

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")
Image = pytest.importorskip("PIL.Image")

MLP = ModelSpec(
    "mlp", ("1",), 8, (TensorSpec("input", "FP32", (4,)),), (TensorSpec("output", "FP32", (2,)),)
)
TWO = ModelSpec(
    "two",
    ("1",),
    8,
    (TensorSpec("a", "FP32", (2, 2)), TensorSpec("b", "INT64", (1,))),
    (TensorSpec("y", "FP32", (1,)),),
)
ROWS = np.arange(20, dtype=np.float32).reshape(5, 4)


def read(path: Path, spec: ModelSpec = MLP, fmt: str | None = None, **kwargs):
    source = open_source(path, fmt or detect_format(path), spec, kwargs.pop("mapping", {}), **{
        "id_column": None, **kwargs
    })  # fmt: skip
    return source, list(source.rows())


def test_formats_come_from_the_suffix_or_a_folder(tmp_path: Path):
    for name, fmt in [("a.npy", "npy"), ("a.NPZ", "npz"), ("a.ndjson", "jsonl"),
                      ("a.csv", "csv"), ("a.pq", "parquet")]:  # fmt: skip
        assert detect_format(tmp_path / name) == fmt
    assert detect_format(tmp_path) == "images"
    with pytest.raises(BatchError, match="give --format"):
        detect_format(tmp_path / "a.txt")


def test_input_maps_parse_and_refuse_what_is_malformed():
    assert parse_input_map(["a=x", " b = p* "]) == {"a": "x", "b": "p*"}
    for bad in (["a"], ["=x"], ["a="], ["a=x", "a=y"]):
        with pytest.raises(BatchError):
            parse_input_map(bad)


# ----------------------------------------------------------------------------- npy, npz


def test_npy_rows_are_the_first_axis(tmp_path: Path):
    np.save(tmp_path / "x.npy", ROWS.astype(np.float64))
    source, rows = read(tmp_path / "x.npy")
    assert source.count() == 5
    assert [r.id for r in rows] == [0, 1, 2, 3, 4] == [r.index for r in rows]
    assert all(r.inputs["input"].dtype == np.float32 for r in rows)
    np.testing.assert_array_equal(rows[3].inputs["input"], ROWS[3])
    assert source.fingerprint()["sha256"]


def test_npy_needs_a_single_input_model_and_rows_that_fit(tmp_path: Path):
    np.save(tmp_path / "x.npy", ROWS)
    with pytest.raises(BatchError, match="takes 2 inputs"):
        read(tmp_path / "x.npy", TWO)
    np.save(tmp_path / "y.npy", np.zeros((3, 5), np.float32))
    with pytest.raises(BatchError, match=r"rows of shape \[5\] do not fit input 'input'"):
        read(tmp_path / "y.npy")
    np.save(tmp_path / "o.npy", np.array([{"a": 1}], dtype=object))
    with pytest.raises(BatchError, match="cannot read"):
        read(tmp_path / "o.npy")


def test_npz_arrays_by_input_name_or_mapped(tmp_path: Path):
    np.savez(tmp_path / "x.npz", a=np.zeros((3, 4), np.float32), other=np.arange(3))
    source, rows = read(tmp_path / "x.npz", TWO, mapping={"b": "other"})
    assert source.count() == 3
    assert rows[2].inputs["a"].shape == (2, 2)  # 4 values reshaped to the dims
    assert rows[2].inputs["b"].dtype == np.int64 and rows[2].inputs["b"].tolist() == [2]
    with pytest.raises(BatchError, match="no array 'b' for input 'b'.*--input b=KEY"):
        read(tmp_path / "x.npz", TWO)
    np.savez(tmp_path / "y.npz", a=np.zeros((3, 4)), b=np.zeros(2))
    with pytest.raises(BatchError, match="differ in rows"):
        read(tmp_path / "y.npz", TWO)
    with pytest.raises(BatchError, match="no such input"):
        read(tmp_path / "x.npz", TWO, mapping={"c": "other"})


# ----------------------------------------------------------------------------- JSONL


def test_jsonl_named_rows_requests_and_unreadable_lines(tmp_path: Path):
    lines = [
        json.dumps({"id": "first", "input": [1, 2, 3, 4]}),
        json.dumps({"input": [[5, 6], [7, 8]]}),
        "",
        "{not json",
        json.dumps(
            {
                "id": "req",
                "inputs": [
                    {"name": "input", "datatype": "FP64", "shape": [2, 4], "data": list(range(8))}
                ],
            }
        ),  # fmt: skip
        json.dumps(
            {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 4], "data": [1, 2]}]}
        ),  # fmt: skip
        json.dumps({"other": 1}),
        json.dumps([1, 2]),
        json.dumps({"input": ["x", 1, 2, 3]}),
    ]
    path = tmp_path / "rows.jsonl"
    path.write_text("\n".join(lines) + "\n")
    source, rows = read(path)
    assert source.count() == 8  # the blank line is no row
    assert [r.index for r in rows] == list(range(8))
    assert [r.id for r in rows] == ["first", 2, 4, "req", 6, 7, 8, 9]
    np.testing.assert_array_equal(rows[1].inputs["input"], [5, 6, 7, 8])
    assert rows[1].inputs["input"].dtype == np.float32
    request = rows[3]
    assert request.request and request.error is None
    assert request.inputs["input"].dtype == np.float64 and request.inputs["input"].shape == (2, 4)
    errors = {r.id: r.error for r in rows if r.error}
    assert errors[4].startswith("line 4: not valid JSON")
    assert "2 values do not fill shape [1, 4]" in errors[6]
    assert "no value for input 'input'" in errors[7]
    assert "expected a JSON object" in errors[8]
    assert "cannot read 'x' as FP32" in errors[9]
    assert set(errors) == {4, 6, 7, 8, 9}


def test_jsonl_keys_can_be_mapped_and_id_may_be_an_input(tmp_path: Path):
    spec = ModelSpec("m", ("1",), 0, (TensorSpec("id", "INT64", (1,)),), MLP.outputs)
    path = tmp_path / "rows.jsonl"
    path.write_text(json.dumps({"id": [7], "v": [1]}) + "\n" + json.dumps({"id": "b"}) + "\n")
    _, rows = read(path, spec)
    assert [r.id for r in rows] == [1, 2]  # `id` feeds the input, so rows are lines
    assert rows[0].inputs["id"].tolist() == [7]
    assert "cannot read 'b' as INT64" in (rows[1].error or "")
    _, mapped = read(path, spec, mapping={"id": "v"})
    assert [r.id for r in mapped] == [1, "b"]  # a list is no id; "b" is
    assert mapped[0].inputs["id"].tolist() == [1]
    assert "no value for input 'id' (key 'v')" in (mapped[1].error or "")


# ----------------------------------------------------------------------------- CSV


def write_csv(path: Path, header: list[str], records: list[list[object]]) -> Path:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(records)
    return path


def test_csv_numbered_columns_and_an_id_column(tmp_path: Path):
    header = ["key", *(f"input_{i}" for i in (2, 0, 1, 3)), "note"]
    path = write_csv(tmp_path / "r.csv", header, [["a", 3, 1, 2, 4, "x"], ["b", 7, 5, 6, 8, ""]])
    source, rows = read(path, id_column="key")
    assert source.count() == 2
    assert [r.id for r in rows] == ["a", "b"]
    np.testing.assert_array_equal(rows[0].inputs["input"], [1, 2, 3, 4])  # by number, not order
    _, by_index = read(path)
    assert [r.id for r in by_index] == [0, 1]
    with pytest.raises(BatchError, match="no id column 'nope'"):
        read(path, id_column="nope")


def test_csv_whole_tensor_columns_mappings_and_bad_cells(tmp_path: Path):
    path = write_csv(
        tmp_path / "r.csv",
        ["input", "p1", "p0", "p2", "p3", "b"],
        [["[1, 2, 3, 4]", 2, 1, 3, 4, 9], ["[1, 2]", 0, 0, 0, "", 9], ["[1,", 0, 0, 0, 0]],
    )
    _, rows = read(path)
    np.testing.assert_array_equal(rows[0].inputs["input"], [1, 2, 3, 4])
    assert rows[1].inputs["input"].shape == (2,)  # the server will refuse it, by name
    assert "5 cells for 6 columns" in (rows[2].error or "")
    _, prefixed = read(path, mapping={"input": "p*"})
    np.testing.assert_array_equal(prefixed[0].inputs["input"], [1, 2, 3, 4])
    assert "cannot read '' as FP32" in (prefixed[1].error or "")
    _, listed = read(path, mapping={"input": "p3,p2,p1,p0"})
    np.testing.assert_array_equal(listed[0].inputs["input"], [4, 3, 2, 1])
    spec = ModelSpec("m", ("1",), 8, (TensorSpec("b", "INT64", (1,)),), MLP.outputs)
    _, scalars = read(path, spec)
    assert scalars[0].inputs["b"].tolist() == [9]


def test_csv_columns_that_cannot_be_the_input_are_refused_up_front(tmp_path: Path):
    path = write_csv(tmp_path / "r.csv", ["input_0", "input_1", "q"], [[1, 2, 3]])
    with pytest.raises(BatchError, match="2 columns for input 'input'.*take 4 values"):
        read(path)
    with pytest.raises(BatchError, match="no column 'a' nor a_0, a_1"):
        read(path, TWO)
    with pytest.raises(BatchError, match="no column 'z'"):
        read(path, mapping={"input": "q,z"})
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(BatchError, match="no header"):
        read(tmp_path / "empty.csv")


# ----------------------------------------------------------------------------- Parquet


def test_parquet_list_and_scalar_columns(tmp_path: Path):
    table = pa.table(
        {
            "input": pa.array([[1, 2, 3, 4], [5, 6, 7, 8], None], type=pa.list_(pa.float32())),
            "key": pa.array([10, 11, 12]),
            **{f"a_{i}": pa.array([float(i)] * 3) for i in range(4)},
            "b": pa.array([1, 2, 3]),
        }
    )
    pq.write_table(table, tmp_path / "r.parquet")
    source, rows = read(tmp_path / "r.parquet", id_column="key")
    assert source.count() == 3
    assert [r.id for r in rows] == [10, 11, 12]
    np.testing.assert_array_equal(rows[1].inputs["input"], [5, 6, 7, 8])
    assert rows[2].error is not None and "not numbers" in rows[2].error
    _, two = read(tmp_path / "r.parquet", TWO)
    np.testing.assert_array_equal(two[0].inputs["a"], [[0, 1], [2, 3]])
    assert two[0].inputs["b"].tolist() == [1]


def test_parquet_that_is_not_parquet_is_refused(tmp_path: Path):
    (tmp_path / "r.parquet").write_bytes(b"nope")
    with pytest.raises(BatchError, match="cannot read as Parquet"):
        read(tmp_path / "r.parquet")


# ----------------------------------------------------------------------------- images


def image_model(layout: str = "HW", dims=(8, 8), **params: str) -> ModelSpec:
    parameters = {"image.layout": layout, **{f"image.{k}": v for k, v in params.items()}}
    return ModelSpec(
        "img", ("1",), 4, (TensorSpec("image", "FP32", dims),), MLP.outputs, parameters
    )


def test_image_preprocessing_as_the_model_declares(tmp_path: Path):
    pixels = np.arange(64).reshape(8, 8) * 4
    Image.fromarray(pixels.astype(np.uint8), mode="L").save(tmp_path / "a.png")
    digits = image_model(scale="0,16")
    out = load_image(tmp_path / "a.png", image_prep(digits))
    assert out.shape == (8, 8) and out.dtype == np.float32
    np.testing.assert_allclose(out, pixels * 16 / 255, rtol=1e-6)
    inverted = load_image(tmp_path / "a.png", image_prep(image_model(scale="16,0")))
    np.testing.assert_allclose(inverted, 16 - pixels * 16 / 255, rtol=1e-6, atol=1e-5)
    rgb = image_prep(image_model("CHW", (3, 4, 2)))
    assert rgb.mode == "RGB" and rgb.size == (2, 4)
    chw = load_image(tmp_path / "a.png", rgb)
    assert chw.shape == (3, 4, 2)
    np.testing.assert_array_equal(chw[0], chw[2])  # grey in, equal channels out
    hwc = load_image(tmp_path / "a.png", image_prep(image_model("HWC", (8, 8, 1), mode="L")))
    assert hwc.shape == (8, 8, 1)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (ModelSpec("m", (), 0, MLP.inputs, MLP.outputs), "declares no image preprocessing"),
        (image_model("HWX"), "use HW, HWC or CHW"),
        (image_model("HW", (3, 8, 8)), "not a HW image"),
        (image_model("HW", mode="RGB"), "one channel"),
        (image_model("CHW", (1, 8, 8), mode="RGB"), "takes 1 channels"),
        (image_model(size="8"), "expected two numbers"),
        (image_model(scale="a,b"), "expected two numbers"),
    ],
)
def test_image_preprocessing_that_cannot_work_is_refused(spec, message):
    with pytest.raises(BatchError, match=message):
        image_prep(spec)


def test_an_image_folder_is_rows_by_relative_path(tmp_path: Path):
    folder = tmp_path / "imgs"
    (folder / "sub").mkdir(parents=True)
    for name in ("b.png", "sub/a.png", "a.jpg"):
        Image.fromarray(np.full((16, 16), 255, np.uint8), mode="L").save(folder / name)
    (folder / "notes.txt").write_text("not an image")
    (folder / "broken.png").write_bytes(b"not a png")
    source, rows = read(folder, image_model(scale="0,1"))
    assert source.count() == 4
    assert [r.id for r in rows] == ["a.jpg", "b.png", "broken.png", "sub/a.png"]
    assert rows[1].inputs["image"].shape == (8, 8)  # resized to the model's dims
    np.testing.assert_allclose(rows[1].inputs["image"], 1.0)
    assert (rows[2].error or "").startswith("cannot read image")
    before = source.fingerprint()
    Image.fromarray(np.zeros((4, 4), np.uint8), mode="L").save(folder / "c.png")
    assert open_source(folder, "images", image_model(scale="0,1"), {}, None).fingerprint() != before
    with pytest.raises(BatchError, match="declares no image preprocessing"):
        read(folder, MLP)


def test_missing_extras_say_how_to_install_them(tmp_path: Path, monkeypatch):
    pq.write_table(pa.table({"input": pa.array([[1.0] * 4])}), tmp_path / "r.parquet")
    folder = tmp_path / "imgs"
    folder.mkdir()
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)  # import raises ImportError
    monkeypatch.setitem(sys.modules, "PIL", None)
    with pytest.raises(BatchError, match=r"Parquet needs pyarrow: pip install 'salvo\[batch\]'"):
        read(tmp_path / "r.parquet")
    with pytest.raises(BatchError, match=r"needs pillow: pip install 'salvo\[batch\]'"):
        read(folder, image_model())
