"""Shadow traffic: a share of the requests a model's primary version answered run again on
a candidate version, whose outputs are compared with the primary's and never returned.

A shadow copy is taken only after the primary's answer is ready, so it never delays its
caller. Copies wait up to `FLUSH_S` for others and go to the candidate's queue together,
so that they share its batches; each runs as an ordinary request of the candidate version
(counted in that version's statistics) and, if the candidate's queue is full or it fails,
it is counted as failed and dropped. Comparisons are tallied per (model, primary version, candidate
version): how many were compared, how many agreed, the mean absolute difference.

Two answers agree when every output agrees: for an output whose last dimension holds
several values (scores, logits), the same largest value's index in every row; for any
other, equal values (within 1e-3 relative, 1e-5 absolute for floats).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace

import numpy as np

from salvo.domain.types import Prepared
from salvo.engine.repository import ModelVersion

log = logging.getLogger(__name__)


@dataclass(slots=True)
class ShadowTally:
    """The comparisons of one candidate version against one primary version."""

    compared: int = 0
    agreed: int = 0
    failed: int = 0
    difference: float = 0.0
    """The sum over compared requests of each one's mean absolute difference."""

    def describe(self) -> dict[str, object]:
        return {
            "compared": self.compared,
            "agreement": self.agreed / self.compared if self.compared else None,
            "mean_abs_difference": self.difference / self.compared if self.compared else None,
            "failed": self.failed,
        }


def compare(primary: Sequence[np.ndarray], shadow: Sequence[np.ndarray]) -> tuple[bool, float]:
    """Whether two answers agree, and their mean absolute difference over every value."""
    agreed = True
    total, count = 0.0, 0
    for a, b in zip(primary, shadow, strict=True):
        if a.shape != b.shape:
            agreed = False
            continue
        if a.dtype.kind in "biuf" and b.dtype.kind in "biuf":
            x, y = a.astype(np.float64), b.astype(np.float64)
            total += float(np.abs(x - y).sum())
            count += x.size
            if a.ndim >= 2 and a.shape[-1] > 1:
                same = np.array_equal(np.argmax(x, axis=-1), np.argmax(y, axis=-1))
            else:
                same = bool(np.allclose(x, y, rtol=1e-3, atol=1e-5))
        else:
            same = bool(np.array_equal(a, b))
        agreed = agreed and same
    return agreed, total / count if count else 0.0


FLUSH_S = 0.02
"""How long a shadow copy waits for others to share its candidate's batch: nobody waits
on a copy, and copies sent one by one would each run as a batch of one."""
FLUSH_ROWS = 32
"""Copies go at once when this many rows (or the candidate's largest batch) wait."""


class Shadowing:
    """Runs shadow copies, gathered into batches on each candidate, and keeps their
    tallies."""

    def __init__(self, flush_s: float = FLUSH_S) -> None:
        self.flush_s = flush_s
        self.tallies: dict[tuple[str, int, int], ShadowTally] = {}
        self._pending: dict[ModelVersion, list[tuple[Prepared, int, Sequence[np.ndarray]]]] = {}
        self._rows: dict[ModelVersion, int] = {}
        self._timer: asyncio.TimerHandle | None = None
        self._in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()

    def tally(self, model: str, primary: int, candidate: int) -> ShadowTally:
        key = (model, primary, candidate)
        found = self.tallies.get(key)
        if found is None:
            found = self.tallies[key] = ShadowTally()
        return found

    def run(
        self, candidate: ModelVersion, prepared: Prepared, primary: int,
        answer: Sequence[np.ndarray],
    ) -> None:  # fmt: skip
        """Copy `prepared` (answered by version `primary` with `answer`) to `candidate`:
        queued there with the other copies within `flush_s`, and compared with `answer`
        when the candidate answers."""
        self._in_flight += 1
        self._idle.clear()
        self._pending.setdefault(candidate, []).append((prepared, primary, answer))
        rows = self._rows[candidate] = self._rows.get(candidate, 0) + prepared.rows
        limit = candidate.config.max_batch_size or 1
        if rows >= min(limit, FLUSH_ROWS):
            self._flush(candidate)
        elif self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(self.flush_s, self._flush_all)

    def _flush_all(self) -> None:
        self._timer = None
        for candidate in list(self._pending):
            self._flush(candidate)

    def _flush(self, candidate: ModelVersion) -> None:
        """Queue every copy waiting for `candidate` at once, so that they share batches."""
        copies = self._pending.pop(candidate, [])
        self._rows.pop(candidate, None)
        for prepared, primary, answer in copies:
            self._submit(candidate, prepared, primary, answer)

    def _submit(
        self, candidate: ModelVersion, prepared: Prepared, primary: int,
        answer: Sequence[np.ndarray],
    ) -> None:  # fmt: skip
        tally = self.tally(candidate.name, primary, candidate.version)
        start = time.monotonic_ns()
        try:
            entry = candidate.scheduler.submit(replace(prepared, version=candidate.version))
        except Exception as exc:  # a full queue, an unloading version: the copy is dropped
            tally.failed += 1
            log.debug("shadow copy on %s v%d dropped: %s", candidate.name, candidate.version, exc)
            self._done()
            return

        def answered(waiter: asyncio.Future) -> None:
            ok = not waiter.cancelled() and waiter.exception() is None
            candidate.stats.record_request(ok, time.monotonic_ns() - start)
            if ok:
                agreed, difference = compare(answer, waiter.result())
                tally.compared += 1
                tally.agreed += agreed
                tally.difference += difference
            else:
                tally.failed += 1
            self._done()

        entry.waiter.add_done_callback(answered)

    def _done(self) -> None:
        self._in_flight -= 1
        if not self._in_flight:
            self._idle.set()

    async def settled(self) -> None:
        """Return once no shadow copy is queued or running (drains and tests)."""
        await self._idle.wait()

    def observe(self) -> Iterable[tuple[str, float, dict[str, str]]]:
        """The tallies, for the observable metrics."""
        for (model, primary, candidate), tally in list(self.tallies.items()):
            attributes = {
                "model": model, "version": str(primary), "shadow_version": str(candidate),
            }  # fmt: skip
            yield "shadow_compared", tally.compared, attributes
            yield "shadow_agreed", tally.agreed, attributes
            yield "shadow_failed", tally.failed, attributes
            yield "shadow_difference", tally.difference, attributes
