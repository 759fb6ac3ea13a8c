"""Model files onto a device, and forward passes on numpy batches.

Two formats are accepted: TorchScript (`model.pt`, read by TorchScript's own C++ loader)
and torch.export (`model.pt2`). Python's pickle is never run on a model file: a pickle or
a `torch.save` checkpoint is refused, and a `.pt2` archive is checked for pickled payloads
and loaded with its pickled example inputs removed (torch.export's loader would otherwise
unpickle them, falling back to arbitrary objects).
"""

from __future__ import annotations

import contextlib
import functools
import io
import json
import logging
import math
import threading
import time
import warnings
import zipfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .config import ModelConfig
from .datatypes import DATATYPES
from .errors import ConfigError, ModelFailed, Overloaded, SalvoError

log = logging.getLogger(__name__)

# Request arrays are views of the request's read-only bytes, and torch warns (once) that it
# cannot mark a tensor read-only; the model never writes to its inputs. Filtered here, once,
# rather than around every batch: a `warnings.catch_warnings` block a batch cost the event
# loop a filter-list copy and rebuild each time, and is not thread-safe across instances.
warnings.filterwarnings(
    "ignore", message="The given NumPy array is not writable", category=UserWarning
)

MODEL_FILES = ("model.pt", "model.pt2")
PICKLE_SUFFIXES = (".pkl", ".pickle", ".pth", ".bin", ".joblib", ".ckpt")
_PICKLE_MAGIC = (b"\x80", b"(", b"]", b"}")  # protocol 2+ opcode, and protocol 0/1 openers

TORCH_DTYPES: dict[str, torch.dtype] = {
    "BOOL": torch.bool,
    "UINT8": torch.uint8,
    "UINT16": torch.uint16,
    "UINT32": torch.uint32,
    "UINT64": torch.uint64,
    "INT8": torch.int8,
    "INT16": torch.int16,
    "INT32": torch.int32,
    "INT64": torch.int64,
    "FP16": torch.float16,
    "FP32": torch.float32,
    "FP64": torch.float64,
    "BF16": torch.bfloat16,
}


PRECISIONS: dict[str, torch.dtype | None] = {
    "fp32": None,
    "fp16": torch.float16,
    "bf16": torch.bfloat16,
}
"""The dtype a model computes in per `optimization.precision`; None leaves it as exported."""


