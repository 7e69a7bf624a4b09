"""`migration-fsm watch`: evaluate the `[watch]` guards of the current phase every
`interval_seconds` while it soaks, and act after `failure_limit` failed verdicts of one guard
in a row (DESIGN.md section 11, docs/OBSERVABILITY.md "Watch").

Every verdict is an event (`watch_verdict`, with the measured values), written in a
transaction of its own; no journal row is written for a verdict, only for an action:

- `rollback`: `commands.rollback` as actor `watch`, the reason naming the guards and their
  values, with a compare-and-set on the version the verdicts were measured at (a phase that
  changed meanwhile, by an operator or another watch, is not rolled back a second time);
- `pause`: a hold (a `held` journal row, in the hash chain) that refuses `advance` and a ramp
  up until an operator releases it (`watch --release --reason TEXT`) or the phase changes; it
  never blocks a rollback, a ramp down, `resume` or `abort`; a hold that stands is not placed
  twice;
- `notify`: a `watch_alert` event only (once per episode, across every watch process).

An inconclusive verdict (nothing measured) never rolls back: `on_inconclusive` pauses or
notifies. Safe on several hosts: any of them evaluates, each action is taken under the
operator lock (PostgreSQL) or in one write transaction (SQLite) and re-checks the migration
first; while a transition is in progress or interrupted no action is taken (the round says so).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final

from sqlalchemy import select

from . import commands
from .exceptions import Conflict, MigrationFSMError, Refused, StepFailed
from .journal import Journal, redact_text, utcnow
from .journal.outbox import emit
from .journal.schema import events_table
from .log import get_logger
from .migration import GuardRecord
from .plugins import notify
from .plugins.metric_guards import (
    MetricVerdict,
    Outcome,
    evaluate_metric_guard,
    finished_on_new_side,
    inconclusive,
    percent,
    task_rate_verdict,
)

if TYPE_CHECKING:
    from collections.abc import Callable
    from datetime import datetime

    from .config import Settings
    from .journal import MigrationState

#: The actor of every action `watch` takes (its host and pid are journaled with it).
WATCH_ACTOR: Final = "watch"

_log = get_logger(component="watch")


@dataclass(slots=True)
class Streak:
    """One guard's consecutive non-passing verdicts (either kind resets the other)."""

    failed: int = 0
    inconclusive: int = 0


@dataclass(frozen=True, slots=True)
class WatchRound:
    """What one round measured and did."""

    at: datetime
    migration: str
    phase: str
    percent: int
    version: int
    verdicts: list[MetricVerdict]
    #: guard -> its streak after this round: (failed, inconclusive) in a row.
    streaks: dict[str, tuple[int, int]]
    #: The action this round called for (`rollback`, `pause`, `notify`) or None.
    action: str | None = None
    #: Whether that action was taken by this round.
    acted: bool = False
    #: What happened, for people: why nothing was done, what was done.
    note: str | None = None
    #: The journal row the action wrote (the rollback's, the hold's), when it wrote one.
    seq: int | None = None
    held: bool = False

    def as_json(self) -> dict[str, Any]:
        return {
            "at": self.at.isoformat(timespec="microseconds"),
            "migration": self.migration,
            "phase": self.phase,
            "percent": self.percent,
            "version": self.version,
            "verdicts": [verdict_json(v) for v in self.verdicts],
            "streaks": {name: {"failed": f, "inconclusive": i} for name, (f, i) in self.streaks.items()},
            "action": self.action,
            "acted": self.acted,
            "note": self.note,
            "seq": self.seq,
            "held": self.held,
        }


