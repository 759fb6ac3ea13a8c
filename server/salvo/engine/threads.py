"""torch's intra-op threads, which OpenMP keeps per calling thread."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch


@contextlib.contextmanager
def one_torch_thread() -> Iterator[None]:
    """Run the block's forward passes on one intra-op thread, in the calling thread only
    (OpenMP keeps the count per thread), and give the thread its count back after.

    For the event loop's thread, which runs fast CPU models' batches (`execution: auto` or
    `loop`): those passes take well under 2 ms, where a team of two gains little, and the
    team's second thread spins after each pass on the core that gRPC's threads and the
    clients need. Costs under a µs a batch.
    """
    count = torch.get_num_threads()
    if count == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(count)


def torch_threads() -> int:
    """The calling thread's intra-op thread count."""
    return torch.get_num_threads()


def use_torch_threads(count: int) -> None:
    """Give the calling thread `count` intra-op threads (OpenMP keeps the count per thread);
    a few µs when it changes, nothing when it does not."""
    if torch.get_num_threads() != count:
        torch.set_num_threads(count)


def inherit_torch_threads() -> Callable[[], None]:
    """An initializer for the threads that run models: torch's intra-op thread count as the
    calling thread has it (`--torch-threads`, set on the main thread at start-up).

    OpenMP keeps that count per thread, and a new thread starts from OpenMP's default, every
    core, which a forward pass there does not change: without this a model's thread runs
    its batches on a team of every core whatever `--torch-threads` says, and the team's
    idle member spins between batches. On 2 cores a loop of batch-16 `mlp` passes on a
    second thread then takes 1.29 cores instead of 0.35 (tests/integration/test_threads.py
    checks the count in the threads that run batches).
    """
    count = torch.get_num_threads()
    return lambda: torch.set_num_threads(count)
