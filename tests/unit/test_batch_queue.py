"""The batch queue's rules, by example and under arbitrary interleavings (hypothesis)."""

from __future__ import annotations

import copy
from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from salvo.domain.status import Overloaded
from salvo.engine.batch_queue import MAX_MISSES, QUIET_CAP, QUIET_ENDS, BatchQueue, Entry


@dataclass(frozen=True)
class Req:
    id: int
    rows: int = 1
    signature: tuple = ("a",)


def entry(i, rows=1, sig=("a",), t=0, priority=0, deadline=None):
    return Entry(Req(i, rows, sig), enqueued_ns=t, priority=priority, deadline_ns=deadline)


def ids(batch):
    return [e.request.id for e in batch]


def test_free_instance_takes_everything_queued_up_to_max_rows():
    q = BatchQueue(8)
    for i, rows in enumerate([3, 3, 3, 1]):
        q.append(entry(i, rows))
    assert ids(q.next_batch(0)) == [0, 1]  # 6 rows; the 3-row request would make 9
    assert ids(q.next_batch(0)) == [2, 3]
    assert q.next_batch(0) is None and len(q) == 0 and q.rows == 0


def test_only_equal_signatures_share_a_batch():
    q = BatchQueue(8)
    for i, sig in enumerate(["a", "b", "a", "b"]):
        q.append(entry(i, sig=(sig,)))
    assert ids(q.next_batch(0)) == [0, 2]
    assert ids(q.next_batch(0)) == [1, 3]


def test_without_batching_each_request_runs_alone():
    q = BatchQueue(0)
    q.append(entry(0))
    q.append(entry(1))
    assert ids(q.next_batch(0)) == [0]


def test_preferred_sizes_wait_up_to_the_delay_then_go():
    q = BatchQueue(8, preferred_batch_sizes=(4,), max_queue_delay_ns=1000)
    for i in range(3):
        q.append(entry(i, t=0))
    assert q.next_batch(500) is None  # 3 rows, no preferred size yet, delay not over
    assert q.hold_until_ns() == 1000
    assert ids(q.next_batch(1000)) == [0, 1, 2]  # delay over: what there is goes


def test_largest_fillable_preferred_size_goes_at_once():
    q = BatchQueue(8, preferred_batch_sizes=(2, 4), max_queue_delay_ns=10**9)
    for i in range(6):
        q.append(entry(i))
    assert ids(q.next_batch(0)) == [0, 1, 2, 3]
    assert ids(q.next_batch(0)) == [4, 5]


def test_full_queue_rejects_and_leaves_the_rest_alone():
    q = BatchQueue(8, max_queue_size=2)
    q.append(entry(0))
    q.append(entry(1))
    with pytest.raises(Overloaded, match="queue full"):
        q.append(entry(2))
    assert ids(q.next_batch(0)) == [0, 1]


def test_priority_levels_then_fifo():
    q = BatchQueue(1, priority_levels=3, default_priority_level=2)
    q.append(entry(0, priority=3))
    q.append(entry(1))  # default: 2
    q.append(entry(2, priority=1))
    q.append(entry(3, priority=9))  # out of range: default
    assert [ids(q.next_batch(0)) for _ in range(4)] == [[2], [1], [3], [0]]


def test_expire_and_remove():
    q = BatchQueue(8)
    a, b, c = entry(0, deadline=10), entry(1), entry(2, deadline=100)
    for e in (a, b, c):
        q.append(e)
    assert q.expire(50) == [a]
    assert q.remove(b) and not q.remove(b)
    assert ids(q.next_batch(60)) == [2]


# -- any interleaving ---------------------------------------------------------------------

append = st.tuples(
    st.just("append"),
    st.integers(1, 4),  # rows
    st.sampled_from(["a", "b"]),  # signature
    st.integers(0, 3),  # priority (0: default)
    st.one_of(st.none(), st.integers(1, 50)),  # deadline, relative
)
cancel = st.tuples(st.just("cancel"), st.integers(0, 200))
tick = st.tuples(st.just("tick"), st.integers(1, 30))
dispatch = st.tuples(st.just("dispatch"))
ops = st.lists(st.one_of(append, cancel, tick, dispatch), max_size=80)


