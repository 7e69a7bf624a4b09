"""`migration_fsm.journal` is the journal layer's face, and the old `migration_fsm.store`
path still resolves every public name the old module had (with a warning); and the
`Journal`'s own writes (`create`, `append_refused`, `claim`, `take_over`), reads, errors,
data fence and schema checks, on SQLite and on PostgreSQL (the lease is `test_lease.py`)."""

from __future__ import annotations

import importlib
import importlib.resources
import os
import socket
import sys
import threading
import warnings
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import insert, text, update
from sqlalchemy.engine import make_url

from migration_fsm import journal
from migration_fsm.exceptions import (
    BadInput,
    ConcurrentChange,
    DatabaseUnavailable,
    JournalCorrupt,
    LeaseHeld,
    SchemaNotCurrent,
    TransitionInterrupted,
    UnknownMigration,
)
from migration_fsm.fsm import Phase, Trigger
from migration_fsm.journal import (
    Journal,
    JournalEntry,
    chain_hash,
    head_revisions,
    make_engine,
    migrations_table,
    pgpath,
    revisions,
    steps_table,
    utcnow,
)
from migration_fsm.journal.db import safe_url
from migration_fsm.journal.locks import LOCK_CLASS, lease_holder_name, lock_params
from migration_fsm.journal.records import replace
from tests.support.clock import FakeClock

#: Every public name of the old one-file `store` module (before the journal was split).
OLD_STORE_NAMES = [
    "JournalEntry",
    "MigrationState",
    "NOTIFY_CHANNEL",
    "SQLITE_BUSY_TIMEOUT_MS",
    "StepRecord",
    "UTCDateTime",
    "alembic_config",
    "chain_hash",
    "head_revisions",
    "journal_table",
    "lease_held_error",
    "lease_holder_name",
    "make_engine",
    "metadata",
    "migrations_dir",
    "migrations_table",
    "repair_log_table",
    "safe_url",
    "steps_table",
    "utcnow",
]


def test_the_facade_exports_what_it_lists() -> None:
    for name in journal.__all__:
        assert getattr(journal, name) is not None, name
    assert set(OLD_STORE_NAMES) <= set(journal.__all__)


def test_the_old_store_path_resolves_every_old_name() -> None:
    sys.modules.pop("migration_fsm.store", None)
    with pytest.warns(DeprecationWarning, match=r"migration_fsm\.store moved to migration_fsm\.journal"):
        old = importlib.import_module("migration_fsm.store")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for name in OLD_STORE_NAMES:
            assert getattr(old, name) is getattr(journal, name), name
        assert old.Store is journal.Journal


def test_migrations_dir_finds_the_revisions() -> None:
    """`migrations_dir()` is computed from its own file: it must still find `env.py`."""
    assert (journal.migrations_dir() / "env.py").is_file()
    assert journal.head_revisions()


# -- the Journal's own writes and errors, on SQLite and on PostgreSQL ----------------------

NAME = "orders"
T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


def _intent() -> JournalEntry:
    return JournalEntry(
        seq=0,
        trigger=Trigger.ADVANCE,
        source=Phase.PREPARATION,
        dest=Phase.DUAL_WRITE,
        percent=0,
        status="intent",
        actor="bob",
        reason="go",
        forced=True,
        guards=[{"name": "g", "passed": False, "detail": "no"}],
        takeovers=[],
        started_at=T0,
        finished_at=T0,
        host="other-host",
        pid=7,
        error=None,
        prev_hash=None,
        hash=None,
    )


def test_create_writes_the_migration_row_and_its_first_journal_row(store: Journal) -> None:
    before = utcnow()
    state = store.create(NAME, "alice")
    after = utcnow()
    assert state == store.get(NAME)
    assert (NAME, Phase.PREPARATION, 0, 1, 1, None, None, None, None) == (
        state.name,
        state.phase,
        state.percent,
        state.version,
        state.last_seq,
        state.in_progress_seq,
        state.lease_holder,
        state.lease_expires_at,
        state.paused_side,
    )
    assert before <= state.created_at <= after
    assert state.created_at == state.updated_at == state.phase_entered_at
    (entry,) = store.journal(state)
    assert (1, Trigger.INIT, None, Phase.PREPARATION, 0, "committed", "alice", None, False) == (
        entry.seq,
        entry.trigger,
        entry.source,
        entry.dest,
        entry.percent,
        entry.status,
        entry.actor,
        entry.reason,
        entry.forced,
    )
    assert ([], [], [], None, None) == (
        entry.guards,
        entry.takeovers,
        entry.steps,
        entry.error,
        entry.prev_hash,
    )
    assert (socket.gethostname(), os.getpid()) == (entry.host, entry.pid)
    assert entry.started_at == entry.finished_at == state.created_at
    assert entry.hash == state.head_hash == chain_hash(None, NAME, entry)


