"""How a shadow copy's answer is compared with the answer the caller got."""

from __future__ import annotations

import numpy as np

from salvo.core.shadow import ShadowTally, compare


def test_scores_agree_when_every_row_picks_the_same_index() -> None:
    primary = [np.array([[0.1, 0.9], [0.8, 0.2]], np.float32)]
    close = [np.array([[0.3, 0.7], [0.6, 0.4]], np.float32)]
    flipped = [np.array([[0.9, 0.1], [0.8, 0.2]], np.float32)]
    assert compare(primary, close)[0] is True
    assert abs(compare(primary, close)[1] - 0.2) < 1e-6
    assert compare(primary, flipped)[0] is False


def test_other_outputs_agree_when_their_values_are_equal() -> None:
    assert compare([np.array([[1.0], [2.0]])], [np.array([[1.0], [2.0000001]])])[0] is True
    assert compare([np.array([[1.0], [2.0]])], [np.array([[1.0], [2.5]])]) == (False, 0.25)
    labels = [np.array([[3], [7]], np.int64)]
    assert compare(labels, [np.array([[3], [7]], np.int64)]) == (True, 0.0)
    assert compare(labels, [np.array([[3], [8]], np.int64)]) == (False, 0.5)


def test_every_output_must_agree_and_shapes_must_match() -> None:
    scores = np.array([[0.1, 0.9]], np.float32)
    assert compare([scores, np.array([[1]])], [scores, np.array([[2]])])[0] is False
    assert compare([scores], [np.array([[0.1, 0.9, 0.0]], np.float32)])[0] is False


def test_a_tally_reports_rates_once_it_has_comparisons() -> None:
    tally = ShadowTally()
    assert tally.describe() == {
        "compared": 0, "agreement": None, "mean_abs_difference": None, "failed": 0,
    }  # fmt: skip
    tally.compared, tally.agreed, tally.difference, tally.failed = 4, 3, 2.0, 1
    assert tally.describe() == {
        "compared": 4, "agreement": 0.75, "mean_abs_difference": 0.5, "failed": 1,
    }  # fmt: skip


class FakeScheduler:
    """Records what is submitted, answering x * 2 at once."""

    def __init__(self) -> None:
        self.waiters: list = []

    def submit(self, prepared):
        import asyncio
        from types import SimpleNamespace

        waiter = asyncio.get_running_loop().create_future()
        waiter.set_result([prepared.inputs[0] * 2])
        self.waiters.append(waiter)
        return SimpleNamespace(waiter=waiter)


class FakeCandidate:
    """A candidate version as the shadowing sees it (hashable, as ModelVersion is)."""

    def __init__(self, max_batch_size: int) -> None:
        from types import SimpleNamespace

        self.name, self.version = "m", 2
        self.scheduler = FakeScheduler()
        self.stats = SimpleNamespace(record_request=lambda ok, ns: None)
        self.config = SimpleNamespace(max_batch_size=max_batch_size)


def prepared(value: float):
    from salvo.domain.types import Prepared

    return Prepared("m", 1, "", (np.array([[value]], np.float32),), (0,), 1)


async def test_copies_wait_to_share_a_batch_then_go_together() -> None:
    import asyncio

    from salvo.core.shadow import Shadowing

    shadows = Shadowing(flush_s=0.01)
    candidate = FakeCandidate(max_batch_size=8)
    for value in (1.0, 2.0, 3.0):
        shadows.run(candidate, prepared(value), 1, [np.array([[value]], np.float32)])  # type: ignore[arg-type]
    assert candidate.scheduler.waiters == []  # waiting for company
    await asyncio.wait_for(shadows.settled(), 5)
    assert len(candidate.scheduler.waiters) == 3
    assert shadows.tallies[("m", 1, 2)].describe()["compared"] == 3
    # A full batch's worth goes at once, without waiting.
    for value in range(8):
        shadows.run(candidate, prepared(value), 1, [np.array([[2.0 * value]], np.float32)])  # type: ignore[arg-type]
    assert len(candidate.scheduler.waiters) == 11
    await asyncio.wait_for(shadows.settled(), 5)
    assert shadows.tallies[("m", 1, 2)].agreed == 8
