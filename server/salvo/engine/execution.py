"""Where a model's batches run: on the event loop itself, or on instance threads.

On a CPU a fast model's forward pass costs less than the two hand-overs of the GIL and the
wake-ups that running it on a thread takes, so `execution: auto` runs a CPU model with one
instance on the loop when its largest batch took under LOOP_MAX_NS at warm-up. A model on
CUDA waits for its device, and several instances run in parallel: those use threads.

On the loop every other call waits while a batch runs, so `LoopGuard` watches: an `auto`
model whose batches hold the loop up for over LOOP_GUARD_NS, LOOP_GUARD_BATCHES times in a
row and for at least LOOP_GUARD_SPAN_NS from the first of them, moves to its thread for
good. A short run of slow batches is the machine's hiccup, not the model's: on a 2-core
VM, a batch of `mlp` that takes 0.2 ms can take 4 to 7 ms a few times in a row (every
phase slower in the thread's own CPU time) for some 15 ms, and must not move it.
"""

from __future__ import annotations

from typing import Protocol

from salvo.domain.config import ModelConfig

LOOP_MAX_NS = 2_000_000
"""`execution: auto` runs a model on the event loop when its largest batch took less."""
LOOP_GUARD_NS = 2 * LOOP_MAX_NS
LOOP_GUARD_BATCHES = 3
LOOP_GUARD_SPAN_NS = 250_000_000


class _Model(Protocol):
    @property
    def config(self) -> ModelConfig: ...

    @property
    def largest_batch_ns(self) -> int | None: ...

    @property
    def device(self) -> object: ...


def runs_on_loop(model: _Model) -> bool:
    """Whether `model`'s batches run on the event loop (see OptimizationConfig.execution)."""
    config = model.config
    execution = config.optimization.execution
    if execution != "auto":
        return execution == "loop"
    return (
        getattr(model.device, "type", None) == "cpu"
        and config.instance_count == 1
        and model.largest_batch_ns is not None
        and model.largest_batch_ns < LOOP_MAX_NS
    )


class LoopGuard:
    """Counts batches on the loop that took too long; pure state, fed the batches' times."""

    def __init__(self) -> None:
        self.slow = 0
        """Slow batches in a row."""
        self.slow_since_ns = 0
        """When the batch that began the current run of slow batches started."""

    def tripped(self, start_ns: int, finished_ns: int) -> bool:
        """Record one batch; True when the model should leave the loop now."""
        if finished_ns - start_ns <= LOOP_GUARD_NS:
            self.slow = 0
            return False
        if self.slow == 0:
            self.slow_since_ns = start_ns
        self.slow += 1
        return (
            self.slow >= LOOP_GUARD_BATCHES
            and finished_ns - self.slow_since_ns >= LOOP_GUARD_SPAN_NS
        )
