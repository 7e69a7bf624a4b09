"""The events outbox's reads and delivery state (`journal/outbox.py`), called directly on a
journal database: what `notify` delivers from (`pending_events`, `pending_count`), where each
target stands (`register_targets`, `target_states`, `record_delivered`, `record_failure`) and
what `serve` counts (`watch_verdict_counts`), each scoped to its migration."""

from __future__ import annotations

import os
import socket
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import insert, select, update

from migration_fsm.fsm import Phase, Trigger
from migration_fsm.journal import Journal, JournalEntry, MigrationState, outbox
from migration_fsm.journal.records import StepRecord, replace
from migration_fsm.journal.schema import events_table, journal_table, steps_table

AT = datetime(2026, 12, 7, 12, 30, 15, 123456, tzinfo=UTC)


def add(store: Journal, migration: str, kind: str, **fields: Any) -> int:
    """One event row; returns its id."""
    with store.transaction() as conn:
        result = conn.execute(
            insert(events_table).values(
                migration=migration, seq=1, kind=kind, created_at=AT, event={"event": kind, **fields}
            )
        )
        assert result.inserted_primary_key is not None
        return int(result.inserted_primary_key[0])


@pytest.fixture
def at(monkeypatch: pytest.MonkeyPatch) -> datetime:
    """The outbox's clock, fixed."""
    monkeypatch.setattr(outbox, "utcnow", lambda: AT)
    return AT


def test_the_newest_event_id_is_its_migration_s(store: Journal) -> None:
    first = add(store, "a", "init")
    second = add(store, "a", "committed")
    add(store, "b", "init")  # later, another migration's
    with store.transaction(readonly=True) as conn:
        assert (second, 0) == (outbox.last_event_id(conn, "a"), outbox.last_event_id(conn, "none"))
    assert first < second


def test_pending_events_are_its_migration_s_after_the_cursor_oldest_first(store: Journal) -> None:
    ids = [add(store, "a", kind, n=n) for n, kind in enumerate(["init", "claim", "committed", "claim"])]
    add(store, "b", "claim")
    with store.transaction(readonly=True) as conn:
        assert [
            {"event": "claim", "n": 1, "id": ids[1]},
            {"event": "committed", "n": 2, "id": ids[2]},
            {"event": "claim", "n": 3, "id": ids[3]},
        ] == outbox.pending_events(conn, "a", ids[0], None, 10)
        assert [ids[1], ids[2]] == [e["id"] for e in outbox.pending_events(conn, "a", ids[0], None, 2)]
        assert [ids[1], ids[3]] == [e["id"] for e in outbox.pending_events(conn, "a", ids[0], ["claim"], 10)]
        assert [] == outbox.pending_events(conn, "a", ids[3], None, 10)
        assert (3, 2, 0, 1) == (
            outbox.pending_count(conn, "a", ids[0], None),
            outbox.pending_count(conn, "a", ids[0], ["claim"]),
            outbox.pending_count(conn, "a", ids[3], None),
            outbox.pending_count(conn, "b", ids[3], None),
        )


def test_a_new_target_starts_after_the_newest_event_and_a_known_one_keeps_its_place(
    store: Journal,
) -> None:
    first = add(store, "a", "init")
    with store.transaction() as conn:
        outbox.register_targets(conn, "b", ["hook"])  # another migration's target of that name
        outbox.register_targets(conn, "a", ["hook"])
        outbox.register_targets(conn, "a", [])
    second = add(store, "a", "committed")
    with store.transaction() as conn:
        outbox.register_targets(conn, "a", ["hook", "slack"])
        states = outbox.target_states(conn, "a")
    blank = {"failures": 0, "last_error": None, "last_attempt_at": None, "last_delivered_at": None}
    assert {
        "hook": {"migration": "a", "target": "hook", "cursor": first, **blank},
        "slack": {"migration": "a", "target": "slack", "cursor": second, **blank},
    } == states
    with store.transaction(readonly=True) as conn:
        assert {"hook": {"migration": "b", "target": "hook", "cursor": 0, **blank}} == outbox.target_states(
            conn, "b"
        )


