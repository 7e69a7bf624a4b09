"""The transition protocol: guards -> claim -> steps -> commit; resume and abort.

This is the only place that fires triggers (through `fsm.resolve_edge`). See DESIGN.md section 3.
"""

from __future__ import annotations

import math
import os
import socket
import time
from dataclasses import dataclass, field, replace
from typing import Any

from .config import Settings, StepSpec
from .exceptions import (
    BadInput,
    ConcurrentChange,
    JournalCorrupt,
    Refused,
    TransitionInterrupted,
)
from .fsm import (
    EDGES_BY_KEY,
    DefaultStep,
    Edge,
    EntryStatus,
    Phase,
    StepStatus,
    Trigger,
    giving_side,
    percent_after,
    resolve_edge,
    rollback_path,
)
from .journal import (
    Journal,
    JournalEntry,
    Lease,
    MigrationState,
    lease_held_error,
    lease_holder_name,
    redact_text,
    utcnow,
)
from .journal.outbox import BEFORE, EVENT_SCHEMA, state_fields
from .journal.records import phase_entered_at
from .log import get_logger
from .plugins import notify
from .plugins.context import GuardVerdict
from .plugins.defaults import guards_for, steps_for
from .plugins.registry import BUILTIN_UNDO, as_guard_result, resolve_guard, resolve_step
from .step_runner import StepRunner, edge_of


@dataclass(frozen=True, slots=True)
class GuardRecord:
    """One guard's result as journaled."""

    name: str
    passed: bool
    detail: str
    duration_ms: int
    forceable: bool = True
    #: The number a metric guard measured (finite; journaled as `value` when there is one).
    value: float | None = None

    def as_dict(self) -> dict[str, Any]:
        record: dict[str, Any] = {
            "name": self.name,
            "passed": self.passed,
            "detail": self.detail,
            "duration_ms": self.duration_ms,
        }
        if self.value is not None:
            record["value"] = self.value
        return record


@dataclass(frozen=True, slots=True)
class Plan:
    """What an edge would do: its guards' results and the steps it would run."""

    percent: int
    guards: list[GuardRecord]
    steps: list[tuple[str, str | None]]
    warnings: list[str] = field(default_factory=list)

    @property
    def failing(self) -> list[GuardRecord]:
        return [g for g in self.guards if not g.passed]

    def refused(self, force: bool) -> list[GuardRecord]:
        """The failing guards that still refuse when `force` is given."""
        return [g for g in self.failing if not (force and g.forceable)]


@dataclass(frozen=True, slots=True)
class TransitionResult:
    """What a command did to one edge."""

    status: str  # committed, refused, aborted, planned; unchanged (a ramp to the current percent)
    edge: Edge
    percent: int
    seq: int | None
    guards: list[GuardRecord] = field(default_factory=list)
    steps: list[str] = field(default_factory=list)
    forced: bool = False
    state: MigrationState | None = None
    warnings: list[str] = field(default_factory=list)


def edge_steps(settings: Settings, edge: Edge) -> list[tuple[str, str | None]]:
    """The configured (step, undo) pairs of an edge (its defaults when stores are configured)."""
    pairs: list[tuple[str, str | None]] = []
    for spec in steps_for(settings, edge):
        if isinstance(spec, StepSpec):
            pairs.append((spec.do, spec.undo))
        elif isinstance(spec, DefaultStep):
            pairs.append((spec.name, spec.undo))
        else:
            pairs.append((spec, BUILTIN_UNDO.get(spec)))
    return pairs


def pause_warnings(settings: Settings, edge: Edge, steps: list[tuple[str, str | None]]) -> list[str]:
    """Why an edge's configured steps may run tasks twice: an edge that moves consumption
    (`fsm.giving_side`) whose config lists its own steps without `pause_consumers`."""
    side = giving_side(edge.source, edge.dest)
    if side is None or edge.key not in settings.steps or any(n == "pause_consumers" for n, _ in steps):
        return []
    return [
        f'steps."{edge.key}" moves consumption off the {side} side but has no pause_consumers step:'
        f" {side} workers may still take tasks while the drain counts, and run them a second time on"
        ' the other side; add "pause_consumers" first (docs/REFERENCE.md, docs/MIGRATION.md)'
    ]


