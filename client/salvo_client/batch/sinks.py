"""Writers, one per output format: every row once, in input order, keyed by its id.

- npz: arrays `id`, `error` ('' where the row scored) and one per output; row i of each
  is input row i, and a failed row's outputs are NaN (0 for integers, b"" for BYTES).
- jsonl: a line per row, `{"id": ..., "outputs": {name: values}}` or
  `{"id": ..., "error": "..."}`.
- csv: columns `id`, `error`, then each output flattened as `NAME_0`, `NAME_1`, ...
- parquet: columns `id`, `error` (null where the row scored) and a list column per output.

A .npy file holds one array, so .npy input gets an .npz output; a folder of images gets a
JSONL file beside it. Each writer writes a temporary file and renames it into place, so a
reader never sees half an output.
"""

from __future__ import annotations

import csv
import json
import math
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from salvo_client.batch.errors import BatchError, missing_extra
from salvo_client.batch.model import TensorSpec
from salvo_client.batch.rows import RowId, RowResult
from salvo_client.batch.sources import SUFFIXES

__all__ = ["SINK_FORMATS", "default_output", "output_format", "write_output"]

SINK_FORMATS: dict[str, str] = {s: f for s, f in SUFFIXES.items() if f != "npy"}
"""Output formats by the suffix of `--output`: the input formats' suffixes, but `.npy`,
which holds one array and cannot carry ids beside the outputs."""

_DEFAULT_SINK = {"npy": "npz", "npz": "npz", "jsonl": "jsonl", "csv": "csv", "parquet": "parquet"}


def default_output(path: Path, input_format: str) -> Path:
    """Where outputs go by default: beside the input, `x.npy` → `x.out.npz`, `rows.jsonl`
    → `rows.out.jsonl`, a folder `imgs/` → `imgs.out.jsonl`."""
    if input_format == "images":
        return path.parent / f"{path.name}.out.jsonl"
    suffix = ".npz" if input_format == "npy" else path.suffix
    return path.with_name(f"{path.stem}.out{suffix}")


def output_format(path: Path, input_format: str) -> str:
    """The format written to `path`: its suffix's, else the input's own."""
    return SINK_FORMATS.get(path.suffix.lower(), _DEFAULT_SINK.get(input_format, "jsonl"))


def _jsonable(array: np.ndarray) -> Any:
    if array.dtype.kind == "f" and array.dtype.itemsize < 8:
        # Each value as the shortest decimal that reads back as the same float32 (or 16),
        # not the long decimal of its float64 widening.
        return array.astype(str).astype(np.float64).tolist()
    if array.dtype == object:
        decoded = [
            item.decode("utf-8", "backslashreplace") if isinstance(item, bytes) else item
            for item in array.reshape(-1)
        ]
        return np.array(decoded, dtype=object).reshape(array.shape).tolist()
    return array.tolist()


def _ids(results: Sequence[RowResult]) -> np.ndarray:
    """The ids as one array: integers where every id is one, text otherwise."""
    ids: list[RowId] = [r.id for r in results]
    if all(isinstance(i, int) for i in ids):
        return np.array(ids, dtype=np.int64)
    return np.array([str(i) for i in ids], dtype=str)


def _row_shape(results: Sequence[RowResult], spec: TensorSpec) -> tuple[int, ...]:
    """The one shape of `spec` in every scored row; BatchError where rows differ."""
    shapes = {r.outputs[spec.name].shape for r in results if r.outputs is not None}
    if len(shapes) > 1:
        raise BatchError(
            f"output '{spec.name}' differs in shape between rows ({sorted(shapes)[:3]}...); "
            "write JSONL instead (--output FILE.jsonl)"
        )
    return shapes.pop() if shapes else tuple(max(d, 0) for d in spec.dims)


def _fill(dtype: np.dtype) -> Any:
    """A failed row's value: NaN where the type has one."""
    return np.nan if dtype.kind in "fc" else (b"" if dtype.kind in "OS" else 0)


def _column(results: Sequence[RowResult], spec: TensorSpec) -> np.ndarray:
    """One output over every row, failed rows filled."""
    shape = _row_shape(results, spec)
    values: list[np.ndarray | None] = [
        None if r.outputs is None else r.outputs[spec.name] for r in results
    ]
    scored = [v for v in values if v is not None]
    if spec.datatype == "BYTES":  # .npz holds no objects without pickle: fixed-width bytes
        values = [None if v is None else v.astype(bytes) for v in values]
        widths = [v.dtype for v in values if v is not None]
        dtype = np.result_type(*widths) if widths else np.dtype("S1")
    else:
        dtype = scored[0].dtype if scored else spec.dtype
    column = np.full((len(results), *shape), _fill(dtype), dtype=dtype)
    for i, value in enumerate(values):
        if value is not None:
            column[i] = value
    return column


