"""Operator hooks the demo configures as steps (`migration_fsm.demo.hooks:NAME`), the way a
user configures their own: stop and start each system's workers, and one injected crash."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..plugins.context import Context

#: The running demo's worker pools ("old", "new") and flags, set by the demo runner.
RUNTIME: dict[str, Any] = {}


class SimulatedCrash(BaseException):
    """Raised inside a step to play an operator process dying mid-transition; a
    BaseException, so nothing on the way out can treat it as an ordinary step failure."""


def stop_old_workers(ctx: Context) -> None:  # noqa: ARG001  a step is called with its ctx
    """Old workers stop claiming tasks (in-flight ones finish; `drain_old` waits for them)."""
    RUNTIME["old"].pause()


def start_old_workers(ctx: Context) -> None:  # noqa: ARG001  a step is called with its ctx
    RUNTIME["old"].resume()


def stop_new_workers(ctx: Context) -> None:  # noqa: ARG001  a step is called with its ctx
    """New workers stop claiming jobs (in-flight ones finish; `drain_new` waits for them)."""
    RUNTIME["new"].pause()


def start_new_workers(ctx: Context) -> None:  # noqa: ARG001  a step is called with its ctx
    RUNTIME["new"].resume()


def crash_once(ctx: Context) -> None:
    """The first time it runs, the operator's process "dies" here; `resume` runs it again."""
    if RUNTIME.pop("crash_pending", False):
        raise SimulatedCrash(f"demo: the operator's process died inside transition #{ctx.seq}")
