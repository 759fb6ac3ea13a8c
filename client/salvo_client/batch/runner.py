"""Sending rows: batches out over one stream with a window of requests in flight, transient
failures retried with back-off, refused batches retried row by row, and every answer
handed to the journal.

`Runner` is the asyncio shell around the pure `Grouper`; it knows nothing of gRPC beyond
the client's exceptions, and sends through a `Send` function (in the job: the client's
pipelined ModelStreamInfer stream; in tests: a fake). `Committer` writes answers to the
journal on a worker thread, so the event loop never waits for a disk.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import random
import time
from collections.abc import Awaitable, Callable, Container, Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from salvo_client.batch.journal import Journal
from salvo_client.batch.retries import Backoff, is_transient
from salvo_client.batch.rows import Batch, Grouper, Row, RowResult
from salvo_client.errors import InvalidArgument, SalvoClientError

__all__ = ["Committer", "RunStats", "Runner", "Send"]

log = logging.getLogger(__name__)

NOTE_INTERVAL_S = 1.0
"""Retry notes are at most this frequent; the ones between are counted in the next."""

Send = Callable[[Mapping[str, np.ndarray]], Awaitable[Mapping[str, np.ndarray]]]
"""One request: the batch's tensors in, the answer's outputs back; a failure raises the
client's exception for its status."""


@dataclass
class RunStats:
    """What one run of the job did."""

    read: int = 0
    """Rows taken from the input (journalled ones included)."""
    skipped: int = 0
    """Rows an earlier run journalled, not sent again."""
    requests: int = 0
    """Requests sent, retries and row-by-row re-sends included."""
    retries: int = 0
    refused_batches: int = 0
    """Batches refused as a whole (INVALID_ARGUMENT) and re-sent a row at a time."""
    unsent: int = 0
    """Rows read but left unscored because the job stopped; a rerun scores them."""
    exhausted: bool = False
    """The whole input was read and every batch dispatched."""
    stopped: str | None = None
    """Why the job stopped early, if it did."""


class _Unsent(Exception):
    """A batch left unscored: the job is stopping, or its retries ran out."""