def resolve_device(device: str) -> torch.device:
    """`auto` is CUDA where a GPU is present, else the CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    resolved = torch.device(device)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {device!r} requested but CUDA is not available")
    return resolved


def find_model_file(version_dir: Path) -> Path:
    """The model file in a version directory; refuses pickles with a clear error."""
    for name in MODEL_FILES:
        path = version_dir / name
        if path.is_file():
            return path
    pickles = sorted(p.name for p in version_dir.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise ConfigError(
            f"{version_dir / pickles[0]}: refusing a pickle file: Salvo never unpickles model "
            "files; save the model with torch.jit.save (model.pt) or torch.export.save (model.pt2)"
        )
    raise ConfigError(f"{version_dir}: no model file (expected one of {', '.join(MODEL_FILES)})")


def _open_archive(path: Path) -> zipfile.ZipFile:
    with path.open("rb") as f:
        head = f.read(2)
    if not zipfile.is_zipfile(path):
        kind = "a pickle" if head[:1] in _PICKLE_MAGIC else "not a zip archive"
        raise ConfigError(
            f"{path}: refusing to load: the file is {kind}; Salvo loads only TorchScript "
            "(torch.jit.save) and torch.export (torch.export.save) archives and never unpickles"
        )
    return zipfile.ZipFile(path)


def _load_torchscript(path: Path, device: torch.device) -> Any:
    with _open_archive(path) as archive:
        names = archive.namelist()
    if not any("/code/" in n for n in names) or not any(n.endswith("constants.pkl") for n in names):
        raise ConfigError(
            f"{path}: refusing to load: this is a torch.save checkpoint (a pickle), not "
            "TorchScript; save the model with torch.jit.save"
        )
    module = torch.jit.load(str(path), map_location=device)
    module.eval()
    return module


def _load_exported(path: Path, device: torch.device) -> Any:
    buffer = io.BytesIO()
    with _open_archive(path) as src, zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as dst:
        for info in src.infolist():
            name = info.filename
            data = src.read(info)
            if name.endswith("_config.json") and "/data/" in name:
                payloads = json.loads(data).get("config", {})
                pickled = [key for key, meta in payloads.items() if meta.get("use_pickle")]
                if pickled:
                    raise ConfigError(
                        f"{path}: refusing to load: entry {pickled[0]!r} is stored as a pickle"
                    )
            elif "/data/weights/" in name and name.endswith(".pt"):
                raise ConfigError(f"{path}: refusing to load: legacy pickled weights {name!r}")
            if "/data/sample_inputs/" in name:
                data = b""  # example inputs are pickled; serving does not need them
            dst.writestr(info, data)
    buffer.seek(0)
    with warnings.catch_warnings():
        # Weights are read straight from the archive's bytes, which are never written.
        warnings.filterwarnings("ignore", message="The given buffer is not writable")
        program = torch.export.load(buffer)
    return program.module().to(device)


@contextlib.contextmanager
def one_torch_thread() -> Iterator[None]:
    """Run the block's forward passes on one intra-op thread, in the calling thread only
    (OpenMP keeps the count per thread), and give the thread its count back after.

    For the event loop's thread, which runs fast CPU models' batches (`execution: auto` or
    `loop`): those passes take well under 2 ms, where a team of two gains little, and the
    team's second thread spins after each pass on the core that gRPC's threads and the
    clients need. Costs under a µs a batch.
    """
    count = torch.get_num_threads()
    if count == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(count)


def torch_threads() -> int:
    """The calling thread's intra-op thread count."""
    return torch.get_num_threads()


def use_torch_threads(count: int) -> None:
    """Give the calling thread `count` intra-op threads (OpenMP keeps the count per thread);
    a few µs when it changes, nothing when it does not."""
    if torch.get_num_threads() != count:
        torch.set_num_threads(count)


def inherit_torch_threads() -> Callable[[], None]:
    """An initializer for the threads that run models: torch's intra-op thread count as the
    calling thread has it (`--torch-threads`, set on the main thread at start-up).

    OpenMP keeps that count per thread, and a new thread starts from OpenMP's default, every
    core; running a model's forward pass there did not change it (tests/integration/
    test_threads.py fails without this). So a model's executor thread ran batches on an
    OpenMP team of every core whatever `--torch-threads` said, and the team's idle member
    spun between batches: most of a core lost on a 2-core machine (measured: a loop of
    batch-16 `mlp` passes on a second thread took 1.29 cores instead of 0.35).
    """
    count = torch.get_num_threads()
    return lambda: torch.set_num_threads(count)


@dataclass(frozen=True, slots=True)
class Timings:
    """Nanoseconds spent on one forward pass, in Triton's three compute phases."""

    input_ns: int
    infer_ns: int
    output_ns: int


