"""A CLI process that SIGKILLs itself at a chosen point of a transition, for the crash matrix
(`test_crash_matrix.py`).

`python -m tests.support.crashkit --crash-at POINT -- CLI ARGS` arms a tripwire, then runs
`migration_fsm.cli.main(CLI ARGS)`. The tripwire wraps the store's own methods, so the
transition runs exactly as in the CLI; at POINT the process sends itself SIGKILL:

- `after_claim`: the claim (intent row, lease, planned steps) has committed, no step has run;
- `in_step=NAME#N`: step NAME has made its N-th write (a task `put_many`, one task's
  `put` or `set_progress`, a batch's `set_progress_many`, a checkpoint save or a pause,
  counted once it returned), and has
  not finished;
- `after_step=NAME`: step NAME is recorded `done`; the next step has not begun;
- `before_commit`: the commit transaction has run all its statements; its COMMIT has not
  been sent.

A process that reaches the end without meeting POINT exits `NOT_REACHED`, so a matrix entry
that no longer crashes where it says fails instead of passing vacuously.

The fork server (`forkserver`) arms the same tripwire in its forked runs, for many runs at
a lower cost.
"""

from __future__ import annotations

import functools
import os
import signal
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Final, Literal, NoReturn

from sqlalchemy import event
from sqlalchemy.engine import Connection, Engine

from migration_fsm.journal import Journal, JournalEntry, Lease
from migration_fsm.tasks.sql import SqlTaskStore

NOOP_STEP: Final = "tests.support.steps:noop_step"
NOT_REACHED: Final = 86

Kind = Literal["after_claim", "in_step", "after_step", "before_commit"]


@dataclass(frozen=True, slots=True)
class CrashPoint:
    """Where in a transition the process dies."""

    kind: Kind
    step: str | None = None
    writes: int = 0  # in_step: die once the step has made this many writes

    def __str__(self) -> str:
        if self.kind == "in_step":
            return f"in_step={self.step}#{self.writes}"
        if self.kind == "after_step":
            return f"after_step={self.step}"
        return self.kind

    @classmethod
    def parse(cls, spec: str) -> CrashPoint:
        """The point `str(point)` wrote."""
        kind, _, rest = spec.partition("=")
        if kind == "in_step":
            step, _, writes = rest.rpartition("#")
            return cls("in_step", step, int(writes))
        if kind == "after_step":
            return cls("after_step", rest)
        if kind == "after_claim" and not rest:
            return cls("after_claim")
        if kind == "before_commit" and not rest:
            return cls("before_commit")
        raise ValueError(f"not a crash point: {spec!r}")


def die() -> NoReturn:
    """Flush stdout and stderr (the test reads them), then SIGKILL this process: no signal
    handler, `finally`, `atexit` or rollback runs, open transactions are simply abandoned."""
    sys.stdout.flush()
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)
    raise AssertionError("unreachable: SIGKILL was sent")


class Tripwire:
    """Follows the transition through the store's calls and dies at `point`."""

    def __init__(self, point: CrashPoint) -> None:
        self.point = point
        self.names: dict[int, str] = {}
        self.current: str | None = None
        self.writes = 0
        self.committing = False

    def claimed(self, entry: JournalEntry) -> None:
        self.names = {step.position: step.name for step in entry.steps}
        if self.point.kind == "after_claim":
            die()

    def step_recorded(self, position: int, status: str) -> None:
        name = self.names.get(position)
        if status == "started":
            self.current, self.writes = name, 0
            return
        self.current = None
        if status == "done" and self.point.kind == "after_step" and name == self.point.step:
            die()

    def wrote(self) -> None:
        if self.point.kind == "in_step" and self.current == self.point.step:
            self.writes += 1
            if self.writes == self.point.writes:
                die()

    def commit(self) -> None:
        if self.committing and self.point.kind == "before_commit":
            die()


def _after(owner: type, name: str, hook: Callable[[tuple[Any, ...], dict[str, Any], Any], None]) -> None:
    """Replace `owner.name` by a wrapper that calls `hook(args, kwargs, result)` once it returned."""
    original = getattr(owner, name)

    @functools.wraps(original)
    def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
        result = original(self, *args, **kwargs)
        hook(args, kwargs, result)
        return result

    setattr(owner, name, wrapper)


def arm(point: CrashPoint) -> Tripwire:
    """Install the tripwire in this process (for good: the process is about to die)."""
    wire = Tripwire(point)
    _after(Journal, "claim", lambda args, kwargs, result: wire.claimed(result[1]))
    _after(Lease, "start_step", lambda args, kwargs, _: wire.step_recorded(args[0], "started"))
    _after(Lease, "mark_step", lambda args, kwargs, _: wire.step_recorded(args[0], args[1]))
    _after(Lease, "save_checkpoint", lambda args, kwargs, _: wire.wrote())
    _after(SqlTaskStore, "put_many", lambda args, kwargs, _: wire.wrote())
    # One task's write: `put` / `put_forward` (through `_put_one`) and the progress update.
    _after(SqlTaskStore, "_put_one", lambda args, kwargs, _: wire.wrote())
    _after(SqlTaskStore, "set_progress", lambda args, kwargs, _: wire.wrote())
    _after(SqlTaskStore, "set_progress_many", lambda args, kwargs, _: wire.wrote())  # a batch: one write
    _after(Lease, "pause", lambda args, kwargs, _: wire.wrote())
    original_close = Lease._close  # commit and abort both close through it

    @functools.wraps(original_close)
    def close(self: Lease, *args: Any, **kwargs: Any) -> Any:
        wire.committing = True
        try:
            return original_close(self, *args, **kwargs)
        finally:
            wire.committing = False

    Lease._close = close  # type: ignore[method-assign]

    def on_commit(conn: Connection) -> None:
        wire.commit()

    # Fires inside `Connection.commit`, after every statement of the transaction, before COMMIT.
    event.listen(Engine, "commit", on_commit)
    return wire


def run_armed(cli_main: Callable[[list[str]], int], point: CrashPoint, argv: list[str]) -> int:
    """Run the CLI armed to die at `point`; `NOT_REACHED` if it ends instead."""
    arm(point)
    code = cli_main(argv)
    print(f"crashkit: the CLI ended (exit {code}) without reaching {point}", file=sys.stderr)
    return NOT_REACHED


def main(argv: Sequence[str]) -> int:
    """`--crash-at POINT -- CLI ARGS`: run the CLI once with the tripwire armed."""
    args = list(argv)
    if len(args) < 3 or args[0] != "--crash-at" or args[2] != "--":
        print("usage: python -m tests.support.crashkit --crash-at POINT -- CLI ARGS", file=sys.stderr)
        return 2
    from migration_fsm.cli import main as cli_main

    return run_armed(cli_main, CrashPoint.parse(args[1]), args[3:])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
