"""`salvo batch`'s rows: conversion to an input's datatype and dims, grouping into batches
(what stacks with what, batch sizes, requests kept whole) and splitting answers back."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from salvo_client.batch.model import TensorSpec
from salvo_client.batch.rows import Batch, Grouper, Row, to_tensor

X = TensorSpec("x", "FP32", (4,))


def row(index: int, width: int = 4, dtype: type = np.float32, **kwargs) -> Row:
    return Row(index, index, {"x": np.full(width, index, dtype)}, **kwargs)


def request(index: int, rows: int) -> Row:
    """A v2 request of `rows` rows, each holding its request's index."""
    return Row(index, f"r{index}", {"x": np.full((rows, 4), index, np.float32)}, request=True)


def rows_of(batches: list[Batch]) -> list[list[int]]:
    return [[r.index for r in b.rows] for b in batches]


def echo(batch: Batch) -> dict[str, np.ndarray]:
    """A model answering y = 2x, one row out per row in."""
    return {"y": batch.inputs["x"] * 2}


# ----------------------------------------------------------------------------- to_tensor


@pytest.mark.parametrize(
    ("spec", "value", "expected"),
    [
        (X, [1, 2, 3, 4], np.array([1, 2, 3, 4], np.float32)),
        (X, ["1.5", "2", "3", "-4e1"], np.array([1.5, 2, 3, -40], np.float32)),
        (TensorSpec("x", "FP32", (2, 2)), [1, 2, 3, 4], np.array([[1, 2], [3, 4]], np.float32)),
        (TensorSpec("x", "INT64", (2,)), [3.0, 4], np.array([3, 4], np.int64)),
        (TensorSpec("x", "INT32", (1,)), "7", np.array([7], np.int32)),
        (TensorSpec("x", "FP32", (-1,)), [1, 2], np.array([1, 2], np.float32)),
    ],
)
def test_values_take_the_inputs_datatype_and_dims(spec, value, expected):
    out = to_tensor(spec, value)
    assert out.dtype == expected.dtype
    np.testing.assert_array_equal(out, expected)


def test_values_that_do_not_fill_the_dims_keep_their_shape_for_the_server_to_judge():
    assert to_tensor(X, [1, 2, 3]).shape == (3,)
    assert to_tensor(X, [[1, 2], [3, 4]]).shape == (4,)  # as many values: reshaped
    assert to_tensor(X, [[1, 2, 3, 4, 5]]).shape == (1, 5)


def test_bytes_inputs_take_text():
    out = to_tensor(TensorSpec("s", "BYTES", (2,)), ["a", b"b"])
    assert out.dtype == object and out.tolist() == [b"a", b"b"]
    with pytest.raises(ValueError, match="BYTES takes text"):
        to_tensor(TensorSpec("s", "BYTES", (1,)), [3])


@pytest.mark.parametrize(
    ("spec", "value", "message"),
    [
        (X, ["1", "2", "abc", "4"], "cannot read 'abc' as FP32"),
        (X, [1, None, 2, 3], "not numbers"),
        (X, [[1, 2], [3]], "cannot read as FP32"),
        (TensorSpec("x", "INT64", (2,)), [1.5, 2], "whole numbers"),
    ],
)
def test_values_that_are_not_the_datatype_name_the_input(spec, value, message):
    with pytest.raises(ValueError, match=message) as info:
        to_tensor(spec, value)
    assert "input 'x'" in str(info.value)


# ----------------------------------------------------------------------------- grouping


def test_rows_fill_batches_of_the_batch_size_in_order():
    grouper = Grouper(3, batching=True)
    ready = [b for i in range(7) for b in grouper.add(row(i))]
    assert rows_of(ready) == [[0, 1, 2], [3, 4, 5]]
    assert grouper.held == 1
    tail = grouper.flush()
    assert rows_of(tail) == [[6]] and grouper.held == 0
    assert ready[0].inputs["x"].shape == (3, 4) and ready[0].counts == (1, 1, 1)
    np.testing.assert_array_equal(ready[1].inputs["x"][:, 0], [3, 4, 5])


def test_rows_that_do_not_stack_wait_for_their_own_kind():
    grouper = Grouper(2, batching=True)
    ready = []
    for r in (row(0), row(1, width=3), row(2), row(3, width=3), row(4, dtype=np.float64)):
        ready += grouper.add(r)
    assert rows_of(ready) == [[0, 2], [1, 3]]
    assert rows_of(grouper.flush()) == [[4]]


