"""The transition protocol on SQLite and PostgreSQL: guards, claim, steps, commit,
failure, resume, abort, lease takeover and heartbeat."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import update

from migration_fsm.commands import verify_entries
from migration_fsm.config import Settings
from migration_fsm.exceptions import (
    BadInput,
    ConfigError,
    LeaseHeld,
    Refused,
    StepFailed,
    TransitionInterrupted,
)
from migration_fsm.fsm import Phase
from migration_fsm.journal import Journal, migrations_table, utcnow
from migration_fsm.migration import Migration
from tests.support import steps as engsteps

STEPS = {
    "dual_write->cutover": [
        {"do": "tests.support.steps:step_a", "undo": "tests.support.steps:undo_a"},
        {"do": "tests.support.steps:step_b", "undo": "tests.support.steps:undo_b"},
        "tests.support.steps:step_c",
    ]
}


@pytest.fixture(autouse=True)
def _reset_steps() -> Iterator[None]:
    engsteps.reset()
    yield
    engsteps.reset()


def make(store: Journal, make_settings: Callable[..., Settings], **overrides: Any) -> Migration:
    """An engine on `default` with the given settings."""
    return Migration(store, make_settings(**overrides), "default")


def to_dual_write(engine: Migration) -> None:
    engine.advance()
    assert Phase.DUAL_WRITE == engine.store.get("default").phase


def check_journal(store: Journal) -> None:
    state = store.get("default")
    verify_entries(state, store.journal(state))


def test_steps_run_in_order_and_are_recorded(
    engine: Migration, make_settings: Callable[..., Settings]
) -> None:
    """Each configured step runs once, in order, with its seq, and is recorded done."""
    to_dual_write(engine)
    eng = make(engine.store, make_settings, steps=STEPS)
    outcome = eng.advance()
    assert "committed" == outcome.status
    assert ["step_a", "step_b", "step_c"] == [name for name, _, _ in engsteps.CALLS]
    assert {outcome.seq} == {seq for _, seq, _ in engsteps.CALLS}
    entry = engine.store.entry(engine.store.get("default"), outcome.seq or 0)
    assert [("done", 1)] * 3 == [(s.status, s.attempts) for s in entry.steps]
    assert {"cursor": "b-half"} == entry.steps[1].checkpoint
    check_journal(engine.store)


def test_failing_step_interrupts_then_resume_finishes(
    engine: Migration, make_settings: Callable[..., Settings]
) -> None:
    """A step that raises leaves the row intent with its error and no lease; resume reruns it."""
    to_dual_write(engine)
    eng = make(engine.store, make_settings, steps=STEPS)
    engsteps.FAIL_ONCE.add("step_b")
    with pytest.raises(StepFailed, match="step_b broke") as info:
        eng.advance()
    assert 1 == info.value.exit_code
    state = engine.store.get("default")
    assert (Phase.DUAL_WRITE, None) == (state.phase, state.lease_holder)
    entry = engine.store.entry(state, state.in_progress_seq or 0)
    assert "intent" == entry.status
    assert "step_b broke" in (entry.error or "")
    assert ["done", "failed", "pending"] == [s.status for s in entry.steps]
    with pytest.raises(TransitionInterrupted) as blocked:
        eng.advance()
    assert 3 == blocked.value.exit_code

    outcome = make(engine.store, make_settings, steps=STEPS, actor="second").resume()
    assert "committed" == outcome.status
    # step_a is not run again; step_b sees the checkpoint it saved before failing.
    assert ["step_a", "step_b", "step_b", "step_c"] == [n for n, _, _ in engsteps.CALLS]
    assert {"cursor": "b-half"} == engsteps.CALLS[2][2]
    final = engine.store.get("default")
    entry = engine.store.entry(final, outcome.seq or 0)
    assert (Phase.CUTOVER, None, "committed", None) == (
        final.phase,
        final.in_progress_seq,
        entry.status,
        entry.error,
    )
    assert [1, 2, 1] == [s.attempts for s in entry.steps]
    assert ["resume"] == [t["command"] for t in entry.takeovers]
    check_journal(engine.store)


def test_abort_undoes_done_steps_in_reverse(
    engine: Migration, make_settings: Callable[..., Settings]
) -> None:
    """abort runs the undo of every done step, last first, and stays in the source phase."""
    to_dual_write(engine)
    eng = make(engine.store, make_settings, steps=STEPS)
    engsteps.FAIL_ONCE.add("step_c")
    with pytest.raises(StepFailed):
        eng.advance()
    before = engine.store.get("default")
    outcome = eng.abort(reason="cutover window closed")
    assert "aborted" == outcome.status
    assert ["step_a", "step_b", "step_c", "undo_b", "undo_a"] == [n for n, _, _ in engsteps.CALLS]
    after = engine.store.get("default")
    assert (before.phase, before.percent, before.version) == (after.phase, after.percent, after.version)
    assert after.in_progress_seq is None
    entry = engine.store.entry(after, outcome.seq or 0)
    assert "aborted" == entry.status
    assert ["undone", "undone", "failed"] == [s.status for s in entry.steps]
    assert "cutover window closed" == entry.takeovers[-1]["reason"]
    check_journal(engine.store)
    # The edge can be taken again afterwards.
    assert "committed" == eng.advance().status
    check_journal(engine.store)


def test_failing_undo_keeps_the_transition_interrupted(
    engine: Migration, make_settings: Callable[..., Settings]
) -> None:
    """An undo that raises stops abort (exit 1); a second abort finishes the remaining undos."""
    to_dual_write(engine)
    eng = make(engine.store, make_settings, steps=STEPS)
    engsteps.FAIL_ONCE.update({"step_c", "undo_a"})
    with pytest.raises(StepFailed):
        eng.advance()
    engsteps.FAIL_ONCE.add("undo_a")
    with pytest.raises(StepFailed, match="undo of"):
        eng.abort(reason="give up")
    assert engine.store.get("default").in_progress_seq is not None
    eng.abort(reason="give up, again")
    assert ["undo_b", "undo_a", "undo_a"] == [n for n, _, _ in engsteps.CALLS if n.startswith("undo")]
    assert engine.store.get("default").in_progress_seq is None
    check_journal(engine.store)


def test_resume_refuses_a_live_lease_and_steal_takes_it(
    engine: Migration, make_settings: Callable[..., Settings]
) -> None:
    """With the holder's lease live, resume exits 3 naming it; --steal takes over, journaled."""
    to_dual_write(engine)
    eng = make(engine.store, make_settings, steps=STEPS)
    state = engine.store.get("default")
    # Claim as a crashed operator would have left it: intent written, lease live, no steps run.
    from migration_fsm.fsm import Trigger, resolve_edge
    from migration_fsm.migration import edge_steps

    edge = resolve_edge(state.phase, Trigger.ADVANCE)
    entry = _intent(edge)
    engine.store.claim(state, entry, edge_steps(eng.settings, edge), "ghost [elsewhere:1]", 30)

    other = make(engine.store, make_settings, steps=STEPS, actor="bob")
    with pytest.raises(LeaseHeld, match=r"ghost \[elsewhere:1\]") as info:
        other.resume()
    assert 3 == info.value.exit_code
    assert "until" in str(info.value)
    with pytest.raises(LeaseHeld):
        other.advance()
    outcome = other.resume(steal=True)
    assert "committed" == outcome.status
    final = engine.store.get("default")
    takeover = engine.store.entry(final, outcome.seq or 0).takeovers[0]
    assert (True, "ghost [elsewhere:1]", "bob") == (
        takeover["stolen"],
        takeover["previous_holder"],
        takeover["actor"],
    )
    check_journal(engine.store)


