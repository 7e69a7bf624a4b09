"""Holds (`watch`'s `on_failure = "pause"`) and their release, through `Migration` and the
`Journal`: the closed rows they journal, field by field, and their log lines; one hold at a
time per migration; what ends a hold (a release, a phase change) and what does not (a
refusal, a ramp down, another migration's rows); the refusals' exact messages. The
`Journal.standing_hold` calls here come without the operator lock, so they read the
journal themselves (`_standing_hold`), as `release` and a second `hold` do."""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from typing import Any

import pytest
from structlog.testing import capture_logs

from migration_fsm.config import Settings
from migration_fsm.exceptions import BadInput, ConcurrentChange, Refused
from migration_fsm.fsm import EntryStatus, Phase, Trigger
from migration_fsm.journal import Journal, JournalEntry, outbox
from migration_fsm.migration import GuardRecord, Migration

VERDICT = GuardRecord("error_rate", False, "3.0% > 1.0%", 12, value=3.0)


def make(store: Journal, make_settings: Callable[..., Settings], name: str = "default") -> Migration:
    engine = Migration(store, make_settings(actor="watcher"), name)
    engine.init()
    return engine


def hold(engine: Migration, reason: str = "error rate up") -> JournalEntry | None:
    return engine.hold(
        reason=reason, verdicts=[VERDICT], seen_version=engine.store.get(engine.migration).version
    )


def rows(store: Journal, name: str = "default") -> list[JournalEntry]:
    return store.journal(store.get(name))


def events(logs: list[Any], kind: str) -> list[dict[str, Any]]:
    return [{k: v for k, v in line.items() if k != "log_level"} for line in logs if line["event"] == kind]


def test_a_hold_is_a_closed_row_that_changes_nothing_else(
    store: Journal, make_settings: Callable[..., Settings]
) -> None:
    engine = make(store, make_settings)
    engine.advance()
    before = store.get("default")
    with capture_logs() as logs:
        entry = hold(engine)
    assert entry is not None
    assert entry == rows(store)[-1]
    assert (
        before.last_seq + 1,
        Trigger.ADVANCE,
        Phase.DUAL_WRITE,
        Phase.CUTOVER,
        0,
        EntryStatus.HELD,
        "watcher",
        "error rate up",
        False,
        [],
        None,
    ) == (
        entry.seq,
        entry.trigger,
        entry.source,
        entry.dest,
        entry.percent,
        entry.status,
        entry.actor,
        entry.reason,
        entry.forced,
        entry.takeovers,
        entry.error,
    )
    verdict = {
        "name": "error_rate",
        "passed": False,
        "detail": "3.0% > 1.0%",
        "duration_ms": 12,
        "value": 3.0,
    }
    assert [verdict] == entry.guards
    assert (socket.gethostname(), os.getpid()) == (entry.host, entry.pid)
    assert entry.started_at is not None
    assert entry.started_at == entry.finished_at
    after = store.get("default")
    assert (before.phase, before.percent, before.version) == (after.phase, after.percent, after.version)
    assert [
        {"migration": "default", "event": "hold", "seq": entry.seq, "phase": "dual_write", "actor": "watcher"}
    ] == events(logs, "hold")
    assert entry == store.standing_hold(after)


def test_a_second_hold_while_one_stands_writes_nothing(
    store: Journal, make_settings: Callable[..., Settings]
) -> None:
    engine = make(store, make_settings)
    first = hold(engine)
    journaled = rows(store)
    with capture_logs() as logs:
        assert hold(engine, "again") is None
    assert (journaled, []) == (rows(store), events(logs, "hold"))
    assert first == store.standing_hold(store.get("default"))


def test_a_release_ends_the_hold_and_a_new_hold_may_follow(
    store: Journal, make_settings: Callable[..., Settings]
) -> None:
    engine = make(store, make_settings)
    held = hold(engine)
    assert held is not None
    with pytest.raises(Refused, match="watch_hold"):
        engine.advance()
    with capture_logs() as logs:
        released = engine.release(reason="looked again")
    assert released == rows(store)[-1]
    assert (
        Trigger.ADVANCE,
        Phase.PREPARATION,
        Phase.DUAL_WRITE,
        EntryStatus.RELEASED,
        "looked again",
        [],
    ) == (
        released.trigger,
        released.source,
        released.dest,
        released.status,
        released.reason,
        released.guards,
    )
    assert [
        {
            "migration": "default",
            "event": "release",
            "seq": released.seq,
            "held": held.seq,
            "actor": "watcher",
        }
    ] == events(logs, "release")
    assert store.standing_hold(store.get("default")) is None
    again = hold(engine, "worse")
    assert again is not None
    assert again.seq == released.seq + 1
    assert again == store.standing_hold(store.get("default"))


