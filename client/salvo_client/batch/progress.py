"""What the job shows while it runs (a progress bar on a terminal, notes) and the summary
it ends with, all on stderr so that stdout stays free."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TextIO

__all__ = ["Counts", "Progress", "make_progress", "summary"]


class Progress(Protocol):
    """Where the job reports while it runs."""

    def start(self, total: int, done: int) -> None:
        """`total` rows in the input, `done` of them journalled before this run."""

    def advance(self, rows: int) -> None:
        """`rows` more rows journalled."""

    def note(self, message: str) -> None:
        """A line for the user (a retry, a stop), kept above the bar."""

    def close(self) -> None: ...


class PlainProgress:
    """No bar: notes as lines on the stream (a log, a pipe, `--no-progress`)."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream

    def start(self, total: int, done: int) -> None:
        pass

    def advance(self, rows: int) -> None:
        pass

    def note(self, message: str) -> None:
        print(f"salvo batch: {message}", file=self._stream, flush=True)

    def close(self) -> None:
        pass


class BarProgress:
    """rich's progress bar: rows done of the total, rows/s of this run, and the ETA."""

    def __init__(self, stream: TextIO) -> None:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )
        from rich.progress import Progress as RichProgress

        self._console = Console(file=stream)
        self._bar = RichProgress(
            TextColumn("scoring"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[rate]} rows/s"),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            console=self._console,
        )
        self._task: Any = None
        self._rows = 0
        self._started = time.monotonic()

    def start(self, total: int, done: int) -> None:
        self._started = time.monotonic()
        self._bar.start()
        self._task = self._bar.add_task("scoring", total=total, completed=done, rate="-")

    def advance(self, rows: int) -> None:
        self._rows += rows
        elapsed_s = max(time.monotonic() - self._started, 1e-9)
        self._bar.update(self._task, advance=rows, rate=f"{self._rows / elapsed_s:,.0f}")

    def note(self, message: str) -> None:
        self._console.print(f"salvo batch: {message}", markup=False, highlight=False)

    def close(self) -> None:
        self._bar.stop()


def make_progress(enabled: bool, stream: TextIO) -> Progress:
    """A bar where asked for and `stream` is a terminal with rich installed, else lines."""
    if not enabled or not stream.isatty():
        return PlainProgress(stream)
    try:
        return BarProgress(stream)
    except ImportError:
        print(
            "salvo batch: no progress bar without rich: pip install 'salvo[batch]'",
            file=stream,
        )
        return PlainProgress(stream)


@dataclass
class Counts:
    """Rows journalled in this run, by outcome."""

    scored: int = 0
    errors: int = 0

    def add(self, results: Any) -> None:
        for result in results:
            if result.ok:
                self.scored += 1
            else:
                self.errors += 1

    @property
    def rows(self) -> int:
        return self.scored + self.errors


def summary(
    *,
    counts: Counts,
    skipped: int,
    errors_total: int,
    elapsed_s: float,
    retries: int,
    output: Path | None,
    journal: Path,
    stopped: str | None,
    total: int,
) -> list[str]:
    """The closing lines: what this run did, and where its outputs went (or, for a run that
    stopped early, how to resume it)."""
    rate = counts.rows / elapsed_s if elapsed_s > 0 else 0.0
    lines = [
        f"rows scored {counts.scored:,}, with errors {counts.errors:,}, skipped (journalled "
        f"before) {skipped:,}; {elapsed_s:.2f} s, {rate:,.0f} rows/s; retries {retries:,}"
    ]
    if output is not None:
        lines.append(f"output: {output} ({total:,} rows, {errors_total:,} with errors)")
    else:
        lines.append(
            f"stopped: {stopped}; {counts.rows + skipped:,} of {total:,} rows journalled in "
            f"{journal}; rerun the same command to resume"
        )
    return [f"salvo batch: {line}" for line in lines]
