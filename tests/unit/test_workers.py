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


# -- the registry's details, one behaviour each ----------------------------------------------


def test_upsert_takes_an_engine_a_connection_a_dialect_or_its_name(store: Journal) -> None:
    from sqlalchemy.dialects import postgresql, sqlite

    from migration_fsm.journal import workers_table
    from migration_fsm.journal.workers import upsert

    expected = {"sqlite": sqlite.Insert, "postgresql": postgresql.Insert}
    with store.engine.connect() as conn:
        for given in (store.engine, conn, store.engine.dialect, store.engine.dialect.name):
            assert isinstance(upsert(given, workers_table), expected[store.engine.dialect.name]), given
    for name, insert in expected.items():
        assert isinstance(upsert(name, workers_table), insert)
    with pytest.raises(
        ValueError, match=r"^the workers' table and the ledger support SQLite and PostgreSQL, not mysql$"
    ):
        upsert("mysql", workers_table)


def test_default_worker_id_is_host_pid_and_six_random_hex_digits() -> None:
    import os
    import socket

    from migration_fsm.journal.workers import default_worker_id

    host, pid, tail = default_worker_id().rsplit(":", 2)
    assert (host, pid) == (socket.gethostname(), str(os.getpid()))
    assert len(tail) == 6
    int(tail, 16)


def test_the_ttl_must_be_positive_and_defaults_to_thirty_seconds(store: Journal, upgraded_url: str) -> None:
    for bad in (0, -1):
        with pytest.raises(ValueError, match=r"^ttl_seconds must be positive$"):
            Workers(store.engine, ttl_seconds=bad)
    short = Workers(store.engine, ttl_seconds=0.5)
    short.register(M, "old", "w")
    (beat,) = [r.heartbeat_at for r in short.records(M)]
    assert short.is_gone(M, "old", "w", now=beat + timedelta(seconds=0.6))
    assert not short.is_gone(M, "old", "w", now=beat + timedelta(seconds=0.4))
    for default in (Workers(store.engine), Workers.from_url(upgraded_url)):
        assert not default.is_gone(M, "old", "w", now=beat + timedelta(seconds=30))
        assert default.is_gone(M, "old", "w", now=beat + timedelta(seconds=30, microseconds=1))
        default.close()
    from_url = Workers.from_url(upgraded_url, ttl_seconds=5)
    assert from_url.is_gone(M, "old", "w", now=beat + timedelta(seconds=6))
    from_url.close()


def test_close_disposes_only_the_engine_from_url_created(store: Journal, upgraded_url: str) -> None:
    disposed: list[object] = []
    given = Workers(store.engine)
    event.listen(store.engine, "engine_disposed", disposed.append)
    given.close()
    assert disposed == []
    owned = Workers.from_url(upgraded_url)
    event.listen(owned.engine, "engine_disposed", disposed.append)
    owned.close()
    assert disposed == [owned.engine]


def test_a_registration_acknowledges_nothing_and_defers_no_finishes(workers: Workers) -> None:
    workers.register(M, "old", "w")
    (record,) = workers.records(M)
    assert (record.seen_version, record.defers_finishes) == (0, False)
    assert [w.worker_id for w in workers.side(M, "old", 1).waiting] == ["w"]


def test_defers_finishes_once_set_stays_set_and_exact_moves_the_version_back(workers: Workers) -> None:
    workers.heartbeat(M, "old", "w", seen_version=5, defers_finishes=True)
    workers.heartbeat(M, "old", "w", seen_version=5)
    workers.heartbeat(M, "old", "w", seen_version=3)  # not exact: never moves back
    (record,) = workers.records(M)
    assert (record.seen_version, record.defers_finishes) == (5, True)
    workers.heartbeat(M, "old", "w", seen_version=3, exact=True)  # a restored database
    (record,) = workers.records(M)
    assert (record.seen_version, record.defers_finishes) == (3, True)


def test_records_are_ordered_by_side_then_worker(workers: Workers) -> None:
    for side, worker in (("old", "b"), ("old", "a"), ("new", "z"), ("new", "c")):
        workers.register(M, side, worker)
    assert [(r.side, r.worker_id) for r in workers.records(M)] == [
        ("new", "c"),
        ("new", "z"),
        ("old", "a"),
        ("old", "b"),
    ]
    assert [r.worker_id for r in workers.records(M, "old")] == ["a", "b"]


@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
def test_records_are_in_worker_order_when_postgresql_sorts_them_itself(
    store: Journal, workers: Workers
) -> None:
    """With many workers and the table analysed (as autovacuum would), PostgreSQL reads the
    rows without the primary key's index and sorts them: the order within a side is the
    query's, not the index's."""
    names = [f"w{i:03d}" for i in range(300)]
    for name in reversed(names):
        workers.register(M, "old", name)
        workers.register(M, "new", name)
    with store.engine.connect() as conn:
        conn.exec_driver_sql("ANALYZE mfsm_workers")
        conn.commit()
    assert [(r.side, r.worker_id) for r in workers.records(M)] == [
        *(("new", name) for name in names),
        *(("old", name) for name in names),
    ]
    assert [r.worker_id for r in workers.records(M, "old")] == names