def test_a_migration_name_has_1_to_200_characters(store: Journal) -> None:
    assert "x" * 200 == store.create("x" * 200, "alice").name
    store.create("y", "alice")
    for name in ("", "z" * 201):
        with pytest.raises(BadInput) as info:
            store.create(name, "alice")
        assert f"a migration name has 1 to 200 characters, not {len(name)}" == str(info.value)
    assert ["x" * 200, "y"] == store.names()


def test_create_of_an_existing_migration_is_bad_input(store: Journal) -> None:
    store.create(NAME, "alice")
    with pytest.raises(BadInput) as info:
        store.create(NAME, "bob")
    assert f"migration '{NAME}' already exists (phase preparation): nothing to do" == str(info.value)


def test_names_are_sorted(store: Journal) -> None:
    for name in ("b", "c", "a"):
        store.create(name, "alice")
    assert ["a", "b", "c"] == store.names()


def test_an_unknown_migration_says_how_to_create_it(store: Journal, upgraded_url: str) -> None:
    with pytest.raises(UnknownMigration) as info:
        store.get("nope")
    where = safe_url(upgraded_url)  # the database's URL, not whatever the journal holds
    assert f"no migration named 'nope' in {where}: run `migration-fsm init -m nope`" == str(info.value)


def test_append_refused_chains_a_refused_row_and_moves_only_last_seq(store: Journal) -> None:
    seen = store.create(NAME, "alice")
    row = store.append_refused(seen, _intent())
    state = store.get(NAME)
    assert (2, "refused", seen.head_hash) == (row.seq, row.status, row.prev_hash)
    assert row.hash == chain_hash(seen.head_hash, NAME, row) == state.head_hash
    assert (2, seen.version, seen.phase, None) == (
        state.last_seq,
        state.version,
        state.phase,
        state.in_progress_seq,
    )
    stored = store.journal(state)[1]
    assert stored == row
    assert ("bob", "go", True, [{"name": "g", "passed": False, "detail": "no"}], "other-host", 7) == (
        stored.actor,
        stored.reason,
        stored.forced,
        stored.guards,
        stored.host,
        stored.pid,
    )


def test_append_refused_from_a_stale_state_writes_nothing(store: Journal) -> None:
    seen = store.create(NAME, "alice")
    store.append_refused(seen, _intent())
    with pytest.raises(ConcurrentChange, match=r"changed while this command ran"):
        store.append_refused(seen, _intent())
    assert [1, 2] == [entry.seq for entry in store.journal(store.get(NAME))]


def test_claim_writes_the_lease_the_intent_and_the_pending_steps(store: Journal) -> None:
    seen = store.create(NAME, "alice")
    before = utcnow()
    lease, entry = store.claim(seen, _intent(), [("a", None), ("b", "undo_b")], "bob [h:2]", 90)
    after = utcnow()
    state = store.get(NAME)
    assert (2, 2, "bob [h:2]", seen.version) == (
        state.last_seq,
        state.in_progress_seq,
        state.lease_holder,
        state.version,
    )
    assert state.lease_expires_at is not None
    assert before + timedelta(seconds=90) <= state.lease_expires_at <= after + timedelta(seconds=90)
    assert before <= state.updated_at <= after
    assert (2, "intent") == (entry.seq, entry.status)
    assert (state.id, 2, "bob [h:2]") == (lease.migration_id, lease.seq, lease.holder)
    stored = store.entry(state, 2)
    assert [(0, "a", None, "pending", 0, None, None), (1, "b", "undo_b", "pending", 0, None, None)] == [
        (s.position, s.name, s.undo, s.status, s.attempts, s.checkpoint, s.started_at) for s in stored.steps
    ]
    assert stored.steps == entry.steps
    assert ("intent", None, seen.head_hash is not None) == (stored.status, stored.hash, True)


def test_claim_without_steps_writes_none(store: Journal) -> None:
    seen = store.create(NAME, "alice")
    _, entry = store.claim(seen, _intent(), [], "bob [h:2]", 30)
    assert [] == entry.steps == store.entry(store.get(NAME), 2).steps


