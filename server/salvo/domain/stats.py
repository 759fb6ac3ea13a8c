"""Per model-version inference statistics, as Triton's ModelStatistics reports them.

Updated only from the event loop thread, so it needs no lock.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from salvo_client.proto import grpc_service_pb2 as pb


@dataclass(slots=True)
class Duration:
    """A cumulative count and nanoseconds."""

    count: int = 0
    ns: int = 0

    def add(self, ns: int, count: int = 1) -> None:
        self.count += count
        self.ns += ns

    def fill(self, target: pb.StatisticDuration) -> None:
        target.count = self.count
        target.ns = self.ns


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
        """One request answered, end to end on the server."""
        (self.success if ok else self.fail).add(duration_ns)
        self.last_inference_ms = int(time.time() * 1000)

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

    def to_proto(self) -> pb.ModelStatistics:
        out = pb.ModelStatistics(
            name=self.name,
            version=str(self.version),
            last_inference=self.last_inference_ms,
            inference_count=self.inference_count,
            execution_count=self.execution_count,
        )
        s = out.inference_stats
        self.success.fill(s.success)
        self.fail.fill(s.fail)
        self.queue.fill(s.queue)
        self.compute_input.fill(s.compute_input)
        self.compute_infer.fill(s.compute_infer)
        self.compute_output.fill(s.compute_output)
        self.cache_hit.fill(s.cache_hit)
        self.cache_miss.fill(s.cache_miss)
        for size in sorted(self.batches):
            b = self.batches[size]
            entry = out.batch_stats.add(batch_size=size)
            b.compute_input.fill(entry.compute_input)
            b.compute_infer.fill(entry.compute_infer)
            b.compute_output.fill(entry.compute_output)
        return out
