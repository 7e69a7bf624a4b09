"""`mfsm_workers` (`journal/workers.py`) and the pause of a side (`Lease.pause` / `lift`), on
SQLite and on PostgreSQL: registration, heartbeat and acknowledgement in one upsert; live,
acknowledged and gone workers; a pause bumps the version, is journaled, survives a step and
the commit's compare-and-set; the commit clears it, `abort` lifts it, `verify` still holds."""

from __future__ import annotations

from datetime import timedelta
from typing import TYPE_CHECKING

import pytest
from sqlalchemy import event

from migration_fsm import commands
from migration_fsm.exceptions import LeaseHeld
from migration_fsm.fsm import Phase
from migration_fsm.journal import Journal, Lease, utcnow
from migration_fsm.journal.workers import Workers

if TYPE_CHECKING:
    from collections.abc import Callable

    from migration_fsm.config import Settings
    from migration_fsm.migration import Migration

M = "default"


@pytest.fixture
def workers(store: Journal) -> Workers:
    return Workers(store.engine, ttl_seconds=30)


def test_register_heartbeat_and_acknowledge_are_one_statement_each(store: Journal, workers: Workers) -> None:
    statements: list[str] = []
    event.listen(store.engine, "before_cursor_execute", lambda *a: statements.append(a[2].split()[0].upper()))
    workers.register(M, "old", "w1", host="h", pid=7)
    workers.acknowledge(M, "old", "w1", 5)
    workers.heartbeat(M, "old", "w1", seen_version=3)  # an older version never moves it back
    assert [s for s in statements if s != "BEGIN"] == ["INSERT", "INSERT", "INSERT"]
    (record,) = workers.records(M, "old")
    assert (record.host, record.pid, record.seen_version) == ("h", 7, 5)


def test_live_acknowledged_and_gone_per_side(workers: Workers) -> None:
    workers.register(M, "old", "a")
    workers.acknowledge(M, "old", "b", 4)
    workers.register(M, "new", "n")
    workers.acknowledge(M, "old", "dead", 9)
    later = utcnow() + timedelta(seconds=20)
    workers.heartbeat(M, "old", "a")
    old = workers.side(M, "old", 4, now=later)
    assert [w.worker_id for w in old.live] == ["a", "b", "dead"]
    assert [w.worker_id for w in old.acknowledged] == ["b", "dead"]
    assert [w.worker_id for w in old.waiting] == ["a"]
    much_later = utcnow() + timedelta(seconds=31)
    gone = workers.side(M, "old", 4, now=much_later)
    assert gone.live == []
    assert gone.all_acknowledged
    assert gone.as_json()["gone_ids"] == ["a", "b", "dead"]
    both = workers.sides(M, 4)
    assert both["new"].as_json() == {
        "live": 1,
        "acknowledged": 0,
        "gone": 0,
        "gone_ids": [],
        "waiting_ids": ["n"],
    }
    assert workers.is_gone(M, "old", "a", now=much_later)
    assert not workers.is_gone(M, "old", "a")
    assert workers.is_gone(M, "old", "never-registered")
    workers.deregister(M, "old", "a")
    assert [w.worker_id for w in workers.records(M, "old")] == ["b", "dead"]


def test_a_bad_side_is_refused(workers: Workers) -> None:
    with pytest.raises(ValueError, match="'old' or 'new'"):
        workers.register(M, "middle", "w")


def _into_transition(store: Journal, engine: Migration) -> tuple[Lease, int]:
    """Claim `preparation -> dual_write` by hand and return the lease and the version before."""
    from tests.unit.test_lease import _intent

    state = store.get(M)
    lease, _ = store.claim(state, _intent(), [("tests.support.steps:step_a", None)], "alice [h:1]", 30)
    return lease, state.version


def test_pause_bumps_the_version_is_journaled_and_the_commit_clears_it(
    store: Journal, engine: Migration, make_settings: Callable[..., Settings]
) -> None:
    lease, before = _into_transition(store, engine)
    paused = lease.pause("old")
    assert paused == before + 1
    assert lease.pause("old") == paused  # idempotent: a step run again
    state = store.get(M)
    assert (state.paused_side, state.version) == ("old", paused)
    entry = store.entry(state, state.in_progress_seq or 0)
    assert [(t["command"], t.get("side"), t["version"]) for t in entry.takeovers] == [
        ("pause", "old", paused)
    ]
    assert commands.status(make_settings(), M).as_json()["paused"] == "old"
    final = lease.commit()  # the pause does not break the commit's CAS
    assert (final.phase, final.paused_side, final.version) == (Phase.DUAL_WRITE, None, paused + 1)
    assert store.get(M).paused_side is None
    commands.verify(make_settings(), M)  # version = committed rows + pauses and lifts


def test_abort_lifts_the_pause(
    store: Journal, engine: Migration, make_settings: Callable[..., Settings]
) -> None:
    lease, before = _into_transition(store, engine)
    lease.pause("old")
    final = lease.abort()
    assert (final.phase, final.paused_side, final.version) == (Phase.PREPARATION, None, before + 2)
    entry = store.journal(store.get(M))[-1]
    assert [t["command"] for t in entry.takeovers] == ["pause", "lift"]
    commands.verify(make_settings(), M)


def test_lift_and_a_lost_lease(
    store: Journal, engine: Migration, make_settings: Callable[..., Settings]
) -> None:
    lease, before = _into_transition(store, engine)
    assert lease.lift() == before  # nothing paused: nothing changes
    lease.pause("new")
    assert lease.lift() == before + 2
    assert store.get(M).paused_side is None
    state = store.get(M)
    store.take_over(state, "bob [h:2]", 30, {"command": "resume", "actor": "bob", "stolen": True})
    with pytest.raises(LeaseHeld):
        lease.pause("old")
    Lease(store, state.id, state.in_progress_seq or 0, "bob [h:2]", 30).commit()
    commands.verify(make_settings(), M)
