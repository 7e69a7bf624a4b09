"""The real engine, on a real store, against a tiny in-memory model of DESIGN.md sections 2-4.

Hypothesis starts each example in a phase of its choice and then drives an operator
session: advance, forced advance, ramp, rollback (one edge or `--to`), a transition that
breaks, resume (with or without `--steal`), abort, the lease running out, a dry run, bad
input and commands the state does not allow. Guards refuse, raise or crash; steps fail or
crash at any fault point (see `tests/support/strategies.py`). After a crash the store is closed
and opened again from scratch and a new engine, for a new operator, carries on. After
every rule the stored state, the journal (its hash chain and its replay, through
`verify_entries`), every step run and `status` must agree with the model.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Final

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)
from sqlalchemy import event, update
from sqlalchemy.engine import make_url
from structlog.testing import capture_logs

from migration_fsm.commands import Status, verify_entries
from migration_fsm.config import Settings
from migration_fsm.exceptions import (
    BadInput,
    LeaseHeld,
    MigrationFSMError,
    Refused,
    StepFailed,
    TransitionInterrupted,
    TriggerNotAllowed,
)
from migration_fsm.fsm import Phase
from migration_fsm.journal import JournalEntry, migrations_table, utcnow
from migration_fsm.migration import Migration, TransitionResult
from tests.support.strategies import (
    GUARD_FLAG,
    GUARDS,
    RUNS,
    STEPS,
    Fault,
    FaultCounter,
    FaultyStore,
    GuardMode,
    SimulatedCrash,
    arm,
    edge_steps,
    faults,
    guard_modes,
    percents,
    reasons,
    rollback_targets,
)

#: Long enough that a lease never runs out by itself during an example: `lease_expires` does it.
LEASE_SECONDS: Final = 600.0

#: The contract's exit codes (DESIGN.md section 4), written out rather than read from the classes.
EXIT_CODES: Final[dict[type[MigrationFSMError], int]] = {
    Refused: 1,
    StepFailed: 1,
    BadInput: 2,
    TriggerNotAllowed: 2,
    LeaseHeld: 3,
    TransitionInterrupted: 3,
}

Expected = type[BaseException] | None

BAD_INPUT: Final = (
    "force without reason",
    "rollback without reason",
    "abort without reason",
    "ramp out of range",
)

# -- the model ------------------------------------------------------------------------------

ORDER: Final = (Phase.PREPARATION, Phase.DUAL_WRITE, Phase.CUTOVER, Phase.CLEANUP, Phase.COMPLETE)
ROLLBACK: Final = {
    Phase.DUAL_WRITE: Phase.PREPARATION,
    Phase.CUTOVER: Phase.DUAL_WRITE,
    Phase.CLEANUP: Phase.CUTOVER,
}
ALLOWED: Final = {
    Phase.PREPARATION: ["advance"],
    Phase.DUAL_WRITE: ["advance", "rollback"],
    Phase.CUTOVER: ["advance", "rollback", "ramp"],
    Phase.CLEANUP: ["advance", "rollback"],
    Phase.COMPLETE: [],
}


class _Stop(Exception):
    """The model's way to say: the engine stops here, raising `expected`."""

    def __init__(self, expected: type[BaseException]) -> None:
        super().__init__(expected.__name__)
        self.expected = expected


@dataclass(slots=True)
class ModelStep:
    name: str
    undo: str | None
    status: str = "pending"
    attempts: int = 0


@dataclass(slots=True)
class ModelEntry:
    seq: int
    trigger: str
    source: Phase | None
    dest: Phase
    percent: int
    status: str
    reason: str | None = None
    forced: bool = False
    error: bool = False
    guards: list[tuple[str, bool]] = field(default_factory=list)
    steps: list[ModelStep] = field(default_factory=list)
    takeovers: list[tuple[str, bool]] = field(default_factory=list)

    def view(self) -> tuple[Any, ...]:
        return (
            self.seq,
            self.trigger,
            self.source,
            self.dest,
            self.percent,
            self.status,
            self.reason,
            self.forced,
            self.error,
            self.guards,
            [(s.name, s.undo, s.status, s.attempts) for s in self.steps],
            self.takeovers,
        )


