"""A guard and steps that the CLI tests (`test_cli.py`) name in config.

The CLI subprocesses import them as `"tests.clisteps:gate"` and so on; the test steers
them through environment variables and reads what they did from a marker file.
"""

from __future__ import annotations

import os

from migration_fsm.plugins.context import Context, GuardVerdict

GATE_ENV = "CLISTEPS_GATE"
FAIL_ENV = "CLISTEPS_FAIL"
MARKER_ENV = "CLISTEPS_MARKER"


def gate(ctx: Context) -> GuardVerdict:
    """Passes only while `CLISTEPS_GATE=open`."""
    if os.environ.get(GATE_ENV) == "open":
        return GuardVerdict(True, "gate is open")
    return GuardVerdict(False, "gate is closed")


def flaky(ctx: Context) -> None:
    """Raises while `CLISTEPS_FAIL` is set, else does nothing."""
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
