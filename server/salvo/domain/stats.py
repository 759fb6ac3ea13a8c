"""Per model-version inference statistics, with the semantics of Triton's ModelStatistics.

Each field means what Triton's statistics extension says it means, so that tools written
for Triton read Salvo alike (perf_analyzer finds the version it measures by the `queue`
count that grew during its window):

- `success` / `fail`: requests answered / failed, end to end in the server. Cache hits
  are successes.
- `queue`: time requests waited before their batch started. Cache hits count too, with
  the time from arrival to the cache's answer; a request that joined one already in
  flight for the same inputs (coalesced) waited for that one.
- `compute_input` / `compute_infer` / `compute_output`: per request executed, each charged
  its batch's time in that phase; cache hits are not counted.
- `cache_hit`: hits (coalesced requests included) and the time to find the answer;
  `cache_miss`: misses and the time to look up (the computation itself is not in it).
- `inference_count`: rows executed by the model; `execution_count`: batches executed.
  Neither counts cache hits.
- `last_inference`: when the last request was answered, in ms since the epoch.
- `batch_stats`: per batch size executed, the compute phases' counts and times.

Updated only from the event loop's thread, so it needs no lock. The front ends turn it
into their own formats (`salvo.frontends.grpc.codec.statistics`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field


@dataclass(slots=True)
class Duration:
    """A cumulative count and nanoseconds."""

    count: int = 0
    ns: int = 0

    def add(self, ns: int, count: int = 1) -> None:
        self.count += count
        self.ns += ns


@dataclass(slots=True)
class BatchStats:
    """Compute durations of the executions of one batch size."""

    compute_input: Duration = field(default_factory=Duration)
    compute_infer: Duration = field(default_factory=Duration)
    compute_output: Duration = field(default_factory=Duration)


@dataclass(slots=True)
class ModelStats:
    """Cumulative statistics of one model version since it loaded."""

    name: str
    version: int
    success: Duration = field(default_factory=Duration)
    fail: Duration = field(default_factory=Duration)
    queue: Duration = field(default_factory=Duration)
    compute_input: Duration = field(default_factory=Duration)
    compute_infer: Duration = field(default_factory=Duration)
    compute_output: Duration = field(default_factory=Duration)
    cache_hit: Duration = field(default_factory=Duration)
    cache_miss: Duration = field(default_factory=Duration)
    inference_count: int = 0
    execution_count: int = 0
    last_inference_ms: int = 0
    batches: dict[int, BatchStats] = field(default_factory=dict)

    def record_request(self, ok: bool, duration_ns: int) -> None:
        """One request answered (or failed), end to end in the server."""
        (self.success if ok else self.fail).add(duration_ns)
        self.last_inference_ms = int(time.time() * 1000)

    def record_cache_hit(self, lookup_ns: int, waited_ns: int) -> None:
        """A request answered by the cache: `lookup_ns` to find the answer, `waited_ns`
        from its arrival until the answer was there (its queue time)."""
        self.cache_hit.add(lookup_ns)
        self.queue.add(waited_ns)

    def record_cache_miss(self, lookup_ns: int) -> None:
        """A request the cache could not answer: it is computed (and queued) as usual."""
        self.cache_miss.add(lookup_ns)

    def record_queued(self, waited_ns: int) -> None:
        """A request's batch started after it waited `waited_ns` in the queue."""
        self.queue.add(waited_ns)

    def record_batch(
        self, batch_size: int, requests: int, input_ns: int, infer_ns: int, output_ns: int
    ) -> None:
        """One forward pass of `batch_size` rows that served `requests` requests."""
        self.execution_count += 1
        self.inference_count += batch_size
        # Triton counts per-request compute durations, each request charged the batch's time.
        self.compute_input.add(input_ns * requests, requests)
        self.compute_infer.add(infer_ns * requests, requests)
        self.compute_output.add(output_ns * requests, requests)
        stats = self.batches.get(batch_size)
        if stats is None:
            stats = self.batches[batch_size] = BatchStats()
        stats.compute_input.add(input_ns)
        stats.compute_infer.add(infer_ns)
        stats.compute_output.add(output_ns)