class LoadedModel:
    """One model version on its device: numpy batch in, numpy outputs out.

    Calls are safe from several worker threads at once (TorchScript and exported modules
    hold no per-call state); each call runs under `torch.inference_mode`.
    """

    def __init__(self, config: ModelConfig, path: Path, module: Any, device: torch.device):
        self.config = config
        self.path = path
        self.module = module
        self.device = device
        self.compute_dtype = PRECISIONS[config.optimization.precision]
        self.channels_last = config.optimization.channels_last
        self.largest_batch_ns: int | None = None
        """How long the largest batch took at warm-up, once warm (on one thread on the CPU,
        as the event loop runs it); None without warm-up."""
        self._instances: list[_CudaInstance] = []
        """On CUDA, one per instance: its stream, pinned buffers and graphs."""
        if device.type == "cuda":
            self._instances = [_CudaInstance(self) for _ in range(config.instance_count)]

    @classmethod
    def load(cls, config: ModelConfig, version_dir: Path) -> LoadedModel:
        """Load the model file in `version_dir` per `config`. Raises ConfigError."""
        for tensor in (*config.inputs, *config.outputs):
            if tensor.datatype == "BYTES":
                raise ConfigError(
                    f"{version_dir.parent}: tensor {tensor.name!r}: BYTES tensors cannot feed "
                    "or leave a PyTorch model"
                )
        path = find_model_file(version_dir)
        device = resolve_device(config.device)
        loader = _load_torchscript if path.suffix == ".pt" else _load_exported
        try:
            module = loader(path, device)
        except ConfigError:
            raise
        except Exception as exc:  # torch's loaders raise many types; the message is what matters
            raise ConfigError(f"{path}: cannot load: {_first_line(exc)}") from None
        if config.optimization.compile and path.suffix != ".pt2":
            raise ConfigError(
                f"{path}: optimization.compile needs a torch.export model (model.pt2); "
                "TorchScript runs on its own JIT"
            )
        if config.optimization.freeze and path.suffix != ".pt":
            raise ConfigError(
                f"{path}: optimization.freeze applies to TorchScript models (model.pt); "
                "a torch.export model has optimization.compile"
            )
        module = _optimized(module, config)
        if config.optimization.freeze:
            try:
                module = torch.jit.optimize_for_inference(torch.jit.freeze(module))
            except Exception as exc:  # what cannot be frozen is the model's own business
                raise ConfigError(
                    f"{path}: optimization.freeze: cannot freeze the model: "
                    f"{type(exc).__name__}: {_first_line(exc)}"
                ) from None
        model = cls(config, path, module, device)
        if config.optimization.warmup or config.optimization.compile:
            model.warm_up()  # also compiles, so that no request waits for it
        if device.type == "cuda" and config.optimization.cuda_graphs:
            for instance in model._instances:
                instance.capture_graphs()
        elif config.optimization.cuda_graphs:
            log.info("model '%s': optimization.cuda_graphs applies on CUDA only", config.name)
        return model

    def warm_up(self) -> None:
        """Forward passes of zeros at batch 1, each preferred size and the largest, then the
        largest twice more, timed (`largest_batch_ns`).

        The first passes at a shape pick kernels and grow allocator pools (cuDNN's search,
        oneDNN's primitive cache); done here, no request pays for them. Raises ConfigError
        naming the model if it cannot run on zeros of its declared shapes.
        """
        sizes: set[int | None] = {None}
        if self.config.max_batch_size:
            batching = self.config.dynamic_batching
            preferred = batching.preferred_batch_sizes if batching is not None else ()
            sizes = {1, *preferred, self.config.max_batch_size}
        for rows in sorted(sizes, key=lambda r: r or 0):
            batch = () if rows is None else (rows,)
            inputs = [
                np.zeros((*batch, *(max(d, 1) for d in spec.dims)), DATATYPES[spec.datatype].numpy)
                for spec in self.config.inputs
            ]
            self._warm_pass(inputs)
        # The largest twice more, now warm: what a full batch costs (see execution: auto).
        # The calling thread's CPU time, not the clock's: other models load at the same
        # time, and a pass preempted by them would read slow. The faster of two passes.
        # On the CPU, timed on one thread, as the event loop would run it.
        single = one_torch_thread() if self.device.type == "cpu" else contextlib.nullcontext()
        with single:
            for _ in range(2):
                start = time.thread_time_ns()
                self._warm_pass(inputs)
                took = time.thread_time_ns() - start
                self.largest_batch_ns = min(took, self.largest_batch_ns or took)

    def _warm_pass(self, inputs: list[np.ndarray]) -> None:
        try:
            self.run(inputs)
        except SalvoError as exc:
            compiled = " (optimization.compile is on)" if self.config.optimization.compile else ""
            raise ConfigError(f"{self.path}: warm-up failed{compiled}: {exc.message}") from None

    def assemble(self, requests: Sequence[Sequence[np.ndarray]], instance: int = 0) -> list[Any]:
        """One contiguous buffer per input, from several requests' arrays (config order).

        On the CPU these are numpy arrays. On CUDA they are views of `instance`'s pinned
        host buffers, reused batch after batch, so that each input crosses to the device in
        one asynchronous copy; they stay valid until that instance's next batch.
        """
        if len(requests) == 1 and self.device.type == "cpu":
            return list(requests[0])
        buffers: list[Any] = []
        for i in range(len(self.config.inputs)):
            parts = [arrays[i] for arrays in requests]
            if self.device.type == "cpu":
                buffers.append(np.concatenate(parts))
                continue
            rows = sum(part.shape[0] for part in parts) if self.config.max_batch_size else 0
            shape = (rows, *parts[0].shape[1:]) if rows else parts[0].shape
            dtype = _torch_dtype(parts[0].dtype)
            buffer = self._instances[instance].staging(("in", i), shape, dtype)
            if len(parts) == 1:
                buffer.numpy()[...] = parts[0]
            else:
                np.concatenate(parts, out=buffer.numpy())
            buffers.append(buffer)
        return buffers

    def run(self, inputs: Sequence[Any], instance: int = 0) -> tuple[list[np.ndarray], Timings]:
        """Run one forward pass on `inputs` (config input order); outputs in config order.
        On CUDA it runs on `instance`'s stream (and its graphs, where captured).

        Raises ModelFailed when the model raises or returns the wrong number, dtype or rows,
        Overloaded when the batch runs out of device memory.
        """
        if self._instances:
            return self._instances[instance].run(inputs)
        t0 = time.perf_counter_ns()
        tensors = [
            self._prepared(_to_torch(array, spec.datatype, self.device))
            for array, spec in zip(inputs, self.config.inputs, strict=True)
        ]
        t1 = time.perf_counter_ns()
        try:
            with torch.inference_mode():
                raw = self.module(*tensors)
        except Exception as exc:
            raise self._failure(exc, inputs) from None
        t2 = time.perf_counter_ns()
        outputs = [_to_numpy(value) for value in self._collect(raw, _rows(self.config, inputs))]
        t3 = time.perf_counter_ns()
        return outputs, Timings(t1 - t0, t2 - t1, t3 - t2)

    def _failure(self, exc: Exception, inputs: Sequence[Any]) -> SalvoError:
        """What a forward pass that raised `exc` answers: Overloaded for running out of
        device memory (the allocator's cache freed for smaller batches), else ModelFailed."""
        name = self.config.name
        if isinstance(exc, torch.cuda.OutOfMemoryError):
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            rows = inputs[0].shape[0] if inputs and self.config.max_batch_size else 1
            return Overloaded(
                f"model '{name}' ran out of device memory on a batch of {rows} rows",
                retry_after_ms=100,
            )
        if isinstance(exc, SalvoError):
            return exc
        first = _first_line(exc) or type(exc).__name__
        return ModelFailed(f"model '{name}' raised {type(exc).__name__}: {first}")

    def _collect(self, raw: Any, rows: int | None) -> list[torch.Tensor]:
        """The model's outputs as tensors in config order and declared datatypes, checked
        against the config (`rows` per output where the model batches). Raises ModelFailed."""
        name = self.config.name
        specs = self.config.outputs
        if isinstance(raw, torch.Tensor):
            values: list[Any] = [raw]
        elif isinstance(raw, dict):
            missing = [s.name for s in specs if s.name not in raw]
            if missing:
                raise ModelFailed(f"model '{name}' returned no output {missing[0]!r}")
            values = [raw[s.name] for s in specs]
        elif isinstance(raw, (tuple, list)):
            values = list(raw)
        else:
            raise ModelFailed(f"model '{name}' returned {type(raw).__name__}, not tensors")
        if len(values) != len(specs):
            raise ModelFailed(
                f"model '{name}' returned {len(values)} outputs, its config declares {len(specs)}"
            )
        tensors = []
        for value, spec in zip(values, specs, strict=True):
            if not isinstance(value, torch.Tensor):
                raise ModelFailed(f"model '{name}' output '{spec.name}' is not a tensor")
            expected = TORCH_DTYPES[spec.datatype]
            if self.compute_dtype is not None and value.dtype == self.compute_dtype:
                value = value.to(expected)  # back to the declared datatype
            if value.dtype != expected:
                raise ModelFailed(
                    f"model '{name}' output '{spec.name}': expected {spec.datatype}, "
                    f"got {str(value.dtype).removeprefix('torch.')}"
                )
            if rows is not None and (value.dim() == 0 or value.shape[0] != rows):
                got = value.shape[0] if value.dim() else "a scalar"
                raise ModelFailed(
                    f"model '{name}' output '{spec.name}': expected {rows} rows, one per "
                    f"input row, got {got}"
                )
            tensors.append(value)
        return tensors

    def _prepared(self, tensor: torch.Tensor) -> torch.Tensor:
        """An input in the model's precision and memory layout."""
        if self.compute_dtype is not None and tensor.is_floating_point():
            tensor = tensor.to(self.compute_dtype)
        if self.channels_last and tensor.dim() == 4:
            tensor = tensor.contiguous(memory_format=torch.channels_last)
        return tensor


