"""The journal: what a job has scored so far, durably, so that a rerun of the same command
picks up where a crash, a kill or Ctrl-C left it.

It is an append-only file beside the output (`<output>.partial`) made of frames:

    frame   := length (u32 LE) | crc32 of payload (u32 LE) | payload
    payload := b"H" JSON header                      (the first frame: the job's fingerprint)
             | b"R" json_length (u32 LE) JSON blob   (a record: one batch's results)

A record's JSON lists its rows, `[index, id, error or null]`, and for each output
`[name, datatype, shapes, sizes, offset]`: the scored rows' values of that output, in row
order, are `sizes` bytes each (the v2 wire encoding, `salvo_client.tensors`) from `offset`
of the blob that follows. Each record is written whole and fsynced before its rows count
as done; a crash can only tear the last one, which the next open detects (short, or its
CRC wrong), drops and cuts off. Nothing in the file is ever unpickled.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import struct
import zlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from salvo_client.batch.errors import BatchError
from salvo_client.batch.rows import RowResult
from salvo_client.tensors import WIRE_DTYPES, datatype_of, decode_tensor, encode_tensor

__all__ = ["FORMAT_VERSION", "Journal", "JournalContents", "journal_path", "read_journal"]

FORMAT_VERSION = 1
_FRAME = struct.Struct("<II")
_U32 = struct.Struct("<I")
_HEADER = b"H"
_RECORD = b"R"


def journal_path(output: Path) -> Path:
    """Where the journal of a job writing `output` lives."""
    return output.with_name(output.name + ".partial")


def _frame(payload: bytes) -> bytes:
    return _FRAME.pack(len(payload), zlib.crc32(payload)) + payload


def encode_record(results: Sequence[RowResult]) -> bytes:
    """One frame holding `results` (the scored ones all with the same outputs)."""
    rows = [[r.index, r.id, None if r.ok else (r.error or "error")] for r in results]
    scored = [r.outputs for r in results if r.outputs is not None]
    located: list[list[Any]] = []
    blob: list[bytes] = []
    offset = 0
    names = list(scored[0]) if scored else []
    if any(list(outputs) != names for outputs in scored):
        raise ValueError("the rows of one record must have the same outputs")
    for name in names:
        arrays = [outputs[name] for outputs in scored]
        datatype = datatype_of(arrays[0].dtype)
        if datatype == "BYTES":
            parts = [encode_tensor(name, a)[1] for a in arrays]
        else:
            wire = WIRE_DTYPES[datatype]
            parts = [np.ascontiguousarray(a, dtype=wire).tobytes() for a in arrays]
        sizes = [len(part) for part in parts]
        located.append([name, datatype, [list(a.shape) for a in arrays], sizes, offset])
        blob += parts
        offset += sum(sizes)
    head = json.dumps({"rows": rows, "outputs": located}, separators=(",", ":")).encode()
    return _frame(_RECORD + _U32.pack(len(head)) + head + b"".join(blob))


def _decode_output(
    name: str, datatype: str, shapes: list[list[int]], sizes: list[int], data: bytes
) -> list[np.ndarray]:
    """Each scored row's value of one output, from its bytes in a record."""
    if datatype == "BYTES":
        values, start = [], 0
        for shape, size in zip(shapes, sizes, strict=True):
            values.append(decode_tensor(name, datatype, shape, data[start : start + size]))
            start += size
        return values
    flat = np.frombuffer(data, dtype=WIRE_DTYPES[datatype])
    counts = [math.prod(shape) for shape in shapes]
    ends = list(itertools.accumulate(counts))
    return [
        flat[end - count : end].reshape(shape)
        for shape, count, end in zip(shapes, counts, ends, strict=True)
    ]


def _decode_record(payload: bytes) -> list[RowResult]:
    (length,) = _U32.unpack_from(payload, 1)
    start = 1 + _U32.size
    head = json.loads(payload[start : start + length])
    blob = payload[start + length :]
    outputs = {
        name: _decode_output(name, datatype, shapes, sizes, blob[offset : offset + sum(sizes)])
        for name, datatype, shapes, sizes, offset in head["outputs"]
    }
    results = []
    scored = 0
    for index, row_id, error in head["rows"]:
        if error is not None:
            results.append(RowResult(index, row_id, None, error))
            continue
        results.append(RowResult(index, row_id, {n: v[scored] for n, v in outputs.items()}))
        scored += 1
    return results


