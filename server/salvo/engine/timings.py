"""What a forward pass reports, shared by the CPU and CUDA paths."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from salvo.domain.config import ModelConfig


@dataclass(frozen=True, slots=True)
class Timings:
    """Nanoseconds spent on one forward pass, in Triton's three compute phases."""

    input_ns: int
    infer_ns: int
    output_ns: int


def batch_rows(config: ModelConfig, inputs: Sequence[Any]) -> int | None:
    """A batch's rows, or None for a model without a batch dimension."""
    return inputs[0].shape[0] if config.max_batch_size > 0 and inputs else None
