"""One `salvo batch` job, start to end: read the model from the server, open the input and
the journal, score what is not journalled yet, and write the output once every row is in.

    exit 0  every row scored            exit 2  a flag, file or model the job cannot use
    exit 1  some rows got errors        exit 3  stopped (Ctrl-C, retries ran out, a server
                                                error): resumable from the journal
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import signal
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import grpc

from salvo_client.aio import AsyncInferenceClient
from salvo_client.batch.errors import BatchError
from salvo_client.batch.journal import Journal, journal_path
from salvo_client.batch.model import ModelSpec, model_spec
from salvo_client.batch.progress import Counts, Progress, make_progress, summary
from salvo_client.batch.retries import Backoff, is_transient
from salvo_client.batch.rows import Grouper, RowResult
from salvo_client.batch.runner import Committer, Runner, Send
from salvo_client.batch.sinks import default_output, output_format, write_output
from salvo_client.batch.sources import Source, detect_format, open_source
from salvo_client.errors import SalvoClientError

__all__ = [
    "DEFAULT_MAX_BATCH",
    "EXIT_OK",
    "EXIT_ROW_ERRORS",
    "EXIT_STOPPED",
    "EXIT_USAGE",
    "JobOptions",
    "batch_size_for",
    "fetch_spec",
    "run_job",
]

EXIT_OK = 0
EXIT_ROW_ERRORS = 1
EXIT_USAGE = 2
EXIT_STOPPED = 3

DEFAULT_MAX_BATCH = 64
"""Rows a request carries by default: the model's max_batch_size, at most this many."""


@dataclass(frozen=True)
class JobOptions:
    """What the command line asks of a job."""

    model: str
    input: Path
    format: str | None = None
    """None: from the input's suffix (a directory: images)."""
    output: Path | None = None
    """None: beside the input (`sinks.default_output`)."""
    version: str | None = None
    batch_size: int | None = None
    """None: the model's max_batch_size, at most DEFAULT_MAX_BATCH (1 if it does not batch)."""
    concurrency: int = 4
    backoff: Backoff = field(default_factory=Backoff)
    timeout_s: float = 60.0
    id_column: str | None = None
    inputs: Mapping[str, str] = field(default_factory=dict)
    """`--input NAME=SPEC` mappings."""
    outputs: tuple[str, ...] | None = None
    restart: bool = False
    progress: bool = True


def batch_size_for(spec: ModelSpec, asked: int | None) -> int:
    """Rows per request: what was asked for, within what the model takes."""
    if not spec.batches:
        if asked not in (None, 1):
            raise BatchError(f"model '{spec.name}' does not batch: --batch-size must be 1")
        return 1
    if asked is None:
        return min(spec.max_batch_size, DEFAULT_MAX_BATCH)
    if not 1 <= asked <= spec.max_batch_size:
        raise BatchError(
            f"--batch-size {asked}: model '{spec.name}' takes 1 to {spec.max_batch_size} rows"
        )
    return asked


async def fetch_spec(
    client: AsyncInferenceClient,
    model: str,
    version: str | None,
    backoff: Backoff,
    progress: Progress,
) -> ModelSpec:
    """The model's spec, from ModelMetadata and ModelConfig; a server that is not up yet
    is retried like a request."""
    attempt = 0
    while True:
        try:
            metadata = await client.model_metadata(model, version)
            config = await client.model_config(model, version)
            return model_spec(metadata, config)
        except SalvoClientError as exc:
            if not is_transient(exc) or attempt >= backoff.retries:
                if exc.status in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT):
                    raise BatchError(f"model '{model}': {exc}") from None
                raise
            attempt += 1
            delay_s = backoff.delay_s(attempt, random.Random())
            progress.note(f"reading model '{model}': {exc}; retrying in {delay_s:.2f} s")
            await asyncio.sleep(delay_s)


def _pipeline_send(
    client: AsyncInferenceClient, options: JobOptions, outputs: Sequence[str] | None
) -> Send:
    pipeline = client.pipelined()

    async def send(inputs: Mapping[str, Any]) -> Mapping[str, Any]:
        return await pipeline.infer(
            options.model,
            inputs,
            outputs=outputs,
            version=options.version,
            timeout_s=options.timeout_s,
        )

    return send