class Runner:
    """Scores rows through `send` and hands each batch's results to `commit`.

    At most `concurrency` requests are in flight. A transient failure (`retries.TRANSIENT`)
    is retried after `backoff`; when a batch's retries run out the job stops. A batch
    refused with INVALID_ARGUMENT is re-sent a row at a time, so that only the rows at
    fault get an error and the others still score. Any other failure stops the job.
    Stopping (`stop`, or Ctrl-C through the job) sends nothing more and lets the requests
    in flight finish; `abandon` cancels them too.
    """

    def __init__(
        self,
        send: Send,
        commit: Callable[[list[RowResult]], None],
        grouper: Grouper,
        *,
        concurrency: int,
        backoff: Backoff,
        outputs: Sequence[str],
        note: Callable[[str], None] = lambda message: None,
        sleep: Callable[[float], Awaitable[None]] | None = None,
        rng: random.Random | None = None,
    ) -> None:
        if concurrency < 1:
            raise ValueError(f"concurrency must be at least 1, got {concurrency}")
        self._send = send
        self._commit = commit
        self._grouper = grouper
        self._concurrency = concurrency
        self._backoff = backoff
        self._outputs = list(outputs)
        self._note = note
        self._sleep = sleep or self._pause
        self._rng = rng or random.Random()
        self.stats = RunStats()
        self._last_note = -math.inf
        self._unnoted = 0
        self.in_flight = 0
        self.max_in_flight = 0
        self._tasks: set[asyncio.Task[None]] = set()
        self._freed: asyncio.Event | None = None
        self._stopping: asyncio.Event | None = None

    # ------------------------------------------------------------------ control

    def stop(self, reason: str) -> None:
        """Send nothing more; requests in flight finish and are committed. The first reason
        given is the one reported."""
        if self.stats.stopped is None:
            self.stats.stopped = reason
        if self._stopping is not None:
            self._stopping.set()
        if self._freed is not None:
            self._freed.set()

    def abandon(self) -> None:
        """Stop, and cancel the requests in flight: their rows stay unscored."""
        self.stop("abandoned")
        for task in list(self._tasks):
            task.cancel()

    # ------------------------------------------------------------------ the run

    async def run(self, rows: Iterable[Row], done: Container[int]) -> RunStats:
        """Score every row of `rows` whose index is not in `done`; returns once nothing is
        in flight. `stats.exhausted` says whether the whole input was dispatched."""
        self._freed = asyncio.Event()
        self._stopping = asyncio.Event()
        if self.stats.stopped is not None:
            self._stopping.set()
        try:
            for row in rows:
                if self.stats.stopped is not None:
                    break
                self.stats.read += 1
                if row.index in done:
                    self.stats.skipped += 1
                elif row.error is not None:
                    self._commit([RowResult(row.index, row.id, None, row.error)])
                else:
                    for batch in self._grouper.add(row):
                        await self._dispatch(batch)
            else:
                for batch in self._grouper.flush():
                    await self._dispatch(batch)
                self.stats.exhausted = self.stats.stopped is None
        except (OSError, ValueError) as exc:
            self.stop(f"cannot read the input: {exc}")
        finally:
            self.stats.unsent += sum(len(b.rows) for b in self._grouper.flush())
            await self._drain()
        return self.stats

    async def _dispatch(self, batch: Batch) -> None:
        assert self._freed is not None
        while self.in_flight >= self._concurrency and self.stats.stopped is None:
            self._freed.clear()
            await self._freed.wait()
        if self.stats.stopped is not None:
            self.stats.unsent += len(batch.rows)
            return
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        task = asyncio.create_task(self._run_batch(batch), name="salvo-batch-request")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        # Let the request go out now rather than after the next batch is read.
        await asyncio.sleep(0)

    async def _drain(self) -> None:
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    async def _run_batch(self, batch: Batch) -> None:
        assert self._freed is not None
        try:
            results = await self._score(batch)
        except _Unsent:
            self.stats.unsent += len(batch.rows)
        except asyncio.CancelledError:
            self.stats.unsent += len(batch.rows)
            raise
        except SalvoClientError as exc:
            self.stats.unsent += len(batch.rows)
            self.stop(f"the server answered {exc}")
        except ValueError as exc:  # an answer that does not fit the rows sent
            self.stats.unsent += len(batch.rows)
            self.stop(f"the server's answer does not fit the request: {exc}")
        except Exception as exc:
            log.exception("a batch failed unexpectedly")
            self.stats.unsent += len(batch.rows)
            self.stop(f"unexpected error: {exc!r}")
        else:
            self._commit(results)
        finally:
            self.in_flight -= 1
            self._freed.set()

    async def _score(self, batch: Batch) -> list[RowResult]:
        """The batch's results; rows the server refuses get their error."""
        try:
            outputs = await self._send_retrying(batch)
        except InvalidArgument as exc:
            if len(batch.rows) == 1:
                return batch.failed(str(exc))
            # One bad row fails the whole request: find it, and score the rest.
            self.stats.refused_batches += 1
            results: list[RowResult] = []
            for single in batch.singles():
                results += await self._score(single)
            return results
        return batch.split(outputs, self._outputs)

    async def _send_retrying(self, batch: Batch) -> Mapping[str, np.ndarray]:
        attempt = 0
        while True:
            self.stats.requests += 1
            try:
                return await self._send(batch.inputs)
            except SalvoClientError as exc:
                if not is_transient(exc):
                    raise
                if self.stats.stopped is not None:
                    raise _Unsent from exc
                attempt += 1
                retries = self._backoff.retries
                if attempt > retries:
                    self.stop(f"{exc} (still failing after {retries} retries)")
                    raise _Unsent from exc
                delay_s = self._backoff.delay_s(attempt, self._rng)
                self.stats.retries += 1
                self._note_retry(
                    f"{exc}; retrying {batch.size} rows in {delay_s:.2f} s "
                    f"(retry {attempt} of {retries})"
                )
                await self._sleep(delay_s)
                if self.stats.stopped is not None:
                    raise _Unsent from exc

    def _note_retry(self, message: str) -> None:
        """Say so, at most once every NOTE_INTERVAL_S: a broken stream fails every request
        in flight at once, and each would otherwise say the same."""
        now = time.monotonic()
        if now - self._last_note < NOTE_INTERVAL_S:
            self._unnoted += 1
            return
        if self._unnoted:
            message += f"; {self._unnoted} more retries since the last note"
        self._note(message)
        self._last_note, self._unnoted = now, 0

    async def _pause(self, delay_s: float) -> None:
        """Wait `delay_s`, or less if the job stops meanwhile."""
        assert self._stopping is not None
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), delay_s)


class Committer:
    """Writes results to the journal on a worker thread, in the order they were handed over.

    Each batch's results are one record; whatever batches arrive while a write is under
    way are written together, with one fsync (group commit), so a slow disk costs fsyncs
    per write, not per batch. `on_durable` hears of each batch once it is on disk; a write
    that fails calls `on_failure` and nothing more is written.
    """

    def __init__(
        self,
        journal: Journal,
        on_durable: Callable[[list[RowResult]], None],
        on_failure: Callable[[OSError], None],
    ) -> None:
        self._journal = journal
        self._on_durable = on_durable
        self._on_failure = on_failure
        self._pending: list[list[RowResult]] = []
        self._closing = False
        self.failure: OSError | None = None
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Start the writer on the running loop."""
        self._wake = asyncio.Event()
        self._task = asyncio.create_task(self._write_all(), name="salvo-batch-journal")

    def put(self, results: list[RowResult]) -> None:
        """Hand over one batch's results."""
        assert self._wake is not None
        self._pending.append(results)
        self._wake.set()

    async def close(self) -> None:
        """Write what was handed over, then stop."""
        assert self._wake is not None and self._task is not None
        self._closing = True
        self._wake.set()
        await self._task

    async def _write_all(self) -> None:
        assert self._wake is not None
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._pending and self.failure is None:
                batches, self._pending = self._pending, []
                try:
                    await asyncio.to_thread(self._journal.append, batches)
                except OSError as exc:
                    self.failure = exc
                    self._on_failure(exc)
                    break
                for results in batches:
                    self._on_durable(results)
            if self._closing or self.failure is not None:
                return