@settings(max_examples=300, deadline=None)
@given(
    ops=ops,
    max_batch=st.integers(0, 8),
    max_queue=st.integers(0, 6),
    preferred=st.lists(st.integers(1, 8), max_size=3),
    delay=st.integers(0, 20),
    levels=st.integers(0, 3),
    until_quiet=st.booleans(),
)
def test_every_request_answered_exactly_once(
    ops, max_batch, max_queue, preferred, delay, levels, until_quiet
):
    q = BatchQueue(
        max_batch,
        max_queue_size=max_queue,
        preferred_batch_sizes=tuple(preferred),
        max_queue_delay_ns=delay,
        priority_levels=levels,
        until_quiet=until_quiet,
    )
    now = 0
    entries: list[Entry] = []
    fate: dict[int, str] = {}  # id -> how it was answered
    gone_at: dict[int, int] = {}  # id -> when it was cancelled or expired

    def run(batch: list[Entry]) -> None:
        assert batch, "a batch is never empty"
        assert len({e.request.signature for e in batch}) == 1
        rows = sum(e.request.rows for e in batch)
        assert max_batch <= 0 or rows <= max_batch
        if max_batch <= 0:
            assert len(batch) == 1
        head_level = min(e.priority for e in batch)
        assert all(e.priority >= head_level for e in q)  # nothing better was left behind
        for e in batch:
            assert e.request.id not in fate, "answered twice"
            assert not e.cancelled, "ran after its cancel"
            assert e.deadline_ns is None or e.deadline_ns > now, "ran after its deadline"
            fate[e.request.id] = "ran"

    def expire() -> None:
        for e in q.expire(now):
            assert e.request.id not in fate
            fate[e.request.id] = "expired"

    for op in ops:
        if op[0] == "append":
            _, rows, sig, priority, deadline = op
            e = Entry(
                Req(len(entries), min(rows, max(max_batch, 1)), (sig,)),
                enqueued_ns=now,
                priority=priority,
                deadline_ns=None if deadline is None else now + deadline,
            )
            entries.append(e)
            held_until = q.hold_until_ns()
            try:
                q.append(e)
            except Overloaded:
                assert max_queue and len(q) == max_queue
                fate[e.request.id] = "rejected"
            else:
                if not q.arrival_matters():
                    # The shell skips the dispatcher's pass. Sound only if the hold's timer
                    # is not late now, and the pass would hold too (or the timer is due).
                    assert held_until is not None and q.hold_until_ns() >= held_until
                    assert now >= held_until or copy.deepcopy(q).next_batch(now) is None
        elif op[0] == "cancel" and entries:
            e = entries[op[1] % len(entries)]
            if q.remove(e):
                e.cancelled = True
                fate[e.request.id] = "cancelled"
                gone_at[e.request.id] = now
        elif op[0] == "tick":
            now += op[1]
            expire()
        elif op[0] == "dispatch":
            expire()
            batch = q.next_batch(now)
            if batch is not None:
                run(batch)
                q.completed(sum(e.request.rows for e in batch), now)  # rows expected back
            elif len(q):  # held: the dispatcher's timer must be due later, or it never wakes
                until = q.hold_until_ns()
                assert until is not None and until > now
        assert q.rows == sum(e.request.rows for e in q)
        assert len(q) == len(list(q))

    # Drain: past every hold, the queue empties and every request has one answer.
    now += delay + 1
    expire()
    while (batch := q.next_batch(now)) is not None:
        run(batch)
    assert len(q) == 0 and q.rows == 0
    assert sorted(fate) == list(range(len(entries)))