def edge_guards(settings: Settings, edge: Edge) -> list[tuple[str, bool]]:
    """The (guard, forceable) pairs of an edge: always-on guards first, then configured ones
    (its defaults when stores are configured)."""
    always = list(edge.rules.always_on)
    if edge.key in settings.approvals.edges:  # never replaced by --force
        always.append("approval")
    names = [(name, False) for name in always]
    names += [(name, True) for name in guards_for(settings, edge) if name not in always]
    return names


class Migration:
    """Drives one migration through its phases for one operator (`settings.actor`)."""

    def __init__(self, store: Journal, settings: Settings, migration: str = "default") -> None:
        self.store = store
        self.settings = settings
        self.migration = migration
        self.holder = lease_holder_name(settings.actor)
        self.log = get_logger(migration=migration)

    # -- public verbs -----------------------------------------------------------------

    def init(self) -> MigrationState:
        """Create the migration in `preparation`."""
        with self.store.operator_lock(self.migration, self.holder):
            state = self.store.create(self.migration, self.settings.actor)
        self.log.info(
            "transition",
            seq=1,
            trigger="init",
            source=None,
            dest=str(state.phase),
            status=EntryStatus.COMMITTED,
        )
        return state

    def advance(
        self, *, reason: str | None = None, force: bool = False, dry_run: bool = False
    ) -> TransitionResult:
        """Take the edge to the next phase."""
        return self._single(Trigger.ADVANCE, reason=reason, force=force, dry_run=dry_run, percent=None)

    def ramp(self, percent: int, *, reason: str | None = None, dry_run: bool = False) -> TransitionResult:
        """Set the cutover percent."""
        if isinstance(percent, bool) or not isinstance(percent, int) or not 0 <= percent <= 100:
            raise BadInput(f"percent must be a whole number from 0 to 100, not {percent!r}")
        return self._single(Trigger.RAMP, reason=reason, force=False, dry_run=dry_run, percent=percent)

    def rollback(
        self,
        *,
        reason: str,
        to: Phase | None = None,
        dry_run: bool = False,
        seen_version: int | None = None,
    ) -> list[TransitionResult]:
        """Go back one edge, or edge by edge down to `to`. With `seen_version` (`watch`: the
        version it measured), only if the migration is still at that version (else
        `ConcurrentChange`, exit 3, nothing written): a phase that changed meanwhile is not
        rolled back a second time."""
        _require_reason(reason, "rollback")
        with self.store.operator_lock(self.migration, self.holder):
            state = self._writable()
            _check_seen(state, seen_version, "rollback")
            edges = (
                [resolve_edge(state.phase, Trigger.ROLLBACK)]
                if to is None
                else rollback_path(state.phase, to)
            )
            if dry_run:
                return [self._dry_run(state, edge, None) for edge in edges]
            outcomes = []
            for edge in edges:
                outcome = self._take(state, edge, reason=reason, force=False, percent=None)
                outcomes.append(outcome)
                assert outcome.state is not None
                state = outcome.state
            return outcomes

    def approve(self, edge_key: str, *, reason: str) -> JournalEntry:
        """Journal this operator's approval of `edge_key` (an edge of `[approvals]` leaving
        the current phase); it changes nothing else. Another operator then takes the edge."""
        _require_reason(reason, "approve")
        edge = EDGES_BY_KEY.get(edge_key)
        if edge is None or edge_key not in self.settings.approvals.edges:
            needed = ", ".join(self.settings.approvals.edges) or "none: [approvals] lists no edge"
            raise BadInput(f"--edge '{edge_key}' needs no approval (edges that do: {needed})")
        with self.store.operator_lock(self.migration, self.holder):
            state = self._writable()
            if edge.source is not state.phase:
                raise BadInput(
                    f"--edge {edge_key} does not leave the current phase {state.phase}: approve it"
                    f" once the migration is in {edge.source}"
                )
            entry = self.store.append_approval(state, self._closed_row(edge, state, reason, []))
        self.log.info("approval", seq=entry.seq, edge=edge_key, actor=self.settings.actor)
        return entry

    def hold(self, *, reason: str, verdicts: list[GuardRecord], seen_version: int) -> JournalEntry | None:
        """Journal a hold (`watch`'s `on_failure = "pause"`) on the migration as it stood at
        `seen_version`: `advance` and a ramp up are refused while it stands. None when a hold
        stands already; `ConcurrentChange` when the migration moved on since it was measured;
        `TransitionInterrupted` while a transition is in progress (nothing written)."""
        _require_reason(reason, "hold")
        with self.store.operator_lock(self.migration, self.holder):
            state = self._writable()
            _check_seen(state, seen_version, "hold")
            edge = resolve_edge(state.phase, Trigger.ADVANCE)
            entry = self.store.append_hold(
                state, self._closed_row(edge, state, reason, [v.as_dict() for v in verdicts])
            )
        if entry is not None:
            self.log.info("hold", seq=entry.seq, phase=str(state.phase), actor=self.settings.actor)
        return entry

    def release(self, *, reason: str) -> JournalEntry:
        """Journal this operator's release of the standing hold (`watch --release`)."""
        _require_reason(reason, "release")
        with self.store.operator_lock(self.migration, self.holder):
            state = self._writable()
            held = self.store.standing_hold(state)
            if held is None:
                raise BadInput(f"migration '{self.migration}' has no standing hold: nothing to release")
            edge = EDGES_BY_KEY[f"{held.source}->{held.dest}"]
            entry = self.store.append_release(state, self._closed_row(edge, state, reason, []))
        self.log.info("release", seq=entry.seq, held=held.seq, actor=self.settings.actor)
        return entry

    def _closed_row(
        self, edge: Edge, state: MigrationState, reason: str, guards: list[dict[str, Any]]
    ) -> JournalEntry:
        """A closed row about `edge` that changes nothing but the journal (its seq, status and
        hash are set when it is appended)."""
        now = utcnow()
        return JournalEntry(
            seq=0,
            trigger=edge.trigger,
            source=edge.source,
            dest=edge.dest,
            percent=state.percent,
            status=EntryStatus.HELD,
            actor=self.settings.actor,
            reason=reason,
            forced=False,
            guards=guards,
            takeovers=[],
            started_at=now,
            finished_at=now,
            host=socket.gethostname(),
            pid=os.getpid(),
            error=None,
            prev_hash=None,
            hash=None,
        )

    def resume(self, *, steal: bool = False) -> TransitionResult:
        """Finish the interrupted transition from its first unfinished step."""
        with self.store.operator_lock(self.migration, self.holder, steal=steal):
            state = self.store.get(self.migration)
            if state.in_progress_seq is None:
                raise BadInput(
                    f"migration '{self.migration}' has no interrupted transition: nothing to resume"
                )
            stolen = state.lease_live()
            if stolen and not steal:
                raise lease_held_error(state)
            seq = state.in_progress_seq
            entry = self.store.entry(state, seq)
            self._runner.resolve(entry)  # a step that no longer resolves stops us before the takeover
            lease = self.store.take_over(
                state,
                self.holder,
                self.settings.lease_seconds,
                self._takeover("resume", state, stolen),
            )
            self.log.info(
                "takeover",
                seq=seq,
                command="resume",
                previous=state.lease_holder,
                stolen=stolen,
            )
            return self._run_and_commit(state, lease, entry, time.perf_counter())

    def abort(self, *, reason: str) -> TransitionResult:
        """Undo the done steps of the interrupted transition in reverse; stay in the source phase."""
        _require_reason(reason, "abort")
        with self.store.operator_lock(self.migration, self.holder):
            state = self.store.get(self.migration)
            if state.in_progress_seq is None:
                raise BadInput(
                    f"migration '{self.migration}' has no interrupted transition: nothing to abort"
                )
            if state.lease_live():
                raise lease_held_error(state)
            seq = state.in_progress_seq
            entry = self.store.entry(state, seq)
            undos = {
                step.position: resolve_step(step.undo, f"undo of step '{step.name}'")
                for step in entry.steps
                if step.status == StepStatus.DONE and step.undo
            }
            record = self._takeover("abort", state, False, reason)
            # The row will say who aborted and why; this record keeps who began it and why.
            record.update(transition_actor=entry.actor, transition_reason=entry.reason)
            lease = self.store.take_over(state, self.holder, self.settings.lease_seconds, record)
            started = time.perf_counter()
            edge = edge_of(entry)
            self._runner.undo(state, lease, entry, undos)
            final = lease.abort(actor=self.settings.actor, reason=reason)
            self._log_transition(entry, EntryStatus.ABORTED, started)
            return TransitionResult(
                EntryStatus.ABORTED,
                edge,
                final.percent,
                seq,
                state=final,
                steps=[s.name for s in entry.steps],
            )

    # -- internals --------------------------------------------------------------------

    @property
    def _runner(self) -> StepRunner:
        """The step runner, on the store and settings of the moment (a caller may swap them)."""
        return StepRunner(self.store, self.settings, self.migration, self.log)

    def _single(
        self,
        trigger: Trigger,
        *,
        reason: str | None,
        force: bool,
        dry_run: bool,
        percent: int | None,
    ) -> TransitionResult:
        if force:
            _require_reason(reason, "--force")
        with self.store.operator_lock(self.migration, self.holder):
            state = self._writable()
            edge = resolve_edge(state.phase, trigger)
            if dry_run:
                return self._dry_run(state, edge, percent)
            if trigger is Trigger.RAMP and percent == state.percent:
                # Nothing changes: nothing is journaled, no guard or step runs, no version bump.
                return TransitionResult("unchanged", edge, state.percent, None, state=state)
            return self._take(state, edge, reason=reason, force=force, percent=percent)

    def _writable(self) -> MigrationState:
        """The migration, provided no transition is interrupted (else exit 3)."""
        state = self.store.get(self.migration)
        if state.in_progress_seq is None:
            return state
        if state.lease_live():
            raise lease_held_error(state)
        entry = self.store.entry(state, state.in_progress_seq)
        step = next((s.name for s in entry.steps if s.status != StepStatus.DONE), None)
        at = f" at step '{step}'" if step else " before its commit"
        raise TransitionInterrupted(
            f"migration '{self.migration}' transition #{entry.seq} ({entry.trigger}"
            f" {entry.source}->{entry.dest}) is interrupted{at}: run `migration-fsm resume`"
            " or `migration-fsm abort --reason TEXT`"
        )

    def _plan(self, state: MigrationState, edge: Edge, requested: int | None) -> Plan:
        percent = percent_after(edge, requested=requested)
        guards = [
            (name, forceable, resolve_guard(name, f'guards."{edge.key}"', self.settings))
            for name, forceable in edge_guards(self.settings, edge)
        ]
        steps = edge_steps(self.settings, edge)
        for name, undo in steps:
            resolve_step(name, f'steps."{edge.key}"')
            if undo:
                resolve_step(undo, f'steps."{edge.key}"')
        outcomes = self._held(state, edge, percent)
        if guards:
            self._check_entry_time(state)
        ctx = self._runner.context(state, edge, percent, None, None)
        for name, forceable, fn in guards:
            started = time.perf_counter()
            try:
                result = as_guard_result(fn(ctx), name)
            except Exception as exc:  # noqa: BLE001 - a guard that crashes refuses; it never passes
                result = GuardVerdict(False, f"raised {type(exc).__name__}: {exc}")
            ms = round((time.perf_counter() - started) * 1000)
            # A detail is printed, logged and journaled for good: never with a secret in it.
            value = result.value if _journalable(result.value) else None
            result = GuardVerdict(result.passed, redact_text(result.detail), value)
            outcomes.append(GuardRecord(name, result.passed, result.detail, ms, forceable, value))
            measured = {} if value is None else {"value": value}
            self.log.info(
                "guard",
                guard=name,
                edge=edge.key,
                passed=result.passed,
                detail=result.detail,
                duration_ms=ms,
                **measured,
            )
        return Plan(percent, outcomes, steps, pause_warnings(self.settings, edge, steps))

    def _held(self, state: MigrationState, edge: Edge, percent: int) -> list[GuardRecord]:
        """The refusal of `advance` or a ramp up while a hold of `watch` stands (a guard record
        `watch_hold` that `--force` does not pass); nothing when none stands. A rollback, a
        ramp down and `abort` are never held."""
        ramp_up = edge.trigger is Trigger.RAMP and percent > state.percent
        if not (edge.trigger is Trigger.ADVANCE or ramp_up):
            return []
        held = self.store.standing_hold(state)
        if held is None:
            return []
        detail = (
            f"held by {held.actor} (#{held.seq}): {held.reason}; release it with"
            " `migration-fsm watch --release --reason TEXT`, or roll back"
        )
        record = GuardRecord("watch_hold", False, redact_text(detail), 0, forceable=False)
        self.log.info(
            "guard", guard=record.name, edge=edge.key, passed=False, detail=record.detail, duration_ms=0
        )
        return [record]

    def _check_entry_time(self, state: MigrationState) -> None:
        """Before guards trust `state.phase_entered_at` (outside the hash chain: `min_soak`,
        `checksums_match`, `backup_exists`, `failure_rate_ok` measure from it), check it is when
        the chained journal says the phase was entered; `JournalCorrupt` (exit 4) otherwise."""
        entered = phase_entered_at(self.store.journal(state, with_steps=False))
        if entered is not None and entered != state.phase_entered_at:
            raise JournalCorrupt(
                f"journal of migration '{state.name}' does not verify: the migration row's"
                f" phase_entered_at ({state.phase_entered_at.isoformat()}) is not when the journal says"
                f" {state.phase} was entered ({entered.isoformat()}): it was altered outside"
                " migration-fsm; no guard trusts it (`migration-fsm verify` says more)"
            )

    def _dry_run(self, state: MigrationState, edge: Edge, requested: int | None) -> TransitionResult:
        plan = self._plan(state, edge, requested)
        return TransitionResult(
            "planned",
            edge,
            plan.percent,
            None,
            plan.guards,
            [s for s, _ in plan.steps],
            state=state,
            warnings=plan.warnings,
        )

    def _take(
        self,
        state: MigrationState,
        edge: Edge,
        *,
        reason: str | None,
        force: bool,
        percent: int | None,
    ) -> TransitionResult:
        started = time.perf_counter()
        plan = self._plan(state, edge, percent)
        for warning in plan.warnings:
            self.log.warning("no_pause_step", edge=edge.key, detail=warning)
        if not plan.refused(force):
            plan = self._before(state, edge, plan, reason=reason, force=force)
        refusing = plan.refused(force)
        forced = bool(plan.failing) and not refusing
        entry = JournalEntry(
            seq=0,
            trigger=edge.trigger,
            source=edge.source,
            dest=edge.dest,
            percent=plan.percent,
            status=EntryStatus.INTENT,
            actor=self.settings.actor,
            reason=reason,
            forced=forced,
            guards=[g.as_dict() for g in plan.guards],
            takeovers=[],
            started_at=utcnow(),
            finished_at=None,
            host=socket.gethostname(),
            pid=os.getpid(),
            error=None,
            prev_hash=None,
            hash=None,
        )
        if refusing:
            entry = self.store.append_refused(state, _finished(entry))
            self._log_transition(entry, EntryStatus.REFUSED, started)
            names = ", ".join(f"{g.name} ({g.detail})" for g in refusing)
            unforceable = [g.name for g in refusing if not g.forceable]
            if unforceable == ["approval"]:
                hint = "an approval cannot be replaced by --force: get one"
            elif unforceable == ["watch_hold"]:
                hint = "a hold cannot be forced: release it (watch --release) or roll back"
            elif unforceable:
                hint = f"{', '.join(unforceable)} cannot be forced; fix the cause first"
            elif edge.trigger is Trigger.ADVANCE:
                hint = "fix the cause, or use --force --reason TEXT"
            else:  # rollback and ramp have no --force
                hint = "fix the cause first"
            raise Refused(f"{edge.trigger} {edge.key} refused by {names}: {hint}")
        lease, entry = self.store.claim(state, entry, plan.steps, self.holder, self.settings.lease_seconds)
        seq = entry.seq
        self.log.info("claim", seq=seq, trigger=str(edge.trigger), edge=edge.key, forced=forced)
        outcome = self._run_and_commit(state, lease, entry, started)
        return TransitionResult(
            outcome.status,
            edge,
            outcome.percent,
            seq,
            plan.guards,
            outcome.steps,
            forced,
            outcome.state,
        )

    def _before(
        self, state: MigrationState, edge: Edge, plan: Plan, *, reason: str | None, force: bool
    ) -> Plan:
        """Send the `before` event to the command targets that take it (after the guards
        passed, before the claim); each `veto = true` target's answer joins the guards' results
        as `notify:<name>` (a non-zero exit refuses like a failing guard)."""
        if not any(t.wants_before() for t in self.settings.notify):
            return plan
        event = before_event(state, edge, plan, actor=self.settings.actor, reason=reason, force=force)
        vetoes = notify.before(self.settings, event)
        records = [GuardRecord(v.name, v.passed, v.detail, v.duration_ms) for v in vetoes]
        for record in records:
            self.log.info(
                "guard",
                guard=record.name,
                edge=edge.key,
                passed=record.passed,
                detail=record.detail,
                duration_ms=record.duration_ms,
            )
        return replace(plan, guards=[*plan.guards, *records])

    def _run_and_commit(
        self, state: MigrationState, lease: Lease, entry: JournalEntry, started: float
    ) -> TransitionResult:
        seq = entry.seq
        edge = edge_of(entry)
        self._runner.run(state, lease, entry)
        final = lease.commit()
        self._log_transition(entry, EntryStatus.COMMITTED, started)
        return TransitionResult(
            EntryStatus.COMMITTED,
            edge,
            final.percent,
            seq,
            steps=[s.name for s in entry.steps],
            state=final,
        )

    def _takeover(
        self,
        command: str,
        state: MigrationState,
        stolen: bool,
        reason: str | None = None,
    ) -> dict[str, Any]:
        record: dict[str, Any] = {
            "command": command,
            "actor": self.settings.actor,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "at": utcnow().isoformat(timespec="microseconds"),
            "previous_holder": state.lease_holder,
            "stolen": stolen,
        }
        if reason is not None:
            record["reason"] = reason
        return record

    def _log_transition(self, entry: JournalEntry, status: str, started: float) -> None:
        self.log.info(
            "transition",
            seq=entry.seq,
            trigger=str(entry.trigger),
            source=str(entry.source),
            dest=str(entry.dest),
            status=status,
            duration_ms=round((time.perf_counter() - started) * 1000, 3),
        )