def test_expired_lease_can_be_resumed_without_steal(
    engine: Migration, make_settings: Callable[..., Settings]
) -> None:
    """Once the dead holder's lease expires, plain resume takes over."""
    to_dual_write(engine)
    eng = make(engine.store, make_settings, steps=STEPS)
    state = engine.store.get("default")
    from migration_fsm.fsm import Trigger, resolve_edge
    from migration_fsm.migration import edge_steps

    edge = resolve_edge(state.phase, Trigger.ADVANCE)
    engine.store.claim(state, _intent(edge), edge_steps(eng.settings, edge), "ghost [x:1]", 30)
    with engine.store.transaction() as conn:
        conn.execute(update(migrations_table).values(lease_expires_at=utcnow() - timedelta(seconds=1)))
    outcome = eng.resume()
    assert "committed" == outcome.status
    assert engine.store.entry(engine.store.get("default"), outcome.seq or 0).takeovers[0]["stolen"] is False


def test_heartbeat_keeps_a_long_step_leased(
    engine: Migration, make_settings: Callable[..., Settings]
) -> None:
    """A step running for longer than the lease keeps it through the background heartbeat."""
    to_dual_write(engine)
    settings = {"steps": {"dual_write->cutover": ["tests.support.steps:held_step"]}}
    lease = 0.6
    eng = make(engine.store, make_settings, lease_seconds=lease, heartbeat_seconds=0.1, **settings)
    thief = make(engine.store, make_settings, actor="thief", **settings)
    errors: list[BaseException] = []
    engsteps.HELD.clear()
    engsteps.RELEASE.clear()

    def attempt() -> None:
        try:
            assert engsteps.HELD.wait(timeout=engsteps.HOLD_TIMEOUT), "the step never started"
            # The lease taken at the claim, before the step began, has expired by now: only
            # the heartbeat keeps the transition leased. The step holds until we are done.
            time.sleep(lease * 1.5)
            thief.resume()
        except BaseException as exc:  # noqa: BLE001 - the test reads what happened
            errors.append(exc)
        finally:
            engsteps.RELEASE.set()

    thread = threading.Thread(target=attempt)
    thread.start()
    outcome = eng.advance()
    thread.join()
    assert "committed" == outcome.status
    assert [LeaseHeld] == [type(e) for e in errors], errors
    check_journal(engine.store)


