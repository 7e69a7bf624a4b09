"""The psycopg fast path of a transition on PostgreSQL (`journal/pgpath.py`), against the
SQLAlchemy path it stands for: the claim, the close and the read taken with the operator lock
write and read the same rows, events and notifications; a close whose compare-and-set keeps
missing gives up with the right error; the driver's errors become ours. PostgreSQL only: the
path exists only there."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest
from sqlalchemy import delete, event, insert, select, update
from sqlalchemy.engine import make_url

from migration_fsm.exceptions import ConcurrentChange, DatabaseUnavailable, LeaseHeld
from migration_fsm.fsm import Phase, Trigger
from migration_fsm.journal import Journal, JournalEntry, Lease, MigrationState, outbox, pgpath
from migration_fsm.journal import journal as journal_module
from migration_fsm.journal import lease as lease_module
from migration_fsm.journal.records import replace
from migration_fsm.journal.schema import events_table, journal_table, migrations_table, steps_table
from tests.support.pgbouncer import free_port

pytestmark = pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)

NAME = "orders"
HOLDER = "bob [h:2]"
STEPS = [("tests.support.steps:step_a", None), ("tests.support.steps:step_b", "tests.support.steps:undo_b")]
T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
CONCURRENT = "another operator changed this migration at the same moment: run `status` and retry"


def _intent(seen: MigrationState, reason: str = "go") -> JournalEntry:
    """An intent row with every column set to something of its own."""
    return JournalEntry(
        seq=0,
        trigger=Trigger.ADVANCE,
        source=Phase.PREPARATION,
        dest=Phase.DUAL_WRITE,
        percent=25,
        status="intent",
        actor="bob",
        reason=reason,
        forced=True,
        guards=[{"name": "g", "passed": True, "detail": "ok"}],
        takeovers=[{"command": "resume", "holder": "carol [h:3]"}],
        started_at=T0 + timedelta(seconds=1),
        finished_at=None,
        host="other-host",
        pid=7,
        error="the last attempt failed",
        prev_hash=seen.head_hash,
        hash=None,
    )


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Callable[[int], None]:
    """The journal's clock (`utcnow` where the claim, the close, the pause and the outbox read it) set by
    the test: `clock(n)` makes it T0 + n seconds."""
    now = [T0]
    for module in (journal_module, lease_module, outbox, pgpath):
        monkeypatch.setattr(module, "utcnow", lambda: now[0])

    def set_to(seconds: int) -> None:
        now[0] = T0 + timedelta(seconds=seconds)

    return set_to


def _rows(store: Journal) -> dict[str, list[dict[str, Any]]]:
    """Every row of the migration, its journal, its steps and its events, less the ids the
    database draws."""
    with store.transaction(readonly=True) as conn:
        found = {}
        for table, order in (
            (migrations_table, [migrations_table.c.name]),
            (journal_table, [journal_table.c.seq]),
            (steps_table, [steps_table.c.seq, steps_table.c.position]),
            (events_table, [events_table.c.id]),
        ):
            rows = conn.execute(select(table).order_by(*order)).mappings()
            found[table.name] = [
                {k: v for k, v in row.items() if k not in ("id", "migration_id")} for row in rows
            ]
        return found


def _forget(store: Journal) -> None:
    with store.transaction() as conn:
        for table in (events_table, steps_table, journal_table, migrations_table):
            conn.execute(delete(table))


@contextmanager
def _listening(url: str) -> Iterator[Callable[[], list[tuple[str, Any]]]]:
    """A session that LISTENs on the journal's channel; the function it yields returns what it
    heard so far (one query's round trip later: a NOTIFY committed before it is delivered)."""
    heard: list[tuple[str, Any]] = []
    conninfo = make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)
    with psycopg.connect(conninfo, autocommit=True) as listener:
        listener.add_notify_handler(lambda n: heard.append((n.channel, json.loads(n.payload or "null"))))
        listener.execute("LISTEN migration_fsm")

        def so_far() -> list[tuple[str, Any]]:
            listener.execute("SELECT 1")
            return list(heard)

        yield so_far


CLOSES: dict[str, tuple[bool, Callable[[Lease], MigrationState]]] = {
    "commit-after-a-pause": (True, lambda lease: lease.commit()),
    "abort-by-another-actor": (False, lambda lease: lease.abort(actor="carol", reason="by hand")),
    "abort-after-a-pause": (True, lambda lease: lease.abort()),
}


