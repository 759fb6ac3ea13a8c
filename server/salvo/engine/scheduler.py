"""The dynamic batcher's asyncio shell: one per model version.

It owns a BatchQueue (all policy lives there) and `instance_count` worker threads. The
loop waits for work or for a free instance, asks the queue for the next batch and hands
it to a free instance's thread, or, for a model whose batches take at most a couple of
milliseconds, runs it right there on the loop (`optimization.execution`, see
`runs_on_loop`). Futures are only ever touched on the loop thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from salvo.domain.stats import ModelStats
from salvo.domain.status import DeadlineExceeded, ModelFailed, ModelUnavailable, SalvoError
from salvo.domain.types import Prepared
from salvo.engine.backend import LoadedModel
from salvo.engine.batch_queue import BatchQueue, Entry, request_deadline_ns
from salvo.engine.batches import Ran, run_batch, split_outputs
from salvo.engine.execution import LOOP_GUARD_NS, LoopGuard, runs_on_loop
from salvo.engine.threads import (
    inherit_torch_threads,
    one_torch_thread,
    torch_threads,
)
from salvo.engine.timings import Timings
from salvo.observability.telemetry import Probe, Telemetry

log = logging.getLogger(__name__)

_Outputs = list[np.ndarray]


def _set_result(future: asyncio.Future, value: object) -> None:
    if not future.done():
        future.set_result(value)


def _set_exception(future: asyncio.Future, exc: BaseException) -> None:
    if not future.done():
        future.set_exception(exc)
        # Mark it retrieved: a caller that already left must not leave a warning behind.
        future.exception()


class Scheduler:
    """Queues requests for one model version and runs them in batches."""

    def __init__(
        self,
        model: LoadedModel,
        stats: ModelStats,
        version: int,
        telemetry: Telemetry | None = None,
    ) -> None:
        self.model = model
        self.telemetry = telemetry
        self.stats = stats
        self.version = version
        config = model.config
        batching = config.dynamic_batching
        self.max_batch_size = config.max_batch_size if batching is not None else 0
        self.batching = batching is not None and config.max_batch_size > 0
        self.default_timeout_ns = batching.default_timeout_us * 1000 if batching else 0
        self.allow_timeout_override = batching.allow_timeout_override if batching else False
        self.queue = BatchQueue(
            config.max_batch_size if self.batching else 0,
            max_queue_size=batching.max_queue_size if batching else 0,
            preferred_batch_sizes=batching.preferred_batch_sizes if batching else (),
            max_queue_delay_ns=batching.max_queue_delay_us * 1000 if batching else 0,
            priority_levels=batching.priority_levels if batching else 0,
            default_priority_level=batching.default_priority_level if batching else 0,
            until_quiet=batching is not None and batching.hold_for_returns == "until_quiet",
        )
        self.in_flight = 0
        """Requests inside batches that are running now."""
        self._instances = config.instance_count
        self.shares_cores = (
            self._instances > 1 and model.device.type == "cpu" and not config.optimization.compile
        )
        """Several CPU instances: each batch runs on the intra-op threads divided by the
        instances running at its start (`_threads_now`), so that two instances busy at once
        take a core each where both would put a team of every core to work, and one alone
        keeps every core. Not for `compile`: TorchInductor builds its thread count into the
        kernels it compiles."""
        self._accepting = False
        self.on_loop = runs_on_loop(model)
        """Batches run on the event loop rather than on an instance's thread."""
        self._guard = LoopGuard()
        timed = model.largest_batch_ns
        log.info(
            "model '%s' version %d: batches run on %s (execution: %s; largest batch %s)",
            config.name, version, "the event loop" if self.on_loop else "instance threads",
            config.optimization.execution,
            "not timed" if timed is None else f"{timed / 1e6:.2f} ms at warm-up",
        )  # fmt: skip

    async def start(self) -> None:
        """Create the loop-bound state and start the dispatch task, on the running loop."""
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._free = list(range(self._instances))
        self._threads = torch_threads()
        """The intra-op threads that CPU instances share: the loop's thread has
        `--torch-threads` (a scheduler may be made on a loader thread, which has not)."""
        self._executors = [
            ThreadPoolExecutor(
                1,
                thread_name_prefix=f"salvo-{self.model.config.name}-{i}",
                initializer=inherit_torch_threads(),
            )
            for i in range(self._instances)
        ]
        self._running: set[asyncio.Task] = set()
        self._observers: list[tuple[Callable[[], bool], asyncio.Future]] = []
        self._claim = threading.Lock()
        self._timer: asyncio.TimerHandle | None = None
        self._accepting = True
        self._task = asyncio.create_task(self._dispatch_loop(), name="salvo-dispatch")
        self._task.add_done_callback(_log_crash)

    async def infer(
        self, request: Prepared, deadline_ns: int | None = None, probe: Probe | None = None
    ) -> _Outputs:
        """Queue `request` and wait for its outputs (requested outputs only, in order asked).

        `deadline_ns` (monotonic) comes from the gRPC deadline; the request's `timeout`
        parameter and the model's default timeout may shorten it. A request still queued at
        its deadline is answered DEADLINE_EXCEEDED and never runs.
        """
        return await self.wait(self.submit(request, deadline_ns, probe))

    def submit(
        self, request: Prepared, deadline_ns: int | None = None, probe: Probe | None = None
    ) -> Entry:
        """Queue `request` now, without waiting: the first half of `infer`, for a caller
        that must have the request queued before it yields (the cache's coalescing)."""
        if not self._accepting:
            raise ModelUnavailable(f"model '{request.model}' is unloading")
        loop = asyncio.get_running_loop()
        now = time.monotonic_ns()
        call_deadline_ns = deadline_ns
        deadline_ns = request_deadline_ns(
            request.parameters,
            now,
            deadline_ns,
            self.default_timeout_ns,
            self.allow_timeout_override,
        )
        priority = request.parameters.get("priority", 0)
        entry = Entry(
            request,
            enqueued_ns=now,
            deadline_ns=deadline_ns,
            priority=priority if isinstance(priority, int) else 0,
            waiter=loop.create_future(),
            probe=probe,
        )
        self.queue.append(entry)
        self._idle.clear()
        if self.queue.arrival_matters():
            self._wake.set()
        self._notify()
        # At the call's own gRPC deadline gRPC cancels the caller; a shorter one (the
        # `timeout` parameter, the model's default) gets a timer that answers the request
        # DEADLINE_EXCEEDED if it is still queued then.
        if deadline_ns is not None and deadline_ns != call_deadline_ns:
            delay_s = max(deadline_ns - now, 0) / 1e9
            timer = loop.call_later(delay_s, self._expire_one, entry)
            entry.waiter.add_done_callback(lambda _: timer.cancel())
        return entry

    async def wait(self, entry: Entry) -> _Outputs:
        """The outputs of a submitted request. The caller awaits its waiter directly (no
        shield, no wait_for: each would cost a future or a task per request), and the
        caller leaving cancels the waiter, which the batch skips."""
        try:
            return await entry.waiter
        except asyncio.CancelledError:
            self._withdraw(entry)  # the caller went away: never run it if it has not started
            raise

    def abandon(self, entry: Entry) -> None:
        """Nobody waits for a submitted request any more: never run it if it has not
        started, and cancel its waiter (a running one finishes, its outputs dropped)."""
        self._withdraw(entry)
        entry.waiter.cancel()

    def _expire_one(self, entry: Entry) -> None:
        """At a request's deadline: answer DEADLINE_EXCEEDED if it has not started running.

        One that is running already finishes, and its caller gets the answer."""
        if entry.waiter.done() or not self._withdraw(entry):
            return
        _set_exception(
            entry.waiter,
            DeadlineExceeded(
                f"request timed out after waiting in the queue of model '{self.model.config.name}'"
            ),
        )

    def _withdraw(self, entry: Entry) -> bool:
        """Cancel `entry` unless a worker has started it; True if it will never run."""
        with self._claim:
            if entry.started:
                return False
            entry.cancelled = True
        self.queue.remove(entry)
        self._after_change()
        return True

    async def wait_until(self, predicate: Callable[[], bool]) -> None:
        """Return once `predicate()` holds; it is re-checked whenever the queue changes.

        For drains and tests that must know a request is queued, without polling.
        """
        if predicate():
            return
        waiter = asyncio.get_running_loop().create_future()
        self._observers.append((predicate, waiter))
        try:
            await waiter
        finally:
            with contextlib.suppress(ValueError):
                self._observers.remove((predicate, waiter))

    def _notify(self) -> None:
        for predicate, waiter in self._observers:
            if not waiter.done() and predicate():
                waiter.set_result(None)

    def _after_change(self) -> None:
        if not self.queue and not self.in_flight:
            self._idle.set()
        self._notify()

    async def _dispatch_loop(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            now = time.monotonic_ns()
            for entry in self.queue.expire(now):
                if not entry.cancelled:
                    _set_exception(
                        entry.waiter,
                        DeadlineExceeded(
                            f"request timed out in the queue of model '{self.model.config.name}'"
                        ),
                    )
            ran_here = False
            while self._free and self.queue:
                batch = self.queue.next_batch(now)
                if batch is None:
                    self._arm_timer()
                    break
                instance = self._free.pop()
                self.in_flight += len(batch)
                if self.on_loop:
                    self._run_here(instance, batch)
                    ran_here = True
                    break  # let the loop serve I/O before the next batch
                task = asyncio.create_task(self._execute(instance, batch))
                self._running.add(task)
                task.add_done_callback(self._running.discard)
                task.add_done_callback(_log_crash)
            self._after_change()
            if ran_here:
                await asyncio.sleep(0)

    def _arm_timer(self) -> None:
        when = self.queue.hold_until_ns()
        if when is None:
            return
        if self._timer is not None:
            self._timer.cancel()
        loop = asyncio.get_running_loop()
        delay_s = max(when - time.monotonic_ns(), 0) / 1e9
        self._timer = loop.call_later(delay_s, self._wake.set)

    def _run_here(self, instance: int, batch: list[Entry]) -> None:
        """Run `batch` on the event loop, now (see `runs_on_loop`), on one torch thread
        (`one_torch_thread`). Nothing it raises leaves: the dispatcher that calls it must
        go on."""
        start = time.monotonic_ns()
        outcome: Ran | Exception
        try:
            with one_torch_thread():
                outcome = run_batch(self.model, self._claim, batch, instance)
        except Exception as exc:
            outcome = exc
        self._settle(instance, batch, start, outcome)
        self._watch_loop(batch, start, time.monotonic_ns())

    def _watch_loop(self, batch: list[Entry], start: int, finished: int) -> None:
        """The guard of `execution: auto` (see `salvo.engine.execution`)."""
        guard = self._guard
        if guard.tripped(start, finished) and self.model.config.optimization.execution == "auto":
            self.on_loop = False
            log.warning(
                "model '%s': %d batches in a row, over %.0f ms, held the event loop for over "
                "%.0f ms each (the last: %d rows, %.1f ms); its batches run on its own thread "
                "from now on",
                self.model.config.name, guard.slow, (finished - guard.slow_since_ns) / 1e6,
                LOOP_GUARD_NS / 1e6, sum(e.request.rows for e in batch), (finished - start) / 1e6,
            )  # fmt: skip

    def _threads_now(self) -> int | None:
        """The intra-op threads of a batch starting now (its instance already taken from
        `_free`): None (as the thread has them) unless `shares_cores`."""
        if not self.shares_cores:
            return None
        return max(1, self._threads // (self._instances - len(self._free)))

    async def _execute(self, instance: int, batch: list[Entry]) -> None:
        """Run `batch` on `instance`'s thread."""
        loop = asyncio.get_running_loop()
        start = time.monotonic_ns()
        outcome: Ran | Exception | None = None  # None: this task was cancelled
        threads = self._threads_now()
        try:
            outcome = await loop.run_in_executor(
                self._executors[instance],
                run_batch,
                self.model,
                self._claim,
                batch,
                instance,
                threads,
            )
        except Exception as exc:
            outcome = exc
        finally:
            self._settle(instance, batch, start, outcome)

    def _settle(
        self, instance: int, batch: list[Entry], start: int, outcome: Ran | Exception | None
    ) -> None:
        """After a batch ran (or raised): statistics, answers, and `instance` free again,
        whatever goes wrong on the way (our own bug fails what is still unanswered)."""
        try:
            self._record_queued(batch, start)
            if isinstance(outcome, Exception):
                self._failed(batch, outcome)
            elif outcome is not None:
                self._succeeded(batch, *outcome, start)
        except Exception as exc:
            self._failed(batch, exc)
        finally:
            self._end(instance, batch)

    def _record_queued(self, batch: list[Entry], start: int) -> None:
        """Queue-time statistics for a batch starting at `start`."""
        telemetry = self.telemetry
        name = self.model.config.name
        for entry in batch:
            self.stats.record_queued(start - entry.enqueued_ns)
            if telemetry is not None:
                telemetry.record_queue(name, self.version, (start - entry.enqueued_ns) / 1e9)

    def _failed(self, batch: list[Entry], exc: Exception) -> None:
        """Answer every request of `batch` not answered yet with `exc`'s error."""
        if isinstance(exc, SalvoError):
            log.warning("batch of %d failed: %s", len(batch), exc.message)
            error: SalvoError = exc
        else:  # our own bug: fail this batch only, and say so in the log
            log.exception("batch of model '%s' failed", self.model.config.name, exc_info=exc)
            error = ModelFailed(f"batch failed: {type(exc).__name__}")
        for entry in batch:
            _set_exception(entry.waiter, error)

    def _succeeded(
        self,
        batch: list[Entry],
        ran: list[Entry],
        outputs: _Outputs,
        timings: Timings,
        start: int,
    ) -> None:
        for entry in batch:
            if not entry.started:  # not in `ran`: its caller left, nobody waits for an answer
                entry.waiter.cancel()
        if ran:
            rows = sum(e.request.rows for e in ran)
            self.stats.record_batch(
                rows, len(ran), timings.input_ns, timings.infer_ns, timings.output_ns
            )
            if self.telemetry is not None:
                self._observe(self.telemetry, ran, rows, start, timings)
            for entry, mine in zip(ran, split_outputs(ran, outputs, self.batching), strict=True):
                _set_result(entry.waiter, mine)

    def _end(self, instance: int, batch: list[Entry]) -> None:
        finished = time.monotonic_ns()
        self.queue.completed(sum(e.request.rows for e in batch), finished)
        self.in_flight -= len(batch)
        self._free.append(instance)
        self._wake.set()
        self._after_change()

    def _observe(
        self, telemetry: Telemetry, ran: list[Entry], rows: int, start: int, timings: Timings
    ) -> None:
        finished = time.monotonic_ns()
        compute_ns = timings.input_ns + timings.infer_ns + timings.output_ns
        telemetry.record_batch(self.model.config.name, self.version, rows, compute_ns / 1e9)
        probes = [e.probe for e in ran if e.probe is not None]
        for entry in ran:
            probe = entry.probe
            if probe is not None:
                probe.enqueued_ns = entry.enqueued_ns
                probe.started_ns = start
                probe.finished_ns = finished
                probe.batch_rows = rows
        if any(p.span is not None for p in probes):
            telemetry.batch_span(self.model.config.name, self.version, probes, start, finished)

    async def stop(self, timeout_s: float = 30.0) -> None:
        """Stop taking requests, let queued and running ones finish, then free the threads.

        Whatever has not finished within `timeout_s` is answered UNAVAILABLE.
        """
        self._accepting = False
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._idle.wait(), timeout_s)
        for entry in list(self.queue):
            self.queue.remove(entry)
            _set_exception(entry.waiter, ModelUnavailable("model unloaded before the request ran"))
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        if self._timer is not None:
            self._timer.cancel()
        for executor in self._executors:
            executor.shutdown(wait=False, cancel_futures=True)


def _log_crash(task: asyncio.Task) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("task %s crashed", task.get_name(), exc_info=task.exception())