def stored_view(entry: JournalEntry) -> tuple[Any, ...]:
    """A journal row in the shape of `ModelEntry.view`."""
    return (
        entry.seq,
        str(entry.trigger),
        entry.source,
        entry.dest,
        entry.percent,
        entry.status,
        entry.reason,
        entry.forced,
        entry.error is not None,
        [(g["name"], g["passed"]) for g in entry.guards],
        [(s.name, s.undo, s.status, s.attempts) for s in entry.steps],
        [(t["command"], t["stolen"]) for t in entry.takeovers],
    )


def _has_text(reason: str | None) -> bool:
    return reason is not None and bool(reason.strip())


class Model:
    """What the contract says a migration looks like after each command.

    Each verb returns the exception the engine must raise (None: it must succeed) and
    updates the model as far as the engine gets before it stops.
    """

    def __init__(self) -> None:
        self.phase = Phase.PREPARATION
        self.percent = 0
        self.version = 1
        self.lease = "none"  # none, live (held, or left by a crashed operator), expired
        self.entries = [ModelEntry(1, "init", None, Phase.PREPARATION, 0, "committed")]
        self.runs: list[tuple[int | None, str]] = []  # what `tests.support.strategies.RUNS` must hold

    @property
    def interrupted(self) -> ModelEntry | None:
        last = self.entries[-1]
        return last if last.status == "intent" else None

    # -- verbs --------------------------------------------------------------------------

    def advance(self, *, force: bool, reason: str | None, guard: GuardMode, fault: Fault | None) -> Expected:
        def run(counter: FaultCounter) -> None:
            if force and not _has_text(reason):
                raise _Stop(BadInput)
            self._writable()
            index = ORDER.index(self.phase)
            if index + 1 == len(ORDER):
                raise _Stop(TriggerNotAllowed)
            self._take("advance", ORDER[index + 1], counter, reason=reason, force=force, guard=guard)

        return self._attempt(run, fault)

    def steps_of(self, trigger: str) -> int:
        """How many steps the edge `trigger` takes from the current phase runs (0: no edge)."""
        if trigger == "advance" and self.phase is not Phase.COMPLETE:
            dest = ORDER[ORDER.index(self.phase) + 1]
        elif trigger == "rollback" and self.phase in ROLLBACK:
            dest = ROLLBACK[self.phase]
        elif trigger == "ramp" and self.phase is Phase.CUTOVER:
            dest = Phase.CUTOVER
        else:
            return 0
        return len(edge_steps(f"{self.phase}->{dest}"))

    def dry_run_advance(self, guard: GuardMode) -> tuple[Expected, list[bool]]:
        verdicts: list[bool] = []

        def run(counter: FaultCounter) -> None:
            self._writable()
            index = ORDER.index(self.phase)
            if index + 1 == len(ORDER):
                raise _Stop(TriggerNotAllowed)
            key = f"{self.phase}->{ORDER[index + 1]}"
            verdicts.extend(passed for _, passed, _ in self._guards(key, guard))

        return self._attempt(run, None), verdicts

    def ramp(self, percent: int, *, fault: Fault | None) -> Expected:
        def run(counter: FaultCounter) -> None:
            if not 0 <= percent <= 100:
                raise _Stop(BadInput)
            self._writable()
            if self.phase is not Phase.CUTOVER:
                raise _Stop(TriggerNotAllowed)
            if percent == self.percent:
                return  # unchanged: nothing journaled
            self._take("ramp", Phase.CUTOVER, counter, requested=percent)

        return self._attempt(run, fault)

    def rollback(self, *, reason: str, to: Phase | None, guard: GuardMode, fault: Fault | None) -> Expected:
        def run(counter: FaultCounter) -> None:
            if not _has_text(reason):
                raise _Stop(BadInput)
            self._writable()
            path: list[Phase] = []
            phase = self.phase
            while phase is not to:
                if phase not in ROLLBACK:
                    raise _Stop(TriggerNotAllowed)
                phase = ROLLBACK[phase]
                path.append(phase)
                if to is None:
                    break
            if not path:  # already in `to`
                raise _Stop(TriggerNotAllowed)
            for dest in path:
                self._take("rollback", dest, counter, reason=reason, guard=guard)

        return self._attempt(run, fault)

    def resume(self, *, steal: bool, fault: Fault | None) -> Expected:
        def run(counter: FaultCounter) -> None:
            entry = self.interrupted
            if entry is None:
                raise _Stop(BadInput)
            stolen = self.lease == "live"
            if stolen and not steal:
                raise _Stop(LeaseHeld)
            self._store_point(counter)
            entry.takeovers.append(("resume", stolen))
            self.lease = "live"
            self._store_point(counter)
            self._run_and_commit(entry, counter)

        return self._attempt(run, fault)

    def abort(self, *, reason: str, fault: Fault | None) -> Expected:
        def run(counter: FaultCounter) -> None:
            if not _has_text(reason):
                raise _Stop(BadInput)
            entry = self.interrupted
            if entry is None:
                raise _Stop(BadInput)
            if self.lease == "live":
                raise _Stop(LeaseHeld)
            self._store_point(counter)
            entry.takeovers.append(("abort", False))
            self.lease = "live"
            self._store_point(counter)
            for step in reversed(entry.steps):
                if step.status != "done" or step.undo is None:
                    continue
                self.runs.append((entry.seq, step.undo))
                match counter.next("step"):
                    case "crash":
                        raise _Stop(SimulatedCrash)
                    case "fail":  # the step stays done; the abort can be run again
                        entry.error = True
                        self.lease = "none"
                        raise _Stop(StepFailed)
                step.status = "undone"
            self._store_point(counter)
            entry.status = "aborted"
            entry.reason = reason  # the aborted row says why it was aborted
            self.lease = "none"
            self._store_point(counter)

        return self._attempt(run, fault)

    def lease_expires(self) -> None:
        self.lease = "expired"

    # -- the protocol of DESIGN.md section 3 ---------------------------------------------

    def _attempt(self, run: Callable[[FaultCounter], None], fault: Fault | None) -> Expected:
        try:
            run(FaultCounter(fault))
        except _Stop as stop:
            return stop.expected
        return None

    def _writable(self) -> None:
        if self.interrupted is not None:
            raise _Stop(LeaseHeld if self.lease == "live" else TransitionInterrupted)

    def _guards(self, key: str, guard: GuardMode) -> list[tuple[str, bool, bool]]:
        """(name, passed, forceable) of the edge's guards, in the order they run."""
        verdicts = []
        if key == "cutover->cleanup":
            verdicts.append(("percent_is_100", self.percent == 100, False))
        if key in GUARDS:
            if guard == "crash":
                raise _Stop(SimulatedCrash)
            verdicts.append((GUARD_FLAG, guard == "pass", True))
        return verdicts

    def _store_point(self, counter: FaultCounter) -> None:
        if counter.next("store") is not None:
            raise _Stop(SimulatedCrash)

    def _take(
        self,
        trigger: str,
        dest: Phase,
        counter: FaultCounter,
        *,
        reason: str | None = None,
        force: bool = False,
        guard: GuardMode = "pass",
        requested: int | None = None,
    ) -> None:
        source = self.phase
        key = f"{source}->{dest}"
        if requested is not None:
            percent = requested
        elif dest is Phase.CUTOVER:
            percent = 100 if source is Phase.CLEANUP else 0
        else:
            percent = 100 if dest in (Phase.CLEANUP, Phase.COMPLETE) else 0
        guards = self._guards(key, guard)
        failing = [g for g in guards if not g[1]]
        refusing = [g for g in failing if not (force and g[2])]
        entry = ModelEntry(
            seq=len(self.entries) + 1,
            trigger=trigger,
            source=source,
            dest=dest,
            percent=percent,
            status="refused" if refusing else "intent",
            reason=reason,
            forced=bool(failing) and not refusing,
            guards=[(name, passed) for name, passed, _ in guards],
        )
        self._store_point(counter)
        if refusing:
            self.entries.append(entry)
            self._store_point(counter)
            raise _Stop(Refused)
        entry.steps = [ModelStep(name, undo) for name, undo in edge_steps(key)]
        self.entries.append(entry)
        self.lease = "live"
        self._store_point(counter)
        self._run_and_commit(entry, counter)

    def _run_and_commit(self, entry: ModelEntry, counter: FaultCounter) -> None:
        for step in entry.steps:
            if step.status == "done":
                continue
            step.status = "started"
            step.attempts += 1
            self.runs.append((entry.seq, step.name))
            match counter.next("step"):
                case "crash":  # the step stays `started`, the dead operator's lease stays live
                    raise _Stop(SimulatedCrash)
                case "fail":
                    step.status = "failed"
                    entry.error = True
                    self.lease = "none"
                    raise _Stop(StepFailed)
            step.status = "done"
        self._store_point(counter)
        entry.status = "committed"
        entry.error = False
        self.phase, self.percent = entry.dest, entry.percent
        self.version += 1
        self.lease = "none"
        self._store_point(counter)