def test_take_over_moves_the_lease_and_records_the_takeover(store: Journal) -> None:
    seen = store.create(NAME, "alice")
    lease, _ = store.claim(seen, _intent(), [("a", None)], "bob [h:2]", 30)
    lease.release("step a failed")
    released = store.get(NAME)
    assert released.lease_holder is None
    before = utcnow()
    first = store.take_over(released, "carol [h:3]", 60, {"command": "resume", "from": None})
    state = store.get(NAME)
    assert ("carol [h:3]", 2, 2) == (state.lease_holder, first.seq, state.in_progress_seq)
    assert state.lease_expires_at is not None
    assert state.lease_expires_at >= before + timedelta(seconds=60)
    assert state.updated_at >= before
    second = store.take_over(state, "dave [h:4]", 60, {"command": "resume", "from": "carol [h:3]"})
    assert "dave [h:4]" == store.get(NAME).lease_holder == second.holder
    assert [{"command": "resume", "from": None}, {"command": "resume", "from": "carol [h:3]"}] == store.entry(
        state, 2
    ).takeovers


def test_take_over_with_nothing_in_progress_is_a_concurrent_change(store: Journal) -> None:
    state = store.create(NAME, "alice")
    with pytest.raises(ConcurrentChange, match=r"changed while this command ran"):
        store.take_over(state, "carol [h:3]", 60, {"command": "resume"})
    assert store.get(NAME) == state


def test_take_over_from_a_holder_that_is_no_longer_there_is_refused(store: Journal) -> None:
    """The row's holder is None (released): a take-over that saw a holder loses."""
    seen = store.create(NAME, "alice")
    lease, _ = store.claim(seen, _intent(), [], "bob [h:2]", 30)
    held = store.get(NAME)
    lease.release("boom")
    with pytest.raises(TransitionInterrupted, match=r"interrupted transition #2"):
        store.take_over(held, "carol [h:3]", 60, {"command": "resume"})
    assert [] == store.entry(held, 2).takeovers


def test_a_missing_row_in_progress_is_journal_corrupt(store: Journal) -> None:
    state = store.create(NAME, "alice")
    with pytest.raises(JournalCorrupt) as info:
        store.entry(state, 5)
    assert (
        f"journal of migration '{NAME}' does not verify: row #5, the transition in progress, is"
        " missing: restore the database from a backup"
    ) == str(info.value)


def test_journal_without_steps_reads_no_steps(store: Journal) -> None:
    seen = store.create(NAME, "alice")
    store.claim(seen, _intent(), [("a", None)], "bob [h:2]", 30)
    state = store.get(NAME)
    assert [[], []] == [entry.steps for entry in store.journal(state, with_steps=False)]
    assert [[], ["a"]] == [[s.name for s in entry.steps] for entry in store.journal(state)]
    with store.transaction() as conn:
        conn.execute(update(steps_table).values(status="bogus"))
    assert 2 == len(store.journal(state, with_steps=False))
    with pytest.raises(JournalCorrupt, match=r"step 0 of row #2 does not decode"):
        store.journal(state)


def test_a_migration_row_altered_outside_is_journal_corrupt(store: Journal) -> None:
    store.create(NAME, "alice")
    with store.transaction() as conn:
        conn.execute(update(migrations_table).values(phase="bogus"))
    with pytest.raises(JournalCorrupt) as info:
        store.get(NAME)
    assert str(info.value).startswith(
        f"journal of migration '{NAME}' does not verify: the migration row of '{NAME}' does not decode"
        " (ValueError: 'bogus' is not a valid Phase)"
    )


def test_a_unique_key_violated_is_a_concurrent_change(store: Journal) -> None:
    store.create(NAME, "alice")
    with pytest.raises(ConcurrentChange) as info, store.transaction() as conn:
        conn.execute(
            insert(migrations_table).values(
                name=NAME,
                phase="preparation",
                percent=0,
                version=1,
                last_seq=1,
                phase_entered_at=T0,
                created_at=T0,
                updated_at=T0,
            )
        )
    assert "another operator changed this migration at the same moment: run `status` and retry" == str(
        info.value
    )


# -- the data fence ----------------------------------------------------------------------------


@pytest.mark.parametrize("hold", [True, False])
def test_the_data_fence_yields_the_state_it_checked(store: Journal, hold: bool) -> None:
    state = store.create(NAME, "alice")
    with store.data_fence(NAME, "tool [h:1]", tool="backfill", version=1, hold=hold) as fenced:
        assert fenced == state