@pytest.mark.parametrize("close", list(CLOSES))
def test_the_fast_claim_and_close_write_the_rows_events_and_notifications_of_the_sqlalchemy_path(
    store: Journal,
    upgraded_url: str,
    clock: Callable[[int], None],
    close: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The same transition at the same clock, through the SQLAlchemy path and then (the rows
    forgotten) through psycopg's: after the claim and after the close, every column of the
    migration row, the journal rows, the steps and the events is the same, and so is what a
    listener hears; the two closes return the same state. An abort with no pause to lift
    notifies no one."""
    pause, finish = CLOSES[close]

    def transition(heard: Callable[[], list[tuple[str, Any]]]) -> list[Any]:
        clock(0)
        seen = store.create(NAME, "alice")
        clock(2)
        lease, entry = store.claim(seen, _intent(seen), STEPS, HOLDER, 90)
        claimed = _rows(store)
        if pause:
            clock(3)
            lease.pause("old")
        clock(4)
        after = finish(lease)
        return [entry, claimed, after, _rows(store), heard()]

    with _listening(upgraded_url) as heard, monkeypatch.context() as plain:
        plain.setattr(pgpath, "available", lambda _engine: False)
        sqlalchemy_path = transition(heard)
    _forget(store)
    with _listening(upgraded_url) as heard:
        fast_path = transition(heard)
    assert sqlalchemy_path[2].id != fast_path[2].id
    sqlalchemy_path[2] = replace(sqlalchemy_path[2], id=fast_path[2].id)
    assert sqlalchemy_path == fast_path
    notified = [payload for _, payload in fast_path[4]]
    assert [p["version"] for p in notified] == ([2, 3] if pause else [])


@contextmanager
def _bumping(store: Journal, url: str, *, holder_at: int | None = None) -> Iterator[None]:
    """While open, a `commit` listener on the journal's engine: before each of the close's
    writes is sent, another session touches the migration row (`updated_at`, the lease kept);
    at write `holder_at` it also takes the lease over as carol."""
    calls = [0]
    conninfo = make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)

    def touch(_conn: Any) -> None:
        calls[0] += 1
        if calls[0] > 3:
            return
        with psycopg.connect(conninfo, autocommit=True) as other:
            other.execute("UPDATE mfsm_migrations SET updated_at = updated_at + interval '1 second'")
            if calls[0] == holder_at:
                other.execute("UPDATE mfsm_migrations SET lease_holder = 'carol [h:3]'")

    event.listen(store.engine, "commit", touch)
    try:
        yield
    finally:
        event.remove(store.engine, "commit", touch)


def test_a_close_whose_compare_and_set_misses_three_times_is_a_concurrent_change(
    store: Journal, upgraded_url: str
) -> None:
    """When the migration row changes between the close's read and its write, three times
    while the lease stays ours, the close gives up with `ConcurrentChange` naming the
    migration and the transition, and writes nothing: the transition is still in progress."""
    seen = store.create(NAME, "alice")
    lease, _ = store.claim(seen, _intent(seen), STEPS, HOLDER, 90)
    with _bumping(store, upgraded_url), pytest.raises(ConcurrentChange) as info:
        lease.commit()
    assert (
        f"migration '{NAME}' changed 3 times while transition #2 was being closed: run"
        " `migration-fsm status`, then `resume`"
    ) == str(info.value)
    state = store.get(NAME)
    assert (2, HOLDER, Phase.PREPARATION, seen.version) == (
        state.in_progress_seq,
        state.lease_holder,
        state.phase,
        state.version,
    )
    assert "intent" == store.entry(state, 2).status


def test_a_close_that_keeps_missing_and_then_loses_its_lease_says_who_took_it(
    store: Journal, upgraded_url: str
) -> None:
    """When, by the close's last attempt, another operator has taken the transition over (same
    transition, another holder), the close says the lease was lost, naming the new holder."""
    seen = store.create(NAME, "alice")
    lease, _ = store.claim(seen, _intent(seen), STEPS, HOLDER, 90)
    with _bumping(store, upgraded_url, holder_at=3), pytest.raises(LeaseHeld) as info:
        lease.commit()
    assert (
        f"the lease on transition #2 of migration '{NAME}' was taken over by carol [h:3]: this command"
        " stops here"
    ) == str(info.value)
    assert "carol [h:3]" == info.value.holder


def test_a_claim_that_breaks_a_unique_key_is_a_concurrent_change_and_writes_nothing(
    store: Journal, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A journal row already at the claim's seq (written outside): the claim's statement breaks
    the journal's primary key, which is a concurrent change (as on the SQLAlchemy path), and
    its transaction writes nothing (no lease, no steps, no `claimed` event)."""
    seen = store.create(NAME, "alice")
    with store.transaction() as conn:
        first = conn.execute(select(journal_table).where(journal_table.c.seq == 1)).mappings().one()
        conn.execute(insert(journal_table).values({**first, "seq": 2, "hash": None}))
    before = _rows(store)
    for fast in (False, True):
        with monkeypatch.context() as patched:
            if not fast:
                patched.setattr(pgpath, "available", lambda _engine: False)
            with pytest.raises(ConcurrentChange) as info:
                store.claim(seen, _intent(seen), STEPS, HOLDER, 90)
        assert CONCURRENT == str(info.value)
        assert before == _rows(store)