# -- the machine ----------------------------------------------------------------------------


class Database:
    """The test's database, shared by its examples; opened again from scratch after a crash.

    Commits do not wait for the disk (`synchronous_commit=off`, `PRAGMA synchronous=OFF`): a
    crash of the database server is not what this test simulates, and waiting for thousands
    of commits to reach the disk would dominate its run time.
    """

    def __init__(self, url: str, make_settings: Callable[..., Settings]) -> None:
        parsed = make_url(url)
        if parsed.get_backend_name() == "postgresql":
            options = parsed.query.get("options", ())
            options = " ".join([*([options] if isinstance(options, str) else options)])
            parsed = parsed.update_query_dict({"options": f"{options} -csynchronous_commit=off".strip()})
        self.url = parsed.render_as_string(hide_password=False)
        self.make_settings = make_settings
        self.settings: dict[str, Settings] = {}
        self.store = self._open()

    def _open(self) -> FaultyStore:
        store = FaultyStore(self.url)
        if store.dialect == "sqlite":
            event.listen(store.engine, "connect", _sqlite_without_fsync)
        return store

    def reopen(self) -> None:
        self.store.close()
        self.store = self._open()

    def settings_for(self, actor: str) -> Settings:
        if actor not in self.settings:
            self.settings[actor] = self.make_settings(
                actor=actor, lease_seconds=LEASE_SECONDS, guards=GUARDS, steps=STEPS
            )
        return self.settings[actor]