@pytest.mark.parametrize("hold", [True, False])
def test_the_data_fence_refuses_a_transition_in_progress_or_a_new_version(store: Journal, hold: bool) -> None:
    seen = store.create(NAME, "alice")
    lease, _ = store.claim(seen, _intent(), [], "bob [h:2]", 30)
    with (
        pytest.raises(TransitionInterrupted) as interrupted,
        store.data_fence(NAME, "tool [h:1]", tool="backfill", version=1, hold=hold),
    ):
        pytest.fail("the fence let the tool write")
    assert (
        f"migration '{NAME}' has transition #2 in progress or interrupted: backfill writes nothing"
        " until it is committed (`resume`) or aborted"
    ) == str(interrupted.value)
    lease.commit()
    with (
        pytest.raises(ConcurrentChange) as changed,
        store.data_fence(NAME, "tool [h:1]", tool="validate", version=1, hold=hold),
    ):
        pytest.fail("the fence let the tool write")
    assert (
        f"migration '{NAME}' changed while validate ran (version 1 -> 2, now dual_write at 0%):"
        " validate stopped before its next batch; check `status` and run it again if it still applies"
    ) == str(changed.value)


def test_the_held_data_fence_holds_off_a_claim_on_sqlite(tmp_path: Path) -> None:
    """On SQLite the fence is a write transaction: a claim made meanwhile waits, here until its
    busy timeout, and says the database stayed locked."""
    url = f"sqlite:///{tmp_path / 'fence.db'}"
    with Journal(url, engine=make_engine(url, create=True)) as store:
        store.upgrade()
        seen = store.create(NAME, "alice")
        with Journal(url, engine=make_engine(url, timeout_seconds=0.05)) as other:
            with store.data_fence(NAME, "tool [h:1]", tool="backfill", version=1) as fenced:
                assert fenced == seen
                with pytest.raises(LeaseHeld) as info:
                    other.claim(seen, _intent(), [], "bob [h:2]", 30)
                assert info.value.holder is None
                assert f"database {other.safe_url} stayed locked by another operator's command: retry" == str(
                    info.value
                )
                # a read is not held off: it does not take the write lock
                assert other.get(NAME) == seen
                assert [NAME] == other.names()
                assert [1] == [entry.seq for entry in other.journal(seen)]
                assert 1 == other.entry(seen, 1).seq
                assert head_revisions() == other.current_revisions()
            with store.data_fence(NAME, "tool [h:1]", tool="backfill", version=1, hold=False):
                other.claim(seen, _intent(), [], "bob [h:2]", 30)


# -- the schema --------------------------------------------------------------------------


def test_a_database_without_a_schema_says_db_upgrade(db_url: str) -> None:
    store = Journal(db_url, engine=make_engine(db_url, create=True))
    head = ", ".join(sorted(head_revisions()))
    with pytest.raises(SchemaNotCurrent) as info:
        store.check_schema()
    assert (
        f"database {store.safe_url} is at no schema, expected {head}: run `migration-fsm db upgrade`"
        == str(info.value)
    )
    assert (set(), head_revisions()) == store.upgrade()
    assert (head_revisions(), head_revisions()) == store.upgrade()
    store.check_schema()
    store.close()


def test_a_schema_a_newer_version_wrote_is_refused_by_name(upgraded_url: str) -> None:
    with Journal(upgraded_url) as store:
        with store.transaction() as conn:
            conn.execute(text("UPDATE alembic_version SET version_num = '9999'"))
        head = ", ".join(sorted(head_revisions()))
        for call in (store.check_schema, store.upgrade):
            with pytest.raises(SchemaNotCurrent) as info:
                call()
            assert (
                f"database {store.safe_url} is at revision 9999, which this version of migration-fsm"
                f" does not know (it expects {head}): a newer migration-fsm wrote it; run that version"
                " (never downgrade the schema by hand)"
            ) == str(info.value)
        assert {"9999"} == store.current_revisions()


def test_tables_without_a_revision_are_refused(upgraded_url: str) -> None:
    with Journal(upgraded_url) as store:
        with store.transaction() as conn:
            conn.execute(text("DROP TABLE alembic_version"))
        with pytest.raises(SchemaNotCurrent) as info:
            Journal.open(upgraded_url)
        assert str(info.value).startswith(f"database {store.safe_url} holds migration-fsm tables (mfsm_")
        assert str(info.value).endswith(
            ", ...) but no schema revision (its alembic_version table is missing): restore the"
            " database from a backup; `db upgrade` would not know what it holds"
        )
        tables = str(info.value).split("(", 1)[1].split(", ...)")[0].split(", ")
        assert 3 == len(tables)
        assert tables == sorted(tables)