def test_a_model_without_batching_gets_each_row_alone_and_whole():
    grouper = Grouper(1, batching=False)
    (batch,) = grouper.add(row(5))
    assert batch.counts == () and batch.inputs["x"].shape == (4,)
    (result,) = batch.split({"y": np.arange(4)}, ["y"])
    assert result.index == 5 and result.outputs is not None
    np.testing.assert_array_equal(result.outputs["y"], np.arange(4))


def test_requests_concatenate_along_their_batch_dimension():
    grouper = Grouper(4, batching=True)
    assert grouper.add(request(0, 2)) == [] and grouper.add(row(1)) == []
    (batch,) = grouper.add(request(2, 1))  # 2 + 1 + 1 rows: full
    assert batch.counts == (2, 1, 1) and batch.inputs["x"].shape == (4, 4)
    results = batch.split(echo(batch), ["y"])
    assert [r.outputs["y"].shape for r in results if r.outputs] == [(2, 4), (4,), (1, 4)]
    np.testing.assert_array_equal(results[1].outputs["y"], np.full(4, 2.0))  # type: ignore[index]


def test_a_group_that_would_overflow_is_sent_first():
    grouper = Grouper(4, batching=True)
    assert grouper.add(request(0, 3)) == []
    ready = grouper.add(request(1, 2))
    assert rows_of(ready) == [[0]]
    assert rows_of(grouper.flush()) == [[1]]


def test_requests_too_big_or_ragged_go_alone_and_whole():
    grouper = Grouper(4, batching=True)
    (big,) = grouper.add(request(0, 5))
    assert big.counts == (5,)
    ragged = Row(1, "r", {"a": np.zeros((2, 1)), "b": np.zeros((3, 1))}, request=True)
    (alone,) = grouper.add(ragged)
    assert alone.counts == () and alone.inputs["a"].shape == (2, 1)
    (result,) = alone.split({"y": np.zeros((7, 2))}, ["y"])
    assert result.outputs is not None and result.outputs["y"].shape == (7, 2)


def test_open_groups_are_bounded():
    grouper = Grouper(8, batching=True, max_open=2)
    ready = []
    for width in (1, 2, 3, 4):
        ready += grouper.add(row(width, width=width))
    assert rows_of(ready) == [[1], [2]]  # the oldest groups, pushed out
    assert grouper.held == 2


def test_an_answer_that_does_not_fit_the_rows_sent_is_refused():
    stacked = Grouper(2, batching=True)
    stacked.add(row(0))
    (two,) = stacked.add(row(1))
    with pytest.raises(ValueError, match="shape \\[3, 4\\] for 2 rows"):
        two.split({"y": np.zeros((3, 4))}, ["y"])
    with pytest.raises(ValueError, match="no output 'z'"):
        two.split({"y": np.zeros((2, 4))}, ["y", "z"])


def test_singles_and_failures_keep_each_row():
    grouper = Grouper(3, batching=True)
    for i in range(3):
        ready = grouper.add(row(i))
    (batch,) = ready
    singles = batch.singles()
    assert rows_of(singles) == [[0], [1], [2]]
    assert all(s.counts == (1,) and s.inputs["x"].shape == (1, 4) for s in singles)
    failed = batch.failed("bad")
    assert [(r.index, r.ok, r.error) for r in failed] == [(i, False, "bad") for i in range(3)]


@settings(max_examples=60, deadline=None)
@given(
    sizes=st.lists(st.integers(min_value=0, max_value=4), min_size=1, max_size=40),
    batch_size=st.integers(min_value=1, max_value=6),
)
def test_grouping_then_splitting_gives_every_row_back_once(sizes, batch_size):
    """Rows of mixed kinds (plain rows of two widths, requests of 1..4 rows; size 0 is a
    plain row) all come back, each exactly once, with their own values doubled."""
    rows = []
    for i, size in enumerate(sizes):
        if size == 0:
            rows.append(row(i, width=4 if i % 3 else 2))
        else:
            rows.append(request(i, size))
    grouper = Grouper(batch_size, batching=True)
    batches = [b for r in rows for b in grouper.add(r)] + grouper.flush()
    assert all(b.size <= batch_size or len(b.rows) == 1 for b in batches)
    results = [res for b in batches for res in b.split(echo(b), ["y"])]
    assert sorted(r.index for r in results) == list(range(len(rows)))
    for result in results:
        source = rows[result.index]
        assert result.outputs is not None
        np.testing.assert_array_equal(result.outputs["y"], source.inputs["x"] * 2)
