"""The transition runner says exactly what it did and why it refused: the log line of each
transition, guard, claim and takeover, the journaled row of each edge, refusal and takeover,
and the exact message of each refusal. (Mutation survivors of migration.py: each assertion
here is one a plausible one-line bug would break.)

A duration is measured on `migration.time.perf_counter`; the tests that check one replace it
with a clock that moves 500.41234 ms at each reading, so the duration logged and journaled is
known exactly (no wall-clock time is read), and a factor or a rounding off by one shows."""

from __future__ import annotations

import dataclasses
import os
import re
import socket
import types
from collections.abc import Callable, Iterator, MutableMapping
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import update
from structlog.testing import capture_logs

from migration_fsm import migration as migration_module
from migration_fsm.config import Settings
from migration_fsm.exceptions import (
    BadInput,
    ConfigError,
    JournalCorrupt,
    LeaseHeld,
    Refused,
    StepFailed,
    TransitionInterrupted,
)
from migration_fsm.fsm import EDGES_BY_KEY, Phase, Trigger, resolve_edge, routing_for
from migration_fsm.journal import Journal, JournalEntry, migrations_table, outbox, utcnow
from migration_fsm.migration import GuardRecord, Migration, Plan, edge_guards, edge_steps, pause_warnings
from migration_fsm.plugins.context import Context, GuardVerdict
from tests.support import steps as engsteps
from tests.support.datatools import memory_stores

HERE = "tests.unit.test_migration_rules"
FLAG = "tests.support.steps:flag_guard"
STEP_A = "tests.support.steps:step_a"
STEP_B = "tests.support.steps:step_b"
STEP_C = "tests.support.steps:step_c"
UNDO_A = "tests.support.steps:undo_a"
UNDO_B = "tests.support.steps:undo_b"
STEPS = {
    "dual_write->cutover": [
        {"do": STEP_A, "undo": UNDO_A},
        {"do": STEP_B, "undo": UNDO_B},
        STEP_C,
    ]
}
#: What one reading of the test clock adds, in seconds.
TICK = 0.50041234
#: A takeover's `at`: UTC, to the microsecond.
ISO_MICROSECONDS = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}\+00:00")


def secret_guard(ctx: Context) -> GuardVerdict:
    """A guard whose detail carries a database URL with its password."""
    return GuardVerdict(True, "checked postgresql://admin:hunter2@db.example/app")


@pytest.fixture(autouse=True)
def _reset_steps() -> Iterator[None]:
    engsteps.reset()
    yield
    engsteps.reset()


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> None:
    """The runner's `perf_counter` moves `TICK` seconds at each reading."""
    readings = iter(range(1, 1_000_000))
    fake = types.SimpleNamespace(perf_counter=lambda: 1000.0 + next(readings) * TICK)
    monkeypatch.setattr(migration_module, "time", fake)


def make(store: Journal, make_settings: Callable[..., Settings], **overrides: Any) -> Migration:
    return Migration(store, make_settings(**overrides), "default")


def last_row(store: Journal) -> JournalEntry:
    return store.journal(store.get("default"))[-1]


def interrupted_at_step_b(engine: Migration, make_settings: Callable[..., Settings]) -> Migration:
    """dual_write -> cutover, interrupted by step_b failing (step_a done)."""
    engine.advance()
    eng = make(engine.store, make_settings, steps=STEPS)
    engsteps.FAIL_ONCE.add("step_b")
    with pytest.raises(StepFailed):
        eng.advance()
    return eng


def expire_the_lease(store: Journal) -> None:
    """As if its holder had died a while ago."""
    with store.transaction() as conn:
        conn.execute(update(migrations_table).values(lease_expires_at=utcnow() - timedelta(seconds=1)))


