"""Readers, one per input format: each turns its file (or folder) into rows with ids, their
values mapped onto the model's inputs and converted to its datatypes.

- npy: row i is `array[i]`, for the model's single input; its id is i.
- npz: row i is `arrays[key][i]` for an array named like each input; its id is i.
- jsonl: a line is a v2 request (`{"id", "inputs": [{name, datatype, shape, data}]}`),
  sent as written, or a row of named inputs (`{"input": [...]}`); its id is the line's
  `id`, else its line number (from 1). Blank lines are no rows.
- csv, parquet: a record is a row; its id is the `--id-column` value, else i.
- images: each image file under the folder is a row, prepared as the model declares
  (`salvo_client.batch.images`); its id is its path relative to the folder.

Columns (CSV and Parquet): a column named like the input holds the whole tensor (a list
in Parquet; in CSV a number, or a JSON list as text); otherwise the columns `NAME_0`,
`NAME_1`, ... hold its values flattened in row-major order. `--input NAME=SPEC` maps an
input elsewhere: an npz array or JSONL key (`SPEC` is its name), or columns (`a,b,c`, or
`prefix*` for `prefix0`, `prefix1`, ... in numeric order).

Rows are read lazily; a row that cannot be read (bad JSON, a bad image, text where a number
belongs) comes with its error and the job goes on. Anything that would fail every row (a
missing column, an array of the wrong shape) is a BatchError before anything is sent.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import os
import re
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from salvo_client.batch.errors import BatchError, missing_extra
from salvo_client.batch.images import IMAGE_SUFFIXES, ImagePrep, image_prep, load_image
from salvo_client.batch.model import ModelSpec, TensorSpec
from salvo_client.batch.rows import Row, RowId, to_tensor
from salvo_client.tensors import WIRE_DTYPES

__all__ = [
    "FORMATS",
    "Source",
    "detect_format",
    "file_digest",
    "open_source",
    "parse_input_map",
]

FORMATS = ("npy", "npz", "jsonl", "csv", "parquet", "images")

SUFFIXES: dict[str, str] = {
    ".npy": "npy",
    ".npz": "npz",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".csv": "csv",
    ".parquet": "parquet",
    ".pq": "parquet",
}
"""Input formats by file suffix; a directory is a folder of images."""


def detect_format(path: Path) -> str:
    """The input format of `path`, from its suffix (a directory: images)."""
    if path.is_dir():
        return "images"
    fmt = SUFFIXES.get(path.suffix.lower())
    if fmt is None:
        raise BatchError(
            f"{path}: cannot tell its format from the suffix {path.suffix!r}; "
            f"give --format ({', '.join(FORMATS)})"
        )
    return fmt


def parse_input_map(specs: Sequence[str]) -> dict[str, str]:
    """`--input NAME=SPEC` flags as {input name: SPEC}."""
    mapping: dict[str, str] = {}
    for spec in specs:
        name, sep, value = spec.partition("=")
        name, value = name.strip(), value.strip()
        if not sep or not name or not value:
            raise BatchError(f"--input {spec!r}: expected NAME=SPEC, e.g. image=pixels")
        if name in mapping:
            raise BatchError(f"--input {name}: given twice")
        mapping[name] = value
    return mapping


def file_digest(path: Path) -> str:
    """SHA-256 of a file's content, read in 1 MiB pieces."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


class Source(ABC):
    """One input: its rows, how many there are, and what identifies its content."""

    format: ClassVar[str]

    def __init__(self, path: Path, spec: ModelSpec) -> None:
        self.path = path
        self.spec = spec

    @abstractmethod
    def count(self) -> int:
        """How many rows the input holds (for the progress bar)."""

    @abstractmethod
    def rows(self) -> Iterator[Row]:
        """Every row, in input order, with `index` counting from 0."""

    def fingerprint(self) -> dict[str, Any]:
        """What a resumed job must find unchanged: by default the file's content."""
        return {"format": self.format, "sha256": file_digest(self.path)}


def _row(index: int, row_id: RowId, read: Callable[..., dict[str, np.ndarray]], *args: Any) -> Row:
    """A row from `read(*args)` (its tensors by input name), or the error reading it."""
    try:
        return Row(index, row_id, read(*args))
    except ValueError as exc:
        return Row(index, row_id, error=str(exc))