def test_rows_expected_back_hold_a_batch_until_they_come():
    q = BatchQueue(8, max_queue_delay_ns=1000)
    q.completed(rows=3, now_ns=0)  # expect 3 rows back
    q.append(entry(0, t=10))
    assert q.next_batch(20) is None  # 1 row queued, 2 more expected: hold
    assert q.hold_until_ns() == 1010
    q.append(entry(1, t=30))
    q.append(entry(2, t=40))  # all three are back
    assert ids(q.next_batch(50)) == [0, 1, 2]
    q.completed(rows=3, now_ns=60)  # however fast the batch ran, its rows are expected
    q.append(entry(3, t=70))
    assert q.next_batch(80) is None


@pytest.mark.parametrize("until_quiet", [False, True])
def test_during_a_hold_only_an_arrival_that_ends_it_matters(until_quiet):
    # The last row expected back ends the hold.
    q = BatchQueue(8, max_queue_delay_ns=1000, until_quiet=until_quiet)
    q.completed(rows=3, now_ns=0)  # 3 rows expected back (4 with until_quiet's probe)
    q.append(entry(0, t=10))
    assert q.arrival_matters()  # nothing decided since the batch: the dispatcher looks
    assert q.next_batch(20) is None  # hold
    i = 1
    while q.expected_rows > 1:
        q.append(entry(i, t=20 + i))
        assert not q.arrival_matters()  # short of the count: the hold's timer stands
        i += 1
    q.append(entry(i, t=20 + i))
    assert q.arrival_matters()
    assert len(q.next_batch(30)) == i + 1
    q.append(entry(99, t=40))
    assert q.arrival_matters()  # not holding: the dispatcher looks

    # A full batch ends the hold, however many rows are still expected.
    q = BatchQueue(4, max_queue_delay_ns=1000, until_quiet=until_quiet)
    q.completed(rows=6, now_ns=0)
    q.append(entry(0, t=10))
    assert q.next_batch(10) is None
    for i in (1, 2):
        q.append(entry(i, t=10 + i))
        assert not q.arrival_matters()
    q.append(entry(3, t=20))
    assert q.expected_rows and q.arrival_matters()
    assert ids(q.next_batch(20)) == [0, 1, 2, 3]


def test_at_low_load_the_returning_row_waits_for_nothing():
    q = BatchQueue(8, max_queue_delay_ns=1000)
    for i in range(5):  # one closed-loop client: its row is back before the instance asks
        q.completed(rows=1, now_ns=100 * i)
        q.append(entry(i, t=100 * i + 10))
        assert ids(q.next_batch(100 * i + 10)) == [i]


def test_a_hold_that_times_out_forgets_what_it_expected():
    q = BatchQueue(8, max_queue_delay_ns=1000)
    q.completed(rows=4, now_ns=0)
    q.append(entry(0, t=0))
    assert q.next_batch(500) is None
    assert ids(q.next_batch(1000)) == [0]  # the others never came
    q.append(entry(1, t=1100))
    assert ids(q.next_batch(1100)) == [1]  # nothing held any more


def _timed_out_hold(q, i, t):
    """Answer a batch of 2, get 1 row back, hold, time out; the time after it."""
    q.completed(rows=2, now_ns=t)
    q.append(entry(i, t=t))
    assert q.next_batch(t) is None
    assert ids(q.next_batch(t + 1000)) == [i]
    return t + 1000


def _held(q, i, t):
    """Answer a batch of 2, get 1 row back: whether the queue holds it."""
    q.completed(rows=2, now_ns=t)
    q.append(entry(i, t=t))
    batch = q.next_batch(t)
    if batch is not None:
        assert ids(batch) == [i]
        q.expected_rows = 0  # the one row that never comes, out of the way
        return False
    q.append(entry(i + 1000, t=t))  # the other row comes: the hold paid off
    assert ids(q.next_batch(t)) == [i, i + 1000]
    return True