def without_level(logs: list[MutableMapping[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in line.items() if k != "log_level"} for line in logs]


# -- log lines ---------------------------------------------------------------------------


def test_init_logs_its_transition(store: Journal, make_settings: Callable[..., Settings]) -> None:
    eng = Migration(store, make_settings(actor="carol"))  # the migration is `default` unless named
    with capture_logs() as logs:
        state = eng.init()
    assert [
        {
            "migration": "default",
            "event": "transition",
            "seq": 1,
            "trigger": "init",
            "source": None,
            "dest": "preparation",
            "status": "committed",
        }
    ] == without_level(logs)
    assert (Phase.PREPARATION, 1) == (state.phase, state.last_seq)
    assert "carol" == last_row(store).actor


def test_a_transition_logs_its_claim_and_its_end(engine: Migration, clock: None) -> None:
    with capture_logs() as logs:
        engine.advance()
    assert [
        {
            "migration": "default",
            "event": "claim",
            "log_level": "info",
            "seq": 2,
            "trigger": "advance",
            "edge": "preparation->dual_write",
            "forced": False,
        },
        {
            "migration": "default",
            "event": "transition",
            "log_level": "info",
            "seq": 2,
            "trigger": "advance",
            "source": "preparation",
            "dest": "dual_write",
            "status": "committed",
            # started at the first reading, ended at the second
            "duration_ms": round(TICK * 1000, 3),
        },
    ] == logs
    assert all(type(line[k]) is str for line in logs for k in ("trigger", "event"))
    assert type(logs[1]["source"]) is str
    assert type(logs[1]["dest"]) is str


def test_a_guard_is_logged_journaled_and_returned_with_its_duration(
    engine: Migration, make_settings: Callable[..., Settings], clock: None
) -> None:
    eng = make(engine.store, make_settings, guards={"preparation->dual_write": [FLAG]})
    with capture_logs() as logs:
        outcome = eng.advance()
    guard_ms = round(TICK * 1000)  # one reading before the guard, one after
    assert {
        "migration": "default",
        "event": "guard",
        "log_level": "info",
        "guard": FLAG,
        "edge": "preparation->dual_write",
        "passed": True,
        "detail": "flag is True",
        "duration_ms": guard_ms,
    } == logs[0]
    # The transition's four readings: its start, the guard's two, its end.
    assert ("transition", round(3 * TICK * 1000, 3)) == (logs[-1]["event"], logs[-1]["duration_ms"])
    assert [GuardRecord(FLAG, True, "flag is True", guard_ms, True)] == outcome.guards
    assert [{"name": FLAG, "passed": True, "detail": "flag is True", "duration_ms": guard_ms}] == (
        last_row(engine.store).guards
    )


def test_a_refusal_is_logged_with_its_status(
    engine: Migration, make_settings: Callable[..., Settings], clock: None
) -> None:
    eng = make(engine.store, make_settings, guards={"preparation->dual_write": [FLAG]})
    engsteps.FLAG["passed"] = False
    with capture_logs() as logs, pytest.raises(Refused):
        eng.advance()
    assert [
        {
            "migration": "default",
            "event": "transition",
            "log_level": "info",
            "seq": 2,
            "trigger": "advance",
            "source": "preparation",
            "dest": "dual_write",
            "status": "refused",
            "duration_ms": round(3 * TICK * 1000, 3),
        }
    ] == [line for line in logs if line["event"] == "transition"]


def test_a_guard_detail_is_redacted_everywhere(
    engine: Migration, make_settings: Callable[..., Settings]
) -> None:
    eng = make(engine.store, make_settings, guards={"preparation->dual_write": [f"{HERE}:secret_guard"]})
    with capture_logs() as logs:
        outcome = eng.advance()
    details = [
        outcome.guards[0].detail,
        last_row(engine.store).guards[0]["detail"],
        next(line["detail"] for line in logs if line["event"] == "guard"),
    ]
    assert all("hunter2" not in d and "db.example" in d for d in details), details


# -- refusals and their messages ---------------------------------------------------------


def test_a_refused_edge_is_journaled_with_who_and_where(
    engine: Migration, make_settings: Callable[..., Settings]
) -> None:
    eng = make(engine.store, make_settings, actor="dave", guards={"preparation->dual_write": [FLAG]})
    engsteps.FLAG["passed"] = False
    before = engine.store.get("default")
    with pytest.raises(Refused) as info:
        eng.advance(reason="try it")
    assert (
        f"advance preparation->dual_write refused by {FLAG} (flag is False):"
        " fix the cause, or use --force --reason TEXT"
    ) == str(info.value)
    row = last_row(engine.store)
    assert (2, "refused", "advance", "preparation", "dual_write", 0, "dave", "try it", False) == (
        row.seq,
        row.status,
        row.trigger,
        row.source,
        row.dest,
        row.percent,
        row.actor,
        row.reason,
        row.forced,
    )
    assert (socket.gethostname(), os.getpid(), None, []) == (row.host, row.pid, row.error, row.takeovers)
    assert row.finished_at is not None
    assert row.started_at <= row.finished_at
    after = engine.store.get("default")
    assert (before.phase, before.percent, before.version, None) == (
        after.phase,
        after.percent,
        after.version,
        after.lease_holder,
    )


def test_a_crashing_guard_refuses_with_its_error_as_detail(
    engine: Migration, make_settings: Callable[..., Settings]
) -> None:
    eng = make(
        engine.store, make_settings, guards={"preparation->dual_write": ["tests.support.steps:broken_guard"]}
    )
    with pytest.raises(Refused) as info:
        eng.advance()
    assert (
        "advance preparation->dual_write refused by tests.support.steps:broken_guard"
        " (raised ValueError: cannot reach the metrics): fix the cause, or use --force --reason TEXT"
    ) == str(info.value)
    assert [(False, "raised ValueError: cannot reach the metrics")] == [
        (g["passed"], g["detail"]) for g in last_row(engine.store).guards
    ]


def test_an_always_on_guard_refuses_even_forced_and_says_so(
    engine: Migration, make_settings: Callable[..., Settings]
) -> None:
    engine.advance()
    engine.advance()
    engine.ramp(90)
    eng = make(engine.store, make_settings, guards={"cutover->cleanup": [FLAG]})
    engsteps.FLAG["passed"] = False
    percent = "percent_is_100 (percent is 90: run `migration-fsm ramp 100` first)"
    with pytest.raises(Refused) as both:
        eng.advance()
    assert (
        f"advance cutover->cleanup refused by {percent}, {FLAG} (flag is False):"
        " percent_is_100 cannot be forced; fix the cause first"
    ) == str(both.value)
    with pytest.raises(Refused) as forced:
        eng.advance(force=True, reason="hurry")
    assert (
        f"advance cutover->cleanup refused by {percent}: percent_is_100 cannot be forced; fix the cause first"
    ) == str(forced.value)
    row = last_row(engine.store)
    assert ("refused", False, "hurry") == (row.status, row.forced, row.reason)


def test_an_edge_whose_guards_pass_is_not_forced(
    engine: Migration, make_settings: Callable[..., Settings]
) -> None:
    eng = make(engine.store, make_settings, guards={"preparation->dual_write": [FLAG]})
    with capture_logs() as logs:
        outcome = eng.advance(force=True, reason="belt and braces")
    row = last_row(engine.store)
    assert (False, False, "belt and braces") == (outcome.forced, row.forced, row.reason)
    assert [False] == [line["forced"] for line in logs if line["event"] == "claim"]


def test_a_forced_edge_says_so_in_its_claim(
    engine: Migration, make_settings: Callable[..., Settings]
) -> None:
    eng = make(engine.store, make_settings, guards={"preparation->dual_write": [FLAG]})
    engsteps.FLAG["passed"] = False
    with capture_logs() as logs:
        outcome = eng.advance(force=True, reason="metrics are down")
    assert (True, "committed", 2) == (outcome.forced, outcome.status, outcome.seq)
    assert [True] == [line["forced"] for line in logs if line["event"] == "claim"]
    assert [(False, "flag is False")] == [(g.passed, g.detail) for g in outcome.guards]


@pytest.mark.parametrize("reason", [None, "", "   "])
def test_each_verb_that_needs_a_reason_says_so(engine: Migration, reason: str | None) -> None:
    with pytest.raises(BadInput) as forced:
        engine.advance(force=True, reason=reason)
    assert "--force needs a reason: add --reason TEXT" == str(forced.value)
    engine.advance()
    with pytest.raises(BadInput) as rollback:
        engine.rollback(reason=reason)  # type: ignore[arg-type]
    assert "rollback needs a reason: add --reason TEXT" == str(rollback.value)
    with pytest.raises(BadInput) as abort:
        engine.abort(reason=reason)  # type: ignore[arg-type]
    assert "abort needs a reason: add --reason TEXT" == str(abort.value)
    assert (Phase.DUAL_WRITE, 2) == (engine.store.get("default").phase, engine.store.get("default").last_seq)


def test_an_interrupted_transition_blocks_every_edge_naming_its_step(
    engine: Migration, make_settings: Callable[..., Settings]
) -> None:
    eng = interrupted_at_step_b(engine, make_settings)
    message = (
        "migration 'default' transition #3 (advance dual_write->cutover) is interrupted at step"
        f" '{STEP_B}': run `migration-fsm resume` or `migration-fsm abort --reason TEXT`"
    )
    for verb in (eng.advance, lambda: eng.rollback(reason="back")):
        with pytest.raises(TransitionInterrupted) as info:
            verb()
        assert message == str(info.value)


def test_an_interrupted_transition_with_its_steps_done_is_interrupted_before_its_commit(
    engine: Migration,
) -> None:
    state = engine.store.get("default")
    edge = resolve_edge(state.phase, Trigger.ADVANCE)
    engine.store.claim(state, _intent(edge), [], "ghost [x:1]", 30)
    expire_the_lease(engine.store)
    with pytest.raises(TransitionInterrupted) as info:
        engine.advance()
    assert (
        "migration 'default' transition #2 (advance preparation->dual_write) is interrupted"
        " before its commit: run `migration-fsm resume` or `migration-fsm abort --reason TEXT`"
    ) == str(info.value)


def test_a_live_lease_blocks_every_verb(engine: Migration) -> None:
    state = engine.store.get("default")
    edge = resolve_edge(state.phase, Trigger.ADVANCE)
    engine.store.claim(state, _intent(edge), [], "ghost [x:1]", 300)
    for verb in (
        engine.advance,
        lambda: engine.rollback(reason="back"),
        lambda: engine.abort(reason="stop"),
        engine.resume,
    ):
        with pytest.raises(LeaseHeld) as info:
            verb()
        assert "ghost [x:1]" == info.value.holder
    assert "ghost [x:1]" == engine.store.get("default").lease_holder


def test_resume_and_abort_with_nothing_interrupted_say_so(engine: Migration) -> None:
    with pytest.raises(BadInput) as resume:
        engine.resume()
    assert "migration 'default' has no interrupted transition: nothing to resume" == str(resume.value)
    with pytest.raises(BadInput) as abort:
        engine.abort(reason="stop")
    assert "migration 'default' has no interrupted transition: nothing to abort" == str(abort.value)
    assert 1 == engine.store.get("default").last_seq


def test_an_altered_phase_entry_time_stops_the_guards(
    engine: Migration, make_settings: Callable[..., Settings]
) -> None:
    engine.advance()
    state = engine.store.get("default")
    moved = state.phase_entered_at - timedelta(days=3)
    with engine.store.transaction() as conn:
        conn.execute(update(migrations_table).values(phase_entered_at=moved))
    eng = make(engine.store, make_settings, guards={"dual_write->cutover": [FLAG]})
    with pytest.raises(JournalCorrupt) as info:
        eng.advance()
    assert (
        "journal of migration 'default' does not verify: the migration row's phase_entered_at"
        f" ({moved.isoformat()}) is not when the journal says dual_write was entered"
        f" ({state.phase_entered_at.isoformat()}): it was altered outside migration-fsm; no guard"
        " trusts it (`migration-fsm verify` says more)"
    ) == str(info.value)
    assert 2 == engine.store.get("default").last_seq


def test_a_misnamed_undo_is_a_config_error_before_any_write(
    engine: Migration, make_settings: Callable[..., Settings]
) -> None:
    engine.advance()
    eng = make(
        engine.store, make_settings, steps={"dual_write->cutover": [{"do": STEP_A, "undo": "no_such_undo"}]}
    )
    with pytest.raises(ConfigError, match="no_such_undo") as info:
        eng.advance()
    assert 'steps."dual_write->cutover"' in str(info.value)
    assert 2 == engine.store.get("default").last_seq
    assert [] == engsteps.CALLS


# -- ramp ----------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [-1, 101, True, 50.0, "50", None])
def test_ramp_refuses_what_is_not_a_percent(engine: Migration, bad: Any) -> None:
    with pytest.raises(BadInput) as info:
        engine.ramp(bad)
    assert f"percent must be a whole number from 0 to 100, not {bad!r}" == str(info.value)


def test_ramp_takes_both_ends_and_journals_the_percent(engine: Migration) -> None:
    engine.advance()
    engine.advance()
    for percent in (100, 0, 37):
        outcome = engine.ramp(percent, reason=f"to {percent}")
        row = last_row(engine.store)
        assert ("committed", percent, percent, percent, "ramp", f"to {percent}") == (
            outcome.status,
            outcome.percent,
            outcome.state.percent if outcome.state else None,
            row.percent,
            row.trigger,
            row.reason,
        )


def test_ramp_to_the_current_percent_changes_nothing(
    engine: Migration, make_settings: Callable[..., Settings]
) -> None:
    engine.advance()
    engine.advance()
    engine.ramp(40)
    before = engine.store.get("default")
    eng = make(engine.store, make_settings, guards={"cutover->cutover": [FLAG]})
    engsteps.FLAG["passed"] = False  # no guard runs either
    outcome = eng.ramp(40)
    assert ("unchanged", 40, None, before) == (outcome.status, outcome.percent, outcome.seq, outcome.state)
    assert ("cutover", "cutover", "ramp") == (outcome.edge.source, outcome.edge.dest, outcome.edge.trigger)
    assert before == engine.store.get("default")


def test_a_ramp_dry_run_plans_the_requested_percent(engine: Migration) -> None:
    engine.advance()
    engine.advance()
    before = engine.store.get("default")
    outcome = engine.ramp(60, dry_run=True)
    assert ("planned", 60, None, before) == (outcome.status, outcome.percent, outcome.seq, outcome.state)
    assert before == engine.store.get("default")
    # and a dry run to the current percent still plans (nothing is written either way)
    assert ("planned", 0) == (engine.ramp(0, dry_run=True).status, engine.ramp(0, dry_run=True).percent)


# -- what a committed edge journals and returns ---------------------------------------------


def test_a_committed_edge_is_journaled_and_returned_whole(
    engine: Migration, make_settings: Callable[..., Settings]
) -> None:
    engine.advance()
    eng = make(engine.store, make_settings, actor="erin", steps=STEPS)
    outcome = eng.advance(reason="go")
    row = last_row(engine.store)
    assert (3, "committed", "advance", "dual_write", "cutover", 0, "erin", "go", False) == (
        row.seq,
        row.status,
        row.trigger,
        row.source,
        row.dest,
        row.percent,
        row.actor,
        row.reason,
        row.forced,
    )
    assert (socket.gethostname(), os.getpid(), [], []) == (row.host, row.pid, row.guards, row.takeovers)
    assert [(STEP_A, UNDO_A), (STEP_B, UNDO_B), (STEP_C, None)] == [(s.name, s.undo) for s in row.steps]
    final = engine.store.get("default")
    assert ("committed", 3, 0, False, [], [STEP_A, STEP_B, STEP_C], final, []) == (
        outcome.status,
        outcome.seq,
        outcome.percent,
        outcome.forced,
        outcome.guards,
        outcome.steps,
        outcome.state,
        outcome.warnings,
    )
    assert (Trigger.ADVANCE, Phase.DUAL_WRITE, Phase.CUTOVER) == (
        outcome.edge.trigger,
        outcome.edge.source,
        outcome.edge.dest,
    )


def test_a_dry_run_plans_guards_steps_and_warnings(
    engine: Migration, make_settings: Callable[..., Settings]
) -> None:
    engine.advance()
    eng = make(
        engine.store,
        make_settings,
        steps={"dual_write->cutover": [STEP_A]},
        guards={"dual_write->cutover": [FLAG]},
    )
    before = engine.store.get("default")
    outcome = eng.advance(dry_run=True)
    assert ("planned", 0, None, [STEP_A], before) == (
        outcome.status,
        outcome.percent,
        outcome.seq,
        outcome.steps,
        outcome.state,
    )
    assert [(FLAG, True, "flag is True", True)] == [
        (g.name, g.passed, g.detail, g.forceable) for g in outcome.guards
    ]
    assert pause_warnings(
        eng.settings, resolve_edge(Phase.DUAL_WRITE, Trigger.ADVANCE), [(STEP_A, None)]
    ) == (outcome.warnings)
    assert 1 == len(outcome.warnings)
    assert before == engine.store.get("default")


def test_an_edge_moving_consumption_without_a_pause_step_warns(
    engine: Migration, make_settings: Callable[..., Settings]
) -> None:
    engine.advance()
    eng = make(engine.store, make_settings, steps={"dual_write->cutover": [STEP_A]})
    message = (
        'steps."dual_write->cutover" moves consumption off the old side but has no pause_consumers step:'
        " old workers may still take tasks while the drain counts, and run them a second time on"
        ' the other side; add "pause_consumers" first (docs/REFERENCE.md, docs/MIGRATION.md)'
    )
    with capture_logs() as logs:
        outcome = eng.advance()
    assert [
        {
            "migration": "default",
            "event": "no_pause_step",
            "log_level": "warning",
            "edge": "dual_write->cutover",
            "detail": message,
        }
    ] == [line for line in logs if line["event"] == "no_pause_step"]
    assert "committed" == outcome.status


def test_pause_warnings_only_for_an_edge_moving_consumption_configured_without_a_pause(
    make_settings: Callable[..., Settings],
) -> None:
    moving = EDGES_BY_KEY["dual_write->cutover"]
    back = EDGES_BY_KEY["cutover->dual_write"]
    staying = EDGES_BY_KEY["preparation->dual_write"]
    configured = make_settings(
        steps={
            key: [STEP_A] for key in ("dual_write->cutover", "cutover->dual_write", "preparation->dual_write")
        }
    )
    [forward] = pause_warnings(configured, moving, [(STEP_A, None)])
    [backward] = pause_warnings(configured, back, [(STEP_A, None)])
    assert forward.startswith('steps."dual_write->cutover" moves consumption off the old side')
    assert backward.startswith('steps."cutover->dual_write" moves consumption off the new side')
    assert [] == pause_warnings(configured, staying, [(STEP_A, None)])
    assert [] == pause_warnings(configured, moving, [(STEP_A, None), ("pause_consumers", "lift_pause")])
    # An edge running its defaults (not listed in `steps`) is not warned about.
    assert [] == pause_warnings(make_settings(), moving, [(STEP_A, None)])


def test_edge_steps_pair_each_step_with_its_undo(make_settings: Callable[..., Settings]) -> None:
    edge = EDGES_BY_KEY["dual_write->cutover"]
    configured = make_settings(
        steps={"dual_write->cutover": [{"do": STEP_A, "undo": UNDO_A}, "pause_consumers", STEP_C]}
    )
    assert [(STEP_A, UNDO_A), ("pause_consumers", "lift_pause"), (STEP_C, None)] == edge_steps(
        configured, edge
    )
    defaults = make_settings(stores=memory_stores())
    assert [("pause_consumers", "lift_pause"), ("drain_old", None), ("transfer_state", None)] == edge_steps(
        defaults, edge
    )
    assert [] == edge_steps(make_settings(), edge)


def test_edge_guards_put_the_always_on_first_once(make_settings: Callable[..., Settings]) -> None:
    edge = EDGES_BY_KEY["cutover->cleanup"]
    configured = make_settings(guards={"cutover->cleanup": [FLAG, "percent_is_100", "min_soak"]})
    assert [("percent_is_100", False), (FLAG, True), ("min_soak", True)] == edge_guards(configured, edge)
    assert [("percent_is_100", False)] == edge_guards(make_settings(), edge)
    assert [("min_soak", True)] == edge_guards(
        make_settings(guards={"preparation->dual_write": ["min_soak"]}),
        EDGES_BY_KEY["preparation->dual_write"],
    )


# -- resume ----------------------------------------------------------------------------------


def test_resume_journals_and_logs_its_takeover(
    engine: Migration, make_settings: Callable[..., Settings]
) -> None:
    interrupted_at_step_b(engine, make_settings)
    second = make(engine.store, make_settings, steps=STEPS, actor="second")
    with capture_logs() as logs:
        outcome = second.resume()
    [takeover] = last_row(engine.store).takeovers
    at = takeover.pop("at")
    assert ISO_MICROSECONDS.fullmatch(at), at
    assert {
        "command": "resume",
        "actor": "second",
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "previous_holder": None,
        "stolen": False,
    } == takeover
    assert [
        {
            "migration": "default",
            "event": "takeover",
            "log_level": "info",
            "seq": 3,
            "command": "resume",
            "previous": None,
            "stolen": False,
        }
    ] == [line for line in logs if line["event"] == "takeover"]
    final = engine.store.get("default")
    assert ("committed", 3, 0, [STEP_A, STEP_B, STEP_C], final, Phase.CUTOVER) == (
        outcome.status,
        outcome.seq,
        outcome.percent,
        outcome.steps,
        outcome.state,
        final.phase,
    )
    assert (Phase.DUAL_WRITE, Phase.CUTOVER) == (outcome.edge.source, outcome.edge.dest)
    assert [
        {
            "migration": "default",
            "event": "transition",
            "log_level": "info",
            "seq": 3,
            "trigger": "advance",
            "source": "dual_write",
            "dest": "cutover",
            "status": "committed",
        }
    ] == [
        {k: v for k, v in line.items() if k != "duration_ms"}
        for line in logs
        if line["event"] == "transition"
    ]


def test_a_stolen_resume_names_the_holder_it_took_from(engine: Migration) -> None:
    state = engine.store.get("default")
    edge = resolve_edge(state.phase, Trigger.ADVANCE)
    engine.store.claim(state, _intent(edge), [], "ghost [x:1]", 300)
    with capture_logs() as logs:
        outcome = engine.resume(steal=True)
    assert [("ghost [x:1]", True)] == [
        (line["previous"], line["stolen"]) for line in logs if line["event"] == "takeover"
    ]
    [takeover] = last_row(engine.store).takeovers
    assert ("resume", "ghost [x:1]", True, "tester") == (
        takeover["command"],
        takeover["previous_holder"],
        takeover["stolen"],
        takeover["actor"],
    )
    assert ("committed", Phase.DUAL_WRITE) == (outcome.status, engine.store.get("default").phase)


def test_resume_of_a_step_that_no_longer_resolves_takes_nothing_over(
    engine: Migration, make_settings: Callable[..., Settings], monkeypatch: pytest.MonkeyPatch
) -> None:
    interrupted_at_step_b(engine, make_settings)
    monkeypatch.delattr(engsteps, "step_c")
    second = make(engine.store, make_settings, steps=STEPS, actor="second")
    with pytest.raises(ConfigError, match="step_c"):
        second.resume()
    state = engine.store.get("default")
    assert (3, None, []) == (state.in_progress_seq, state.lease_holder, last_row(engine.store).takeovers)
    assert ["step_a", "step_b"] == [name for name, _, _ in engsteps.CALLS]


# -- abort -----------------------------------------------------------------------------------


def test_abort_undoes_only_the_done_steps(engine: Migration, make_settings: Callable[..., Settings]) -> None:
    eng = interrupted_at_step_b(engine, make_settings)
    before = engine.store.get("default")
    outcome = eng.abort(reason="window closed")
    assert ["step_a", "step_b", "undo_a"] == [name for name, _, _ in engsteps.CALLS]
    row = last_row(engine.store)
    assert ["undone", "failed", "pending"] == [s.status for s in row.steps]
    final = engine.store.get("default")
    assert ("aborted", 3, 0, [STEP_A, STEP_B, STEP_C], final) == (
        outcome.status,
        outcome.seq,
        outcome.percent,
        outcome.steps,
        outcome.state,
    )
    assert (Trigger.ADVANCE, Phase.DUAL_WRITE, Phase.CUTOVER) == (
        outcome.edge.trigger,
        outcome.edge.source,
        outcome.edge.dest,
    )
    assert (before.phase, before.percent, None, None) == (
        final.phase,
        final.percent,
        final.in_progress_seq,
        final.lease_holder,
    )


def test_abort_journals_who_aborted_and_who_began(
    engine: Migration, make_settings: Callable[..., Settings]
) -> None:
    engine.advance()
    began = make(engine.store, make_settings, steps=STEPS, actor="frank")
    engsteps.FAIL_ONCE.add("step_b")
    with pytest.raises(StepFailed):
        began.advance(reason="first try")
    stopper = make(engine.store, make_settings, steps=STEPS, actor="grace")
    with capture_logs() as logs:
        stopper.abort(reason="window closed")
    row = last_row(engine.store)
    assert ("aborted", "grace", "window closed") == (row.status, row.actor, row.reason)
    [takeover] = row.takeovers
    assert ISO_MICROSECONDS.fullmatch(takeover.pop("at"))
    assert {
        "command": "abort",
        "actor": "grace",
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "previous_holder": None,
        "stolen": False,
        "reason": "window closed",
        "transition_actor": "frank",
        "transition_reason": "first try",
    } == takeover
    assert [
        {
            "migration": "default",
            "event": "transition",
            "log_level": "info",
            "seq": 3,
            "trigger": "advance",
            "source": "dual_write",
            "dest": "cutover",
            "status": "aborted",
        }
    ] == [
        {k: v for k, v in line.items() if k != "duration_ms"}
        for line in logs
        if line["event"] == "transition"
    ]


def test_abort_logs_its_duration(
    engine: Migration, make_settings: Callable[..., Settings], clock: None
) -> None:
    eng = interrupted_at_step_b(engine, make_settings)
    with capture_logs() as logs:
        eng.abort(reason="stop")
    assert [round(TICK * 1000, 3)] == [line["duration_ms"] for line in logs if line["event"] == "transition"]


def test_resume_logs_the_duration_from_its_own_start(
    engine: Migration, make_settings: Callable[..., Settings], clock: None
) -> None:
    eng = interrupted_at_step_b(engine, make_settings)
    with capture_logs() as logs:
        eng.resume()
    assert [round(TICK * 1000, 3)] == [line["duration_ms"] for line in logs if line["event"] == "transition"]


# -- rollback --------------------------------------------------------------------------------


def test_rollback_one_edge_is_journaled_with_its_reason(engine: Migration) -> None:
    engine.advance()
    engine.advance()
    engine.ramp(30)
    [outcome] = engine.rollback(reason="bad release")
    row = last_row(engine.store)
    assert ("committed", 0, "rollback", "cutover", "dual_write", "bad release", False) == (
        outcome.status,
        outcome.percent,
        row.trigger,
        row.source,
        row.dest,
        row.reason,
        row.forced,
    )
    assert (Phase.DUAL_WRITE, 0) == (engine.store.get("default").phase, engine.store.get("default").percent)
    assert (Phase.CUTOVER, Phase.DUAL_WRITE, row.seq) == (outcome.edge.source, outcome.edge.dest, outcome.seq)


def test_rollback_to_takes_each_edge_from_where_the_last_left(engine: Migration) -> None:
    engine.advance()
    engine.advance()
    outcomes = engine.rollback(reason="undo all", to=Phase.PREPARATION)
    assert [(4, Phase.CUTOVER, Phase.DUAL_WRITE), (5, Phase.DUAL_WRITE, Phase.PREPARATION)] == [
        (o.seq, o.edge.source, o.edge.dest) for o in outcomes
    ]
    assert [Phase.DUAL_WRITE, Phase.PREPARATION] == [o.state.phase for o in outcomes if o.state]
    assert ["undo all", "undo all"] == [
        r.reason for r in engine.store.journal(engine.store.get("default"))[-2:]
    ]


def test_a_rollback_dry_run_plans_each_edge_and_writes_nothing(
    engine: Migration, make_settings: Callable[..., Settings]
) -> None:
    engine.advance()
    engine.advance()
    engine.ramp(100)
    engine.advance()
    before = engine.store.get("default")
    eng = make(engine.store, make_settings, guards={"cleanup->cutover": [FLAG]})
    outcomes = eng.rollback(reason="look first", to=Phase.DUAL_WRITE, dry_run=True)
    assert [
        ("planned", Phase.CLEANUP, Phase.CUTOVER, 100, None),
        ("planned", Phase.CUTOVER, Phase.DUAL_WRITE, 0, None),
    ] == [(o.status, o.edge.source, o.edge.dest, o.percent, o.seq) for o in outcomes]
    assert [[FLAG], []] == [[g.name for g in o.guards] for o in outcomes]
    assert all(o.state == before for o in outcomes)
    assert before == engine.store.get("default")
    [one] = eng.rollback(reason="look first", dry_run=True)
    assert ("planned", Phase.CLEANUP, Phase.CUTOVER) == (one.status, one.edge.source, one.edge.dest)


def _intent(edge: Any) -> JournalEntry:
    return JournalEntry(
        seq=0,
        trigger=edge.trigger,
        source=edge.source,
        dest=edge.dest,
        percent=0,
        status="intent",
        actor="ghost",
        reason=None,
        forced=False,
        guards=[],
        takeovers=[],
        started_at=utcnow(),
        finished_at=None,
        host=socket.gethostname(),
        pid=os.getpid(),
        error=None,
        prev_hash=None,
        hash=None,
    )


# -- what a guard sees, what cannot be resolved, what cannot be forced ----------------------


def seen_guard(ctx: Context) -> GuardVerdict:
    """A guard that says what it was shown."""
    return GuardVerdict(True, f"{ctx.migration} {ctx.source}->{ctx.dest} at {ctx.percent}% seq {ctx.seq}")


def test_a_guard_sees_the_edge_and_the_percent_it_would_set(
    engine: Migration, make_settings: Callable[..., Settings]
) -> None:
    engine.advance()
    engine.advance()
    eng = make(engine.store, make_settings, guards={"cutover->cutover": [f"{HERE}:seen_guard"]})
    planned = eng.ramp(60, dry_run=True)
    taken = eng.ramp(70)
    assert ["default cutover->cutover at 60% seq None", "default cutover->cutover at 70% seq None"] == [
        planned.guards[0].detail,
        taken.guards[0].detail,
    ]


def test_a_rollback_refused_by_a_guard_is_not_forced_and_offers_no_force(
    engine: Migration, make_settings: Callable[..., Settings]
) -> None:
    """rollback (and ramp) have no --force: their refusal says to fix the cause, and nothing else."""
    engine.advance()
    eng = make(engine.store, make_settings, guards={"dual_write->preparation": [FLAG]})
    engsteps.FLAG["passed"] = False
    with pytest.raises(Refused) as info:
        eng.rollback(reason="back")
    assert f"rollback dual_write->preparation refused by {FLAG} (flag is False): fix the cause first" == str(
        info.value
    )
    row = last_row(engine.store)
    assert ("refused", False, "back") == (row.status, row.forced, row.reason)
    assert Phase.DUAL_WRITE == engine.store.get("default").phase


def test_a_ramp_refused_by_a_guard_offers_no_force(
    engine: Migration, make_settings: Callable[..., Settings]
) -> None:
    engine.advance()
    engine.advance()
    eng = make(engine.store, make_settings, guards={"cutover->cutover": [FLAG]})
    engsteps.FLAG["passed"] = False
    with pytest.raises(Refused) as info:
        eng.ramp(50)
    assert f"ramp cutover->cutover refused by {FLAG} (flag is False): fix the cause first" == str(info.value)
    assert 0 == engine.store.get("default").percent


def test_unresolvable_names_say_where_they_are_configured(
    engine: Migration, make_settings: Callable[..., Settings]
) -> None:
    engine.advance()
    for settings, message in (
        (
            {"guards": {"dual_write->cutover": ["no_such_guard"]}},
            "guards.\"dual_write->cutover\": unknown guard 'no_such_guard'",
        ),
        (
            {"steps": {"dual_write->cutover": ["tests.support.steps:no_such_step"]}},
            "steps.\"dual_write->cutover\": module 'tests.support.steps' has no 'no_such_step'",
        ),
        (
            {"steps": {"dual_write->cutover": [{"do": STEP_A, "undo": "tests.support.steps:no_such_undo"}]}},
            "steps.\"dual_write->cutover\": module 'tests.support.steps' has no 'no_such_undo'",
        ),
    ):
        with pytest.raises(ConfigError) as info:
            make(engine.store, make_settings, **settings).advance()
        assert str(info.value).startswith(message), info.value
    assert 2 == engine.store.get("default").last_seq


def test_abort_of_an_undo_that_no_longer_resolves_takes_nothing_over(
    engine: Migration, make_settings: Callable[..., Settings], monkeypatch: pytest.MonkeyPatch
) -> None:
    eng = interrupted_at_step_b(engine, make_settings)
    monkeypatch.delattr(engsteps, "undo_a")
    with pytest.raises(ConfigError) as info:
        eng.abort(reason="stop")
    assert str(info.value).startswith(
        f"undo of step '{STEP_A}': module 'tests.support.steps' has no 'undo_a'"
    )
    state = engine.store.get("default")
    assert (3, None, []) == (state.in_progress_seq, state.lease_holder, last_row(engine.store).takeovers)


def test_abort_and_resume_are_not_forced(engine: Migration, make_settings: Callable[..., Settings]) -> None:
    eng = interrupted_at_step_b(engine, make_settings)
    assert False is eng.abort(reason="stop").forced
    engsteps.FAIL_ONCE.add("step_b")
    with pytest.raises(StepFailed):
        eng.advance()
    assert False is eng.resume().forced


def test_a_guard_record_made_by_hand_is_forceable() -> None:
    record = GuardRecord("by_hand", False, "failed", 0)
    assert (True, [], [record]) == (
        record.forceable,
        Plan(0, [record], []).refused(force=True),
        Plan(0, [record], []).refused(force=False),
    )


#: What `holder_step` saw: the migration's lease holder while it ran, and the migration it was shown.
HOLDERS: list[tuple[str | None, str, Phase]] = []


def holder_step(ctx: Context) -> None:
    HOLDERS.append((ctx.store.get(ctx.migration).lease_holder, ctx.state.name, ctx.state.phase))


def test_the_operator_holds_the_lease_while_its_steps_run(
    engine: Migration, make_settings: Callable[..., Settings]
) -> None:
    """Its steps (run, resumed, undone) run under the lease of the operator who runs them,
    and see the migration in the edge's source phase."""
    HOLDERS.clear()
    engine.advance()
    holder = f"{HERE}:holder_step"
    steps = {"dual_write->cutover": [{"do": holder, "undo": holder}, STEP_B, holder, STEP_C]}
    first = make(engine.store, make_settings, actor="heidi", steps=steps)
    engsteps.FAIL_ONCE.add("step_b")
    with pytest.raises(StepFailed):
        first.advance()
    engsteps.FAIL_ONCE.add("step_c")
    with pytest.raises(StepFailed):
        make(engine.store, make_settings, actor="ivan", steps=steps).resume()
    make(engine.store, make_settings, actor="judy", steps=steps).abort(reason="stop")
    where = f"[{socket.gethostname()}:{os.getpid()}]"
    assert [
        (f"heidi {where}", "default", Phase.DUAL_WRITE),
        (f"ivan {where}", "default", Phase.DUAL_WRITE),
        (f"judy {where}", "default", Phase.DUAL_WRITE),
    ] == HOLDERS


def wrong_guard(ctx: Context) -> int:
    """A guard returning neither a bool nor a verdict."""
    return 1


def test_a_guard_returning_neither_bool_nor_verdict_refuses_naming_itself(
    engine: Migration, make_settings: Callable[..., Settings]
) -> None:
    eng = make(engine.store, make_settings, guards={"preparation->dual_write": [f"{HERE}:wrong_guard"]})
    with pytest.raises(Refused):
        eng.advance()
    assert [f"raised TypeError: guard {HERE}:wrong_guard returned int, not bool or GuardVerdict"] == [
        g["detail"] for g in last_row(engine.store).guards
    ]


# -- the PostgreSQL operator lock each verb holds ------------------------------------------------


@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
@pytest.mark.parametrize("verb", ["init", "advance", "rollback", "abort", "resume"])
def test_each_verb_holds_its_migration_s_postgresql_lock_under_its_holder_s_name(
    engine: Migration,
    upgraded_url: str,
    make_settings: Callable[..., Settings],
    monkeypatch: pytest.MonkeyPatch,
    verb: str,
) -> None:
    """While a verb reads or creates its migration, another operator's command on that
    migration is refused by the advisory lock, naming this operator (`actor [host:pid]`)."""
    target = Migration(engine.store, make_settings(), "second") if verb == "init" else engine
    if verb == "rollback":
        engine.advance()
    seen: list[str | None] = []
    with Journal.open(upgraded_url) as other:

        def refused() -> None:
            try:
                with other.operator_lock(target.migration, "carol [h:3]"):
                    seen.append(None)
            except LeaseHeld as exc:
                seen.append(exc.holder)

        for name in ("get", "create"):
            real = getattr(engine.store, name)

            def spy(*args: Any, _real: Callable[..., Any] = real, **kwargs: Any) -> Any:
                refused()
                return _real(*args, **kwargs)

            monkeypatch.setattr(engine.store, name, spy)
        calls: dict[str, Callable[[], object]] = {
            "init": target.init,
            "advance": target.advance,
            "rollback": lambda: target.rollback(reason="back"),
            "abort": lambda: target.abort(reason="stop"),  # nothing to abort: refused under the lock
            "resume": target.resume,  # nothing to resume: refused under the lock
        }
        try:
            calls[verb]()
        except BadInput:
            assert verb in ("abort", "resume")
    assert target.holder in seen


@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
def test_resume_steal_ends_the_session_holding_the_postgresql_lock(engine: Migration) -> None:
    """`resume --steal` while a hung command holds the advisory lock: that session is ended
    and resume goes on (here to say there is nothing to resume); without `--steal` it is
    refused, naming the holder."""
    with engine.store.operator_lock("default", "alice [h:1]"):
        with pytest.raises(LeaseHeld) as info:
            engine.resume()
        assert "alice [h:1]" == info.value.holder
        with pytest.raises(BadInput, match="has no interrupted transition: nothing to resume"):
            engine.resume(steal=True)


# -- the `before` event ----------------------------------------------------------------------


def test_the_before_event_is_the_edge_about_to_be_taken_whole(
    store: Journal, make_settings: Callable[..., Settings], monkeypatch: pytest.MonkeyPatch
) -> None:
    """`before_event` (sent to `before` command targets, docs/OBSERVABILITY.md): every field,
    its time to the microsecond (a whole second too), the reason redacted, `forced` only when
    a failing guard is forced, the migration as it stands (not as the edge leaves it)."""
    engine = make(store, make_settings)
    engine.init()
    engine.advance()
    state = dataclasses.replace(store.get("default"), paused_side="old")  # as a pause step leaves it
    at = datetime(2026, 12, 7, 12, 0, 0, tzinfo=UTC)
    monkeypatch.setattr(migration_module, "utcnow", lambda: at)
    edge = EDGES_BY_KEY["dual_write->cutover"]
    guards = [
        GuardRecord("flag", True, "set", 3),
        GuardRecord("soak", False, "2 h < 24 h", 4, forceable=True),
    ]
    plan = Plan(100, guards, [(STEP_A, UNDO_A), (STEP_C, None)])
    reason = "go postgresql://admin:hunter2@db.example/app"
    event = migration_module.before_event(state, edge, plan, actor="carol", reason=reason, force=True)
    assert {
        "schema": 1,
        "id": None,
        "event": "before",
        "migration": "default",
        "seq": state.last_seq + 1,
        "at": "2026-12-07T12:00:00.000000+00:00",
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "trigger": "advance",
        "edge": "dual_write->cutover",
        "source": "dual_write",
        "dest": "cutover",
        "status": None,
        "actor": "carol",
        "reason": "go postgresql://admin:***@db.example/app",
        "forced": True,
        "error": None,
        "percent": 100,
        "guards": [
            {"name": "flag", "passed": True, "detail": "set"},
            {"name": "soak", "passed": False, "detail": "2 h < 24 h"},
        ],
        "steps": [
            {"name": STEP_A, "status": "pending", "attempts": 0, "error": None},
            {"name": STEP_C, "status": "pending", "attempts": 0, "error": None},
        ],
        "state": {
            "phase": "dual_write",
            "percent": 0,
            "version": state.version,
            "paused": "old",
            "routing": routing_for(Phase.DUAL_WRITE, 0).as_dict(),
        },
    } == event
    passing = Plan(100, guards[:1], [])
    assert (False, False, None) == (
        migration_module.before_event(state, edge, passing, actor="carol", reason=None, force=True)["forced"],
        migration_module.before_event(state, edge, plan, actor="carol", reason=None, force=False)["forced"],
        migration_module.before_event(state, edge, plan, actor="carol", reason=None, force=False)["reason"],
    )


def measured_guard(ctx: Context) -> GuardVerdict:
    return GuardVerdict(True, "measured", 2.5)


def flag_valued_guard(ctx: Context) -> GuardVerdict:
    return GuardVerdict(True, "a flag is no measurement", True)


def nan_guard(ctx: Context) -> GuardVerdict:
    return GuardVerdict(True, "no number", float("nan"))


def test_a_guard_s_finite_number_is_journaled_as_its_value_and_nothing_else(
    store: Journal, make_settings: Callable[..., Settings]
) -> None:
    names = [f"{HERE}:measured_guard", f"{HERE}:flag_valued_guard", f"{HERE}:nan_guard"]
    eng = make(store, make_settings, guards={"preparation->dual_write": names})
    eng.init()
    eng.advance()
    assert [("measured", 2.5), ("a flag is no measurement", None), ("no number", None)] == [
        (g["detail"], g.get("value", None)) for g in last_row(store).guards
    ]
    assert [True, False, False] == ["value" in g for g in last_row(store).guards]


def test_an_abort_s_takeover_event_shows_its_reason_redacted(
    store: Journal, make_settings: Callable[..., Settings]
) -> None:
    """The `takeover` event (the outbox `notify` delivers) carries the takeover record with
    its free text redacted, the rest as journaled."""
    eng = make(store, make_settings)
    eng.init()
    eng = interrupted_at_step_b(eng, make_settings)
    expire_the_lease(store)
    with store.transaction(readonly=True) as conn:
        after = outbox.last_event_id(conn, "default")
    interrupted = store.get("default").in_progress_seq
    eng.abort(reason="db at postgresql://admin:hunter2@db.example/app gone")
    with store.transaction(readonly=True) as conn:
        [event] = outbox.pending_events(conn, "default", after, ["takeover"], 10)
    assert interrupted == event["seq"]
    takeover = event["takeover"]
    assert ("abort", "db at postgresql://admin:***@db.example/app gone", "tester") == (
        takeover["command"],
        takeover["reason"],
        takeover["actor"],
    )
