"""The data tools' built-in guards and steps, and the guards and steps an edge gets when
both stores are configured and the config names none for it (DESIGN.md section 6): the
defaults in the edge's rules (`fsm.EDGES`).

An edge that the config names, even with an empty list, gets exactly what it names.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any, Final

from ..fsm import EDGES
from ..tasks.sides import stores_configured

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping

    from ..config import Settings, StepSpec
    from ..fsm import DefaultStep, Edge
    from .context import Context, GuardFn, StepFn

#: Each edge's default guard names by edge key, read from `fsm.EDGES`.
DEFAULT_GUARDS: Final[Mapping[str, tuple[str, ...]]] = {
    edge.key: edge.rules.guards for edge in EDGES if edge.rules.guards
}
#: Each edge's default step names by edge key, read from `fsm.EDGES`.
DEFAULT_STEPS: Final[Mapping[str, tuple[str, ...]]] = {
    edge.key: tuple(step.name for step in edge.rules.steps) for edge in EDGES if edge.rules.steps
}


def guards_for(settings: Settings, edge: Edge) -> list[str]:
    """The guard names configured for an edge, else its defaults when stores are configured."""
    if edge.key in settings.guards:
        return list(settings.guards[edge.key])
    if stores_configured(settings):
        return list(edge.rules.guards)
    return []


def steps_for(settings: Settings, edge: Edge) -> list[str | StepSpec | DefaultStep]:
    """The steps configured for an edge, else its defaults when stores are configured."""
    if edge.key in settings.steps:
        return list(settings.steps[edge.key])
    if stores_configured(settings):
        return list(edge.rules.steps)
    return []


GUARD_NAMES: Final = (
    "stores_reachable",
    "backfill_complete",
    "counts_match",
    "checksums_match",
    "old_drained",
    "backup_exists",
    "failure_rate_ok",
    "completion_rate_ok",
    "no_double_execution",
)
STEP_NAMES: Final = (
    "backfill",
    "pause_consumers",
    "lift_pause",
    "drain_old",
    "transfer_state",
    "drain_new",
    "reverse_sync",
    "retire_old",
)
#: The compensation of each data-tool step that has one, run by `abort`.
STEP_UNDO: Final[Mapping[str, str]] = {"pause_consumers": "lift_pause"}


def _lazy(module: str, name: str) -> Callable[[Context], Any]:
    """`module.name`, imported on first call: the data tools (SQLAlchemy reflection, pydantic
    records) stay off the start-up path of every CLI command that does not use them."""

    def call(ctx: Context) -> Any:
        return getattr(importlib.import_module(module, __package__), name)(ctx)

    call.__name__ = call.__qualname__ = name
    return call


def register(guards: dict[str, GuardFn], steps: dict[str, StepFn], undo: dict[str, str]) -> None:
    """Add the data tools' guards, steps and undos to the built-in tables."""
    guards.update({name: _lazy(".guards", name) for name in GUARD_NAMES})
    steps.update({name: _lazy(".steps", name) for name in STEP_NAMES})
    undo.update(STEP_UNDO)
