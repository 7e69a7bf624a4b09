"""Progress of a long data operation: a rich bar on a terminal, structured events otherwise."""

from __future__ import annotations

import sys
import time
from typing import TYPE_CHECKING, Any, Protocol

from ..log import get_logger

if TYPE_CHECKING:
    from rich.progress import Progress as RichProgress
    from rich.progress import Task
    from rich.text import Text


class Progress(Protocol):
    """Where a data operation reports how far it got."""

    def start(self, total: int | None, completed: int) -> None:
        """The operation begins; `completed` rows were done by an earlier, interrupted run."""

    def advance(self, count: int, cursor: str | None) -> None:
        """`count` more rows are done; `cursor` is the last key."""

    def finish(self) -> None:
        """The operation ended (or stopped)."""


class NoProgress:
    """Reports nothing."""

    def start(self, total: int | None, completed: int) -> None:
        pass

    def advance(self, count: int, cursor: str | None) -> None:
        pass

    def finish(self) -> None:
        pass


class LogProgress:
    """A structured `event` at most every `interval` seconds (and at the end) with the rows
    done, the total, the rate, the ETA and the cursor."""

    def __init__(self, event: str, log: Any = None, interval: float = 1.0) -> None:
        self.event = event
        self.log = log if log is not None else get_logger()
        self.interval = interval
        self.total: int | None = None
        self.done = 0
        self.this_run = 0
        self.cursor: str | None = None
        self.started = self.last = time.monotonic()

    def start(self, total: int | None, completed: int) -> None:
        self.total, self.done, self.this_run = total, completed, 0
        self.started = self.last = time.monotonic()

    def advance(self, count: int, cursor: str | None) -> None:
        self.done += count
        self.this_run += count
        self.cursor = cursor
        if time.monotonic() - self.last >= self.interval:
            self._emit()

    def finish(self) -> None:
        self._emit(final=True)

    def _emit(self, *, final: bool = False) -> None:
        now = time.monotonic()
        self.last = now
        rate = self.this_run / max(now - self.started, 1e-9)
        eta = None
        if self.total is not None and rate > 0:
            eta = round(max(self.total - self.done, 0) / rate, 1)
        self.log.info(
            self.event,
            done=self.done,
            total=self.total,
            rows_per_second=round(rate, 1),
            eta_seconds=eta,
            cursor=self.cursor,
            final=final,
        )


class BarProgress:
    """A rich progress bar on stderr with the rows done, the rate and the ETA."""

    def __init__(self, description: str) -> None:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            ProgressColumn,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )
        from rich.text import Text

        class RateColumn(ProgressColumn):
            def render(self, task: Task) -> Text:
                return Text(f"{task.speed or 0:,.0f} rows/s", style="progress.data.speed")

        self.description = description
        self.bar: RichProgress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            RateColumn(),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            console=Console(stderr=True),
            transient=False,
        )
        self.task: Any = None

    def start(self, total: int | None, completed: int) -> None:
        self.bar.start()
        self.task = self.bar.add_task(self.description, total=total, completed=completed)

    def advance(self, count: int, cursor: str | None) -> None:  # noqa: ARG002  Progress; a bar shows no key
        if self.task is not None:
            self.bar.advance(self.task, count)

    def finish(self) -> None:
        self.bar.stop()


def for_stderr(description: str, event: str) -> Progress:
    """A bar when stderr is a terminal, else `event` log events (JSON lines from the CLI)."""
    if sys.stderr.isatty():
        return BarProgress(description)
    return LogProgress(event)