def _optimized(module: Any, config: ModelConfig) -> Any:
    """The loaded module in the configured precision and layout (converted once, here),
    compiled where asked (compiled by its first passes: the warm-up's)."""
    dtype = PRECISIONS[config.optimization.precision]
    if dtype is not None:
        module = module.to(dtype)
    if config.optimization.channels_last:
        module = module.to(memory_format=torch.channels_last)
    if config.optimization.compile:
        module = torch.compile(module)
    return module


def _first_line(exc: BaseException) -> str:
    """The first line of `exc`'s message ("" for none): torch's carry pages of context."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else ""


def _rows(config: ModelConfig, inputs: Sequence[Any]) -> int | None:
    """A batch's rows, or None for a model without a batch dimension."""
    return inputs[0].shape[0] if config.max_batch_size > 0 and inputs else None


def _graph_buckets(config: ModelConfig) -> list[int | None]:
    """The batch sizes that get a CUDA graph, largest first: powers of two up to
    max_batch_size, each preferred size and the maximum ([None] without batching)."""
    largest = config.max_batch_size
    if not largest:
        return [None]
    sizes = {1 << k for k in range(largest.bit_length()) if 1 << k <= largest} | {largest}
    if config.dynamic_batching is not None:
        sizes |= {n for n in config.dynamic_batching.preferred_batch_sizes if n <= largest}
    return [*sorted(sizes, reverse=True)]