def _frames(data: bytes) -> Iterator[tuple[int, bytes]]:
    """Each whole frame's end offset and payload, stopping at the first torn one."""
    offset = 0
    while offset + _FRAME.size <= len(data):
        length, crc = _FRAME.unpack_from(data, offset)
        end = offset + _FRAME.size + length
        if end > len(data):
            return
        payload = data[offset + _FRAME.size : end]
        if zlib.crc32(payload) != crc:
            return
        yield end, payload
        offset = end


@dataclass
class JournalContents:
    """What a journal file holds: its header, every row journalled (by index, the first
    record of a row winning), and where its valid part ends."""

    header: dict[str, Any] | None
    results: dict[int, RowResult] = field(default_factory=dict)
    valid_bytes: int = 0
    torn_bytes: int = 0
    """Bytes after the last whole frame: a record a crash cut short."""
    records: int = 0


def read_journal(path: Path) -> JournalContents:
    """Read a journal; a torn tail is reported, not raised. An unreadable header (a crash
    while the journal was being created) reads as no header."""
    data = path.read_bytes()
    contents = JournalContents(header=None)
    for end, payload in _frames(data):
        kind = payload[:1]
        if contents.header is None:
            if kind != _HEADER:
                break
            contents.header = json.loads(payload[1:])
        elif kind == _RECORD:
            for result in _decode_record(payload):
                contents.results.setdefault(result.index, result)
            contents.records += 1
        else:
            break
        contents.valid_bytes = end
    contents.torn_bytes = len(data) - contents.valid_bytes
    return contents


def _differences(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    return sorted(key for key in set(old) | set(new) if old.get(key) != new.get(key))


def _fsync_directory(path: Path) -> None:
    """Make a new file's name durable (its directory entry)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # some platforms cannot open a directory
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class Journal:
    """An open journal: what earlier runs scored (`done`), and `append` for this run's.

    `open` resumes a journal whose fingerprint matches this job's, refuses one that does
    not (unless `restart`), and starts a new one otherwise. Not thread-safe: one writer
    (the job's committer) appends at a time.
    """

    def __init__(self, path: Path, fd: int, done: dict[int, RowResult], dropped: int) -> None:
        self.path = path
        self._fd = fd
        self.done = done
        """Rows journalled by earlier runs, by index."""
        self.dropped_bytes = dropped
        """A torn last record cut off at open (bytes)."""

    @classmethod
    def open(cls, path: Path, fingerprint: Mapping[str, Any], restart: bool = False) -> Journal:
        # Through JSON and back, so that it compares equal to one read from the file.
        fingerprint = json.loads(json.dumps(fingerprint, sort_keys=True))
        header = {"salvo_batch_journal": FORMAT_VERSION, "fingerprint": fingerprint}
        if path.exists() and not restart:
            contents = read_journal(path)
            if contents.header is not None:
                old = contents.header.get("fingerprint", {})
                version = contents.header.get("salvo_batch_journal")
                if version != FORMAT_VERSION or old != fingerprint:
                    changed = _differences(old, fingerprint) or ["journal format"]
                    raise BatchError(
                        f"{path} was written by a job with another {', '.join(changed)}; "
                        "rerun with --restart to start over (its rows are discarded), or "
                        "move it away"
                    )
                fd = os.open(path, os.O_WRONLY)
                # Cut off a torn last record, so the next one follows a whole frame.
                os.ftruncate(fd, contents.valid_bytes)
                os.lseek(fd, contents.valid_bytes, os.SEEK_SET)
                os.fsync(fd)
                return cls(path, fd, contents.results, contents.torn_bytes)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.write(fd, _frame(_HEADER + json.dumps(header, sort_keys=True).encode()))
        os.fsync(fd)
        _fsync_directory(path.parent)
        return cls(path, fd, {}, 0)

    def append(self, batches: Sequence[Sequence[RowResult]]) -> None:
        """Journal each batch's results as one record, durably (one fsync for them all)."""
        data = b"".join(encode_record(results) for results in batches if results)
        view = memoryview(data)
        while view:
            written = os.write(self._fd, view)
            view = view[written:]
        os.fsync(self._fd)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def remove(self) -> None:
        """Close and delete the journal: the output now holds every row."""
        self.close()
        self.path.unlink(missing_ok=True)
