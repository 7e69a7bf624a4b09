"""The data tools' built-in guards and steps, and the guards and steps an edge gets when
both stores are configured and the config names none for it (DESIGN.md section 6).

An edge that the config names, even with an empty list, gets exactly what it names.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any, Final

from ..tasks.sides import stores_configured

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping

    from ..config import Settings, StepSpec
    from .context import Context, GuardFn, StepFn

DEFAULT_GUARDS: Final[Mapping[str, tuple[str, ...]]] = {
    "preparation->dual_write": ("stores_reachable",),
    "dual_write->cutover": ("backfill_complete", "repair_log_empty", "checksums_match"),
    "cutover->cleanup": ("percent_is_100", "old_drained", "checksums_match"),
    "cleanup->complete": ("repair_log_empty",),
    "cutover->dual_write": ("stores_reachable",),
    "cleanup->cutover": ("stores_reachable",),
}
DEFAULT_STEPS: Final[Mapping[str, tuple[str, ...]]] = {
    "dual_write->cutover": ("drain_old", "transfer_state"),
    "cutover->dual_write": ("drain_new", "reverse_sync"),
    "cleanup->cutover": ("reverse_sync",),
}


def guards_for(settings: Settings, edge_key: str) -> list[str]:
    """The guard names configured for an edge, else its defaults when stores are configured."""
    if edge_key in settings.guards:
        return list(settings.guards[edge_key])
    if stores_configured(settings):
        return list(DEFAULT_GUARDS.get(edge_key, ()))
    return []


def steps_for(settings: Settings, edge_key: str) -> list[str | StepSpec]:
    """The steps configured for an edge, else its defaults when stores are configured."""
    if edge_key in settings.steps:
        return list(settings.steps[edge_key])
    if stores_configured(settings):
        return list(DEFAULT_STEPS.get(edge_key, ()))
    return []


GUARD_NAMES: Final = (
    "stores_reachable",
    "backfill_complete",
    "counts_match",
    "checksums_match",
    "old_drained",
    "backup_exists",
    "failure_rate_ok",
)
STEP_NAMES: Final = ("backfill", "drain_old", "transfer_state", "drain_new", "reverse_sync")


def _lazy(module: str, name: str) -> Callable[[Context], Any]:
    """`module.name`, imported on first call: the data tools (SQLAlchemy reflection, pydantic
    records) stay off the start-up path of every CLI command that does not use them."""

    def call(ctx: Context) -> Any:
        return getattr(importlib.import_module(module, __package__), name)(ctx)

    call.__name__ = call.__qualname__ = name
    return call


def register(guards: dict[str, GuardFn], steps: dict[str, StepFn]) -> None:
    """Add the data tools' guards and steps to the built-in tables."""
    guards.update({name: _lazy(".guards", name) for name in GUARD_NAMES})
    steps.update({name: _lazy(".steps", name) for name in STEP_NAMES})
