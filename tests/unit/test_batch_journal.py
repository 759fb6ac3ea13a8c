"""`salvo batch`'s journal: records round-trip, a torn last record (a crash mid-write, cut at
any byte) is dropped and cut off, a journal of another job is refused, and a resumed
journal appends after its last whole record."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from salvo_client.batch.errors import BatchError
from salvo_client.batch.journal import Journal, encode_record, journal_path, read_journal
from salvo_client.batch.rows import RowResult

FINGERPRINT = {"input": {"format": "npy", "sha256": "ab"}, "model": {"name": "m"}}


def batch(start: int, size: int = 3) -> list[RowResult]:
    return [
        RowResult(i, f"id{i}", {"y": np.full(2, i, np.float32), "n": np.array([i], np.int64)})
        for i in range(start, start + size)
    ]


def same(a: RowResult, b: RowResult) -> bool:
    if (a.index, a.id, a.error) != (b.index, b.id, b.error):
        return False
    if a.outputs is None or b.outputs is None:
        return a.outputs is b.outputs
    return a.outputs.keys() == b.outputs.keys() and all(
        a.outputs[k].dtype == b.outputs[k].dtype and np.array_equal(a.outputs[k], b.outputs[k])
        for k in a.outputs
    )


def test_the_journal_sits_beside_the_output(tmp_path: Path):
    assert journal_path(tmp_path / "x.out.npz") == tmp_path / "x.out.npz.partial"


def test_records_round_trip_every_kind_of_result(tmp_path: Path):
    path = tmp_path / "j"
    journal = Journal.open(path, FINGERPRINT)
    assert journal.done == {}
    rows = [
        RowResult(0, 0, {"y": np.arange(6, dtype=np.float32).reshape(2, 3)}),
        RowResult(1, "line 2", None, "INVALID_ARGUMENT: input 'x': expected shape [-1, 4]"),
        RowResult(2, "r", {"s": np.array([b"a", b"\x00bc"], dtype=object)}),
        RowResult(3, 3, {"b": np.array([True, False]), "h": np.array([1.5], np.float16)}),
    ]
    journal.append([rows[:2], rows[2:3], rows[3:]])
    journal.close()
    contents = read_journal(path)
    assert contents.records == 3 and contents.torn_bytes == 0
    assert contents.header is not None and contents.header["fingerprint"] == FINGERPRINT
    assert all(same(contents.results[r.index], r) for r in rows)


def test_a_record_holds_rows_with_the_same_outputs():
    with pytest.raises(ValueError, match="same outputs"):
        encode_record([RowResult(0, 0, {"a": np.zeros(1)}), RowResult(1, 1, {"b": np.zeros(1)})])


def test_a_resumed_journal_knows_what_was_done_and_keeps_appending(tmp_path: Path):
    path = tmp_path / "j"
    first = Journal.open(path, FINGERPRINT)
    first.append([batch(0)])
    first.close()
    second = Journal.open(path, FINGERPRINT)
    assert sorted(second.done) == [0, 1, 2]
    second.append([batch(3), batch(6)])
    second.remove()
    assert not path.exists()


def test_the_first_record_of_a_row_wins(tmp_path: Path):
    path = tmp_path / "j"
    journal = Journal.open(path, FINGERPRINT)
    journal.append([batch(0, 2)])
    journal.append([[RowResult(1, "again", None, "later")]])
    journal.close()
    assert read_journal(path).results[1].id == "id1"


@pytest.mark.parametrize("key", ["input", "model", "outputs"])
def test_a_journal_of_another_job_is_refused_unless_restarted(tmp_path: Path, key: str):
    path = tmp_path / "j"
    journal = Journal.open(path, FINGERPRINT)
    journal.append([batch(0)])
    journal.close()
    other = {**FINGERPRINT, key: {"changed": True}}
    with pytest.raises(BatchError, match=f"another {key}.*--restart"):
        Journal.open(path, other)
    restarted = Journal.open(path, other, restart=True)
    assert restarted.done == {}
    restarted.close()
    assert read_journal(path).header["fingerprint"] == other  # type: ignore[index]


def test_a_torn_last_record_is_dropped_and_cut_off(tmp_path: Path):
    path = tmp_path / "j"
    journal = Journal.open(path, FINGERPRINT)
    journal.append([batch(0), batch(3)])
    journal.close()
    whole = path.stat().st_size
    with open(path, "ab") as f:
        f.write(encode_record(batch(6))[:-5])  # a crash in the middle of the write
    contents = read_journal(path)
    assert sorted(contents.results) == list(range(6))
    assert contents.valid_bytes == whole and contents.torn_bytes > 0

    resumed = Journal.open(path, FINGERPRINT)
    assert resumed.dropped_bytes == contents.torn_bytes and sorted(resumed.done) == list(range(6))
    assert path.stat().st_size == whole
    resumed.append([batch(6)])
    resumed.close()
    assert sorted(read_journal(path).results) == list(range(9))


def test_a_record_with_a_wrong_checksum_ends_the_journal(tmp_path: Path):
    path = tmp_path / "j"
    journal = Journal.open(path, FINGERPRINT)
    journal.append([batch(0)])
    journal.close()
    good = path.stat().st_size
    record = bytearray(encode_record(batch(3)))
    record[-1] ^= 0xFF
    with open(path, "ab") as f:
        f.write(bytes(record))
    contents = read_journal(path)
    assert sorted(contents.results) == [0, 1, 2] and contents.valid_bytes == good


def test_a_journal_torn_in_its_header_starts_over(tmp_path: Path):
    path = tmp_path / "j"
    Journal.open(path, FINGERPRINT).close()
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    assert read_journal(path).header is None
    fresh = Journal.open(path, {"other": 1})  # nothing to resume, nothing refused
    assert fresh.done == {}
    fresh.close()


@settings(max_examples=40, deadline=None)
@given(fraction=st.floats(min_value=0, max_value=1))
def test_a_cut_anywhere_leaves_whole_records_only(tmp_path_factory, fraction: float):
    """Whatever byte a crash stops at, what reads back is the records written whole before
    it, each intact."""
    path = tmp_path_factory.mktemp("cut") / "j"
    journal = Journal.open(path, FINGERPRINT)
    batches = [batch(start, 2) for start in range(0, 12, 2)]
    ends = []
    for b in batches:
        journal.append([b])
        ends.append(path.stat().st_size)
    journal.close()
    data = path.read_bytes()
    cut = int(fraction * len(data))
    path.write_bytes(data[:cut])
    contents = read_journal(path)
    whole = sum(1 for end in ends if end <= cut)
    expected = [r for b in batches[:whole] for r in b]
    assert sorted(contents.results) == [r.index for r in expected]
    assert all(same(contents.results[r.index], r) for r in expected)