def _check_fits(tensor: TensorSpec, shape: tuple[int, ...], what: str) -> None:
    """BatchError unless rows of `shape` can be `tensor`'s (same dims, or as many values)."""
    dims = tensor.dims
    same = len(shape) == len(dims) and all(
        d < 0 or d == s for d, s in zip(dims, shape, strict=True)
    )
    if same or (tensor.fixed and math.prod(shape) == math.prod(dims)):
        return
    raise BatchError(
        f"{what}: rows of shape {list(shape)} do not fit input '{tensor.name}' (dims {list(dims)})"
    )


def _no_mapping(fmt: str, mapping: Mapping[str, str]) -> None:
    if mapping:
        raise BatchError(f"--input does not apply to {fmt} input")


# --------------------------------------------------------------------------- npy, npz


class NpySource(Source):
    """A .npy array whose rows (first axis) are the model's single input."""

    format = "npy"

    def __init__(self, path: Path, spec: ModelSpec, mapping: Mapping[str, str]) -> None:
        super().__init__(path, spec)
        _no_mapping("npy", mapping)
        if len(spec.inputs) != 1:
            raise BatchError(
                f"{path}: a .npy file holds one array, but model '{spec.name}' takes "
                f"{len(spec.inputs)} inputs; put them in an .npz, one array per input"
            )
        self.tensor = spec.inputs[0]
        try:
            # Memory-mapped: rows are read as they are sent. Never unpickled.
            self.array = np.load(path, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise BatchError(f"{path}: cannot read: {exc}") from None
        if self.array.ndim == 0:
            raise BatchError(f"{path}: holds a scalar, not rows")
        _check_fits(self.tensor, self.array.shape[1:], str(path))

    READ_ROWS = 1024
    """Rows read from the memory map at once: slicing it row by row costs more than the
    rest of reading."""

    def count(self) -> int:
        return int(self.array.shape[0])

    def rows(self) -> Iterator[Row]:
        for start in range(0, self.count(), self.READ_ROWS):
            chunk = np.asarray(self.array[start : start + self.READ_ROWS])
            for offset in range(len(chunk)):
                yield _row(start + offset, start + offset, self._tensors, chunk[offset])

    def _tensors(self, values: np.ndarray) -> dict[str, np.ndarray]:
        return {self.tensor.name: to_tensor(self.tensor, values)}


class NpzSource(Source):
    """An .npz archive with one array per input (named like it, or mapped with --input),
    all with the same number of rows."""

    format = "npz"

    def __init__(self, path: Path, spec: ModelSpec, mapping: Mapping[str, str]) -> None:
        super().__init__(path, spec)
        try:
            with np.load(path, allow_pickle=False) as archive:
                keys = list(archive.files)
                self.arrays: dict[str, np.ndarray] = {}
                for tensor in spec.inputs:
                    key = mapping.get(tensor.name, tensor.name)
                    if key not in keys:
                        raise BatchError(
                            f"{path}: no array {key!r} for input '{tensor.name}' (arrays: "
                            f"{', '.join(keys) or 'none'}); map one with --input "
                            f"{tensor.name}=KEY"
                        )
                    self.arrays[tensor.name] = archive[key]
        except (OSError, ValueError) as exc:
            raise BatchError(f"{path}: cannot read: {exc}") from None
        lengths = {name: a.shape[0] if a.ndim else None for name, a in self.arrays.items()}
        if None in lengths.values() or len(set(lengths.values())) != 1:
            raise BatchError(f"{path}: the inputs' arrays differ in rows: {lengths}")
        for tensor in spec.inputs:
            _check_fits(tensor, self.arrays[tensor.name].shape[1:], f"{path}:{tensor.name}")
        self.tensors = {t.name: t for t in spec.inputs}

    def count(self) -> int:
        return int(next(iter(self.arrays.values())).shape[0])

    def rows(self) -> Iterator[Row]:
        for i in range(self.count()):
            yield _row(i, i, self._tensors, i)

    def _tensors(self, i: int) -> dict[str, np.ndarray]:
        return {n: to_tensor(t, self.arrays[n][i]) for n, t in self.tensors.items()}


# --------------------------------------------------------------------------- JSONL


def _request_tensors(request: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """The tensors of a v2 inference request in JSON (`inputs`: name, datatype, shape,
    data), each of the datatype and shape it declares."""
    tensors: dict[str, np.ndarray] = {}
    for n, item in enumerate(request["inputs"]):
        if not isinstance(item, dict) or not {"name", "datatype", "shape", "data"} <= set(item):
            raise ValueError(f"inputs[{n}]: needs name, datatype, shape and data")
        name, datatype, shape = item["name"], item["datatype"], item["shape"]
        if datatype not in WIRE_DTYPES or datatype == "BF16":
            raise ValueError(f"input '{name}': datatype {datatype!r} cannot be read from JSON")
        if not isinstance(shape, list) or not all(
            isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
        ):
            raise ValueError(f"input '{name}': shape must be a list of sizes, got {shape!r}")
        array = to_tensor(TensorSpec(str(name), datatype, tuple(shape)), item["data"])
        if array.shape != tuple(shape):
            raise ValueError(f"input '{name}': {array.size} values do not fill shape {shape}")
        tensors[str(name)] = array
    return tensors


class JsonlSource(Source):
    """One JSON object a line: a v2 inference request (`{"id", "inputs": [...]}`), sent as
    it is, or a row of named inputs (`{"input": [...]}`, with an optional `id`)."""

    format = "jsonl"

    def __init__(self, path: Path, spec: ModelSpec, mapping: Mapping[str, str]) -> None:
        super().__init__(path, spec)
        self.keys = {t.name: mapping.get(t.name, t.name) for t in spec.inputs}
        # `id` names the row unless the model (or a mapping) uses it for an input.
        self.id_key = None if "id" in self.keys.values() else "id"
        self.requests_allowed = "inputs" not in self.keys.values()

    def count(self) -> int:
        with open(self.path, "rb") as f:
            return sum(1 for line in f if line.strip())

    def rows(self) -> Iterator[Row]:
        index = 0
        with open(self.path, "rb") as f:
            for number, raw in enumerate(f, start=1):
                if not raw.strip():
                    continue
                yield self._parse(index, number, raw)
                index += 1

    def _parse(self, index: int, number: int, raw: bytes) -> Row:
        try:
            obj = json.loads(raw)
        except ValueError as exc:
            return Row(index, number, error=f"line {number}: not valid JSON: {exc}")
        if not isinstance(obj, dict):
            return Row(index, number, error=f"line {number}: expected a JSON object")
        row_id = obj.get(self.id_key) if self.id_key else None
        if not isinstance(row_id, int | str) or isinstance(row_id, bool) or row_id == "":
            row_id = number
        try:
            if self.requests_allowed and isinstance(obj.get("inputs"), list):
                return Row(index, row_id, _request_tensors(obj), request=True)
            return Row(index, row_id, self._named(obj))
        except ValueError as exc:
            return Row(index, row_id, error=f"line {number}: {exc}")

    def _named(self, obj: Mapping[str, Any]) -> dict[str, np.ndarray]:
        tensors = {}
        for tensor in self.spec.inputs:
            key = self.keys[tensor.name]
            if key not in obj:
                raise ValueError(f"no value for input '{tensor.name}' (key {key!r})")
            tensors[tensor.name] = to_tensor(tensor, obj[key])
        return tensors


# --------------------------------------------------------------------------- CSV, Parquet


@dataclass(frozen=True, slots=True)
class _Columns:
    """Where one input's values are: one column holding the tensor, or several holding its
    values flattened in order."""

    tensor: TensorSpec
    names: tuple[str, ...]
    whole: bool


def _numbered(prefix: str, columns: Sequence[str]) -> list[str]:
    pattern = re.compile(re.escape(prefix) + r"(\d+)")
    found = sorted(
        ((int(m.group(1)), c) for c in columns if (m := pattern.fullmatch(c))),
        key=lambda item: item[0],
    )
    return [c for _, c in found]


def _plan_columns(
    spec: ModelSpec, mapping: Mapping[str, str], columns: Sequence[str], where: str
) -> list[_Columns]:
    """Which columns hold each input (see the module's docstring)."""
    present = set(columns)
    plans = []
    for tensor in spec.inputs:
        mapped = mapping.get(tensor.name)
        if mapped is None:
            if tensor.name in present:
                plans.append(_Columns(tensor, (tensor.name,), True))
                continue
            names = _numbered(f"{tensor.name}_", columns)
            if not names:
                raise BatchError(
                    f"{where}: no column {tensor.name!r} nor {tensor.name}_0, "
                    f"{tensor.name}_1, ... for input '{tensor.name}'; map columns with "
                    f"--input {tensor.name}=COL1,COL2,... or --input {tensor.name}=PREFIX*"
                )
        elif mapped.endswith("*"):
            names = _numbered(mapped[:-1], columns)
            if not names:
                raise BatchError(f"{where}: no column matches --input {tensor.name}={mapped}")
        else:
            names = [c.strip() for c in mapped.split(",")]
            missing = [c for c in names if c not in present]
            if missing:
                raise BatchError(f"{where}: no column {', '.join(map(repr, missing))}")
            if len(names) == 1:
                plans.append(_Columns(tensor, (names[0],), True))
                continue
        if tensor.fixed and len(names) != math.prod(tensor.dims):
            raise BatchError(
                f"{where}: {len(names)} columns for input '{tensor.name}', whose dims "
                f"{list(tensor.dims)} take {math.prod(tensor.dims)} values"
            )
        plans.append(_Columns(tensor, tuple(names), False))
    return plans


def _check_mapping(spec: ModelSpec, mapping: Mapping[str, str]) -> None:
    unknown = [name for name in mapping if spec.input(name) is None]
    if unknown:
        raise BatchError(
            f"--input {', '.join(unknown)}: model '{spec.name}' has no such input "
            f"(inputs: {', '.join(t.name for t in spec.inputs)})"
        )


def _cell(text: str) -> Any:
    """A CSV cell: a JSON list as text holds a whole tensor; anything else is one value."""
    stripped = text.strip()
    if stripped.startswith("["):
        try:
            return json.loads(stripped)
        except ValueError as exc:
            raise ValueError(f"not a JSON list: {exc}") from None
    return stripped


class CsvSource(Source):
    """A CSV file with a header (UTF-8, with or without the byte-order mark spreadsheets
    write); see the module's docstring for how columns map to inputs."""

    format = "csv"

    def __init__(
        self, path: Path, spec: ModelSpec, mapping: Mapping[str, str], id_column: str | None
    ) -> None:
        super().__init__(path, spec)
        with open(path, newline="", encoding="utf-8-sig") as f:
            header = next(csv.reader(f), None)
        if not header:
            raise BatchError(f"{path}: no header row")
        self.header = [h.strip() for h in header]
        self.plans = _plan_columns(spec, mapping, self.header, str(path))
        self.position = {name: i for i, name in enumerate(self.header)}
        if id_column is not None and id_column not in self.position:
            raise BatchError(f"{path}: no id column {id_column!r}")
        self.id_column = id_column

    def count(self) -> int:
        with open(self.path, newline="", encoding="utf-8-sig") as f:
            return max(sum(1 for record in csv.reader(f) if record) - 1, 0)

    def rows(self) -> Iterator[Row]:
        width = len(self.header)
        with open(self.path, newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f)
            next(reader, None)
            index = 0
            for record in reader:
                if not record:
                    continue
                row_id: RowId = index
                if self.id_column is not None and len(record) == width:
                    row_id = record[self.position[self.id_column]]
                if len(record) != width:
                    yield Row(
                        index,
                        row_id,
                        error=f"record {index}: {len(record)} cells for {width} columns",
                    )
                else:
                    yield _row(index, row_id, self._tensors, record)
                index += 1

    def _tensors(self, record: list[str]) -> dict[str, np.ndarray]:
        tensors = {}
        for plan in self.plans:
            cells = [record[self.position[c]] for c in plan.names]
            value = _cell(cells[0]) if plan.whole else cells
            tensors[plan.tensor.name] = to_tensor(plan.tensor, value)
        return tensors


def _pyarrow_parquet() -> Any:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise missing_extra("pyarrow", "Parquet") from None
    return pq


def _parquet_id(value: Any, index: int) -> RowId:
    if value is None:
        return index
    if isinstance(value, int | str) and not isinstance(value, bool):
        return value
    return str(value)


class ParquetSource(Source):
    """A Parquet file: list columns holding whole tensors, or scalar columns flattened (see
    the module's docstring). Read a record batch at a time."""

    format = "parquet"
    READ_ROWS = 4096

    def __init__(
        self, path: Path, spec: ModelSpec, mapping: Mapping[str, str], id_column: str | None
    ) -> None:
        super().__init__(path, spec)
        pq = _pyarrow_parquet()
        try:
            self.file = pq.ParquetFile(path)
        except Exception as exc:  # pyarrow raises its own kinds for a file that is no Parquet
            raise BatchError(f"{path}: cannot read as Parquet: {exc}") from None
        names = list(self.file.schema_arrow.names)
        self.plans = _plan_columns(spec, mapping, names, str(path))
        if id_column is not None and id_column not in names:
            raise BatchError(f"{path}: no id column {id_column!r}")
        self.id_column = id_column
        needed = {c for plan in self.plans for c in plan.names}
        if id_column is not None:
            needed.add(id_column)
        self.columns = [c for c in names if c in needed]

    def count(self) -> int:
        return int(self.file.metadata.num_rows)

    def rows(self) -> Iterator[Row]:
        index = 0
        for batch in self.file.iter_batches(batch_size=self.READ_ROWS, columns=self.columns):
            data = {name: batch.column(name).to_pylist() for name in self.columns}
            for r in range(batch.num_rows):
                row_id = (
                    index if self.id_column is None else _parquet_id(data[self.id_column][r], index)
                )
                yield _row(index, row_id, self._tensors, data, r)
                index += 1

    def _tensors(self, data: Mapping[str, list[Any]], r: int) -> dict[str, np.ndarray]:
        tensors = {}
        for plan in self.plans:
            value = data[plan.names[0]][r] if plan.whole else [data[c][r] for c in plan.names]
            tensors[plan.tensor.name] = to_tensor(plan.tensor, value)
        return tensors


# --------------------------------------------------------------------------- images


class ImageFolderSource(Source):
    """Every image file under a folder (recursively, by relative path), prepared as the
    model's config declares (`salvo_client.batch.images`)."""

    format = "images"

    def __init__(self, path: Path, spec: ModelSpec, mapping: Mapping[str, str]) -> None:
        super().__init__(path, spec)
        _no_mapping("a folder of images", mapping)
        self.prep: ImagePrep = image_prep(spec)
        try:
            import PIL  # noqa: F401
        except ImportError:
            raise missing_extra("pillow", "reading a folder of images") from None
        self.files = sorted(
            (
                p.relative_to(path).as_posix()
                for p in path.rglob("*")
                if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()
            ),
        )

    def count(self) -> int:
        return len(self.files)

    def rows(self) -> Iterator[Row]:
        name = self.prep.input.name
        for i, relative in enumerate(self.files):
            try:
                tensor = load_image(self.path / relative, self.prep)
            except Exception as exc:  # Pillow raises many kinds for a file that is no image
                yield Row(i, relative, error=f"cannot read image: {exc}")
            else:
                yield Row(i, relative, {name: tensor})

    def fingerprint(self) -> dict[str, Any]:
        """The files' paths, sizes and modification times (not their content: a folder
        may hold millions of images), and the preprocessing."""
        digest = hashlib.sha256()
        for relative in self.files:
            stat = os.stat(self.path / relative)
            digest.update(f"{relative}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
        return {"format": self.format, "files": digest.hexdigest(), "image": self.prep.describe()}


def open_source(
    path: Path,
    fmt: str,
    spec: ModelSpec,
    mapping: Mapping[str, str],
    id_column: str | None,
) -> Source:
    """The reader for `path` in format `fmt`; BatchError for an input it cannot use."""
    _check_mapping(spec, mapping)
    if id_column is not None and fmt not in ("csv", "parquet"):
        raise BatchError(f"--id-column applies to CSV and Parquet input, not {fmt}")
    if fmt == "images":
        if not path.is_dir():
            raise BatchError(f"{path}: images are read from a folder")
        return ImageFolderSource(path, spec, mapping)
    if not path.is_file():
        raise BatchError(f"{path}: no such file")
    if fmt == "npy":
        return NpySource(path, spec, mapping)
    if fmt == "npz":
        return NpzSource(path, spec, mapping)
    if fmt == "jsonl":
        return JsonlSource(path, spec, mapping)
    if fmt == "csv":
        return CsvSource(path, spec, mapping, id_column)
    if fmt == "parquet":
        return ParquetSource(path, spec, mapping, id_column)
    raise BatchError(f"unknown format {fmt!r} (formats: {', '.join(FORMATS)})")
