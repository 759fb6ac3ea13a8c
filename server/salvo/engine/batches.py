"""One batch, run: claimed, assembled, through the model, and its outputs split.

These run on an instance's thread or on the event loop (`salvo.engine.execution`), so they
touch no future: the scheduler answers the callers on the loop.
"""

from __future__ import annotations

import threading
import time
from typing import cast

import numpy as np

from salvo.domain.types import Prepared
from salvo.engine.backend import LoadedModel
from salvo.engine.batch_queue import Entry
from salvo.engine.threads import use_torch_threads
from salvo.engine.timings import Timings

Ran = tuple[list[Entry], list[np.ndarray], Timings]
"""What a batch that ran gives: the entries that ran, their outputs, the timings."""


def run_batch(
    model: LoadedModel,
    claim: threading.Lock,
    batch: list[Entry],
    instance: int,
    threads: int | None = None,
) -> Ran:
    """Claim the entries of `batch` whose callers still wait (under `claim`, so that a
    caller leaving now cannot be missed), then assemble and run them on `instance` (on
    `threads` intra-op threads where given)."""
    if threads is not None:
        use_torch_threads(threads)
    with claim:
        ran = [e for e in batch if not e.cancelled]
        for entry in ran:
            entry.started = True
    if not ran:
        return ran, [], Timings(0, 0, 0)
    start = time.perf_counter_ns()
    inputs = model.assemble([_request(e).inputs for e in ran], instance)
    assembled = time.perf_counter_ns() - start
    outputs, timings = model.run(inputs, instance)
    return (
        ran,
        outputs,
        Timings(timings.input_ns + assembled, timings.infer_ns, timings.output_ns),
    )


def split_outputs(
    ran: list[Entry], outputs: list[np.ndarray], batching: bool
) -> list[list[np.ndarray]]:
    """Each request's outputs (those it asked for, in the order asked): its rows of the
    batch's outputs, as views."""
    out = []
    offset = 0
    for entry in ran:
        request = _request(entry)
        if batching or len(ran) > 1:
            stop = offset + request.rows
            out.append([outputs[i][offset:stop] for i in request.outputs])
            offset = stop
        else:
            out.append([outputs[i] for i in request.outputs])
    return out


def _request(entry: Entry) -> Prepared:
    return cast(Prepared, entry.request)