def test_a_database_at_two_unknown_revisions_names_both(upgraded_url: str) -> None:
    with Journal(upgraded_url) as store:
        with store.transaction() as conn:
            conn.execute(text("UPDATE alembic_version SET version_num = '9999'"))
            conn.execute(text("INSERT INTO alembic_version (version_num) VALUES ('9998')"))
        with pytest.raises(SchemaNotCurrent) as info:
            store.check_schema()
        assert str(info.value).startswith(f"database {store.safe_url} is at revision 9998, 9999, which this")


def test_tables_without_a_revision_are_refused_while_another_command_holds_the_write_lock(
    tmp_path: Path,
) -> None:
    """The check reads the tables' names without taking SQLite's write lock: another
    command's write transaction does not turn the refusal into "database is locked"."""
    import sqlite3

    path = tmp_path / "lost.db"
    url = f"sqlite:///{path}"
    with Journal(url, engine=make_engine(url, create=True)) as store:
        store.upgrade()
        with store.transaction() as conn:
            conn.execute(text("DROP TABLE alembic_version"))
    writer = sqlite3.connect(path, isolation_level=None)
    writer.execute("BEGIN IMMEDIATE")
    try:
        with (
            Journal(url, engine=make_engine(url, timeout_seconds=0.05)) as other,
            pytest.raises(SchemaNotCurrent, match="holds migration-fsm tables"),
        ):
            other.check_schema()
    finally:
        writer.execute("ROLLBACK")
        writer.close()


def test_a_readonly_journal_writes_nothing(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'ro.db'}"
    with Journal(url, engine=make_engine(url, create=True)) as store:
        store.upgrade()
        store.create(NAME, "alice")
    with Journal.open(url, readonly=True) as readonly:
        assert NAME == readonly.get(NAME).name
        with pytest.raises(DatabaseUnavailable) as info:
            readonly.create("other", "alice")
        assert f"database {readonly.safe_url} is unavailable: attempt to write a readonly database" == str(
            info.value
        )


# -- who holds what (locks.py) and where the revisions are (revisions.py) -----------------------


def test_a_lease_holder_is_named_by_actor_host_and_process() -> None:
    assert f"alice [{socket.gethostname()}:{os.getpid()}]" == lease_holder_name("alice")


def test_the_advisory_lock_keys_are_pinned() -> None:
    """Two versions of migration-fsm running at once must take the same lock for a migration:
    the keys never change (a CRC-32 of the UTF-8 name, made a non-negative 32-bit key)."""
    assert {"c": 0x6D66736D, "k": 1697644014} == lock_params("orders")
    assert {"c": 0x6D66736D, "k": 235179326} == lock_params("é")


def test_the_revisions_of_an_installed_package_are_inside_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "_migrations").mkdir()
    (tmp_path / "_migrations" / "env.py").write_text("", encoding="utf-8")
    monkeypatch.setattr(importlib.resources, "files", lambda package: tmp_path)
    assert tmp_path / "_migrations" == revisions.migrations_dir()
    (tmp_path / "_migrations").rename(tmp_path / "elsewhere")
    (tmp_path / "_migrations").mkdir()  # no env.py: not the revisions
    assert revisions.migrations_dir() == Path(revisions.__file__).resolve().parents[2] / "migrations"


def test_alembic_config_keeps_a_percent_in_the_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(revisions, "migrations_dir", lambda: tmp_path / "100%")
    assert str(tmp_path / "100%") == revisions.alembic_config().get_main_option("script_location")


def test_the_head_is_one_of_the_known_revisions() -> None:
    assert {"0007"} <= revisions.known_revisions()
    assert {"0001", "0004", "0007"} <= revisions.known_revisions()
    assert 1 == len(revisions.head_revisions())
    assert revisions.head_revisions() < revisions.known_revisions()


