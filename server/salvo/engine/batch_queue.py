"""The dynamic batcher's queue: pure, synchronous state with no event loop in sight.

The asyncio shell in `scheduler.py` only appends, removes and asks for the next batch;
every decision about which requests run together lives here, so it can be tested with
plain calls (and hypothesis) and no timing.

Policy (Triton's vocabulary):
- Priority levels run highest first (level 1 is the highest); FIFO within a level.
- A batch holds requests with the head request's signature (non-batch shapes and requested
  outputs), in queue order, up to `max_batch_size` rows. Rows, not requests, are counted.
- A free instance takes whatever is queued, with one exception below: at low load a request
  waits for nothing.
- Expected returns: each answered row is counted as a row about to come back (a client in a
  closed loop sends its next request), and each arriving row cancels one. While rows are
  expected, a free instance holds a batch that is not full for at most
  `max_queue_delay_ns`, so under load batches fill up instead of splitting into small
  ones, each paying the per-batch cost. At low load the row that comes back has arrived
  before the instance asks, so nothing waits. A hold that times out forgets what it
  expected (clients that left, or callers that do not wait for their answers, such as a
  stream sending ahead), and the next holds are skipped: after the n-th timeout in a row,
  the next 2^n - 1 answered batches expect nothing (at most 1,023). A hold that ends
  because the rows came resets that count.
- `until_quiet` (opt-in, for callers in a closed loop): a hold lasts while rows keep
  arriving, until none has arrived for `max_queue_delay_ns` (a quiet end) or
  QUIET_CAP times that has passed since the batch could have gone. A quiet end keeps
  what is expected (the rows may still be on their way); QUIET_ENDS of them in a row
  (with no batch between them whose expected rows all came), or the cap, count as a
  timeout. And the count probes upward: each answered batch expects one row more than it
  answered until that row fails to come (a hold that ends with only that row missing, at
  the cap or not, is a failed probe: the probes back off like the holds), because
  arrivals that are not returns (callers joining, answers overtaken by queued requests)
  leave it short of the loop's true size for good. With preferred sizes it does nothing:
  those batches never hold for returns.
- With preferred sizes, the largest preferred size that the queue can fill goes at once;
  a smaller batch waits until `max_queue_delay_ns` has passed.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Hashable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from salvo.domain.status import Overloaded

MAX_MISSES = 10
"""Timed-out holds in a row that count: after that, 1,023 batches skip expectations."""

QUIET_CAP = 10
"""`until_quiet`: a hold ends after this many times `max_queue_delay_ns`, rows arriving
or not."""

QUIET_ENDS = 3
"""`until_quiet`: quiet ends in a row that count as a timeout (the callers left)."""


class Batchable(Protocol):
    """What the queue needs of a request."""

    @property
    def rows(self) -> int: ...

    @property
    def signature(self) -> Hashable: ...


@dataclass(eq=False, slots=True)
class Entry:
    """One queued request and its bookkeeping; compared by identity."""

    request: Batchable
    enqueued_ns: int
    deadline_ns: int | None = None
    priority: int = 0
    waiter: Any = None
    """Whatever the shell uses to answer the request (a future); opaque here."""
    cancelled: bool = False
    """Set when the caller went away or its deadline passed; a worker never runs it then."""
    started: bool = False
    """Set by the worker that runs it; from then on it is no longer cancelled, only dropped."""
    seq: int = field(default=0)
    probe: Any = None
    """Where the shell records timings for the request's spans and metrics; opaque here."""