def test_holds_that_keep_timing_out_are_skipped_ever_longer():
    """Callers that never send again while they wait (a stream sending ahead, an open
    loop) must not make every batch wait `max_queue_delay_ns`."""
    q = BatchQueue(8, max_queue_delay_ns=1000)
    t = _timed_out_hold(q, 0, 0)  # first miss: the next 1 batch expects nothing
    assert not _held(q, 1, t)
    t = _timed_out_hold(q, 2, t)  # second miss: the next 3 skip
    assert [_held(q, 3 + i, t) for i in range(4)] == [False, False, False, True]


def test_skipping_stops_after_a_hold_that_paid_off():
    q = BatchQueue(8, max_queue_delay_ns=1000)
    t = 0
    for i in range(3):  # three misses: 7 batches skip
        t = _timed_out_hold(q, i, t)
        for j in range(2 ** (i + 1) - 1):
            assert not _held(q, 100 * i + j + 10, t)
    assert _held(q, 500, t)  # the 8th holds, and its rows come
    t = _timed_out_hold(q, 600, t)  # a miss now counts as the first again
    assert not _held(q, 601, t)
    assert _held(q, 700, t)


def test_skipping_is_bounded():
    q = BatchQueue(8, max_queue_delay_ns=1000)
    t, skips = 0, []
    for i in range(MAX_MISSES + 2):  # every hold times out
        skipped = 0
        while True:
            q.completed(rows=2, now_ns=t)
            q.append(entry(i, t=t))
            if q.next_batch(t) is None:
                break
            skipped += 1
        assert ids(q.next_batch(t + 1000)) == [i]
        t += 1000
        skips.append(skipped)
    assert skips == [0] + [2**n - 1 for n in range(1, MAX_MISSES + 1)] + [2**MAX_MISSES - 1]


def test_a_hold_whose_rows_all_left_is_not_counted_as_paid_off():
    q = BatchQueue(8, max_queue_delay_ns=1000)
    t = _timed_out_hold(q, 0, 0)  # a first miss: the next batch expects nothing
    assert not _held(q, 1, t)
    q.completed(rows=2, now_ns=t)  # expects 2
    held = entry(2, t=t)
    q.append(held)
    assert q.next_batch(t) is None  # holding for the other row
    assert q.remove(held)  # its caller left (the dispatcher never asks an empty queue)
    q.expected_rows = 0  # the row that never comes, out of the way
    q.append(entry(3, t=t))
    assert ids(q.next_batch(t)) == [3]  # not a hold that paid off
    t = _timed_out_hold(q, 4, t)  # so this is the second miss in a row: 3 batches skip
    assert [_held(q, 5 + i, t) for i in range(4)] == [False, False, False, True]


def test_until_quiet_holds_while_rows_keep_coming_then_goes_when_they_stop():
    q = BatchQueue(32, max_queue_delay_ns=100, until_quiet=True)
    q.completed(rows=8, now_ns=0)  # 8 rows expected back, and one more: the probe
    assert q.expected_rows == 9
    for i in range(8):  # they come 80 ns apart: 640 ns in all, far past the 100 ns delay
        t = 80 * (i + 1)
        q.append(entry(i, t=t))
        assert q.next_batch(t) is None
        assert q.hold_until_ns() == t + 100  # quiet for the delay: go
    assert q.expected_rows == 1  # only the probe is missing
    assert ids(q.next_batch(740)) == list(range(8))  # it never came: go, nothing forgotten
    q.completed(rows=8, now_ns=750)  # the probe backs off: this batch expects just its rows
    assert q.expected_rows == 8


def test_until_quiet_caps_a_hold_and_counts_the_cap_as_a_timeout():
    q = BatchQueue(64, max_queue_delay_ns=100, until_quiet=True)
    q.completed(rows=50, now_ns=0)
    t = 0
    for i in range(12):  # rows keep coming, but fewer than expected
        t += 90
        q.append(entry(i, t=t))
        if t < QUIET_CAP * 100 + 90:  # the hold counts from the first row (90)
            assert q.next_batch(t) is None
    assert ids(q.next_batch(QUIET_CAP * 100 + 90)) == list(range(12))
    assert q.expected_rows == 0  # a timeout: forgotten, and the next batch expects nothing
    q.completed(rows=12, now_ns=t + 10)
    assert q.expected_rows == 0