def test_one_entry_reads_its_own_steps_only(store: Journal) -> None:
    """`entry(seq)` decodes the steps of row `seq` alone: a step of another row altered
    outside migration-fsm does not make it fail."""
    seen = store.create(NAME, "alice")
    lease, _ = store.claim(seen, _intent(), [("a", None)], "bob [h:2]", 30)
    lease.commit()
    state = store.get(NAME)
    again = replace(_intent(), source=Phase.DUAL_WRITE, dest=Phase.CUTOVER)
    store.claim(state, again, [("b", None), ("c", None)], "bob [h:2]", 30)
    with store.transaction() as conn:
        conn.execute(update(steps_table).where(steps_table.c.seq == 2).values(status="bogus"))
    assert ["b", "c"] == [step.name for step in store.entry(state, 3).steps]
    with pytest.raises(
        JournalCorrupt, match=rf"^journal of migration '{NAME}' does not verify: step 0 of row #2"
    ):
        store.entry(state, 2)


def test_a_refusal_writes_its_own_migration_only(store: Journal) -> None:
    seen = store.create(NAME, "alice")
    other = store.create("other", "alice")
    store.append_refused(seen, _intent())
    assert other == store.get("other")
    assert [1] == [entry.seq for entry in store.journal(other)]


def test_a_refusal_is_not_journaled_inside_a_transition_in_progress(store: Journal) -> None:
    seen = store.create(NAME, "alice")
    store.claim(seen, _intent(), [], "bob [h:2]", 30)
    during = store.get(NAME)
    with pytest.raises(LeaseHeld, match=r"transition #2 is held by bob \[h:2\]"):
        store.append_refused(during, _intent())
    assert during == store.get(NAME)
    assert [1, 2] == [entry.seq for entry in store.journal(during)]


def test_a_take_over_moves_its_own_migration_only(store: Journal) -> None:
    for name in (NAME, "other"):
        lease, _ = store.claim(store.create(name, "alice"), _intent(), [], "bob [h:2]", 30)
        lease.release("boom")
    other = store.get("other")
    store.take_over(store.get(NAME), "carol [h:3]", 60, {"command": "resume"})
    assert "carol [h:3]" == store.get(NAME).lease_holder
    assert other == store.get("other")
    assert [] == store.entry(other, 2).takeovers


def test_a_take_over_of_a_transition_that_ended_is_refused(store: Journal) -> None:
    """Seen at transition #2 (released); #2 was resumed and committed and #3 began and was
    released meanwhile: the take-over must not take #3 (nor record itself on #2)."""
    lease, _ = store.claim(store.create(NAME, "alice"), _intent(), [], "bob [h:2]", 30)
    lease.release("boom")
    stale = store.get(NAME)
    store.take_over(stale, "carol [h:3]", 60, {"command": "resume"}).commit()
    again = replace(_intent(), source=Phase.DUAL_WRITE, dest=Phase.CUTOVER)
    third, _ = store.claim(store.get(NAME), again, [], "dave [h:4]", 30)
    third.release("boom")
    before = store.get(NAME)
    with pytest.raises(TransitionInterrupted, match=r"interrupted transition #3"):
        store.take_over(stale, "erin [h:5]", 60, {"command": "resume"})
    assert before == store.get(NAME)
    assert [[], [{"command": "resume"}], []] == [entry.takeovers for entry in store.journal(before)]


def test_a_state_seen_during_a_transition_is_stale_once_it_commits(store: Journal) -> None:
    """The commit moves `version` but not `last_seq`: a claim or a refusal from the state seen
    while the transition was in progress loses its compare-and-set on the version."""
    lease, _ = store.claim(store.create(NAME, "alice"), _intent(), [], "bob [h:2]", 30)
    during = store.get(NAME)
    committed = lease.commit()
    assert (during.last_seq, during.version + 1, None) == (
        committed.last_seq,
        committed.version,
        committed.in_progress_seq,
    )
    again = replace(_intent(), source=Phase.DUAL_WRITE, dest=Phase.CUTOVER)
    for write in (
        lambda: store.claim(during, again, [], "carol [h:3]", 30),
        lambda: store.append_refused(during, again),
    ):
        with pytest.raises(ConcurrentChange, match=r"version 1 -> 2"):
            write()
    assert committed == store.get(NAME)


def test_a_claim_writes_its_own_migration_only_and_journals_intent(store: Journal) -> None:
    seen = store.create(NAME, "alice")
    other = store.create("other", "alice")
    _, entry = store.claim(seen, replace(_intent(), status="committed"), [("a", None)], "bob [h:2]", 30)
    assert "intent" == entry.status == store.entry(store.get(NAME), 2).status
    assert other == store.get("other")
    assert [1] == [row.seq for row in store.journal(other)]


def test_the_paused_side_reads_back(store: Journal) -> None:
    lease, _ = store.claim(store.create(NAME, "alice"), _intent(), [], "bob [h:2]", 30)
    assert store.get(NAME).paused_side is None
    lease.pause("old")
    assert "old" == store.get(NAME).paused_side
    lease.lift()
    assert store.get(NAME).paused_side is None