def _sqlite_without_fsync(dbapi_connection: Any, record: object) -> None:
    dbapi_connection.execute("PRAGMA synchronous = OFF")


class EngineVersusModel(RuleBasedStateMachine):
    """One migration (a fresh name per example) driven through the real engine and the model."""

    def __init__(self, db: Database) -> None:
        super().__init__()
        self.db = db
        self.name = f"stateful-{uuid.uuid4().hex[:16]}"
        self.operators = 0
        self.engine = self._new_engine()
        arm()
        self.engine.init()
        self.model = Model()

    @property
    def store(self) -> FaultyStore:
        return self.db.store

    def _new_engine(self) -> Migration:
        self.operators += 1
        return Migration(self.store, self.db.settings_for(f"operator-{self.operators}"), self.name)

    def _crashed(self) -> None:
        """The operator's process died: open the database from scratch, as a new operator."""
        self.db.reopen()
        self.engine = self._new_engine()

    def _call(
        self,
        expected: Expected,
        call: Callable[[], Any],
        *,
        guard: GuardMode = "pass",
        fault: Fault | None = None,
    ) -> Any:
        """Run `call` with the plan armed; check it raises `expected` (or succeeds when None)."""
        arm(guard, fault)
        result: Any = None
        raised: BaseException | None = None
        try:
            result = call()
        except (SimulatedCrash, MigrationFSMError) as exc:
            raised = exc
        finally:
            arm()
        if isinstance(raised, SimulatedCrash):
            self._crashed()
        got = "success" if raised is None else f"{type(raised).__name__}: {raised}"
        assert expected is (None if raised is None else type(raised)), (
            f"expected {_name(expected)}, got {got}"
        )
        if isinstance(raised, MigrationFSMError):
            assert EXIT_CODES[type(raised)] == raised.exit_code
        return result

    def teardown(self) -> None:
        arm()
        RUNS.pop(self.name, None)

    # -- rules --------------------------------------------------------------------------

    @initialize(start=st.sampled_from(ORDER[:-1]), percent=st.sampled_from((0, 30, 100)))
    def walk_to(self, start: Phase, percent: int) -> None:
        """Start the example in any phase but the final one (advancing, with nothing going
        wrong), so that every edge is a few steps away."""
        while self.model.phase is not start:
            if self.model.phase is Phase.CUTOVER and self.model.percent != 100:
                self._call(self.model.ramp(100, fault=None), lambda: self.engine.ramp(100))
            expected = self.model.advance(force=False, reason=None, guard="pass", fault=None)
            self._call(expected, self.engine.advance)
        if start is Phase.CUTOVER and percent:
            self._call(self.model.ramp(percent, fault=None), lambda: self.engine.ramp(percent))

    @precondition(lambda self: self.model.interrupted is None)
    @rule(guard=guard_modes(), fault=faults())
    def advance(self, guard: GuardMode, fault: Fault | None) -> None:
        expected = self.model.advance(force=False, reason=None, guard=guard, fault=fault)
        outcome = self._call(expected, self.engine.advance, guard=guard, fault=fault)
        if outcome is not None:
            self._check_committed(outcome)
            assert self.model.entries[-1].forced is outcome.forced is False

    @precondition(lambda self: self.model.interrupted is None)
    @rule(guard=guard_modes(), fault=faults(), reason=reasons())
    def forced_advance(self, guard: GuardMode, fault: Fault | None, reason: str) -> None:
        expected = self.model.advance(force=True, reason=reason, guard=guard, fault=fault)
        outcome = self._call(
            expected, lambda: self.engine.advance(force=True, reason=reason), guard=guard, fault=fault
        )
        if outcome is not None:
            self._check_committed(outcome)
            assert self.model.entries[-1].forced == outcome.forced

    @precondition(lambda self: self.model.phase is Phase.CUTOVER and not self.model.interrupted)
    @rule(percent=percents(), fault=faults())
    def ramp(self, percent: int, fault: Fault | None) -> None:
        unchanged = self.model.phase is Phase.CUTOVER and percent == self.model.percent
        expected = self.model.ramp(percent, fault=fault)
        outcome = self._call(expected, lambda: self.engine.ramp(percent), fault=fault)
        if outcome is not None:
            assert isinstance(outcome, TransitionResult)
            if unchanged:
                assert ("unchanged", None) == (outcome.status, outcome.seq)
            else:
                self._check_committed(outcome)
            assert percent == outcome.percent

    @precondition(lambda self: self.model.phase in ROLLBACK and not self.model.interrupted)
    @rule(guard=guard_modes(), fault=faults(), reason=reasons(), to=rollback_targets())
    def rollback(self, guard: GuardMode, fault: Fault | None, reason: str, to: Phase | None) -> None:
        expected = self.model.rollback(reason=reason, to=to, guard=guard, fault=fault)
        outcomes = self._call(
            expected, lambda: self.engine.rollback(reason=reason, to=to), guard=guard, fault=fault
        )
        if outcomes is not None:
            assert ["committed"] * len(outcomes) == [o.status for o in outcomes]
            self._check_committed(outcomes[-1])

    @precondition(lambda self: self.model.interrupted is None and self.model.phase is not Phase.COMPLETE)
    @rule(which=st.integers(0, 5), k=st.integers(0, 5), crash=st.booleans())
    def transition_that_breaks(self, which: int, k: int, crash: bool) -> None:
        """One of the phase's edges, whose process dies at one of its fault points (`crash`),
        or one of whose steps fails: the ways a transition is left interrupted."""
        allowed = ALLOWED[self.model.phase]
        trigger = allowed[which % len(allowed)]
        steps = self.model.steps_of(trigger)
        # Counted from the end, so that small `k` (which Hypothesis favours) leave the most
        # steps done: a take reaches claim (before, after), its steps, finish (before, after).
        if crash:
            fault: Fault | None = Fault(at=(steps + 2 - k) % (steps + 4), crash=True)
        else:
            fault = Fault(at=steps - 1 - k % steps, crash=False) if steps else None
        match trigger:
            case "advance":
                self.advance("pass", fault)
            case "rollback":
                self.rollback("pass", fault, "it broke", None)
            case _:
                self.ramp(100 if k % 2 else 50, fault)

    @precondition(lambda self: self.model.interrupted is not None)
    @rule(fault=faults(), steal=st.booleans())
    def resume(self, fault: Fault | None, steal: bool) -> None:
        expected = self.model.resume(steal=steal, fault=fault)
        outcome = self._call(expected, lambda: self.engine.resume(steal=steal), fault=fault)
        if outcome is not None:
            self._check_committed(outcome)

    @precondition(lambda self: self.model.interrupted is not None)
    @rule(fault=faults(), reason=reasons())
    def abort(self, fault: Fault | None, reason: str) -> None:
        expected = self.model.abort(reason=reason, fault=fault)
        outcome = self._call(expected, lambda: self.engine.abort(reason=reason), fault=fault)
        if outcome is not None:
            assert isinstance(outcome, TransitionResult)
            assert outcome.state is not None
            assert ("aborted", self.model.phase) == (outcome.status, outcome.state.phase)

    @rule(guard=guard_modes())
    def dry_run_advance(self, guard: GuardMode) -> None:
        expected, verdicts = self.model.dry_run_advance(guard)
        outcome = self._call(expected, lambda: self.engine.advance(dry_run=True), guard=guard)
        if outcome is not None:
            assert isinstance(outcome, TransitionResult)
            assert ("planned", None) == (outcome.status, outcome.seq)
            assert verdicts == [g.passed for g in outcome.guards]

    @rule(request=st.sampled_from(BAD_INPUT), blank=st.sampled_from(("", "   ")))
    def bad_input(self, request: str, blank: str) -> None:
        """A missing reason or a percent outside 0..100: exit 2, whatever the state."""
        model, engine = self.model, self.engine
        match request:
            case "force without reason":
                expected = model.advance(force=True, reason=blank, guard="pass", fault=None)
                self._call(expected, lambda: engine.advance(force=True, reason=blank))
            case "rollback without reason":
                expected = model.rollback(reason=blank, to=None, guard="pass", fault=None)
                self._call(expected, lambda: engine.rollback(reason=blank))
            case "abort without reason":
                self._call(model.abort(reason=blank, fault=None), lambda: engine.abort(reason=blank))
            case _:
                percent = -1 if blank else 101
                self._call(model.ramp(percent, fault=None), lambda: engine.ramp(percent))

    @rule(which=st.integers(0, 2))
    def command_not_possible_now(self, which: int) -> None:
        """A trigger the phase has no edge for, nothing to resume or abort (exit 2), or a
        command other than resume and abort while a transition is interrupted (exit 3)."""
        model, engine = self.model, self.engine
        if model.interrupted is not None:
            self._trigger(("advance", "rollback", "ramp")[which])
            return
        not_allowed = [t for t in ("advance", "rollback", "ramp") if t not in ALLOWED[model.phase]]
        if not_allowed and which:
            self._trigger(not_allowed[which % len(not_allowed)])
            return
        self._call(model.resume(steal=which == 1, fault=None), lambda: engine.resume(steal=which == 1))
        self._call(model.abort(reason="r", fault=None), lambda: engine.abort(reason="r"))

    def _trigger(self, trigger: str) -> None:
        """Fire `trigger` with everything valid, predicting the outcome from the model."""
        model, engine = self.model, self.engine
        match trigger:
            case "advance":
                expected = model.advance(force=True, reason="r", guard="pass", fault=None)
                self._call(expected, lambda: engine.advance(force=True, reason="r"))
            case "rollback":
                expected = model.rollback(reason="r", to=None, guard="pass", fault=None)
                self._call(expected, lambda: engine.rollback(reason="r"))
            case _:
                self._call(model.ramp(50, fault=None), lambda: engine.ramp(50))

    @precondition(lambda self: self.model.lease == "live")
    @rule()
    def lease_expires(self) -> None:
        # Time passing, made deterministic: the lease's expiry moves into the past.
        with self.store.transaction() as conn:
            conn.execute(
                update(migrations_table)
                .where(migrations_table.c.name == self.name)
                .values(lease_expires_at=utcnow() - timedelta(seconds=1))
            )
        self.model.lease_expires()

    def _check_committed(self, outcome: TransitionResult) -> None:
        model = self.model
        assert "committed" == outcome.status
        assert outcome.state is not None
        assert (model.phase, model.percent, model.version) == (
            outcome.state.phase,
            outcome.state.percent,
            outcome.state.version,
        )
        assert model.entries[-1].seq == outcome.seq

    # -- invariants ---------------------------------------------------------------------

    @invariant()
    def engine_agrees_with_model(self) -> None:
        model = self.model
        state = self.store.get(self.name)
        journal = self.store.journal(state)
        verified = verify_entries(state, journal)  # hash chain + replay, else JournalCorrupt
        assert (model.phase, model.percent, model.version) == (state.phase, state.percent, state.version)
        assert (state.phase, state.percent) == (verified.phase, verified.percent)
        assert sum(entry.status == "intent" for entry in journal) <= 1
        assert [entry.view() for entry in model.entries] == [stored_view(entry) for entry in journal]
        assert model.runs == RUNS[self.name]
        interrupted = model.interrupted
        assert (None if interrupted is None else interrupted.seq) == state.in_progress_seq
        assert (model.lease == "live") == state.lease_live()
        for entry in journal:  # each attempt saved a checkpoint, and resume handed it back
            for step in entry.steps:
                assert (None if step.attempts == 0 else {"runs": step.attempts}) == step.checkpoint

        in_progress = next((e for e in journal if e.seq == state.in_progress_seq), None)
        shown = Status(state, in_progress).as_json()  # what `status --json` prints
        assert (model.phase.value, model.version, model.percent) == (
            shown["phase"],
            shown["version"],
            shown["percent"],
        )
        if interrupted is None:
            assert (None, ALLOWED[model.phase]) == (shown["interrupted"], shown["allowed"])
        else:
            pending = next((s.name for s in interrupted.steps if s.status != "done"), None)
            assert shown["interrupted"] is not None
            assert (interrupted.seq, pending, []) == (
                shown["interrupted"]["seq"],
                shown["interrupted"]["step"],
                shown["allowed"],
            )


def _name(expected: Expected) -> str:
    return "success" if expected is None else expected.__name__


STATEFUL_SETTINGS: Final = settings(
    max_examples=200 if os.environ.get("CI") else 50,
    # Eight rules after `walk_to` (which already takes up to four transitions to reach a deep
    # phase): enough to break, resume and abort twice over, and the module stays near a minute.
    stateful_step_count=8,
    deadline=None,
)


def test_engine_matches_model_through_failures_and_crashes(
    upgraded_url: str, make_settings: Callable[..., Settings]
) -> None:
    """Random sessions with refusals, failing and crashing steps never split engine, journal and model."""
    db = Database(upgraded_url, make_settings)

    class OnThisDatabase(EngineVersusModel):
        def __init__(self) -> None:
            super().__init__(db)

    # The engine's log lines are captured, not rendered: thousands of them cost time and say nothing here.
    try:
        with capture_logs():
            run_state_machine_as_test(OnThisDatabase, settings=STATEFUL_SETTINGS)
    finally:
        db.store.close()
