"""The events outbox's reads and delivery state (`journal/outbox.py`), called directly on a
journal database: what `notify` delivers from (`pending_events`, `pending_count`), where each
target stands (`register_targets`, `target_states`, `record_delivered`, `record_failure`) and
what `serve` counts (`watch_verdict_counts`), each scoped to its migration."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import insert

from migration_fsm.journal import Journal, outbox
from migration_fsm.journal.schema import events_table

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