# -- the PostgreSQL advisory lock (locks.py): who holds it, and `resume --steal` ----------------

pg_only = pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
HELD = (
    "migration 'orders' is being changed by {} right now (PostgreSQL advisory lock held): wait for"
    " that command to finish, or if it hangs, run `migration-fsm resume --steal`"
)


@pytest.fixture
def second(store: Journal, upgraded_url: str) -> Iterator[Journal]:
    """A second operator's journal on the same database (its own engine and connections)."""
    store.create(NAME, "alice")
    with Journal.open(upgraded_url) as other:
        yield other


# Advisory locks are per database: the other test workers' databases hold locks of the same keys.
_THIS_DATABASE = " AND database = (SELECT oid FROM pg_database WHERE datname = current_database())"


def _lock_holder_pids(store: Journal, name: str) -> list[int]:
    params = lock_params(name)
    with store.engine.connect() as conn:
        rows = conn.execute(
            text(
                "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND granted"
                " AND classid = :c AND objid = :k AND objsubid = 2" + _THIS_DATABASE
            ),
            params,
        )
        return [int(pid) for (pid,) in rows]


@pg_only
def test_an_upgrade_waits_while_another_holds_the_upgrade_lock(db_url: str) -> None:
    """Two `db upgrade`s at once queue up on PostgreSQL: while another transaction holds the
    upgrade's advisory lock (the database's, key 0 of our class), an upgrade waits for it, and
    it runs once that transaction ends."""
    store = Journal(db_url, engine=make_engine(db_url, create=True))
    done = threading.Event()
    results: list[tuple[set[str], set[str]]] = []

    def upgrade() -> None:
        try:
            results.append(store.upgrade())
        finally:
            done.set()

    waiting = "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted"
    waiting += " AND classid = :c AND objid = 0 AND objsubid = 2" + _THIS_DATABASE
    with store.engine.connect() as holder, store.engine.connect() as watcher:
        holder.execute(text("SELECT pg_advisory_xact_lock(:c, 0)"), {"c": LOCK_CLASS})
        thread = threading.Thread(target=upgrade)
        thread.start()
        seen = 0
        for _ in range(4000):  # until the upgrade waits or ends (bounded: a bug fails, never hangs)
            seen = watcher.execute(text(waiting), {"c": LOCK_CLASS}).scalar_one()
            watcher.rollback()
            if seen or done.wait(0.005):
                break
        assert seen == 1, "the upgrade did not wait for the lock"
        assert not done.is_set()
        holder.rollback()  # the lock goes with its transaction
        thread.join(timeout=60)
    assert results == [(set(), head_revisions())]
    store.close()