def test_a_delivery_moves_the_cursor_forward_only_and_clears_the_failures(
    store: Journal, at: datetime, monkeypatch: pytest.MonkeyPatch
) -> None:
    with store.transaction() as conn:
        outbox.register_targets(conn, "a", ["hook", "other"])
        outbox.register_targets(conn, "b", ["hook"])
        outbox.record_failure(conn, "a", "hook", "refused")
        later = at + timedelta(seconds=7)
        monkeypatch.setattr(outbox, "utcnow", lambda: later)
        outbox.record_delivered(conn, "a", "hook", 5)
        outbox.record_delivered(conn, "a", "hook", 3)  # never back
        states = outbox.target_states(conn, "a")
        others = (outbox.target_states(conn, "b")["hook"], states["other"])
    assert {
        "migration": "a",
        "target": "hook",
        "cursor": 5,
        "failures": 0,
        "last_error": None,
        "last_attempt_at": later,
        "last_delivered_at": later,
    } == states["hook"]
    assert [(0, 0, None)] * 2 == [(s["cursor"], s["failures"], s["last_delivered_at"]) for s in others]


def test_a_delivery_that_moves_no_cursor_leaves_the_failures_since(store: Journal, at: datetime) -> None:
    """A delivery up to where the target already stands (another `notify` got there first)
    changes nothing: the failure recorded after the first delivery, and its time, stay."""
    with store.transaction() as conn:
        outbox.register_targets(conn, "a", ["hook"])
        outbox.record_delivered(conn, "a", "hook", 5)
        outbox.record_failure(conn, "a", "hook", "refused")
        outbox.record_delivered(conn, "a", "hook", 5)
        hook = outbox.target_states(conn, "a")["hook"]
    assert (5, 1, "refused", at) == (
        hook["cursor"],
        hook["failures"],
        hook["last_error"],
        hook["last_delivered_at"],
    )


def test_a_failure_is_counted_with_its_error_redacted_and_cut(store: Journal, at: datetime) -> None:
    long = "refused by postgresql://admin:hunter2@db.example/app " + "x" * 2000
    with store.transaction() as conn:
        outbox.register_targets(conn, "a", ["hook", "other"])
        outbox.register_targets(conn, "b", ["hook"])
        outbox.record_failure(conn, "a", "hook", "timed out")
        outbox.record_failure(conn, "a", "hook", long)
        states = outbox.target_states(conn, "a")
        other_migration = outbox.target_states(conn, "b")["hook"]
    hook = states["hook"]
    expected = "refused by postgresql://admin:***@db.example/app " + "x" * 2000
    assert (2, expected[:1000], at, None, 0) == (
        hook["failures"],
        hook["last_error"],
        hook["last_attempt_at"],
        hook["last_delivered_at"],
        hook["cursor"],
    )
    assert [(0, None, None)] * 2 == [
        (s["failures"], s["last_error"], s["last_attempt_at"]) for s in (states["other"], other_migration)
    ]


def test_watch_verdicts_are_counted_by_guard_and_outcome(store: Journal) -> None:
    for guard, outcome in [("errors", "fail"), ("errors", "fail"), ("errors", "pass"), ("lag", "fail")]:
        add(store, "a", "watch_verdict", guard=guard, outcome=outcome)
    add(store, "a", "claim", guard="errors", outcome="fail")  # not a verdict
    add(store, "b", "watch_verdict", guard="errors", outcome="fail")
    with store.transaction(readonly=True) as conn:
        assert {
            ("errors", "fail"): 2,
            ("errors", "pass"): 1,
            ("lag", "fail"): 1,
        } == outbox.watch_verdict_counts(conn, "a")
        assert {} == outbox.watch_verdict_counts(conn, "none")


# -- writing events ------------------------------------------------------------------------

PREPARATION_ROUTING = {
    "write_old": True,
    "write_new": False,
    "authoritative": "old",
    "read_from": "old",
    "read_fallback": None,
    "consume_from": "old",
}
STEPS = [("pkg.steps:copy", None), ("pkg.steps:switch", "pkg.steps:unswitch")]


def intent(actor: str = "alice") -> JournalEntry:
    return JournalEntry(
        seq=0,
        trigger=Trigger.ADVANCE,
        source=Phase.PREPARATION,
        dest=Phase.DUAL_WRITE,
        percent=0,
        status="intent",
        actor=actor,
        reason="go, token=s3cret",
        forced=True,
        guards=[
            {"name": "lag", "passed": True, "detail": "lag 2 s, password=pw"},
            {"name": "rows", "passed": False, "detail": 12.5},
        ],
        takeovers=[],
        started_at=AT,
        finished_at=None,
        host="box",
        pid=41,
        error=None,
        prev_hash=None,
        hash=None,
    )


def claimed(store: Journal, name: str, steps: list[tuple[str, str | None]]) -> tuple[int, JournalEntry]:
    """Migration `name` created and its transition #2 claimed: (its id, the intent row)."""
    store.create(name, "alice")
    _, entry = store.claim(store.get(name), intent(), steps, "alice [h:1]", 30)
    return store.get(name).id, entry


