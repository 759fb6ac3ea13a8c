"""A model's instances on a CUDA device: streams, pinned buffers, CUDA graphs."""

from __future__ import annotations

import contextlib
import math
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from salvo.domain.config import ModelConfig
from salvo.domain.status import ConfigError
from salvo.engine.loading import first_line
from salvo.engine.tensors import TORCH_DTYPES, host_dtype, host_tensor, to_numpy, to_torch
from salvo.engine.timings import Timings, batch_rows

if TYPE_CHECKING:
    from salvo.engine.backend import LoadedModel


def graph_buckets(config: ModelConfig) -> list[int | None]:
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


class CudaInstance:
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
                        host_dtype(spec.datatype) if kind == "in" else TORCH_DTYPES[spec.datatype]
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
            for rows in graph_buckets(model.config):
                try:
                    self.graphs[rows] = self._capture(rows, pool)
                except Exception as exc:
                    size = "unbatched" if rows is None else f"at batch size {rows}"
                    raise ConfigError(
                        f"{model.path}: optimization.cuda_graphs: cannot capture the forward "
                        f"pass {size}: {type(exc).__name__}: {first_line(exc)}"
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
        rows = batch_rows(model.config, inputs)
        specs = model.config.inputs
        t0 = time.perf_counter_ns()
        try:
            with self._lock, torch.cuda.stream(self.stream), torch.inference_mode():
                graph = self.graph_for(rows)
                if graph is not None:
                    for static, array, spec in zip(graph.inputs, inputs, specs, strict=True):
                        host = host_tensor(array, spec.datatype)
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
                        model._prepared(to_torch(array, spec.datatype, model.device))
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
        outputs = [to_numpy(host).copy() for host in hosts]  # the buffers are reused
        t3 = time.perf_counter_ns()
        return outputs, Timings(t1 - t0, t2 - t1, t3 - t2)