@dataclass(frozen=True, slots=True)
class _Graph:
    """One captured forward pass: replaying `graph` reads `inputs` and writes `outputs`,
    all on the device, all `rows` rows (None: no batch dimension)."""

    rows: int | None
    graph: torch.cuda.CUDAGraph
    inputs: list[torch.Tensor]
    outputs: list[torch.Tensor]


_STREAM_LOCKS: dict[tuple[int, int], threading.Lock] = {}
_STREAM_LOCKS_GUARD = threading.Lock()


def _stream_lock(stream: torch.cuda.Stream) -> threading.Lock:
    """The lock of `stream`, one per CUDA stream in the process.

    torch hands streams out round-robin from a pool of 32 a device, so past 32 instances on
    a device two instances share one. Sharing is only slower, except while a graph is
    captured: whatever another instance queued on the stream meanwhile would be captured
    into the graph. So a batch and a capture hold their stream's lock (uncontended where
    every instance has a stream of its own).
    """
    key = (stream.device_index, stream.cuda_stream)
    with _STREAM_LOCKS_GUARD:
        return _STREAM_LOCKS.setdefault(key, threading.Lock())


class _CudaInstance:
    """One instance of a model on a CUDA device: its own stream, pinned host buffers for
    inputs and outputs (grown to fit, never shrunk, reused batch after batch) and, with
    `optimization.cuda_graphs`, one graph per batch size bucket.

    An instance runs one batch at a time (its scheduler thread), so its buffers are not
    locked: a batch's copies have finished when `run` returns, and only then does the
    instance's next `assemble` write into them again.
    """

    def __init__(self, model: LoadedModel):
        self.model = model
        self.stream = torch.cuda.Stream(model.device)
        # The weights were converted (precision, layout) on the default stream; this
        # stream's first pass must see them converted.
        self.stream.wait_stream(torch.cuda.current_stream(model.device))
        self._lock = _stream_lock(self.stream)
        self.graphs: dict[int | None, _Graph] = {}
        self._fitting: list[_Graph] = []
        """By rows (index 0 unused): the graph of the smallest bucket that holds them."""
        self._pinned: dict[tuple[str, int], torch.Tensor] = {}
        config = model.config
        rows = (config.max_batch_size,) if config.max_batch_size else ()
        for kind, specs in (("in", config.inputs), ("out", config.outputs)):
            for i, spec in enumerate(specs):
                if all(d >= 0 for d in spec.dims):
                    dtype = (
                        _host_dtype(spec.datatype) if kind == "in" else TORCH_DTYPES[spec.datatype]
                    )
                    self.staging((kind, i), (*rows, *spec.dims), dtype)

    def staging(
        self, key: tuple[str, int], shape: tuple[int, ...], dtype: torch.dtype
    ) -> torch.Tensor:
        """A pinned host tensor of `shape` for input or output `key`, in the buffer kept
        for it (a larger one replaces it when a batch needs more)."""
        count = math.prod(shape)
        buffer = self._pinned.get(key)
        if buffer is None or buffer.dtype != dtype or buffer.numel() < count:
            buffer = torch.empty(max(count, 1), dtype=dtype, pin_memory=True)
            self._pinned[key] = buffer
        return buffer[:count].view(shape)

    def capture_graphs(self) -> None:
        """Capture a graph per bucket (`_graph_buckets`), largest first, so that the smaller
        ones reuse its memory from one pool. Raises ConfigError naming the model file, the
        option and the batch size if the forward pass cannot be captured."""
        model = self.model
        pool = torch.cuda.graph_pool_handle()
        with torch.cuda.device(model.device), self._lock:
            for rows in _graph_buckets(model.config):
                try:
                    self.graphs[rows] = self._capture(rows, pool)
                except Exception as exc:
                    size = "unbatched" if rows is None else f"at batch size {rows}"
                    raise ConfigError(
                        f"{model.path}: optimization.cuda_graphs: cannot capture the forward "
                        f"pass {size}: {type(exc).__name__}: {_first_line(exc)}"
                    ) from None
        self._index_graphs()

    def _index_graphs(self) -> None:
        """`_fitting` from `graphs`: worked out once here, not on every batch."""
        buckets = sorted(r for r in self.graphs if r is not None)
        self._fitting = [
            self.graphs[next(b for b in buckets if b >= rows)]
            for rows in range(max(buckets, default=-1) + 1)
        ]

    def _capture(self, rows: int | None, pool: Any) -> _Graph:
        model = self.model
        batch = () if rows is None else (rows,)
        with torch.cuda.stream(self.stream), torch.inference_mode():
            static = [
                torch.zeros(
                    (*batch, *spec.dims), dtype=TORCH_DTYPES[spec.datatype], device=model.device
                )
                for spec in model.config.inputs
            ]
            for _ in range(3):  # warm on this stream: kernels chosen, JIT settled
                model.module(*[model._prepared(t) for t in static])
        torch.cuda.synchronize(model.device)
        graph = torch.cuda.CUDAGraph()
        # As torch.cuda.graph does, but a failed capture raises its own error (capture_end
        # would raise another over it) and never leaves this thread on the instance's stream.
        with torch.cuda.stream(self.stream), torch.inference_mode():
            graph.capture_begin(pool, capture_error_mode="thread_local")
            try:
                outputs = model._collect(model.module(*[model._prepared(t) for t in static]), rows)
            except Exception:
                with contextlib.suppress(Exception):
                    graph.capture_end()
                raise
            graph.capture_end()
        return _Graph(rows, graph, static, outputs)

    def graph_for(self, rows: int | None) -> _Graph | None:
        """The graph of the smallest bucket that holds `rows`, if any was captured."""
        if rows is None:
            return self.graphs.get(None)
        return self._fitting[rows] if rows < len(self._fitting) else None

    def run(self, inputs: Sequence[Any]) -> tuple[list[np.ndarray], Timings]:
        """`LoadedModel.run` on this instance: copies in on its stream, the graph replayed
        (or the module called), copies out into pinned buffers, and one synchronisation,
        where the outputs are read."""
        model = self.model
        rows = _rows(model.config, inputs)
        specs = model.config.inputs
        t0 = time.perf_counter_ns()
        try:
            with self._lock, torch.cuda.stream(self.stream), torch.inference_mode():
                graph = self.graph_for(rows)
                if graph is not None:
                    for static, array, spec in zip(graph.inputs, inputs, specs, strict=True):
                        host = _host_tensor(array, spec.datatype)
                        if rows is None or rows == graph.rows:
                            static.copy_(host, non_blocking=True)
                        else:
                            static[:rows].copy_(host, non_blocking=True)
                            static[rows:].zero_()  # padding: its outputs are dropped
                    t1 = time.perf_counter_ns()
                    graph.graph.replay()
                    values = [o if rows is None else o[:rows] for o in graph.outputs]
                else:
                    tensors = [
                        model._prepared(_to_torch(array, spec.datatype, model.device))
                        for array, spec in zip(inputs, specs, strict=True)
                    ]
                    t1 = time.perf_counter_ns()
                    values = model._collect(model.module(*tensors), rows)
                hosts = []
                for j, value in enumerate(values):
                    host = self.staging(("out", j), tuple(value.shape), value.dtype)
                    host.copy_(value, non_blocking=True)
                    hosts.append(host)
                self.stream.synchronize()
        except Exception as exc:
            with contextlib.suppress(Exception):
                self.stream.synchronize()  # no copy may still read or write the buffers
            raise model._failure(exc, inputs) from None
        t2 = time.perf_counter_ns()
        outputs = [_to_numpy(host).copy() for host in hosts]  # the buffers are reused
        t3 = time.perf_counter_ns()
        return outputs, Timings(t1 - t0, t2 - t1, t3 - t2)