def events(store: Journal, migration: str) -> list[dict[str, Any]]:
    """The migration's event rows, oldest first, without their ids."""
    e = events_table.c
    with store.transaction(readonly=True) as conn:
        rows = conn.execute(
            select(e.migration, e.seq, e.kind, e.created_at, e.event)
            .where(e.migration == migration)
            .order_by(e.id)
        ).mappings()
        return [dict(r) for r in rows]


def row_event(**changes: Any) -> dict[str, Any]:
    """The event about transition #2 of `intent()` (claimed, its steps pending), texts redacted."""
    return {
        "schema": 1,
        "event": "step_done",
        "migration": "a",
        "seq": 2,
        "at": "2026-12-07T12:30:15.123456+00:00",
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "trigger": "advance",
        "edge": "preparation->dual_write",
        "source": "preparation",
        "dest": "dual_write",
        "status": "intent",
        "actor": "alice",
        "reason": "go, token=***",
        "forced": True,
        "error": None,
        "guards": [
            {"name": "lag", "passed": True, "detail": "lag 2 s, password=***"},
            {"name": "rows", "passed": False, "detail": 12.5},
        ],
        "steps": [
            {"name": "pkg.steps:copy", "status": "pending", "attempts": 0, "error": None},
            {"name": "pkg.steps:switch", "status": "pending", "attempts": 0, "error": None},
        ],
        "state": {
            "phase": "preparation",
            "percent": 0,
            "version": 1,
            "paused": None,
            "routing": PREPARATION_ROUTING,
        },
        **changes,
    }


def test_emit_writes_the_event_of_a_row_and_its_steps_as_the_transaction_leaves_them(
    store: Journal, at: datetime
) -> None:
    """`emit` reads the migration, the journal row and its steps inside the caller's
    transaction (a step failed just before, its error redacted), of that migration only
    (another has a transition #2 too), names the step at `step` and adds the extra keys; the
    row is written with its migration, seq, kind and time."""
    claimed(store, "b", [("pkg.other:one", None)])
    migration_id, _ = claimed(store, "a", STEPS)
    before = len(events(store, "a"))
    s = steps_table.c
    with store.transaction() as conn:
        conn.execute(
            update(steps_table)
            .where(s.migration_id == migration_id, s.seq == 2, s.position == 1)
            .values(status="failed", attempts=2, error="boom password=hunter2")
        )
        outbox.emit(conn, migration_id, "step_done", 2, step=1, note="by hand")
    failed = {"name": "pkg.steps:switch", "status": "failed", "attempts": 2, "error": "boom password=***"}
    expected = row_event(
        steps=[{"name": "pkg.steps:copy", "status": "pending", "attempts": 0, "error": None}, failed],
        step={"position": 1, **failed},
        note="by hand",
    )
    written = events(store, "a")
    assert before + 1 == len(written)
    assert {"migration": "a", "seq": 2, "kind": "step_done", "created_at": AT, "event": expected} == written[
        -1
    ]


def test_emit_of_the_first_row_has_no_edge_and_of_no_row_only_the_state(store: Journal, at: datetime) -> None:
    """The `init` row has no source, so no edge; an event about no row (`watch`'s) has a null
    seq and no row's fields, only its extra keys and the state."""
    store.create("a", "alice")
    migration_id = store.get("a").id
    with store.transaction() as conn:
        outbox.emit(conn, migration_id, "init", 1)
        outbox.emit(conn, migration_id, "watch_alert", None, guard="lag")
    first, alert = events(store, "a")[-2:]
    assert (1, "init", None, None, "committed", "preparation", []) == (
        first["seq"],
        first["event"]["trigger"],
        first["event"]["edge"],
        first["event"]["source"],
        first["event"]["status"],
        first["event"]["dest"],
        first["event"]["steps"],
    )
    state = {
        "phase": "preparation",
        "percent": 0,
        "version": 1,
        "paused": None,
        "routing": PREPARATION_ROUTING,
    }
    assert {
        "migration": "a",
        "seq": None,
        "kind": "watch_alert",
        "created_at": AT,
        "event": {
            "schema": 1,
            "event": "watch_alert",
            "migration": "a",
            "seq": None,
            "at": "2026-12-07T12:30:15.123456+00:00",
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "guard": "lag",
            "state": state,
        },
    } == alert