def test_until_quiet_keeps_the_count_over_quiet_ends_but_not_too_many_in_a_row():
    q = BatchQueue(8, max_queue_delay_ns=100, until_quiet=True)
    q.completed(rows=4, now_ns=0)  # 4 expected, plus the probe
    t = 0
    for i in range(QUIET_ENDS):
        q.append(entry(i, t=t + 10))  # one row comes, then none for the delay
        assert q.next_batch(t + 10) is None
        assert ids(q.next_batch(t + 110)) == [i]
        if i < QUIET_ENDS - 1:
            assert q.expected_rows == 4  # kept: the others may still be on their way
            q.completed(rows=1, now_ns=t + 120)  # the probe is still out: no other
            assert q.expected_rows == 5
        t += 200
    assert q.expected_rows == 0  # QUIET_ENDS in a row: the callers left


def test_until_quiet_probes_find_the_callers_the_count_missed():
    """Three callers in a closed loop, but the count starts at one (two joined while it
    expected nothing). The first probe pays off and adds a caller to the next batch; the
    next finds no more, and the count of the batch after is right."""
    q = BatchQueue(8, max_queue_delay_ns=100, until_quiet=True)
    q.completed(rows=1, now_ns=0)  # expects 1, and probes for one more
    q.append(entry(0, t=10))
    assert q.next_batch(10) is None  # holding for the probe
    q.append(entry(1, t=20))  # a second caller: the probe paid off
    assert ids(q.next_batch(20)) == [0, 1]
    q.append(entry(2, t=30))  # the third arrives while the batch runs
    q.completed(rows=2, now_ns=40)  # expects 2 + a probe; the third is already here
    q.append(entry(3, t=50))
    q.append(entry(4, t=60))
    assert q.next_batch(60) is None  # 3 rows; the probe is still out
    assert ids(q.next_batch(160)) == [2, 3, 4]  # it did not come: all three callers are in
    q.completed(rows=3, now_ns=170)  # the count is right now, and the probe backs off
    for i, t in enumerate((180, 190)):
        q.append(entry(5 + i, t=t))
        assert q.next_batch(t) is None  # holding for the third
    q.append(entry(7, t=200))
    assert ids(q.next_batch(200)) == [5, 6, 7]  # one batch of all three, with no wait


def test_bounded_holds_are_unchanged_by_rows_that_keep_coming():
    q = BatchQueue(32, max_queue_delay_ns=100)
    q.completed(rows=8, now_ns=0)
    assert q.expected_rows == 8  # no probe
    q.append(entry(0, t=80))
    assert q.next_batch(80) is None
    assert q.hold_until_ns() == 180  # from when the batch could have gone (the row came)
    q.append(entry(1, t=160))
    assert ids(q.next_batch(180)) == [0, 1]


def test_until_quiet_ends_are_counted_in_a_row_only():
    q = BatchQueue(8, max_queue_delay_ns=100, until_quiet=True)
    t, n = 0, 0
    for _ in range(2 * QUIET_ENDS):  # quiet ends, each followed by a batch whose rows came
        q.completed(rows=2, now_ns=t)
        q.append(entry(n, t=t + 10))
        n += 1
        assert q.next_batch(t + 10) is None
        assert len(q.next_batch(t + 110)) == 1  # a quiet end
        assert q.expected_rows >= 1  # kept every time: never QUIET_ENDS in a row
        q.completed(rows=1, now_ns=t + 120)
        came = []
        while q.expected_rows:  # then every row expected comes
            q.append(entry(n, t=t + 130))
            came.append(n)
            n += 1
        assert ids(q.next_batch(t + 130)) == came
        t += 1000
