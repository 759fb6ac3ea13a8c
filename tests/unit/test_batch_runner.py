"""`salvo batch`'s runner against a fake server (a Python function in place of the stream):
the window of requests in flight, transient failures retried with exponential back-off and
jitter, refused batches re-sent row by row, stopping, and the journal's group commit."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Mapping
from pathlib import Path

import grpc
import numpy as np
import pytest

from salvo_client.batch.journal import Journal, read_journal
from salvo_client.batch.retries import Backoff
from salvo_client.batch.rows import Grouper, Row, RowResult
from salvo_client.batch.runner import Committer, Runner
from salvo_client.errors import InvalidArgument, NotFound, SalvoClientError, Unavailable

POISON = -1.0


def rows(count: int, poison: tuple[int, ...] = ()) -> list[Row]:
    """Rows whose tensor holds their index (or POISON), so answers say whose they are."""
    return [
        Row(i, i, {"x": np.full(2, POISON if i in poison else i, np.float32)}) for i in range(count)
    ]


class FakeServer:
    """y = 2x. Refuses (INVALID_ARGUMENT) any request holding a POISON row, and fails the
    first `failures` requests with `error`; counts what is in flight."""

    def __init__(self, failures: int = 0, error: SalvoClientError | None = None) -> None:
        self.failures = failures
        self.error = error or Unavailable(grpc.StatusCode.UNAVAILABLE, "server restarting")
        self.requests: list[list[float]] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self.hold: asyncio.Event | None = None
        self.held = asyncio.Event()

    async def send(self, inputs: Mapping[str, np.ndarray]) -> Mapping[str, np.ndarray]:
        x = inputs["x"]
        self.requests.append(x[:, 0].tolist())
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            if self.hold is not None:
                self.held.set()
                await self.hold.wait()
            for _ in range(3):  # answers arrive later, interleaved with other requests
                await asyncio.sleep(0)
            if self.failures:
                self.failures -= 1
                raise self.error
            if (x == POISON).any():
                raise InvalidArgument(grpc.StatusCode.INVALID_ARGUMENT, "input 'x': poisoned")
            return {"y": x * 2}
        finally:
            self.in_flight -= 1


class Sleeps:
    """Records each back-off wait instead of waiting."""

    def __init__(self) -> None:
        self.delays: list[float] = []

    async def __call__(self, delay_s: float) -> None:
        self.delays.append(delay_s)
        await asyncio.sleep(0)


def runner(server: FakeServer, committed: list[list[RowResult]], **kwargs) -> Runner:
    options = {
        "concurrency": 2,
        "backoff": Backoff(retries=3, initial_s=0.1),
        "outputs": ["y"],
        "sleep": Sleeps(),
        "rng": random.Random(0),
    }
    options.update(kwargs)
    batch_size = options.pop("batch_size", 4)
    return Runner(server.send, committed.append, Grouper(batch_size, True), **options)


def by_index(committed: list[list[RowResult]]) -> dict[int, RowResult]:
    flat = [r for results in committed for r in results]
    indices = [r.index for r in flat]
    assert len(indices) == len(set(indices)), "a row was committed twice"
    return {r.index: r for r in flat}


def assert_doubled(result: RowResult) -> None:
    assert result.outputs is not None, result.error
    np.testing.assert_array_equal(result.outputs["y"], np.full(2, 2.0 * result.index))


async def test_every_row_scores_once_within_the_window():
    server = FakeServer()
    committed: list[list[RowResult]] = []
    run = runner(server, committed, concurrency=3)
    stats = await run.run(rows(50), done=set())
    results = by_index(committed)
    assert sorted(results) == list(range(50))
    for result in results.values():
        assert_doubled(result)
    assert server.max_in_flight == 3 == run.max_in_flight
    assert stats.exhausted and stats.stopped is None and stats.unsent == 0
    assert stats.requests == len(server.requests) == 13  # 12 batches of 4, and 2 rows


async def test_journalled_rows_are_skipped_and_unreadable_ones_committed_unsent():
    server = FakeServer()
    committed: list[list[RowResult]] = []
    source = rows(10)
    source[4] = Row(4, 4, error="line 5: not valid JSON")
    stats = await runner(server, committed).run(source, done={0, 1, 2, 7})
    results = by_index(committed)
    assert sorted(results) == [3, 4, 5, 6, 8, 9]
    assert results[4].error == "line 5: not valid JSON"
    sent = sorted(v for request in server.requests for v in request)
    assert sent == [3, 5, 6, 8, 9]
    assert stats.skipped == 4 and stats.read == 10 and stats.exhausted


async def test_transient_failures_are_retried_with_exponential_back_off_and_jitter():
    server = FakeServer(failures=3)
    committed: list[list[RowResult]] = []
    sleeps = Sleeps()
    backoff = Backoff(retries=5, initial_s=0.1, multiplier=2)
    stats = await runner(server, committed, concurrency=1, backoff=backoff, sleep=sleeps).run(
        rows(8), set()
    )
    assert sorted(by_index(committed)) == list(range(8))
    assert stats.retries == 3 and stats.requests == 2 + 3
    # The first batch failed three times: waits within [half, all] of 0.1, 0.2, 0.4 s.
    assert len(sleeps.delays) == 3
    for attempt, delay in enumerate(sleeps.delays, start=1):
        ceiling = 0.1 * 2 ** (attempt - 1)
        assert ceiling / 2 <= delay <= ceiling
    assert len(set(sleeps.delays)) == 3


def test_the_back_off_is_capped_and_jittered():
    backoff = Backoff(retries=10, initial_s=1.0, max_s=4.0)
    rng = random.Random(1)
    delays = [backoff.delay_s(n, rng) for n in range(1, 8)]
    assert [backoff.ceiling_s(n) for n in range(1, 6)] == [1.0, 2.0, 4.0, 4.0, 4.0]
    assert all(2.0 <= d <= 4.0 for d in delays[2:]) and len(set(delays)) == len(delays)
    with pytest.raises(ValueError):
        Backoff(retries=-1)
    with pytest.raises(ValueError):
        Backoff(initial_s=2, max_s=1)


async def test_when_retries_run_out_the_job_stops_with_what_it_scored():
    server = FakeServer()
    committed: list[list[RowResult]] = []
    run = runner(server, committed, concurrency=1, backoff=Backoff(retries=2, initial_s=0.1))
    first = await run.run(rows(4), set())  # one batch, scored
    assert first.exhausted and sorted(by_index(committed)) == [0, 1, 2, 3]

    server.failures = 100
    committed.clear()
    run = runner(server, committed, concurrency=1, backoff=Backoff(retries=2, initial_s=0.1))
    stats = await run.run(rows(12), set())
    assert committed == []
    assert not stats.exhausted and stats.unsent >= 4
    assert stats.stopped is not None and "UNAVAILABLE" in stats.stopped
    assert "after 2 retries" in stats.stopped
    assert stats.requests == 3  # one batch: the first attempt and two retries, then stop


async def test_a_refused_batch_is_resent_row_by_row_so_good_rows_still_score():
    server = FakeServer()
    committed: list[list[RowResult]] = []
    stats = await runner(server, committed).run(rows(8, poison=(1, 6)), set())
    results = by_index(committed)
    assert sorted(results) == list(range(8))
    for index, result in results.items():
        if index in (1, 6):
            assert result.error == "INVALID_ARGUMENT: input 'x': poisoned"
        else:
            assert_doubled(result)
    assert stats.refused_batches == 2
    assert stats.requests == 2 + 8  # two batches refused, then each of their rows alone
    assert stats.exhausted and stats.unsent == 0


async def test_an_error_that_is_not_the_rows_fault_stops_the_job():
    server = FakeServer(failures=1, error=NotFound(grpc.StatusCode.NOT_FOUND, "unknown model"))
    committed: list[list[RowResult]] = []
    stats = await runner(server, committed, concurrency=1).run(rows(12), set())
    assert stats.stopped == "the server answered NOT_FOUND: unknown model"
    assert not stats.exhausted and committed == [] and stats.requests == 1


async def test_stopping_lets_requests_in_flight_finish_and_sends_nothing_more():
    server = FakeServer()
    server.hold = asyncio.Event()
    committed: list[list[RowResult]] = []
    run = runner(server, committed, concurrency=2, batch_size=2)
    task = asyncio.create_task(run.run(rows(40), set()))
    await server.held.wait()
    while run.in_flight < 2:  # the window fills before the first answer
        await asyncio.sleep(0)
    run.stop("interrupted (SIGINT)")
    server.hold.set()
    stats = await task
    assert sorted(by_index(committed)) == [0, 1, 2, 3]  # the two batches in flight
    assert len(server.requests) == 2
    assert stats.stopped == "interrupted (SIGINT)" and not stats.exhausted


async def test_abandoning_cancels_what_is_in_flight():
    server = FakeServer()
    server.hold = asyncio.Event()
    committed: list[list[RowResult]] = []
    run = runner(server, committed, concurrency=2, batch_size=2)
    task = asyncio.create_task(run.run(rows(40), set()))
    await server.held.wait()
    run.abandon()
    stats = await task
    assert committed == [] and stats.unsent >= 2 and not stats.exhausted


async def test_a_stop_during_a_back_off_leaves_the_batch_unsent():
    server = FakeServer(failures=100)
    committed: list[list[RowResult]] = []
    run = runner(server, committed, concurrency=1, sleep=None, backoff=Backoff(initial_s=30))
    task = asyncio.create_task(run.run(rows(4), set()))
    while run.stats.retries == 0:
        await asyncio.sleep(0)
    run.stop("interrupted (SIGINT)")  # wakes the 30 s wait at once
    stats = await asyncio.wait_for(task, 5)
    assert committed == [] and stats.unsent == 4 and stats.requests == 1


async def test_the_committer_writes_each_batch_as_a_record(tmp_path: Path):
    path = tmp_path / "j"
    journal = Journal.open(path, {"job": 1})
    durable: list[list[RowResult]] = []
    committer = Committer(journal, durable.append, lambda exc: None)
    committer.start()
    batches = [[RowResult(i, i, {"y": np.array([i], np.float32)})] for i in range(5)]
    for results in batches:
        committer.put(results)
    await committer.close()
    journal.close()
    assert durable == batches
    contents = read_journal(path)
    assert contents.records == 5 and sorted(contents.results) == list(range(5))


async def test_a_journal_that_cannot_be_written_is_reported(tmp_path: Path):
    class Full(Journal):
        def append(self, batches):
            raise OSError(28, "No space left on device")

    journal = Full.open(tmp_path / "j", {"job": 1})
    failures: list[OSError] = []
    durable: list[list[RowResult]] = []
    committer = Committer(journal, durable.append, failures.append)
    committer.start()
    committer.put([RowResult(0, 0, None, "x")])
    await committer.close()
    journal.close()
    assert durable == [] and committer.failure is not None
    assert [f.strerror for f in failures] == ["No space left on device"]