def test_a_refusal_and_a_ramp_down_leave_the_hold_standing(
    store: Journal, make_settings: Callable[..., Settings]
) -> None:
    engine = make(store, make_settings)
    engine.advance()
    engine.advance()
    engine.ramp(50)
    held = hold(engine)
    with pytest.raises(Refused, match="watch_hold"):
        engine.ramp(60)
    assert EntryStatus.REFUSED == rows(store)[-1].status
    assert held == store.standing_hold(store.get("default"))
    assert "committed" == engine.ramp(20).status  # a ramp down is never held
    assert held == store.standing_hold(store.get("default"))
    assert hold(engine, "still bad") is None
    assert EntryStatus.RELEASED == engine.release(reason="fixed").status


def test_a_phase_change_ends_the_hold(store: Journal, make_settings: Callable[..., Settings]) -> None:
    engine = make(store, make_settings)
    engine.advance()
    held = hold(engine)
    assert held is not None
    engine.rollback(reason="back to preparation")
    assert store.standing_hold(store.get("default")) is None
    with pytest.raises(BadInput) as refused:
        engine.release(reason="nothing")
    assert "migration 'default' has no standing hold: nothing to release" == str(refused.value)
    again = hold(engine)
    assert again is not None
    assert (Phase.PREPARATION, Phase.DUAL_WRITE) == (again.source, again.dest)


def test_a_hold_stands_on_its_own_migration_only(
    store: Journal, make_settings: Callable[..., Settings]
) -> None:
    other = make(store, make_settings, "other")
    engine = make(store, make_settings)
    engine.advance()
    held = hold(engine)  # default's #3: later than anything of other's
    assert store.standing_hold(store.get("other")) is None
    other_held = hold(other)
    assert other_held is not None
    assert 2 == other_held.seq
    engine.release(reason="fixed")
    assert (None, other_held) == (
        store.standing_hold(store.get("default")),
        store.standing_hold(store.get("other")),
    )
    assert held is not None
    assert held.seq == 3


def test_hold_release_and_rollback_refusals(store: Journal, make_settings: Callable[..., Settings]) -> None:
    engine = make(store, make_settings)
    engine.advance()
    seen = store.get("default").version
    engine.advance()  # the migration moves on after it was measured
    now = store.get("default")
    stale = (
        f"migration 'default' changed since it was measured (version {seen} -> {now.version}, now"
        f" cutover at {now.percent}%): no "
    )
    journaled = rows(store)
    with pytest.raises(ConcurrentChange) as refused:
        engine.hold(reason="late", verdicts=[], seen_version=seen)
    assert stale + "hold" == str(refused.value)
    with pytest.raises(ConcurrentChange) as refused:
        engine.rollback(reason="late", seen_version=seen)
    assert stale + "rollback" == str(refused.value)
    assert journaled == rows(store)
    with pytest.raises(BadInput) as no_reason:
        engine.hold(reason=" ", verdicts=[], seen_version=now.version)
    assert "hold needs a reason: add --reason TEXT" == str(no_reason.value)
    with pytest.raises(BadInput) as no_reason:
        engine.release(reason="")
    assert "release needs a reason: add --reason TEXT" == str(no_reason.value)
    assert journaled == rows(store)
    [back] = engine.rollback(reason="measured now", seen_version=now.version)
    assert (Phase.CUTOVER, Phase.DUAL_WRITE, "committed") == (back.edge.source, back.edge.dest, back.status)


def test_each_closed_row_leaves_its_event(store: Journal, make_settings: Callable[..., Settings]) -> None:
    """A hold, the refusal it causes and its release each leave an event of their own kind
    about their row (the outbox `notify` delivers)."""
    engine = make(store, make_settings)
    with store.transaction(readonly=True) as conn:
        after = outbox.last_event_id(conn, "default")
    held = hold(engine)
    with pytest.raises(Refused):
        engine.advance()
    released = engine.release(reason="fixed")
    with store.transaction(readonly=True) as conn:
        found = outbox.pending_events(conn, "default", after, None, 10)
    assert held is not None
    assert [
        ("held", held.seq, "held", "watcher"),
        ("refused", held.seq + 1, "refused", "watcher"),
        ("released", released.seq, "released", "watcher"),
    ] == [(e["event"], e["seq"], e["status"], e["actor"]) for e in found]