@pg_only
@pytest.mark.parametrize("fast", [True, False], ids=["psycopg-pipeline", "other-drivers"])
def test_a_held_postgresql_operator_lock_names_its_holder_until_released(
    store: Journal, second: Journal, fast: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While alice's command holds migration `orders`' lock, bob's is refused with her name
    (the lock's transaction carries it); another migration's lock is free; once her command
    ends, the lock is gone with its transaction and bob takes it. The same through the
    pipelined fast path (psycopg 3) and the plain one (other drivers)."""
    if not fast:
        monkeypatch.setattr(pgpath, "available", lambda engine: False)
    with store.operator_lock(NAME, "alice [h:1]"):
        with pytest.raises(LeaseHeld) as info, second.operator_lock(NAME, "bob [h:2]"):
            pass
        assert HELD.format("alice [h:1]") == str(info.value)
        assert "alice [h:1]" == info.value.holder
        with second.operator_lock("another", "bob [h:2]"):
            pass
        assert 1 == len(_lock_holder_pids(store, NAME))
    assert [] == _lock_holder_pids(store, NAME)
    with second.operator_lock(NAME, "bob [h:2]"):
        assert 1 == len(_lock_holder_pids(store, NAME))
    with store.engine.connect() as conn:  # the pooled connections hold no transaction
        idle = conn.execute(
            text(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
                " AND state LIKE 'idle in transaction%'"
            )
        ).scalar()
    assert 0 == idle


@pg_only
def test_a_lock_held_by_a_session_with_no_name_is_another_operator_s(
    store: Journal, second: Journal, upgraded_url: str
) -> None:
    """A session that took the lock without naming itself (by hand, or an older version)."""
    import psycopg

    conninfo = make_url(upgraded_url).set(drivername="postgresql").render_as_string(hide_password=False)
    with psycopg.connect(conninfo, application_name="") as raw:
        raw.execute("SELECT pg_advisory_xact_lock(%(c)s, %(k)s)", lock_params(NAME))
        with pytest.raises(LeaseHeld) as info, second.operator_lock(NAME, "bob [h:2]"):
            pass
    assert (HELD.format("another operator"), "another operator") == (str(info.value), info.value.holder)


@pg_only
def test_a_holder_s_long_name_is_cut_to_what_postgresql_keeps(store: Journal, second: Journal) -> None:
    """The lock's transaction names its holder in `application_name` (63 bytes at most, with
    the prefix `migration-fsm `): a refused operator sees the name cut there."""
    holder = "a" * 30 + " [" + "h" * 30 + ":1]"
    with (
        store.operator_lock(NAME, holder),
        pytest.raises(LeaseHeld) as info,
        second.operator_lock(NAME, "bob [h:2]"),
    ):
        pass
    assert holder[:49] == info.value.holder


@pg_only
def test_steal_ends_the_holder_s_session_and_takes_the_lock(store: Journal, second: Journal) -> None:
    """`resume --steal`: the session that holds the lock (a hung operator) is terminated,
    which ends its transaction and its lock, and the stealer holds it; the old holder's
    command ends without an error of its own (its lock is simply gone)."""
    with store.operator_lock(NAME, "alice [h:1]"):
        (alice,) = _lock_holder_pids(store, NAME)
        with second.operator_lock(NAME, "bob [h:2]", steal=True):
            (bob,) = _lock_holder_pids(second, NAME)
            assert alice != bob
            with pytest.raises(LeaseHeld) as info, store.operator_lock(NAME, "carol [h:3]"):
                pass
            assert "bob [h:2]" == info.value.holder
    with store.engine.connect() as conn:
        gone = conn.execute(
            text("SELECT count(*) FROM pg_stat_activity WHERE pid = :p"), {"p": alice}
        ).scalar()
    assert 0 == gone


@pg_only
def test_a_steal_that_cannot_end_the_holder_s_session_gives_up_after_10_seconds(
    store: Journal, second: Journal, monkeypatch: pytest.MonkeyPatch
) -> None:
    """When terminating the holder does not free the lock (a session the stealer may not end),
    the stealer tries again every 50 ms for 10 s (a test clock), then gives up naming who holds
    it and what to ask for."""
    from sqlalchemy import event

    from migration_fsm.journal import locks

    clock = FakeClock()
    monkeypatch.setattr(locks, "time", clock)
    tries: list[str] = []

    def no_terminate(_c: Any, _cur: Any, statement: str, params: Any, _ctx: Any, _many: bool) -> Any:
        if "pg_terminate_backend" in statement:
            statement = "SELECT %(pid)s IS NULL"
        if "pg_try_advisory_xact_lock" in statement:
            tries.append(statement)
        return statement, params

    event.listen(second.engine, "before_cursor_execute", no_terminate, retval=True)
    with store.operator_lock(NAME, "alice [h:1]"):
        with pytest.raises(LeaseHeld) as info, second.operator_lock(NAME, "bob [h:2]", steal=True):
            pass
        assert 1 == len(_lock_holder_pids(store, NAME))
    assert (
        "migration 'orders': could not end the session of alice [h:1] that holds the PostgreSQL"
        " advisory lock: ask a database administrator to terminate it"
    ) == str(info.value)
    assert "alice [h:1]" == info.value.holder
    assert {0.05} == set(clock.slept)
    assert 10.0 <= clock.now - 1000.0 < 10.05
    assert len(clock.slept) + 1 == len(tries)


@pg_only
@pytest.mark.parametrize("fast", [True, False], ids=["psycopg-pipeline", "other-drivers"])
def test_the_lock_s_connection_ends_its_transaction_and_serves_the_next_command(
    store: Journal, second: Journal, fast: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The end of a command rolls the lock's transaction back (nothing was written in it) and
    gives its connection back to the pool: the next command's lock is taken on the same
    server session, not on a new connection."""
    if not fast:
        monkeypatch.setattr(pgpath, "available", lambda engine: False)
    sessions = []
    for _ in range(2):
        with second.operator_lock(NAME, "bob [h:2]"):
            sessions += _lock_holder_pids(store, NAME)
    assert 2 == len(sessions)
    assert sessions[0] == sessions[1]
