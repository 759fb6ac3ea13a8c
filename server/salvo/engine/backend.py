"""A loaded model: numpy batches in, numpy outputs out, on the CPU or a CUDA device."""

from __future__ import annotations

import contextlib
import logging
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from salvo.domain.config import ModelConfig
from salvo.domain.datatypes import DATATYPES
from salvo.domain.status import ConfigError, ModelFailed, Overloaded, SalvoError
from salvo.engine.cuda import CudaInstance
from salvo.engine.loading import (
    find_model_file,
    first_line,
    load_exported,
    load_torchscript,
    optimized,
    resolve_device,
)
from salvo.engine.tensors import PRECISIONS, TORCH_DTYPES, to_numpy, to_torch, torch_dtype
from salvo.engine.threads import one_torch_thread
from salvo.engine.timings import Timings, batch_rows

log = logging.getLogger(__name__)

# Request arrays are views of the request's read-only bytes, and torch warns (once) that it
# cannot mark a tensor read-only; the model never writes to its inputs. Filtered here, once,
# rather than around every batch: a `warnings.catch_warnings` block a batch cost the event
# loop a filter-list copy and rebuild each time, and is not thread-safe across instances.
warnings.filterwarnings(
    "ignore", message="The given NumPy array is not writable", category=UserWarning
)


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
        self._instances: list[CudaInstance] = []
        """On CUDA, one per instance: its stream, pinned buffers and graphs."""
        if device.type == "cuda":
            self._instances = [CudaInstance(self) for _ in range(config.instance_count)]

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
        loader = load_torchscript if path.suffix == ".pt" else load_exported
        try:
            module = loader(path, device)
        except ConfigError:
            raise
        except Exception as exc:  # torch's loaders raise many types; the message is what matters
            raise ConfigError(f"{path}: cannot load: {first_line(exc)}") from None
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
        module = optimized(module, config)
        if config.optimization.freeze:
            try:
                module = torch.jit.optimize_for_inference(torch.jit.freeze(module))
            except Exception as exc:  # what cannot be frozen is the model's own business
                raise ConfigError(
                    f"{path}: optimization.freeze: cannot freeze the model: "
                    f"{type(exc).__name__}: {first_line(exc)}"
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
            dtype = torch_dtype(parts[0].dtype)
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
            self._prepared(to_torch(array, spec.datatype, self.device))
            for array, spec in zip(inputs, self.config.inputs, strict=True)
        ]
        t1 = time.perf_counter_ns()
        try:
            with torch.inference_mode():
                raw = self.module(*tensors)
        except Exception as exc:
            raise self._failure(exc, inputs) from None
        t2 = time.perf_counter_ns()
        outputs = [to_numpy(value) for value in self._collect(raw, batch_rows(self.config, inputs))]
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
        first = first_line(exc) or type(exc).__name__
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
