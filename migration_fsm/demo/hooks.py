"""The operator hook the demo configures as a step (`migration_fsm.demo.hooks:crash_once`),
the way a user configures their own: one injected crash of the operator's process.

The demo's workers need no hooks: they run a `WorkerGate` (`migration_fsm.demo.worker`), so
the built-in `pause_consumers` step stops the giving side and the commit starts the other.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..plugins.context import Context

#: The running demo's flags ("crash_pending"), set by the demo runner.
RUNTIME: dict[str, Any] = {}


class SimulatedCrash(BaseException):
    """Raised inside a step to play an operator process dying mid-transition; a
    BaseException, so nothing on the way out can treat it as an ordinary step failure."""


def crash_once(ctx: Context) -> None:
    """The first time it runs, the operator's process "dies" here; `resume` runs it again."""
    if RUNTIME.pop("crash_pending", False):
        raise SimulatedCrash(f"demo: the operator's process died inside transition #{ctx.seq}")