class BatchQueue:
    """Queued requests of one model version, and the rule that forms batches from them."""

    def __init__(
        self,
        max_batch_size: int,
        *,
        max_queue_size: int = 0,
        preferred_batch_sizes: tuple[int, ...] = (),
        max_queue_delay_ns: int = 0,
        priority_levels: int = 0,
        default_priority_level: int = 0,
        until_quiet: bool = False,
    ) -> None:
        self.max_batch_size = max_batch_size
        self.max_queue_size = max_queue_size
        limit = max(max_batch_size, 1)
        self.preferred = tuple(sorted({p for p in preferred_batch_sizes if 0 < p <= limit}))
        self.max_queue_delay_ns = max_queue_delay_ns
        self.levels = max(priority_levels, 1)
        self.default_level = default_priority_level or (self.levels + 1) // 2 or 1
        self._queues: list[deque[Entry]] = [deque() for _ in range(self.levels)]
        self._size = 0
        self._rows = 0
        self._seq = 0
        self.expected_rows = 0
        """Rows answered whose clients have not sent again yet (see the module doc)."""
        self._free_since_ns = 0
        self._holding = False
        self._misses = 0
        """Holds for returning rows that timed out in a row."""
        self._skip = 0
        """Answered batches still to complete before rows are expected back again."""
        self.until_quiet = until_quiet
        self._last_arrival_ns = 0
        self._quiet_ends = 0
        """`until_quiet`: holds in a row that ended because no row came for a while."""
        self._probe = 0
        """`until_quiet`: rows of `expected_rows` that only probe (0 or 1)."""
        self._probe_misses = 0
        self._probe_skip = 0
        """Answered batches still to complete before the next probe."""

    def __len__(self) -> int:
        return self._size

    @property
    def rows(self) -> int:
        """Rows queued in all."""
        return self._rows

    def level_of(self, priority: int) -> int:
        """The priority level a request asking for `priority` gets (0: the default)."""
        if priority <= 0 or priority > self.levels:
            return self.default_level
        return priority

    def append(self, entry: Entry) -> None:
        """Queue `entry`, or raise Overloaded if the queue is full (nothing else changes)."""
        if self.max_queue_size and self._size >= self.max_queue_size:
            raise Overloaded(f"queue full: {self._size} requests queued (max_queue_size)")
        entry.priority = self.level_of(entry.priority)
        self._seq += 1
        entry.seq = self._seq
        self._queues[entry.priority - 1].append(entry)
        self._size += 1
        self._rows += entry.request.rows
        self.expected_rows = max(self.expected_rows - entry.request.rows, 0)
        self._last_arrival_ns = max(self._last_arrival_ns, entry.enqueued_ns)
        if self._probe and not self.expected_rows:
            self._probe = 0  # the probed row came: the count was short
            self._probe_misses = 0

    def arrival_matters(self) -> bool:
        """Whether the request just appended can change what a free instance does now.

        False only while the queue holds for rows expected back (`next_batch` said so) and
        the arrival neither filled a batch nor brought the last row expected. An arrival
        never brings a hold's end nearer, so the hold's timer stays right, and when it
        fires the queue reads the deadline afresh (`until_quiet` moves it later). The shell
        can then skip a dispatcher pass per arrival while a batch gathers.
        """
        return not self._holding or self._rows >= self.max_batch_size or not self.expected_rows

    def completed(self, rows: int, now_ns: int) -> None:
        """A batch of `rows` was answered: expect that many rows back, unless recent holds
        timed out (see the module doc)."""
        if self._skip:
            self._skip -= 1
        else:
            self.expected_rows += rows
            if self.until_quiet and not self._probe:
                if self._probe_skip:
                    self._probe_skip -= 1
                else:
                    self._probe = 1
                    self.expected_rows += 1
        self._free_since_ns = now_ns

    def remove(self, entry: Entry) -> bool:
        """Take `entry` out if it is still queued; False if it already left."""
        queue = self._queues[entry.priority - 1] if 0 < entry.priority <= self.levels else None
        if queue is None:
            return False
        try:
            queue.remove(entry)
        except ValueError:
            return False
        self._size -= 1
        self._rows -= entry.request.rows
        if not self._size:
            self._holding = False  # what it held left (cancelled, expired): nothing paid off
        return True

    def expire(self, now_ns: int) -> list[Entry]:
        """Remove and return every entry whose deadline has passed or whose caller left."""
        gone = [
            e
            for e in self
            if e.cancelled or (e.deadline_ns is not None and e.deadline_ns <= now_ns)
        ]
        for entry in gone:
            self.remove(entry)
        return gone

    def __iter__(self) -> Iterator[Entry]:
        for queue in self._queues:
            yield from queue

    def head(self) -> Entry | None:
        """The request that runs next."""
        return next(iter(self), None)

    def hold_until_ns(self) -> int | None:
        """When a batch held back for a preferred size must go anyway; None if none waits."""
        head = self.head()
        if head is None or not self.max_queue_delay_ns:
            return None
        return self._hold_deadline(head)

    def _hold_deadline(self, head: Entry) -> int:
        # Preferred sizes wait from the head's arrival (Triton's rule); expected returns
        # wait from the moment the batch could have gone.
        if self.preferred:
            return head.enqueued_ns + self.max_queue_delay_ns
        since = self._since(head)
        if not self.until_quiet:
            return since + self.max_queue_delay_ns
        quiet_ns = max(since, self._last_arrival_ns) + self.max_queue_delay_ns
        return min(quiet_ns, self._cap_ns(head))

    def _since(self, head: Entry) -> int:
        """When a batch led by `head` could have gone: its arrival or the instance freed."""
        return max(head.enqueued_ns, self._free_since_ns)

    def _cap_ns(self, head: Entry) -> int:
        """`until_quiet`: when a hold for `head`'s batch ends however rows keep coming."""
        return self._since(head) + QUIET_CAP * self.max_queue_delay_ns

    def next_batch(self, now_ns: int) -> list[Entry] | None:
        """The entries to run on a free instance now, removed from the queue.

        None when the queue is empty, or when it holds back for a preferred batch size.
        """
        head = self.head()
        if head is None:
            return None
        if self.max_batch_size <= 0:
            self.remove(head)
            return [head]
        chosen: list[Entry] = []
        rows = 0
        for entry in self:
            if entry.request.signature != head.request.signature:
                continue
            if rows + entry.request.rows > self.max_batch_size:
                if entry is head:  # cannot happen: validation caps a request's rows
                    chosen, rows = [entry], entry.request.rows
                break
            chosen.append(entry)
            rows += entry.request.rows
        hold_until = self._hold_deadline(head)
        if self.preferred and rows not in self.preferred:
            fits = [p for p in self.preferred if p <= rows]
            if fits:
                chosen = _trim(chosen, fits[-1])
            elif now_ns < hold_until:
                return None
        elif not self.preferred and rows < self.max_batch_size and self.expected_rows:
            if now_ns < hold_until:
                self._holding = True
                return None
            if not self._quiet_end(head, now_ns):
                # They did not come: stop expecting them, and skip the next holds.
                self.expected_rows = 0
                self._misses = min(self._misses + 1, MAX_MISSES)
                self._skip = (1 << self._misses) - 1
                self._probe = self._probe_misses = self._probe_skip = self._quiet_ends = 0
        elif self._holding:
            self._misses = 0  # the rows it held for came
        if not self.expected_rows:
            self._quiet_ends = 0  # the rows expected came, held for or not
        self._holding = False
        for entry in chosen:
            self.remove(entry)
        return chosen

    def _quiet_end(self, head: Entry, now_ns: int) -> bool:
        """`until_quiet`: whether a hold that ends now goes without forgetting what it
        expected: only the probed row is missing (the probes back off), or no row came
        for a while, short of the cap and of QUIET_ENDS in a row."""
        if not self.until_quiet:
            return False
        if self._probe and self.expected_rows <= self._probe:
            self.expected_rows -= self._probe
            self._probe = 0
            self._probe_misses = min(self._probe_misses + 1, MAX_MISSES)
            self._probe_skip = (1 << self._probe_misses) - 1
            self._quiet_ends = 0  # every row really expected came
            return True
        if now_ns >= self._cap_ns(head) or self._quiet_ends + 1 >= QUIET_ENDS:
            return False
        self._quiet_ends += 1
        return True


def _trim(entries: list[Entry], target_rows: int) -> list[Entry]:
    """The longest prefix of `entries` whose rows do not exceed `target_rows` (at least one)."""
    kept: list[Entry] = []
    rows = 0
    for entry in entries:
        if kept and rows + entry.request.rows > target_rows:
            break
        kept.append(entry)
        rows += entry.request.rows
    return kept


def request_deadline_ns(
    parameters: Mapping[str, object],
    now_ns: int,
    deadline_ns: int | None,
    default_timeout_ns: int,
    allow_timeout_override: bool,
) -> int | None:
    """When a request arriving at `now_ns` must have started: its caller's deadline, or
    sooner per its `timeout` parameter (µs) or the model's default timeout. A `timeout`
    longer than the default counts only where the model allows overriding it."""
    timeout_us = parameters.get("timeout")
    timeout_ns = default_timeout_ns
    if isinstance(timeout_us, int) and timeout_us > 0:
        asked = timeout_us * 1000
        if allow_timeout_override or not timeout_ns or asked < timeout_ns:
            timeout_ns = asked
    if timeout_ns:
        mine = now_ns + timeout_ns
        deadline_ns = mine if deadline_ns is None else min(deadline_ns, mine)
    return deadline_ns