def test_lease_lost_mid_step_stops_without_commit(
    engine: Migration, make_settings: Callable[..., Settings]
) -> None:
    """If another operator steals the lease, the first one's commit fails and changes nothing."""
    to_dual_write(engine)
    steps = {"dual_write->cutover": ["tests.support.steps:step_a"]}
    eng = make(engine.store, make_settings, steps=steps)
    thief = make(engine.store, make_settings, steps=steps, actor="thief")
    original = engsteps.step_a

    def stolen_under_us(ctx: Any) -> None:
        thief.store.take_over(thief.store.get("default"), thief.holder, 30, {"command": "test"})
        original(ctx)

    engsteps.step_a = stolen_under_us
    try:
        with pytest.raises(LeaseHeld, match="taken over"):
            eng.advance()
    finally:
        engsteps.step_a = original
    state = engine.store.get("default")
    assert (Phase.DUAL_WRITE, thief.holder) == (state.phase, state.lease_holder)


def test_guard_refusal_is_journaled_and_changes_nothing(
    engine: Migration, make_settings: Callable[..., Settings]
) -> None:
    """A failing guard refuses (exit 1): a refused row, same phase, percent and version."""
    eng = make(
        engine.store, make_settings, guards={"preparation->dual_write": ["tests.support.steps:flag_guard"]}
    )
    engsteps.FLAG["passed"] = False
    before = engine.store.get("default")
    with pytest.raises(Refused, match="flag is False") as info:
        eng.advance()
    assert 1 == info.value.exit_code
    after = engine.store.get("default")
    assert (before.phase, before.percent, before.version) == (after.phase, after.percent, after.version)
    last = engine.store.journal(after)[-1]
    assert ("refused", [{"name": "tests.support.steps:flag_guard", "passed": False}]) == (
        last.status,
        [{k: g[k] for k in ("name", "passed")} for g in last.guards],
    )
    check_journal(engine.store)


def test_guard_that_raises_refuses(engine: Migration, make_settings: Callable[..., Settings]) -> None:
    """A guard raising an exception counts as failed, with the error as its detail."""
    eng = make(
        engine.store, make_settings, guards={"preparation->dual_write": ["tests.support.steps:broken_guard"]}
    )
    with pytest.raises(Refused, match="cannot reach the metrics"):
        eng.advance()


def test_force_overrides_failing_guards_and_is_journaled(
    engine: Migration, make_settings: Callable[..., Settings]
) -> None:
    """--force --reason takes the edge despite a failing guard and journals forced=true."""
    eng = make(
        engine.store, make_settings, guards={"preparation->dual_write": ["tests.support.steps:flag_guard"]}
    )
    engsteps.FLAG["passed"] = False
    with pytest.raises(BadInput):
        eng.advance(force=True)
    outcome = eng.advance(force=True, reason="metrics are down, checked by hand")
    assert (True, "committed") == (outcome.forced, outcome.status)
    last = engine.store.journal(engine.store.get("default"))[-1]
    assert (True, "metrics are down, checked by hand") == (last.forced, last.reason)