def test_emit_known_reads_the_steps_only_when_not_given(store: Journal, at: datetime) -> None:
    """`emit_known` with a journal row (a `JournalEntry` or a row as read) and no steps reads
    that row's steps; with steps given, it writes those."""
    claimed(store, "b", [("pkg.other:one", None)])
    migration_id, entry = claimed(store, "a", STEPS)
    state = store.get("a")
    given = [
        StepRecord(
            position=0,
            name="pkg.steps:given",
            undo=None,
            status="done",
            attempts=3,
            checkpoint=None,
            error="password=pw",
            started_at=AT,
            finished_at=AT,
        )
    ]
    with store.transaction() as conn:
        outbox.emit_known(conn, "step_done", state, entry, None)
        row = dict(
            conn.execute(
                select(journal_table).where(
                    journal_table.c.migration_id == migration_id, journal_table.c.seq == 2
                )
            )
            .mappings()
            .one()
        )
        outbox.emit_known(conn, "step_done", state, row, None)
        outbox.emit_known(conn, "step_done", state, entry, given, step=0)
        outbox.emit_known(conn, "step_done", state, row, [])
    from_entry, from_row, with_given, with_none = (w["event"] for w in events(store, "a")[-4:])
    assert row_event() == from_entry == from_row
    done = {"name": "pkg.steps:given", "status": "done", "attempts": 3, "error": "password=***"}
    assert row_event(steps=[done], step={"position": 0, **done}) == with_given
    assert row_event(steps=[]) == with_none


def test_an_event_lists_the_steps_of_its_own_transition_only(store: Journal, at: datetime) -> None:
    """A migration's second transition with steps: the event about it lists its steps, not
    the first one's, whether `emit` or `emit_known` reads them."""
    store.create("a", "alice")
    lease, _ = store.claim(store.get("a"), intent(), STEPS, "alice [h:1]", 30)
    lease.commit()
    _, entry = store.claim(store.get("a"), intent(), [("pkg.steps:later", None)], "alice [h:1]", 30)
    assert entry.seq == 3
    with store.transaction() as conn:
        outbox.emit(conn, store.get("a").id, "step_done", 3)
        outbox.emit_known(conn, "step_done", store.get("a"), entry, None)
    later = [{"name": "pkg.steps:later", "status": "pending", "attempts": 0, "error": None}]
    assert [later, later] == [w["event"]["steps"] for w in events(store, "a")[-2:]]


def test_an_event_about_the_first_row_has_no_source_and_shows_the_paused_side() -> None:
    """`event_of` from a `JournalEntry` with no source (the `init` row): source and edge are
    null, not the text "None"; the state names the paused side; a time at a whole second
    keeps its microseconds."""
    whole = datetime(2026, 12, 7, 12, 30, 15, tzinfo=UTC)
    state = MigrationState(
        id=1,
        name="a",
        phase=Phase.DUAL_WRITE,
        percent=0,
        version=3,
        last_seq=1,
        head_hash=None,
        in_progress_seq=None,
        lease_holder=None,
        lease_expires_at=None,
        phase_entered_at=whole,
        created_at=whole,
        updated_at=whole,
        paused_side="old",
    )
    first = replace(intent(), seq=1, trigger=Trigger.INIT, source=None, status="committed")
    event = outbox.event_of("init", state, first, [], whole)
    assert (None, None, "init", "2026-12-07T12:30:15.000000+00:00") == (
        event["source"],
        event["edge"],
        event["trigger"],
        event["at"],
    )
    assert {"phase": "dual_write", "percent": 0, "version": 3, "paused": "old"} == {
        k: v for k, v in event["state"].items() if k != "routing"
    }


@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
def test_emit_holds_the_migration_row_until_its_transaction_ends(store: Journal) -> None:
    """On PostgreSQL `emit` locks its migration's row (`FOR UPDATE`) before it inserts, so a
    second write of that migration (each changes the row first) waits for the first's commit
    and one migration's event ids grow in commit order: a target that has received event N has
    no event < N still to come. Here the second write gives up after 200 ms instead."""
    from sqlalchemy import text
    from sqlalchemy.exc import OperationalError

    from migration_fsm.journal.schema import migrations_table

    store.create("a", "alice")
    migration_id = store.get("a").id
    with store.transaction() as conn:
        outbox.emit(conn, migration_id, "watch_alert", None, guard="lag")
        with store.engine.connect() as other:
            other.execute(text("SET lock_timeout = '200ms'"))
            touch = update(migrations_table).where(migrations_table.c.id == migration_id)
            with pytest.raises(OperationalError, match="lock timeout"):
                other.execute(touch.values(version=migrations_table.c.version))
            other.rollback()
    with store.engine.connect() as other:  # once the first has committed, the row is free
        other.execute(text("SET lock_timeout = '200ms'"))
        other.execute(update(migrations_table).where(migrations_table.c.id == migration_id).values(version=1))
        other.rollback()