def test_one_worker_id_in_another_side_or_migration_is_another_worker(workers: Workers) -> None:
    """`is_gone`, `may_take_over` and `deregister` name one row: (migration, side, worker)."""
    workers.register(M, "new", "w")
    workers.register("other", "old", "w")
    assert workers.is_gone(M, "old", "w")
    assert workers.may_take_over(M, "old", "w")
    assert not workers.is_gone(M, "new", "w")
    assert not workers.may_take_over(M, "new", "w")
    workers.register(M, "old", "w")
    workers.deregister(M, "old", "w")
    assert [(r.migration, r.side) for r in (*workers.records(M), *workers.records("other"))] == [
        (M, "new"),
        ("other", "old"),
    ]


def test_live_and_gone_at_the_ttl_boundary(workers: Workers) -> None:
    """A heartbeat exactly `ttl` old is still live; a microsecond more and it is gone (for
    `side`, `sides`, `is_gone` and `may_take_over` alike)."""
    workers.register(M, "old", "w")
    (beat,) = [r.heartbeat_at for r in workers.records(M)]
    edge = beat + timedelta(seconds=30)
    past = edge + timedelta(microseconds=1)
    assert [w.worker_id for w in workers.side(M, "old", 0, now=edge).live] == ["w"]
    assert [w.worker_id for w in workers.sides(M, 0, now=edge)["old"].live] == ["w"]
    assert not workers.is_gone(M, "old", "w", now=edge)
    assert not workers.may_take_over(M, "old", "w", now=edge)
    assert [w.worker_id for w in workers.side(M, "old", 0, now=past).gone] == ["w"]
    assert [w.worker_id for w in workers.sides(M, 0, now=past)["old"].gone] == ["w"]
    assert workers.is_gone(M, "old", "w", now=past)
    assert workers.may_take_over(M, "old", "w", now=past)
    assert not workers.may_take_over(M, "old", "w")  # live now


def test_side_and_sides_name_the_side_they_judged(workers: Workers) -> None:
    assert workers.side(M, "new", 3).side == "new"
    assert {s: judged.side for s, judged in workers.sides(M, 3).items()} == {"old": "old", "new": "new"}
    assert {judged.version for judged in workers.sides(M, 3).values()} == {3}


# -- the pause's details ----------------------------------------------------------------------


def test_pause_refuses_a_side_that_is_not_old_or_new(store: Journal, engine: Migration) -> None:
    lease, _ = _into_transition(store, engine)
    with pytest.raises(ValueError, match=r"^side must be 'old' or 'new', not 'middle'$"):
        lease.pause("middle")


def test_each_pause_and_lift_is_journaled_with_its_holder_time_and_version(
    store: Journal, engine: Migration
) -> None:
    """The `takeovers` record of a pause and of a lift, field by field: its `at` is the
    migration row's `updated_at` of the same statement."""
    lease, before = _into_transition(store, engine)
    records: list[dict[str, object]] = []
    signals: list[Callable[[], int]] = [lambda: lease.pause("new"), lease.lift]
    for signal in signals:
        version = signal()
        state = store.get(M)
        records.append(
            {
                "command": "?",
                "actor": "alice [h:1]",
                "at": state.updated_at.isoformat(timespec="microseconds"),
                "version": version,
            }
        )
    records[0].update(command="pause", side="new")
    records[1].update(command="lift")
    entry = store.entry(store.get(M), lease.seq)
    assert entry.takeovers == records
    assert entry.takeovers[0]["version"] == before + 1


def test_a_pause_or_lift_without_the_lease_names_the_transition_and_why(
    store: Journal, engine: Migration
) -> None:
    lease, _ = _into_transition(store, engine)
    lost = f"the lease on transition #{lease.seq} of migration '{M}'"
    lease.release("step failed")
    with pytest.raises(LeaseHeld, match=rf"^{lost} is no longer held \(the transition waits for"):
        lease.lift()
    store.take_over(store.get(M), "bob [h:2]", 30, {"command": "resume", "actor": "bob"})
    with pytest.raises(LeaseHeld, match=rf"^{lost} was taken over by bob \[h:2\]: this command stops here$"):
        lease.pause("old")


def test_the_lift_of_an_abort_is_journaled_with_its_holder_time_and_version(
    store: Journal, engine: Migration
) -> None:
    lease, before = _into_transition(store, engine)
    lease.pause("old")
    final = lease.abort()
    entry = store.entry(final, lease.seq)
    assert entry.takeovers[-1] == {
        "command": "lift",
        "actor": "alice [h:1]",
        "at": final.updated_at.isoformat(timespec="microseconds"),
        "version": before + 2,
    }
    assert final.version == before + 2