def test_percent_is_100_cannot_be_forced(engine: Migration) -> None:
    """cutover -> cleanup refuses below 100 percent, even with --force."""
    engine.advance()
    engine.advance()
    engine.ramp(90)
    with pytest.raises(Refused, match="cannot be forced"):
        engine.advance(force=True, reason="hurry")
    assert (Phase.CUTOVER, 90) == (engine.store.get("default").phase, engine.store.get("default").percent)
    engine.ramp(100)
    assert Phase.CLEANUP == engine.advance().state.phase  # type: ignore[union-attr]


def test_dry_run_writes_nothing(engine: Migration, make_settings: Callable[..., Settings]) -> None:
    """--dry-run evaluates guards and lists steps without touching the database."""
    to_dual_write(engine)
    eng = make(
        engine.store,
        make_settings,
        steps=STEPS,
        guards={"dual_write->cutover": ["tests.support.steps:true_guard"]},
    )
    before = engine.store.journal(engine.store.get("default"))
    outcome = eng.advance(dry_run=True)
    assert (
        "planned",
        ["tests.support.steps:step_a", "tests.support.steps:step_b", "tests.support.steps:step_c"],
    ) == (
        outcome.status,
        outcome.steps,
    )
    assert [True] == [g.passed for g in outcome.guards]
    assert [] == engsteps.CALLS
    assert before == engine.store.journal(engine.store.get("default"))


def test_unknown_guard_is_a_config_error_before_any_write(
    engine: Migration, make_settings: Callable[..., Settings]
) -> None:
    """A guard name that is neither built in nor importable is exit 2 and writes nothing."""
    eng = make(engine.store, make_settings, guards={"preparation->dual_write": ["no_such_guard"]})
    before = engine.store.journal(engine.store.get("default"))
    with pytest.raises(ConfigError, match="no_such_guard") as info:
        eng.advance()
    assert 2 == info.value.exit_code
    assert before == engine.store.journal(engine.store.get("default"))


def test_checkpoint_must_be_json(engine: Migration, make_settings: Callable[..., Settings]) -> None:
    """A step saving a checkpoint that is not JSON fails as a step (exit 1), nothing saved."""
    to_dual_write(engine)
    eng = make(
        engine.store, make_settings, steps={"dual_write->cutover": ["tests.support.steps:bad_checkpoint"]}
    )
    with pytest.raises(StepFailed, match="TypeError"):
        eng.advance()


def test_rollback_to_walks_each_edge(engine: Migration) -> None:
    """rollback --to PHASE takes every rollback edge in turn, each journaled."""
    engine.advance()
    engine.advance()
    engine.ramp(100)
    engine.advance()
    outcomes = engine.rollback(reason="bad release", to=Phase.PREPARATION)
    assert [Phase.CUTOVER, Phase.DUAL_WRITE, Phase.PREPARATION] == [o.edge.dest for o in outcomes]
    assert [100, 0, 0] == [o.percent for o in outcomes]
    state = engine.store.get("default")
    assert (Phase.PREPARATION, 0) == (state.phase, state.percent)
    check_journal(engine.store)


def test_ramp_rejects_percent_outside_range(engine: Migration) -> None:
    """ramp outside 0..100 is bad input, checked before anything else."""
    for bad in (-1, 101):
        with pytest.raises(BadInput):
            engine.ramp(bad)


def test_min_soak_guard(engine: Migration, make_settings: Callable[..., Settings]) -> None:
    """min_soak refuses until the phase has run min_soak_seconds."""
    guards = {"preparation->dual_write": ["min_soak"]}
    with pytest.raises(Refused, match="min_soak"):
        make(engine.store, make_settings, guards=guards, min_soak_seconds=3600).advance()
    assert (
        "committed" == make(engine.store, make_settings, guards=guards, min_soak_seconds=0).advance().status
    )


def _intent(edge: Any) -> Any:
    import os
    import socket

    from migration_fsm.journal import JournalEntry

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
