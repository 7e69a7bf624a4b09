"""Built-in guards and steps, and the resolution of configured names to callables.

A configured name is either a built-in (`percent_is_100`) or an import path
(`"package.module:callable"`).
"""

from __future__ import annotations

import importlib
import math
from typing import TYPE_CHECKING, Any, Final

from ..config import BUILTIN_GUARD_NAMES
from ..exceptions import ConfigError
from ..fsm import EDGES, check_names, percent_routed
from ..journal import utcnow
from .context import Context, GuardFn, GuardVerdict, StepFn
from .defaults import register as _register_data_tools

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping

    from ..config import Settings


def percent_is_100(ctx: Context) -> GuardVerdict:
    """Cutover may end only when every key reads from the new side."""
    if percent_routed(ctx.state.phase) and ctx.state.percent != 100:
        return GuardVerdict(False, f"percent is {ctx.state.percent}: run `migration-fsm ramp 100` first")
    return GuardVerdict(True, f"percent is {ctx.state.percent}")


def min_soak(ctx: Context) -> GuardVerdict:
    """The current phase has run for at least `min_soak_seconds`."""
    soaked = (utcnow() - ctx.state.phase_entered_at).total_seconds()
    needed = ctx.settings.min_soak_seconds
    # Whole seconds that never contradict the verdict: the time soaked rounds down and the
    # wait up, so a refusal never says "wait 0 s more" nor that the time needed has passed.
    verdict = "ok" if soaked >= needed else f"wait {max(1, math.ceil(needed - soaked))} s more"
    need = f"{needed:.0f}" if needed.is_integer() else f"{needed}"
    return GuardVerdict(
        soaked >= needed,
        f"{math.floor(max(soaked, 0.0))} s in {ctx.state.phase}, need {need} s: {verdict}",
    )


def repair_log_empty(ctx: Context) -> GuardVerdict:
    """No dual write is waiting in the repair log (run `migration-fsm reconcile`)."""
    from ..tools.reconcile import open_entries

    waiting = open_entries(ctx.store, ctx.migration)
    if waiting:
        return GuardVerdict(False, f"{waiting} open repair entries: run `migration-fsm reconcile`")
    return GuardVerdict(True, "repair log is empty")


def approval(ctx: Context) -> GuardVerdict:
    """An edge of `[approvals]` has a live approval (`migration-fsm approve`) by an operator
    other than the one taking it: given since the current phase was entered, within
    `approval_ttl_seconds`. The migration's journal (hash-chained) is where approvals are."""
    from ..fsm import EntryStatus

    edge = f"{ctx.source}->{ctx.dest}"
    ttl = ctx.settings.approvals.approval_ttl_seconds
    now = utcnow()
    live: list[Any] = []
    for entry in ctx.store.journal(ctx.state, with_steps=False):
        if entry.status == EntryStatus.COMMITTED and entry.source is not entry.dest:
            live = []  # the phase changed: earlier approvals lapse
        elif entry.status == EntryStatus.APPROVED and f"{entry.source}->{entry.dest}" == edge:
            assert entry.finished_at is not None
            if (now - entry.finished_at).total_seconds() <= ttl:
                live.append(entry)
    others = [e for e in live if e.actor != ctx.settings.actor]
    if others:
        last = others[-1]
        return GuardVerdict(True, f"approved by {last.actor} (#{last.seq}): {last.reason}")
    ask = f"ask another operator to run `migration-fsm approve --edge {edge} --reason TEXT`"
    if live:
        who = ctx.settings.actor
        return GuardVerdict(
            False, f"{edge} is approved only by {who}, who is taking it: {ask} (two-person rule)"
        )
    return GuardVerdict(False, f"{edge} needs an approval given in this phase within {ttl:g} s: {ask}")


BUILTIN_GUARDS: Final[dict[str, GuardFn]] = {
    "percent_is_100": percent_is_100,
    "approval": approval,
    "min_soak": min_soak,
    "repair_log_empty": repair_log_empty,
}
BUILTIN_STEPS: Final[dict[str, StepFn]] = {}
#: Compensations of built-in steps, run by `abort`.
BUILTIN_UNDO: Final[dict[str, str]] = {}

# The data tools' guards and steps (backfill, drain, transfer, validation checks).
_register_data_tools(BUILTIN_GUARDS, BUILTIN_STEPS, BUILTIN_UNDO)

# Every guard and step an edge's rules name is one of the above (ValueError at import if not).
check_names(EDGES, BUILTIN_GUARDS, BUILTIN_STEPS, BUILTIN_UNDO)
# The config refuses a metric guard named like a built-in by this list (it cannot import us).
if set(BUILTIN_GUARDS) != BUILTIN_GUARD_NAMES:
    differ = sorted(set(BUILTIN_GUARDS) ^ BUILTIN_GUARD_NAMES)
    raise ValueError(f"config.BUILTIN_GUARD_NAMES differs from the built-in guards: {differ}")


def resolve(
    name: str, builtins: Mapping[str, Callable[..., Any]], kind: str, where: str
) -> Callable[..., Any]:
    """The callable a configured `name` stands for; `ConfigError` naming `where` if none."""
    if ":" not in name:
        try:
            return builtins[name]
        except KeyError:
            known = ", ".join(sorted(builtins)) or "none yet"
            raise ConfigError(
                f"{where}: unknown {kind} '{name}' (built-in {kind}s: {known};"
                " or give an import path 'package.module:callable')"
            ) from None
    module_name, _, attr = name.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(
            f"{where}: cannot import module '{module_name}' for {kind} '{name}': {exc}"
        ) from exc
    target: Any = module
    for part in attr.split("."):
        target = getattr(target, part, None)
        if target is None:
            raise ConfigError(f"{where}: module '{module_name}' has no '{attr}' for {kind} '{name}'")
    if not callable(target):
        raise ConfigError(f"{where}: {kind} '{name}' is not callable")
    return target  # type: ignore[no-any-return]


def resolve_guard(name: str, where: str, settings: Settings | None = None) -> GuardFn:
    """The guard function for a configured name: a built-in, a metric guard of `settings`
    (`[metric_guards.NAME]`) or an import path."""
    if settings is not None and name in settings.metric_guards:
        from .metric_guards import metric_guard

        return metric_guard(name)
    return resolve(name, BUILTIN_GUARDS, "guard", where)


def resolve_step(name: str, where: str) -> StepFn:
    """The step function for a configured name."""
    return resolve(name, BUILTIN_STEPS, "step", where)


def as_guard_result(value: object, name: str) -> GuardVerdict:
    """Accept `bool` or `GuardVerdict` from a guard; anything else is a programming error."""
    if isinstance(value, GuardVerdict):
        return value
    if isinstance(value, bool):
        return GuardVerdict(value, "passed" if value else "failed")
    raise TypeError(f"guard {name} returned {type(value).__name__}, not bool or GuardVerdict")
