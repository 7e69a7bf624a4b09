"""The steps and guards that test configs name by import path (`tests.support.steps:NAME`).

Three ways to steer them, one per kind of test:

- in this process (the engine tests): module state, `CALLS`, `FAIL_ONCE`, `FLAG`, `HELD` /
  `RELEASE`, cleared by `reset()`;
- through the environment (the CLI tests, in-process or not): `gate`, `flaky`, `record`,
  `unrecord` read `STEPS_GATE`, `STEPS_FAIL`, `STEPS_MARKER`;
- through files in the folder named by `MFSM_PROC_DIR` (the process tests, whose CLI runs in
  other processes): `quick_step`, `sleepy_step`, `hold_step`;

and `noop_step`, a trivial idempotent step with two checkpoints for the crash matrix.
"""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path
from typing import Any

from migration_fsm.plugins.context import Context, GuardVerdict

#: How long a holding step waits for the test before it gives up.
HOLD_TIMEOUT = 60.0

# -- steered in this process (engine tests) ----------------------------------------

#: What the steps did, in order: (name, seq, checkpoint seen).
CALLS: list[tuple[str, int | None, dict[str, Any] | None]] = []
#: Names of steps that raise on their next run (removed once raised).
FAIL_ONCE: set[str] = set()
#: Guard verdict used by `flag_guard`.
FLAG: dict[str, Any] = {"passed": True}
#: `held_step` sets HELD once it runs, then holds until the test sets RELEASE.
HELD = threading.Event()
RELEASE = threading.Event()


def _record(name: str, ctx: Context) -> None:
    CALLS.append((name, ctx.seq, ctx.checkpoint))
    if name in FAIL_ONCE:
        FAIL_ONCE.discard(name)
        raise RuntimeError(f"{name} broke")


def step_a(ctx: Context) -> None:
    _record("step_a", ctx)


def undo_a(ctx: Context) -> None:
    _record("undo_a", ctx)


def step_b(ctx: Context) -> None:
    ctx.save_checkpoint({"cursor": "b-half"})
    _record("step_b", ctx)


def undo_b(ctx: Context) -> None:
    _record("undo_b", ctx)


def step_c(ctx: Context) -> None:
    _record("step_c", ctx)


def held_step(ctx: Context) -> None:
    """Says it runs (HELD), then holds the transition until the test sets RELEASE, for as long
    as the test needs (longer than a short lease, relying on the background heartbeat)."""
    HELD.set()
    if not RELEASE.wait(timeout=HOLD_TIMEOUT):
        raise TimeoutError(f"held_step was not released within {HOLD_TIMEOUT:g} s")
    _record("held_step", ctx)


def bad_checkpoint(ctx: Context) -> None:
    ctx.save_checkpoint({"when": object()})


def flag_guard(ctx: Context) -> GuardVerdict:
    return GuardVerdict(bool(FLAG["passed"]), f"flag is {FLAG['passed']}")


def true_guard(ctx: Context) -> bool:
    return True


def broken_guard(ctx: Context) -> bool:
    raise ValueError("cannot reach the metrics")


def reset() -> None:
    CALLS.clear()
    FAIL_ONCE.clear()
    FLAG["passed"] = True


# -- steered through the environment (CLI tests) ---------------------------------

GATE_ENV = "STEPS_GATE"
FAIL_ENV = "STEPS_FAIL"
MARKER_ENV = "STEPS_MARKER"


def gate(ctx: Context) -> GuardVerdict:
    """Passes only while `STEPS_GATE=open`."""
    if os.environ.get(GATE_ENV) == "open":
        return GuardVerdict(True, "gate is open")
    return GuardVerdict(False, "gate is closed")


def flaky(ctx: Context) -> None:
    """Raises while `STEPS_FAIL` is set, else does nothing."""
    if os.environ.get(FAIL_ENV):
        raise RuntimeError("injected failure")


def record(ctx: Context) -> None:
    """Appends `do SOURCE->DEST` to the marker file."""
    _mark(f"do {ctx.source}->{ctx.dest}")


def unrecord(ctx: Context) -> None:
    """The compensation of `record`: appends `undo SOURCE->DEST` to the marker file."""
    _mark(f"undo {ctx.source}->{ctx.dest}")


def _mark(line: str) -> None:
    path = os.environ.get(MARKER_ENV)
    if path:
        with open(path, "a", encoding="utf-8") as file:
            file.write(line + "\n")


# -- steered through files (process tests) ---------------------------------------

PROC_DIR_ENV = "MFSM_PROC_DIR"
CHECKPOINT = {"cursor": "task-0042", "copied": 42}


def _dir() -> Path:
    return Path(os.environ[PROC_DIR_ENV])


def touch(path: Path, content: str = "") -> None:
    """Create `path` atomically, so a poller never sees it half written."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(content, encoding="utf-8")
    tmp.replace(path)


def _append(name: str, record: dict[str, Any]) -> None:
    with (_dir() / name).open("a", encoding="utf-8") as file:
        file.write(json.dumps(record) + "\n")


def quick_step(ctx: Context) -> None:
    """Record that it ran; a step that finishes before the crash must not run again."""
    _append("quick_runs.jsonl", {"pid": os.getpid(), "seq": ctx.seq})


def sleepy_step(ctx: Context) -> None:
    """Continue from the checkpoint when there is one; else save one, say so, and sleep
    until the test kills this process."""
    _append("sleepy_runs.jsonl", {"pid": os.getpid(), "seq": ctx.seq, "checkpoint": ctx.checkpoint})
    if ctx.checkpoint is not None:
        return
    ctx.save_checkpoint(CHECKPOINT)
    touch(_dir() / "inside_sleepy_step", str(os.getpid()))
    time.sleep(HOLD_TIMEOUT)  # killed long before this ends


def hold_step(ctx: Context) -> None:
    """Say it is inside the transition, then hold it until the test says `release`
    (when every loser has exited), so losers always meet a live transition."""
    touch(_dir() / f"inside_{ctx.migration}_{os.getpid()}", str(os.getpid()))
    release = _dir() / f"release_{ctx.migration}"
    deadline = time.monotonic() + HOLD_TIMEOUT
    while not release.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{release} never appeared")
        time.sleep(0.01)


def noop_step(ctx: Context) -> None:
    """A trivial idempotent step with two checkpoints, so there is a point inside it."""
    ctx.save_checkpoint({"stage": 1})
    ctx.save_checkpoint({"stage": 2})