def before_event(
    state: MigrationState, edge: Edge, plan: Plan, *, actor: str, reason: str | None, force: bool
) -> dict[str, Any]:
    """The `before` event of `edge` (schema 1, docs/OBSERVABILITY.md): what the edge is about
    to do; it has no `id` (it is not stored) and its `state` is the migration as it stands."""
    return {
        "schema": EVENT_SCHEMA,
        "id": None,
        "event": BEFORE,
        "migration": state.name,
        "seq": state.last_seq + 1,
        "at": utcnow().isoformat(timespec="microseconds"),
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "trigger": str(edge.trigger),
        "edge": edge.key,
        "source": str(edge.source),
        "dest": str(edge.dest),
        "status": None,
        "actor": actor,
        "reason": redact_text(reason) if reason else reason,
        "forced": bool(plan.failing) and force,
        "error": None,
        "percent": plan.percent,
        "guards": [{"name": g.name, "passed": g.passed, "detail": g.detail} for g in plan.guards],
        "steps": [
            {"name": name, "status": "pending", "attempts": 0, "error": None} for name, _ in plan.steps
        ],
        "state": state_fields(state.phase.value, state.percent, state.version, state.paused_side),
    }


def _finished(entry: JournalEntry) -> JournalEntry:
    from dataclasses import replace

    return replace(entry, finished_at=utcnow())


def _check_seen(state: MigrationState, seen_version: int | None, what: str) -> None:
    """`ConcurrentChange` unless the migration is still at `seen_version` (when given)."""
    if seen_version is not None and state.version != seen_version:
        raise ConcurrentChange(
            f"migration '{state.name}' changed since it was measured (version {seen_version} ->"
            f" {state.version}, now {state.phase} at {state.percent}%): no {what}"
        )


def _require_reason(reason: str | None, what: str) -> None:
    if reason is None or not reason.strip():
        raise BadInput(f"{what} needs a reason: add --reason TEXT")


def _journalable(value: object) -> bool:
    """Whether a guard's `value` can be journaled: a finite number (JSON has no NaN; a bool
    is not a measurement)."""
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
