"""Admission: a token bucket per client identity, so one noisy client cannot starve another.

Pure state, no gRPC and no clock of its own: callers pass `now` (time.monotonic()), which
keeps it synchronously testable. The interceptor in `auth` asks it before each request and
answers RESOURCE_EXHAUSTED with the push-back it returns.
"""

from __future__ import annotations

import math


class _Bucket:
    """One client's tokens and when they were last counted."""

    __slots__ = ("stamp", "tokens")

    def __init__(self, tokens: float, stamp: float) -> None:
        self.tokens = tokens
        self.stamp = stamp


class RateLimiter:
    """`rate_per_s` requests per second per identity, with bursts of up to `burst`.

    Each identity has its own bucket, so a client that floods empties only its own. Buckets
    that have refilled completely carry no state worth keeping: once there are more than
    `max_identities`, they are dropped, which bounds memory to the clients active within
    the last `burst / rate_per_s` seconds.
    """

    def __init__(self, rate_per_s: float, burst: int = 0, max_identities: int = 10_000) -> None:
        if rate_per_s <= 0:
            raise ValueError(f"rate_per_s must be positive, got {rate_per_s}")
        self.rate_per_s = rate_per_s
        # 0: one second's worth, and never less than one request.
        self.burst = float(burst or max(1, math.ceil(rate_per_s)))
        self.max_identities = max_identities
        self._buckets: dict[str, _Bucket] = {}

    def admit(self, identity: str, now: float) -> int:
        """0 when `identity` may make a request now (its token is spent), else the
        milliseconds until it may (at least 1), which is the push-back to send."""
        bucket = self._buckets.get(identity)
        if bucket is None:
            if len(self._buckets) >= self.max_identities:
                self._forget_idle(now)
            bucket = self._buckets[identity] = _Bucket(self.burst, now)
        else:
            elapsed = max(now - bucket.stamp, 0.0)
            bucket.tokens = min(self.burst, bucket.tokens + elapsed * self.rate_per_s)
            bucket.stamp = now
        if bucket.tokens >= 1.0:
            bucket.tokens -= 1.0
            return 0
        return max(1, math.ceil((1.0 - bucket.tokens) / self.rate_per_s * 1000))

    def _forget_idle(self, now: float) -> None:
        full_after_s = self.burst / self.rate_per_s
        self._buckets = {
            identity: bucket
            for identity, bucket in self._buckets.items()
            if now - bucket.stamp < full_after_s
        }

    def __len__(self) -> int:
        """Identities with a bucket (for tests and metrics)."""
        return len(self._buckets)
