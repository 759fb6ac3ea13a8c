"""Rows and the requests they travel in: one row as read, its result, and the pure grouping
of rows into batches (what stacks with what, how many rows a request carries, and how a
batched answer is split back into rows).

A row's tensors are one row's, without the batch dimension, except a v2 request read from
JSONL (`Row.request`), whose tensors are sent as written, batch dimension included, and
whose outputs are kept whole.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from salvo_client.batch.model import TensorSpec

__all__ = ["Batch", "Grouper", "Row", "RowId", "RowResult", "to_tensor"]

RowId = int | str
"""A row's key in the output: a position, a line number, a request id, a column's value or
a file's relative path."""


@dataclass(frozen=True, slots=True)
class Row:
    """One row of the input: its position (outputs follow that order), its id, and its
    tensors by input name, or the reason it could not be read."""

    index: int
    id: RowId
    inputs: Mapping[str, np.ndarray] = field(default_factory=dict)
    request: bool = False
    """The tensors are a whole v2 request's, batch dimension included: sent as written,
    and answered whole."""
    error: str | None = None


@dataclass(frozen=True, slots=True)
class RowResult:
    """What became of one row: its outputs by name, or the error it got."""

    index: int
    id: RowId
    outputs: Mapping[str, np.ndarray] | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


def _integral(values: np.ndarray) -> bool:
    with np.errstate(invalid="ignore"):
        return bool(np.all(np.isfinite(values)) and np.all(np.mod(values, 1) == 0))


def _parse_text(raw: np.ndarray, spec: TensorSpec) -> np.ndarray:
    """Numbers written as text (CSV cells, JSON strings)."""
    target = np.float64 if spec.dtype.kind == "f" else np.int64
    try:
        return raw.astype(target)
    except ValueError:
        kind = float if target is np.float64 else int
        for item in raw.reshape(-1).tolist():
            try:
                kind(item)
            except ValueError:
                raise ValueError(
                    f"input '{spec.name}': cannot read {item!r} as {spec.datatype}"
                ) from None
        raise


def to_tensor(spec: TensorSpec, value: Any) -> np.ndarray:
    """`value` (an array, nested lists, a number or numeric text) as one row of input
    `spec`, in its datatype.

    The values take the input's dims when they fill them exactly (64 flat values for dims
    [8, 8]); otherwise they keep the shape they came in, for the server to judge. Raises
    ValueError, naming the input, for values that cannot be read as its datatype.
    """
    where = f"input '{spec.name}'"
    if spec.datatype == "BYTES":
        raw = np.asarray(value, dtype=object)
        flat = raw.reshape(-1)
        for i, item in enumerate(flat):
            if isinstance(item, str):
                flat[i] = item.encode("utf-8")
            elif not isinstance(item, bytes):
                raise ValueError(f"{where}: BYTES takes text, got {type(item).__name__}")
        array = raw
    else:
        try:
            raw = np.asarray(value)
        except (ValueError, TypeError) as exc:  # ragged nesting
            raise ValueError(f"{where}: cannot read as {spec.datatype}: {exc}") from None
        if raw.dtype.kind in "US":  # text, as CSV cells are: numpy parses it
            raw = _parse_text(raw, spec)
        if raw.dtype.kind not in "biuf":
            raise ValueError(f"{where}: cannot read as {spec.datatype}: not numbers")
        if spec.dtype.kind in "iub" and raw.dtype.kind == "f" and not _integral(raw):
            raise ValueError(f"{where}: {spec.datatype} takes whole numbers")
        array = raw.astype(spec.dtype, copy=False)
    if spec.fixed and array.shape != spec.dims and array.size == math.prod(spec.dims):
        array = array.reshape(spec.dims)
    return array


@dataclass(frozen=True, slots=True)
class Batch:
    """The rows of one request and its tensors.

    `counts` holds the rows of the batch dimension each row takes, in order; it is empty
    when the request carries one row whose answer is kept whole (a model that does not
    batch, or a v2 request whose tensors do not stack).
    """

    rows: tuple[Row, ...]
    inputs: Mapping[str, np.ndarray]
    counts: tuple[int, ...] = ()

    @property
    def size(self) -> int:
        """Rows of the batch dimension (1 for a request answered whole)."""
        return sum(self.counts) if self.counts else 1

    def split(self, outputs: Mapping[str, np.ndarray], names: Sequence[str]) -> list[RowResult]:
        """Each row's share of `outputs` (those in `names`); ValueError where the answer
        lacks an output or has not one row of it per row sent."""
        missing = [n for n in names if n not in outputs]
        if missing:
            raise ValueError(f"the answer has no output {', '.join(map(repr, missing))}")
        if not self.counts:
            row = self.rows[0]
            return [RowResult(row.index, row.id, {n: outputs[n] for n in names})]
        total = sum(self.counts)
        for name in names:
            shape = outputs[name].shape
            if not shape or shape[0] != total:
                raise ValueError(
                    f"output '{name}' came with shape {list(shape)} for {total} rows sent"
                )
        results = []
        start = 0
        for row, count in zip(self.rows, self.counts, strict=True):
            end = start + count
            shares = {n: outputs[n][start:end] if row.request else outputs[n][start] for n in names}
            results.append(RowResult(row.index, row.id, shares))
            start = end
        return results

    def failed(self, error: str) -> list[RowResult]:
        """Every row of the batch, failed with `error`."""
        return [RowResult(row.index, row.id, None, error) for row in self.rows]

    def singles(self) -> list[Batch]:
        """One batch per row, to find which rows of a refused batch are at fault."""
        return [_alone(row, True) for row in self.rows]