def _finite(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None


def verdict_json(verdict: MetricVerdict) -> dict[str, Any]:
    """A verdict as the `watch_verdict` event and `watch --json` show it."""
    return {
        "guard": verdict.name,
        "outcome": str(verdict.outcome),
        "value": _finite(verdict.value),
        "values": [{"labels": labels, "value": _finite(v)} for labels, v in verdict.values],
        "detail": redact_text(verdict.detail),
        "dry_run": verdict.dry_run,
    }


def evaluate(settings: Settings, name: str, since: datetime) -> MetricVerdict:
    """One verdict of a watched guard: a `[metric_guards]` guard, or the built-in
    `failure_rate_ok` / `completion_rate_ok` with their configured bounds. Never raises."""
    if name in settings.metric_guards:
        return evaluate_metric_guard(settings, name, since=since)
    failure = name == "failure_rate_ok"
    limit = settings.max_failure_rate if failure else settings.min_completion_rate
    bounds = f"limit {percent(limit)}" if failure else f"minimum {percent(limit)}"
    try:
        finished = finished_on_new_side(settings, since)
    except MigrationFSMError as exc:
        return inconclusive(name, f"the new side's tasks cannot be read: {exc}", bounds=bounds)
    return task_rate_verdict(
        name,
        "failure_rate" if failure else "completion_rate",
        finished,
        since_text=f"the phase was entered at {since.isoformat(timespec='seconds')}",
        low=None if failure else limit,
        high=limit if failure else None,
        bounds=bounds,
    )


def reason_for(kind: str, verdicts: list[MetricVerdict], limit: int) -> str:
    """The journaled reason of an action: the guards and what they measured."""
    said = "; ".join(v.detail for v in verdicts)
    what = "failed" if kind == "failed" else "was inconclusive"
    names = ", ".join(v.name for v in verdicts)
    return redact_text(f"watch: {names} {what} {limit} times in a row: {said}")


@dataclass
class Watcher:
    """The state of one `watch` process: each guard's streak, for the version it measured."""

    settings: Settings
    migration: str
    store: Journal
    streaks: dict[str, Streak] = field(default_factory=dict)
    version: int | None = None
    hold_seq: int | None = None
    #: (version, action) already taken (or found taken) in this episode: acted once.
    done: set[tuple[int, str]] = field(default_factory=set)

    @property
    def acting_settings(self) -> Settings:
        return self.settings.model_copy(update={"actor": WATCH_ACTOR})

    def round(self) -> WatchRound:
        """Evaluate the current phase's guards once, journal the verdicts as events, act when
        a streak reaches `failure_limit`, and deliver the pending events."""
        try:
            return self._round()
        finally:
            if self.settings.notify:
                notify.deliver_pending(self.settings, self.migration, journal=self.store)

    def _round(self) -> WatchRound:
        watch = self.settings.watch
        state = self.store.get(self.migration)
        names = watch.guards_for(str(state.phase))
        held = self.store.standing_hold(state)
        if state.version != self.version or (held is None and self.hold_seq is not None):
            # A new version (a transition, a ramp) or a released hold: the streaks start over.
            self.streaks = {}
            self.version = state.version
        self.hold_seq = None if held is None else held.seq
        if not names:
            return self._result(state, [], note=f"nothing to watch in {state.phase}", held=held is not None)
        verdicts = [evaluate(self.settings, name, state.phase_entered_at) for name in names]
        for verdict in verdicts:
            streak = self.streaks.setdefault(verdict.name, Streak())
            if verdict.dry_run or verdict.outcome is Outcome.PASSED:
                streak.failed = streak.inconclusive = 0
            elif verdict.outcome is Outcome.FAILED:
                streak.failed, streak.inconclusive = streak.failed + 1, 0
            else:
                streak.failed, streak.inconclusive = 0, streak.inconclusive + 1
        self.streaks = {name: self.streaks[name] for name in names}
        self._record(state, verdicts)
        limit = watch.failure_limit
        failing = [v for v in verdicts if self.streaks[v.name].failed >= limit]
        unknown = [v for v in verdicts if self.streaks[v.name].inconclusive >= limit]
        action: str
        if failing:
            action, kind, which = watch.on_failure, "failed", failing
        elif unknown:
            action, kind, which = watch.on_inconclusive, "inconclusive", unknown
        else:
            self.done = set()  # the episode is over: the next one acts again
            return self._result(state, verdicts, held=held is not None)
        if (state.version, action) in self.done or (action == "pause" and held is not None):
            note = "held already" if action == "pause" else f"{action} done already in this episode"
            return self._result(state, verdicts, action=action, note=note, held=held is not None)
        if state.in_progress_seq is not None:
            seq = state.in_progress_seq
            note = f"transition #{seq} is in progress or interrupted: not acting ({action})"
            _log.warning("watch_not_acting", migration=self.migration, seq=seq, action=action)
            return self._result(state, verdicts, action=action, note=note, held=held is not None)
        reason = reason_for(kind, which, limit)
        return self._act(state, verdicts, which, action, reason)

    def _act(
        self,
        state: MigrationState,
        verdicts: list[MetricVerdict],
        which: list[MetricVerdict],
        action: str,
        reason: str,
    ) -> WatchRound:
        self.done.add((state.version, action))
        seq: int | None = None
        try:
            if action == "rollback":
                outcomes = commands.rollback(
                    self.acting_settings, self.migration, reason=reason, seen_version=state.version
                )
                seq = outcomes[-1].seq
                note = f"rolled back {outcomes[-1].edge.key} (#{seq}): {reason}"
            elif action == "pause":
                records = [
                    GuardRecord(v.name, False, redact_text(v.detail), 0, value=_finite(v.value))
                    for v in which
                ]
                with commands.open_engine(self.acting_settings, self.migration) as engine:
                    entry = engine.hold(reason=reason, verdicts=records, seen_version=state.version)
                if entry is None:
                    note = "held already (by another watch)"
                    return self._result(state, verdicts, action=action, note=note, held=True)
                seq = entry.seq
                note = f"held (#{seq}): advance and ramp up refused until `watch --release`: {reason}"
            else:
                if not self._alert(state, which, reason):
                    note = "alerted already (by another watch)"
                    return self._result(state, verdicts, action=action, note=note)
                note = f"alert sent: {reason}"
        except Conflict as exc:  # another watch or an operator is acting: the next round looks again
            self.done.discard((state.version, action))
            return self._result(state, verdicts, action=action, note=f"not acting: {exc}")
        except Refused as exc:  # the rollback edge's own guards refused it (journaled)
            return self._result(state, verdicts, action=action, note=f"rollback refused: {exc}")
        except StepFailed as exc:  # the rollback is interrupted: an operator resumes or aborts it
            return self._result(state, verdicts, action=action, note=f"rollback stopped: {exc}")
        _log.warning("watch_acted", migration=self.migration, action=action, seq=seq, reason=reason)
        return self._result(
            state, verdicts, action=action, acted=True, note=note, seq=seq, held=action == "pause"
        )

    def _record(self, state: MigrationState, verdicts: list[MetricVerdict]) -> None:
        """Write one `watch_verdict` event per verdict, in one transaction."""
        with self.store.transaction() as conn:
            for verdict in verdicts:
                streak = self.streaks[verdict.name]
                emit(
                    conn,
                    state.id,
                    "watch_verdict",
                    None,
                    **verdict_json(verdict),
                    streak={"failed": streak.failed, "inconclusive": streak.inconclusive},
                    failure_limit=self.settings.watch.failure_limit,
                )

    def _alert(self, state: MigrationState, which: list[MetricVerdict], reason: str) -> bool:
        """Write the `watch_alert` event, unless another watch wrote one at this version with
        no passed verdict of these guards since (one transaction, under the operator lock)."""
        names = {v.name for v in which}
        holder = f"{WATCH_ACTOR}-alert"
        with self.store.operator_lock(self.migration, holder), self.store.transaction() as conn:
            e = events_table.c
            last = conn.execute(
                select(e.id, e.event)
                .where(e.migration == self.migration, e.kind == "watch_alert")
                .order_by(e.id.desc())
                .limit(1)
            ).first()
            if last is not None and (last.event.get("state") or {}).get("version") == state.version:
                later = conn.execute(
                    select(e.event).where(
                        e.migration == self.migration, e.kind == "watch_verdict", e.id > last.id
                    )
                ).scalars()
                if not any(ev.get("guard") in names and ev.get("outcome") == "passed" for ev in later):
                    return False
            emit(
                conn,
                state.id,
                "watch_alert",
                None,
                actor=WATCH_ACTOR,
                reason=reason,
                guards=[verdict_json(v) for v in which],
            )
        return True

    def _result(self, state: MigrationState, verdicts: list[MetricVerdict], **kwargs: Any) -> WatchRound:
        return WatchRound(
            at=utcnow(),
            migration=self.migration,
            phase=str(state.phase),
            percent=state.percent,
            version=state.version,
            verdicts=verdicts,
            streaks={n: (s.failed, s.inconclusive) for n, s in self.streaks.items()},
            **kwargs,
        )


def run(
    settings: Settings,
    migration: str,
    *,
    once: bool = False,
    report: Callable[[WatchRound], None],
    stopped: Callable[[float], bool],
) -> None:
    """Watch `migration` until `stopped(seconds)` (which waits up to `seconds` and says whether
    to stop) is true, or for one round (`once`). Each round goes to `report`. A round that
    cannot read the database is logged and retried at the next interval."""
    if not any(settings.watch.guards_for(p) for p in ("dual_write", "cutover", "cleanup")):
        from .exceptions import ConfigError

        raise ConfigError("nothing to watch: [watch] names no guard (guards = [...] or [watch.phases])")
    with commands.open_store(settings) as store:
        store.get(migration)  # an unknown migration is bad input before the first round
        if settings.notify:
            notify.register(store, settings, migration)
        watcher = Watcher(settings, migration, store)
        while True:
            started = time.monotonic()
            try:
                report(watcher.round())
            except (MigrationFSMError, OSError) as exc:
                if once:
                    raise
                _log.warning("watch_round_failed", migration=migration, error=redact_text(str(exc)))
            if once:
                return
            wait = max(0.0, settings.watch.interval_seconds - (time.monotonic() - started))
            if stopped(wait):
                return
