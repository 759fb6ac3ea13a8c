"""RetryPolicy: gRPC's own retries, set through the channel's service config."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import grpc

__all__ = ["MIN_BACKOFF_S", "RetryPolicy"]

MIN_BACKOFF_S = 0.01
"""The shortest retry backoff allowed (see RetryPolicy)."""


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """gRPC's own retries (service config `retryPolicy`), for calls that failed before the
    server started answering.

    Only UNAVAILABLE and RESOURCE_EXHAUSTED are retried by default; INVALID_ARGUMENT is
    refused, since a malformed request fails the same way every time. gRPC honours the
    server's `grpc-retry-pushback-ms` on RESOURCE_EXHAUSTED natively: it waits that long
    instead of the backoff. Requests larger than the channel's retry buffer (set to the
    maximum message size) are sent once.
    """

    max_attempts: int = 3
    """Attempts in all, the first included (2 to 5; gRPC allows no more than 5)."""
    initial_backoff_s: float = 0.1
    """At least 10 ms."""
    max_backoff_s: float = 2.0
    backoff_multiplier: float = 2.0
    retryable_status_codes: tuple[str, ...] = ("UNAVAILABLE", "RESOURCE_EXHAUSTED")

    def __post_init__(self) -> None:
        if not 2 <= self.max_attempts <= 5:
            raise ValueError(f"max_attempts must be 2 to 5, got {self.max_attempts}")
        # gRPC (1.72 onwards, grpc/grpc#41036) can hang a call whose retry backoff is a
        # millisecond or so; 10 ms is well clear of it.
        if self.initial_backoff_s < MIN_BACKOFF_S:
            raise ValueError(f"initial_backoff_s must be at least {MIN_BACKOFF_S} s")
        if self.max_backoff_s < self.initial_backoff_s:
            raise ValueError("max_backoff_s must be at least initial_backoff_s")
        if self.backoff_multiplier <= 0:
            raise ValueError("backoff_multiplier must be positive")
        names = {code.name for code in grpc.StatusCode}
        for code in self.retryable_status_codes:
            if code not in names or code == "OK":
                raise ValueError(f"unknown status code {code!r}")
            if code == "INVALID_ARGUMENT":
                raise ValueError("INVALID_ARGUMENT must never be retried")
        if not self.retryable_status_codes:
            raise ValueError("retryable_status_codes must not be empty")

    @classmethod
    def of(cls, retries: int | RetryPolicy | None) -> RetryPolicy | None:
        """`retries` as a policy: an int counts retries after the first attempt (0: none)."""
        if retries is None or isinstance(retries, RetryPolicy):
            return retries
        if retries < 0:
            raise ValueError(f"retries must be >= 0, got {retries}")
        return None if retries == 0 else cls(max_attempts=retries + 1)

    def to_service_config(self) -> dict[str, Any]:
        """The `retryPolicy` object of a gRPC service config."""
        return {
            "maxAttempts": self.max_attempts,
            "initialBackoff": f"{self.initial_backoff_s:.9f}s",
            "maxBackoff": f"{self.max_backoff_s:.9f}s",
            "backoffMultiplier": self.backoff_multiplier,
            "retryableStatusCodes": list(self.retryable_status_codes),
        }