def _leading(row: Row) -> int | None:
    """How many rows of the batch dimension `row` takes, or None if it cannot stack."""
    if not row.request:
        return 1
    leads = {a.shape[0] if a.ndim else None for a in row.inputs.values()}
    if len(leads) != 1:
        return None
    lead = leads.pop()
    return lead if lead else None


def _batched(row: Row) -> dict[str, np.ndarray]:
    """The row's tensors with their batch dimension."""
    if row.request:
        return dict(row.inputs)
    return {name: array[np.newaxis] for name, array in row.inputs.items()}


def _alone(row: Row, batching: bool) -> Batch:
    """A request holding `row` alone."""
    count = _leading(row) if batching else None
    if count is None:
        return Batch((row,), dict(row.inputs))
    return Batch((row,), _batched(row), (count,))


def _stack(rows: list[Row], counts: list[int]) -> Batch:
    if len(rows) == 1:
        return Batch((rows[0],), _batched(rows[0]), (counts[0],))
    names = list(rows[0].inputs)
    parts = [_batched(row) for row in rows]
    inputs = {name: np.concatenate([p[name] for p in parts]) for name in names}
    return Batch(tuple(rows), inputs, tuple(counts))


class _Group:
    """Rows waiting to fill one batch, and how many batch rows they take."""

    __slots__ = ("counts", "rows", "total")

    def __init__(self) -> None:
        self.rows: list[Row] = []
        self.counts: list[int] = []
        self.total = 0

    def batch(self) -> Batch:
        return _stack(self.rows, self.counts)


def _key(row: Row) -> tuple[Any, ...]:
    """What rows must share to stack: input names, dtypes and per-row shapes."""
    if len(row.inputs) == 1:
        ((name, a),) = row.inputs.items()
        return ((name, a.dtype, a.shape[1:] if row.request else a.shape),)
    return tuple(
        (name, a.dtype, a.shape[1:] if row.request else a.shape)
        for name, a in sorted(row.inputs.items(), key=lambda item: item[0])
    )


class Grouper:
    """Rows into batches of at most `batch_size` rows of the batch dimension.

    Rows stack when their tensors have the same names, datatypes and per-row shapes, so a
    row that does not fit the model (a wrong shape) waits for its own kind instead of
    breaking a batch of good ones. Rows that cannot stack at all, and every row of a model
    that does not batch, go alone. At most `max_open` groups wait for rows at once (the
    oldest is sent when another would open), which bounds the rows held. Pure state: the
    caller sends what `add` and `flush` return.
    """

    def __init__(self, batch_size: int, batching: bool, max_open: int = 16) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.batch_size = batch_size
        self.batching = batching
        self.max_open = max_open
        self._open: OrderedDict[tuple[Any, ...], _Group] = OrderedDict()

    @property
    def held(self) -> int:
        """Rows waiting for their batch to fill."""
        return sum(len(group.rows) for group in self._open.values())

    def add(self, row: Row) -> list[Batch]:
        """Take `row`; returns the batches it completed (none, one, or an older group
        pushed out)."""
        count = _leading(row) if self.batching else None
        if count is None or count >= self.batch_size:
            return [_alone(row, self.batching)]
        key = _key(row)
        ready: list[Batch] = []
        group = self._open.get(key)
        if group is not None and group.total + count > self.batch_size:
            ready.append(self._open.pop(key).batch())
            group = None
        if group is None:
            if len(self._open) >= self.max_open:
                ready.append(self._open.popitem(last=False)[1].batch())
            group = self._open[key] = _Group()
        group.rows.append(row)
        group.counts.append(count)
        group.total += count
        if group.total == self.batch_size:
            ready.append(self._open.pop(key).batch())
        return ready

    def flush(self) -> list[Batch]:
        """Every group still open, as batches (the input has ended)."""
        ready = [group.batch() for group in self._open.values()]
        self._open.clear()
        return ready