def test_a_driver_error_in_the_fast_claim_is_unavailability_with_the_driver_s_message(
    store: Journal, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A value PostgreSQL cannot take (a NUL character in the reason): the claim fails as
    unavailability naming the database and psycopg's message, the same as on the SQLAlchemy
    path, and writes nothing; the journal works on after it."""
    seen = store.create(NAME, "alice")
    before = _rows(store)
    messages = []
    for fast in (False, True):
        with monkeypatch.context() as patched:
            if not fast:
                patched.setattr(pgpath, "available", lambda _engine: False)
            with pytest.raises(DatabaseUnavailable) as info:
                store.claim(seen, _intent(seen, reason="a\0b"), STEPS, HOLDER, 90)
        messages.append(str(info.value))
        assert before == _rows(store)
    assert [
        f"database {store.safe_url} is unavailable: PostgreSQL text fields cannot contain NUL (0x00) bytes"
    ] * 2 == messages
    lease, _ = store.claim(seen, _intent(seen), STEPS, HOLDER, 90)
    assert 2 == lease.seq


def test_a_fast_claim_on_a_server_that_is_not_there_is_unavailability_with_libpq_s_message(
    store: Journal, upgraded_url: str
) -> None:
    """The claim's connection cannot be made (nothing listens on the port): unavailability
    naming the database and the first line of libpq's own message, not SQLAlchemy's wrapping
    of it."""
    seen = store.create(NAME, "alice")
    url = make_url(upgraded_url).set(port=free_port()).render_as_string(hide_password=False)
    with Journal(url) as gone, pytest.raises(DatabaseUnavailable) as info:
        gone.claim(seen, _intent(seen), STEPS, HOLDER, 90)
    cause = info.value.__cause__
    assert isinstance(cause, Exception)
    message = str(info.value)
    first_line = str(getattr(cause, "orig", None)).strip().splitlines()[0]
    assert f"database {gone.safe_url} is unavailable: {first_line}" == message
    assert message.startswith(f"database {gone.safe_url} is unavailable: connection failed:")
    assert "sqlalche.me" not in message


def test_a_lost_lease_s_fast_close_says_who_holds_it(store: Journal) -> None:
    """A close after another operator took the transition over reads nothing of its own and
    says who holds the lease now."""
    seen = store.create(NAME, "alice")
    lease, _ = store.claim(seen, _intent(seen), STEPS, HOLDER, 90)
    with store.transaction() as conn:
        conn.execute(update(migrations_table).values(lease_holder="carol [h:3]"))
    with pytest.raises(LeaseHeld, match=r"was taken over by carol \[h:3\]: this command stops here"):
        Lease(store, lease.migration_id, lease.seq, HOLDER, 90).commit()


@pytest.mark.usefixtures("local_time_zone")
def test_what_the_fast_path_reads_is_in_utc_whatever_the_session_s_and_the_process_s_time_zone(
    store: Journal, upgraded_url: str
) -> None:
    """With the PostgreSQL session in UTC+05:30 (`TimeZone`) and the process's local time too,
    the migration the operator lock reads and the state a close returns carry UTC timestamps,
    equal to what the SQLAlchemy path reads."""
    url = make_url(upgraded_url)
    options = f"{url.query['options']} -cTimeZone=Asia/Kolkata"
    kolkata_url = url.update_query_dict({"options": options}).render_as_string(hide_password=False)
    seen = store.create(NAME, "alice")
    store.claim(seen, _intent(seen), STEPS, HOLDER, 90)
    with Journal.open(kolkata_url) as kolkata:
        with kolkata.engine.connect() as conn:
            assert "Asia/Kolkata" == conn.exec_driver_sql("SHOW TimeZone").scalar()
        with kolkata.operator_lock(NAME, "dave [h:4]"):
            locked = kolkata.get(NAME)
        assert store.get(NAME) == locked
        closed = Lease(kolkata, seen.id, 2, HOLDER, 90).commit()
    assert store.get(NAME) == closed
    for state in (locked, closed):
        stamps = [state.created_at, state.updated_at, state.phase_entered_at]
        assert [UTC] * 3 == [stamp.tzinfo for stamp in stamps]
    assert locked.lease_expires_at is not None
    assert UTC is locked.lease_expires_at.tzinfo


def test_only_postgresql_through_psycopg_3_takes_the_fast_path(
    store: Journal, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The fast path is psycopg 3's (its pipeline and its cursors): an engine of another
    PostgreSQL driver does not take it, and a transition on it goes through SQLAlchemy."""
    assert pgpath.available(store.engine)
    monkeypatch.setattr(store.engine.dialect, "driver", "psycopg2")
    assert not pgpath.available(store.engine)
    seen = store.create(NAME, "alice")
    lease, _ = store.claim(seen, _intent(seen), STEPS, HOLDER, 90)
    assert Phase.DUAL_WRITE == lease.commit().phase


def test_a_fast_claim_with_no_source_phase_writes_none(
    store: Journal, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An intent row without a source phase (the API allows it, though every transition the
    machine makes has one) is written with none on both paths, and reads back the same."""
    written = []
    for fast in (False, True):
        with monkeypatch.context() as patched:
            if not fast:
                patched.setattr(pgpath, "available", lambda _engine: False)
            seen = store.create(f"{NAME}-{fast}", "alice")
            _, entry = store.claim(seen, replace(_intent(seen), source=None), STEPS, HOLDER, 90)
            written.append(store.entry(store.get(seen.name), 2))
        assert entry.source is None
    assert [None, None] == [row.source for row in written]