@functools.cache
def _torch_dtype(dtype: np.dtype) -> torch.dtype:
    """torch's dtype for a numpy dtype (worked out once per dtype, not per batch)."""
    return torch.from_numpy(np.empty(0, dtype)).dtype


def _host_dtype(datatype: str) -> torch.dtype:
    """The dtype of the host tensor that carries a request's array of `datatype` (BF16
    travels as its 16 bits)."""
    return torch.uint16 if datatype == "BF16" else TORCH_DTYPES[datatype]


def _host_tensor(array: Any, datatype: str) -> torch.Tensor:
    """A request's array (or an assembled pinned tensor) as a host tensor of `datatype`."""
    tensor = array if isinstance(array, torch.Tensor) else torch.from_numpy(array)
    return tensor.view(torch.bfloat16) if datatype == "BF16" else tensor


def _to_torch(array: Any, datatype: str, device: torch.device) -> torch.Tensor:
    """A request's array (or an assembled pinned tensor) as a tensor on `device`."""
    tensor = _host_tensor(array, datatype)
    return tensor.to(device, non_blocking=True) if device.type != "cpu" else tensor


def _to_numpy(tensor: torch.Tensor) -> np.ndarray:
    tensor = tensor.detach()
    if tensor.device.type != "cpu":
        tensor = tensor.cpu()
    if tensor.dtype == torch.bfloat16:
        return tensor.contiguous().view(torch.int16).numpy().view(np.uint16)
    return tensor.contiguous().numpy()