def _atomic(path: Path, write: Callable[[Path], None]) -> None:
    """Write through a temporary file beside `path`, renamed over it once complete."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp")
    try:
        write(temporary)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def _write_npz(path: Path, results: Sequence[RowResult], outputs: Sequence[TensorSpec]) -> None:
    arrays = {"id": _ids(results), "error": np.array([r.error or "" for r in results], dtype=str)}
    for spec in outputs:
        if spec.name in arrays:
            raise BatchError(f"output '{spec.name}' clashes with the .npz array of that name")
        arrays[spec.name] = _column(results, spec)

    def write(temporary: Path) -> None:
        with open(temporary, "wb") as f:
            np.savez(f, **arrays)  # type: ignore[arg-type]

    _atomic(path, write)


def _jsonl_lines(results: Sequence[RowResult]) -> Iterator[str]:
    for r in results:
        if r.outputs is None:
            yield json.dumps({"id": r.id, "error": r.error})
        else:
            outputs = {name: _jsonable(value) for name, value in r.outputs.items()}
            yield json.dumps({"id": r.id, "outputs": outputs})


def _write_jsonl(path: Path, results: Sequence[RowResult], outputs: Sequence[TensorSpec]) -> None:
    def write(temporary: Path) -> None:
        with open(temporary, "w", encoding="utf-8") as f:
            for line in _jsonl_lines(results):
                f.write(line + "\n")

    _atomic(path, write)


def _text(value: Any) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", "backslashreplace")
    return str(value)


def _cells(array: np.ndarray) -> list[str]:
    """One output's values as CSV cells: numbers as numpy's shortest text that reads back
    as the same value, BYTES as UTF-8 text."""
    flat = array.reshape(-1)
    if flat.dtype == object:
        return [_text(v) for v in flat]
    return [str(v) for v in flat.astype(str).tolist()]


def _write_csv(path: Path, results: Sequence[RowResult], outputs: Sequence[TensorSpec]) -> None:
    sizes = {spec.name: math.prod(_row_shape(results, spec)) for spec in outputs}
    header = ["id", "error"] + [
        f"{spec.name}_{i}" for spec in outputs for i in range(sizes[spec.name])
    ]

    def write(temporary: Path) -> None:
        with open(temporary, "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            writer.writerow(header)
            for r in results:
                cells = [_text(r.id), r.error or ""]
                for spec in outputs:
                    if r.outputs is None:
                        cells += [""] * sizes[spec.name]
                    else:
                        cells += _cells(r.outputs[spec.name])
                writer.writerow(cells)

    _atomic(path, write)


def _write_parquet(path: Path, results: Sequence[RowResult], outputs: Sequence[TensorSpec]) -> None:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise missing_extra("pyarrow", "Parquet") from None
    ids = _ids(results)
    columns: dict[str, Any] = {
        "id": pa.array(ids.tolist(), type=pa.int64() if ids.dtype.kind == "i" else pa.string()),
        "error": pa.array([r.error for r in results], type=pa.string()),
    }
    for spec in outputs:
        if spec.name in columns:
            raise BatchError(f"output '{spec.name}' clashes with the Parquet column of that name")
        scored = [r.outputs[spec.name] for r in results if r.outputs is not None]
        dtype = scored[0].dtype if scored else spec.dtype
        rank = max((a.ndim for a in scored), default=len(spec.dims))
        kind = pa.binary() if spec.datatype == "BYTES" else pa.from_numpy_dtype(dtype)
        for _ in range(rank):
            kind = pa.list_(kind)
        values = [None if r.outputs is None else r.outputs[spec.name].tolist() for r in results]
        columns[spec.name] = pa.array(values, type=kind)
    table = pa.table(columns)
    _atomic(path, lambda temporary: pq.write_table(table, temporary))


_WRITERS: dict[str, Callable[[Path, Sequence[RowResult], Sequence[TensorSpec]], None]] = {
    "npz": _write_npz,
    "jsonl": _write_jsonl,
    "csv": _write_csv,
    "parquet": _write_parquet,
}


def write_output(
    path: Path, fmt: str, results: Sequence[RowResult], outputs: Sequence[TensorSpec]
) -> None:
    """Write `results` (every row, in input order) to `path` in format `fmt`, with the
    columns of `outputs`."""
    _WRITERS[fmt](path, results, outputs)
