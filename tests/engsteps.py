"""Steps and guards the engine tests configure by import path (`tests.engsteps:NAME`)."""

from __future__ import annotations

import threading
from typing import Any

from migration_fsm.plugins.context import Context, GuardVerdict

#: What the steps did, in order: (name, seq, checkpoint seen).
CALLS: list[tuple[str, int | None, dict[str, Any] | None]] = []
#: Names of steps that raise on their next run (removed once raised).
FAIL_ONCE: set[str] = set()
#: Guard verdict used by `flag_guard`.
FLAG: dict[str, Any] = {"passed": True}
#: `held_step` sets HELD once it runs, then holds until the test sets RELEASE.
HELD = threading.Event()
RELEASE = threading.Event()
HOLD_TIMEOUT = 60.0


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