@contextlib.contextmanager
def _interrupts(runner: Runner, progress: Progress) -> Iterator[None]:
    """Ctrl-C (or SIGTERM) stops the job cleanly; a second one abandons what is in flight."""
    loop = asyncio.get_running_loop()
    received: list[str] = []

    def interrupted(name: str) -> None:
        received.append(name)
        if len(received) == 1:
            runner.stop(f"interrupted ({name})")
            progress.note(
                f"{name}: stopping; waiting for the requests in flight ({runner.in_flight}) "
                "to be answered and journalled (press Ctrl-C again to abandon them)"
            )
        else:
            runner.abandon()
            progress.note(f"{name}: abandoning the requests in flight")

    installed = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, interrupted, sig.name)
        except (NotImplementedError, RuntimeError, ValueError):  # not the main thread
            continue
        installed.append(sig)
    try:
        yield
    finally:
        for sig in installed:
            loop.remove_signal_handler(sig)


async def run_job(
    client: AsyncInferenceClient, options: JobOptions, stream: TextIO | None = None
) -> int:
    """Run the job against `client`'s server; returns the exit status. BatchError for what
    the job cannot use (before any row is sent)."""
    stream = stream or sys.stderr
    progress = make_progress(options.progress, stream)
    fmt = options.format or detect_format(options.input)
    output = options.output or default_output(options.input, fmt)
    spec = await fetch_spec(client, options.model, options.version, options.backoff, progress)
    selected = spec.select_outputs(options.outputs)
    batch_size_for(spec, options.batch_size)  # refused before anything else is read
    source = open_source(options.input, fmt, spec, options.inputs, options.id_column)
    fingerprint = {
        "input": source.fingerprint(),
        "model": spec.fingerprint(),
        "version": options.version or "",
        "mapping": dict(options.inputs),
        "id_column": options.id_column,
        "outputs": [t.name for t in selected],
    }
    journal = Journal.open(journal_path(output), fingerprint, options.restart)
    try:
        return await _score(client, options, spec, source, journal, output, stream, progress)
    finally:
        journal.close()


async def _score(
    client: AsyncInferenceClient,
    options: JobOptions,
    spec: ModelSpec,
    source: Source,
    journal: Journal,
    output: Path,
    stream: TextIO,
    progress: Progress,
) -> int:
    """Score what the journal lacks, then write the output if every row is in."""
    selected = spec.select_outputs(options.outputs)
    total = source.count()
    if journal.dropped_bytes:
        progress.note(f"{journal.path}: dropped a torn last record ({journal.dropped_bytes} bytes)")
    counts = Counts()
    # Every row journalled, by index: earlier runs' (read at open) and this run's, added
    # once they are on disk. The output is written from this, so it holds exactly what
    # the journal does.
    journalled: dict[int, RowResult] = dict(journal.done)

    def durable(results: list[RowResult]) -> None:
        for result in results:
            journalled.setdefault(result.index, result)
        counts.add(results)
        progress.advance(len(results))

    # The committer and the runner each call the other: the journal's failure stops the
    # runner, whose results go to the committer. `runner` is bound before either runs.
    runner: Runner
    committer = Committer(
        journal, durable, lambda exc: runner.stop(f"cannot write the journal: {exc}")
    )
    runner = Runner(
        _pipeline_send(client, options, None if options.outputs is None else list(options.outputs)),
        committer.put,
        Grouper(batch_size_for(spec, options.batch_size), spec.batches),
        concurrency=options.concurrency,
        backoff=options.backoff,
        outputs=[t.name for t in selected],
        note=progress.note,
    )
    started = time.monotonic()
    progress.start(total, sum(1 for i in journal.done if i < total))
    with _interrupts(runner, progress):
        committer.start()
        try:
            stats = await runner.run(source.rows(), journal.done)
        finally:
            await committer.close()
            progress.close()
    elapsed_s = time.monotonic() - started

    complete = stats.exhausted and all(i in journalled for i in range(stats.read))
    ordered = [journalled[i] for i in range(stats.read)] if complete else []
    if complete:
        write_output(output, output_format(output, source.format), ordered, selected)
        journal.remove()
    errors_total = sum(1 for r in ordered if not r.ok)
    for line in summary(
        counts=counts,
        skipped=stats.skipped,
        errors_total=errors_total,
        elapsed_s=elapsed_s,
        retries=stats.retries,
        output=output if complete else None,
        journal=journal.path,
        stopped=stats.stopped or "some rows were not answered",
        total=total,
    ):
        print(line, file=stream, flush=True)
    if not complete:
        return EXIT_STOPPED
    return EXIT_ROW_ERRORS if errors_total else EXIT_OK
