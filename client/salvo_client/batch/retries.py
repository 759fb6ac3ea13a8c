"""Which failures are worth another try, and how long to wait before it."""

from __future__ import annotations

import random
from dataclasses import dataclass

import grpc

from salvo_client.errors import SalvoClientError

__all__ = ["TRANSIENT", "Backoff", "is_transient"]

TRANSIENT = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        # gRPC core answers CANCELLED to a call that reaches a server while it stops
        # (salvo.ops.lifecycle), and to calls a flooded server sheds before reading them.
        grpc.StatusCode.CANCELLED,
    }
)
"""Statuses that say nothing about the rows: the server is away, busy or restarting, or
the stream broke. The same request may well succeed later."""


def is_transient(error: SalvoClientError) -> bool:
    return error.status in TRANSIENT


@dataclass(frozen=True, slots=True)
class Backoff:
    """Exponential back-off with jitter for a request that failed transiently.

    The wait before retry n (1 for the first) is `initial_s * multiplier ** (n - 1)`, at
    most `max_s`, times a random factor in [0.5, 1): requests that failed together (a
    broken stream fails every one in flight) spread out instead of retrying together.
    """

    retries: int = 5
    """Retries after the first attempt; when they run out the job stops, resumable."""
    initial_s: float = 0.5
    max_s: float = 30.0
    multiplier: float = 2.0

    def __post_init__(self) -> None:
        if self.retries < 0:
            raise ValueError(f"retries must be >= 0, got {self.retries}")
        if self.initial_s <= 0 or self.max_s < self.initial_s:
            raise ValueError("need 0 < initial_s <= max_s")
        if self.multiplier < 1:
            raise ValueError(f"multiplier must be >= 1, got {self.multiplier}")

    def ceiling_s(self, attempt: int) -> float:
        """The longest wait before retry `attempt`."""
        return min(self.max_s, self.initial_s * self.multiplier ** (attempt - 1))

    def delay_s(self, attempt: int, rng: random.Random) -> float:
        """The wait before retry `attempt`: half its ceiling plus up to half again."""
        return self.ceiling_s(attempt) * (0.5 + 0.5 * rng.random())
