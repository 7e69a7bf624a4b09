"""The migration database as one object: transactions, schema checks, reads, and the writes
that start a transition (create, refuse, claim, take over). Steps, checkpoints and the commit
go through the `Lease` that `claim` and `take_over` return.

Every change to the migration row is a compare-and-set (`UPDATE ... WHERE version = :seen`
or `WHERE in_progress_seq = :seq AND lease_holder = :me`) checked by its rowcount.
Transactions are short: no transaction is held open while a step runs.

Longer than the house's ~500 lines: it is the one object the other layers use for the
migration database, and splitting its reads from its writes would split each compare-and-set
from the read that explains why it missed (`_conflict`). The PostgreSQL hot path of a
transition lives in `pgpath`, the decision of a close in `closing`.
"""

from __future__ import annotations

import os
import socket
import threading
from contextlib import contextmanager
from datetime import timedelta
from typing import TYPE_CHECKING, Any, Final

from sqlalchemy import Connection, Engine, and_, insert, or_, select, text, update
from sqlalchemy.exc import DBAPIError, IntegrityError

from ..exceptions import (
    BadInput,
    ConcurrentChange,
    Conflict,
    DatabaseUnavailable,
    JournalCorrupt,
    LeaseHeld,
    SchemaNotCurrent,
    TransitionInterrupted,
    UnknownMigration,
)
from ..fsm import EntryStatus, Phase, StepStatus, Trigger
from . import locks, pgpath
from .chain import chain_hash
from .db import make_engine, redact_text, safe_url, scrub, utcnow
from .lease import Lease, conflict
from .outbox import emit, emit_known
from .records import (
    UNDECODABLE,
    JournalEntry,
    MigrationState,
    StepRecord,
    corrupt_rows,
    decode_rows,
    entry_from_row,
    entry_values,
    migration_from_row,
    read_with_hold,
    replace,
    step_from_row,
    undecodable,
)
from .revisions import alembic_config, head_revisions, known_revisions
from .schema import journal_table, migrations_table, steps_table

if TYPE_CHECKING:
    from collections.abc import Iterator, Sequence


class Journal:
    """The migration database: migrations, journal and steps. Thread-safe."""

    def __init__(self, url: str, *, engine: Engine | None = None) -> None:
        self.url = url
        self.safe_url = safe_url(url)
        self.engine = engine or make_engine(url)
        # What `operator_lock` read right after it was granted, for this thread's next `get`.
        self._found = threading.local()

    @classmethod
    def open(cls, url: str, *, readonly: bool = False) -> Journal:
        """Open an existing database whose schema is at the Alembic head (else exit 4); with
        `readonly`, a SQLite file is opened read-only (`make_engine(readonly=True)`): for the
        commands that only read (`status`, `history`, `verify`)."""
        store = cls(url, engine=make_engine(url, readonly=True)) if readonly else cls(url)
        try:
            store.check_schema()
        except BaseException:
            store.close()
            raise
        return store

    @property
    def dialect(self) -> str:
        return self.engine.dialect.name

    def close(self) -> None:
        self.engine.dispose()

    def __enter__(self) -> Journal:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- plumbing ---------------------------------------------------------------------

    def _unavailable(self, exc: DBAPIError) -> DatabaseUnavailable:
        return DatabaseUnavailable(
            f"database {self.safe_url} is unavailable: {scrub(str(exc.orig or exc), self.url)}"
        )

    def driver_error(self, exc: Exception) -> ConcurrentChange | DatabaseUnavailable:
        """A driver's error (wrapped by SQLAlchemy or psycopg's own, `pgpath`) as `transaction`
        says it: a broken constraint is a concurrent change, anything else unavailability."""
        orig = exc.orig if isinstance(exc, DBAPIError) else exc
        if isinstance(exc, IntegrityError) or str(getattr(orig, "sqlstate", "") or "").startswith("23"):
            return ConcurrentChange(_CONCURRENT)
        return DatabaseUnavailable(
            f"database {self.safe_url} is unavailable: {scrub(str(orig or exc), self.url)}"
        )

    @contextmanager
    def transaction(self, *, readonly: bool = False) -> Iterator[Connection]:
        """One short transaction; driver errors become our errors. On SQLite a write
        transaction takes the write lock up front (`BEGIN IMMEDIATE`), a read-only one does not."""
        try:
            with self.engine.connect() as conn:
                if readonly:
                    conn.execution_options(mfsm_readonly=True)
                with conn.begin():
                    yield conn
        except IntegrityError as exc:
            raise ConcurrentChange(_CONCURRENT) from exc
        except DBAPIError as exc:
            if "locked" in str(exc.orig):
                raise LeaseHeld(
                    f"database {self.safe_url} stayed locked by another operator's command: retry"
                ) from exc
            raise self._unavailable(exc) from exc

    # -- schema -----------------------------------------------------------------------

    def current_revisions(self) -> set[str]:
        """The Alembic revision(s) the database is at (empty when it has no schema)."""
        from alembic.runtime.migration import MigrationContext

        with self.transaction(readonly=True) as conn:
            return set(MigrationContext.configure(conn).get_current_heads())

    def check_schema(self) -> None:
        """Raise `SchemaNotCurrent` unless the schema is at the Alembic head."""
        current, head = self.current_revisions(), head_revisions()
        if current != head:
            self._check_upgradable(current)
            at = ", ".join(sorted(current)) or "no schema"
            raise SchemaNotCurrent(
                f"database {self.safe_url} is at {at}, expected {', '.join(sorted(head))}:"
                " run `migration-fsm db upgrade`"
            )

    def _check_upgradable(self, current: set[str]) -> None:
        """`SchemaNotCurrent` when `db upgrade` cannot help: the database is at a revision this
        version does not know (a newer migration-fsm wrote it), or it holds our tables with no
        revision recorded (its `alembic_version` table was lost or never written)."""
        unknown = current - known_revisions()
        if unknown:
            raise SchemaNotCurrent(
                f"database {self.safe_url} is at revision {', '.join(sorted(unknown))}, which this"
                f" version of migration-fsm does not know (it expects {', '.join(sorted(head_revisions()))}):"
                " a newer migration-fsm wrote it; run that version (never downgrade the schema by hand)"
            )
        if not current:
            from sqlalchemy import inspect

            with self.transaction(readonly=True) as conn:
                ours = sorted(name for name in inspect(conn).get_table_names() if name.startswith("mfsm_"))
            if ours:
                raise SchemaNotCurrent(
                    f"database {self.safe_url} holds migration-fsm tables ({', '.join(ours[:3])}, ...)"
                    " but no schema revision (its alembic_version table is missing): restore the"
                    " database from a backup; `db upgrade` would not know what it holds"
                )

    def upgrade(self) -> tuple[set[str], set[str]]:
        """Create or upgrade the schema to the Alembic head; returns (before, after)."""
        from alembic import command

        before = self.current_revisions()
        self._check_upgradable(before)
        cfg = alembic_config()
        with self.transaction() as conn:
            if self.dialect == "postgresql":  # two concurrent upgrades queue up
                conn.execute(text("SELECT pg_advisory_xact_lock(:c, 0)"), {"c": locks.LOCK_CLASS})
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, "head")
        return before, self.current_revisions()

    # -- operator lock (PostgreSQL) -----------------------------------------------------

    @contextmanager
    def operator_lock(self, name: str, holder: str, *, steal: bool = False) -> Iterator[None]:
        """Hold an advisory lock on PostgreSQL for the duration of a command, so two commands
        never interleave and a dead operator's lock vanishes with its connection.
        With `steal` (`resume --steal`), a session that still holds the lock (a hung
        operator) is terminated first, so its command cannot write any more.
        The lock is transaction-scoped, held by a transaction of its own that stays open
        (idle, writing nothing) until the command ends: a transaction keeps its server
        connection in every pool mode, so this works behind PgBouncer in transaction pooling
        too (`locks`; the command's other statements run in transactions of their own).
        On SQLite the `BEGIN IMMEDIATE` transactions and the lease are enough."""
        if self.dialect != "postgresql":
            self._remember(name)
            try:
                yield
            finally:
                self._found.__dict__.clear()
            return
        fast = pgpath.available(self.engine)
        try:
            if fast:  # BEGIN, the try-lock and the read in one round trip (`pgpath`)
                conn = self.engine.connect().execution_options(isolation_level="AUTOCOMMIT")
            else:  # READ COMMITTED: between its statements the transaction holds no snapshot.
                conn = self.engine.connect().execution_options(isolation_level="READ COMMITTED")
                conn.begin()
        except DBAPIError as exc:
            raise self._unavailable(exc) from exc
        try:
            self._acquire(conn, name, holder, steal=steal, fast=fast)
        except Exception as exc:
            self._found.__dict__.clear()
            if not isinstance(exc, DBAPIError) and type(exc).__module__.split(".")[0] != "psycopg":
                conn.close()
                raise
            conn.invalidate()
            conn.close()
            raise self.driver_error(exc) from exc
        except BaseException:
            self._found.__dict__.clear()
            conn.invalidate()
            conn.close()
            raise
        try:
            yield
        finally:
            self._found.__dict__.clear()
            try:
                locks.release(conn)
            except Exception:  # noqa: BLE001 - a broken connection's transaction, and its lock, are gone
                conn.invalidate()
            conn.close()

    def _acquire(self, conn: Connection, name: str, holder: str, *, steal: bool, fast: bool) -> None:
        """Take migration `name`'s lock on `conn` (`locks.acquire`); on the fast path, try it
        first together with the read of the migration (`pgpath.lock_and_read`), whose result
        this thread's next `get` returns."""
        params = locks.lock_params(name)
        if fast:
            try_lock, values = locks.try_lock(holder, params)
            got, state, held = pgpath.lock_and_read(conn, try_lock, values, name)
            if got:
                if state is not None:
                    self._found.state, self._found.held = state, held
                return
        locks.acquire(conn, name, holder, params, steal=steal)

    def _remember(self, name: str) -> None:
        """SQLite: read migration `name` and whether a hold stands, in one read transaction,
        for this thread's next `get` (as `pgpath.lock_and_read` does on PostgreSQL)."""
        self._found.__dict__.clear()
        with self.transaction(readonly=True) as conn:
            row = conn.execute(read_with_hold(name)).mappings().first()
        if row is None:
            return
        values = dict(row)
        held = values.pop("held")
        try:
            self._found.state = migration_from_row(values)
        except UNDECODABLE:  # `get` reads it again and says what is wrong
            return
        self._found.held = None if held is None else bool(held)

    # -- reads ------------------------------------------------------------------------

    @contextmanager
    def data_fence(
        self, name: str, holder: str, *, tool: str, version: int, hold: bool = True
    ) -> Iterator[MigrationState]:
        """Hold off every transition of migration `name` while a data tool (`tool`) writes one
        batch, after checking that no transition is in progress or interrupted and that the
        migration is still at `version` (as the tool found it when it started).

        On PostgreSQL the operator lock (the same one every transition takes) is held for the
        batch; on SQLite a write transaction (`BEGIN IMMEDIATE`) on the migration database is,
        which a transition's claim waits for. With `hold=False` (a task store in the migration
        database's own SQLite file, which the held lock would block) the check is made and the
        lock released before the batch. Raises `TransitionInterrupted` or `ConcurrentChange`
        (exit 3) and the tool writes nothing more."""
        if self.dialect == "postgresql":
            with self.operator_lock(name, holder):
                yield self.check_data_fence(self.get(name), tool, version)
            return
        if not hold:
            yield self.check_data_fence(self.get(name), tool, version)
            return
        with self.transaction() as conn:
            yield self.check_data_fence(self._get(conn, name), tool, version)

    @staticmethod
    def check_data_fence(state: MigrationState, tool: str, version: int) -> MigrationState:
        """`state`, or the `data_fence` refusal when a transition is in progress or
        interrupted or the migration is no longer at `version`."""
        if state.in_progress_seq is not None:
            raise TransitionInterrupted(
                f"migration '{state.name}' has transition #{state.in_progress_seq} in progress or"
                f" interrupted: {tool} writes nothing until it is committed (`resume`) or aborted"
            )
        if state.version != version:
            raise ConcurrentChange(
                f"migration '{state.name}' changed while {tool} ran (version {version} -> {state.version},"
                f" now {state.phase} at {state.percent}%): {tool} stopped before its next batch;"
                " check `status` and run it again if it still applies"
            )
        return state

    def get(self, name: str) -> MigrationState:
        """The migration named `name`, or `UnknownMigration`. The first call inside
        `operator_lock` returns what the lock read right after it was granted (nothing can
        change the row between the two but a command holding the same lock)."""
        found: MigrationState | None = self._found.__dict__.pop("state", None)
        if found is not None and found.name == name:
            self._found.seen = found
            return found
        with self.transaction(readonly=True) as conn:
            return self._get(conn, name)

    def _get(self, conn: Connection, name: str) -> MigrationState:
        query = select(migrations_table).where(migrations_table.c.name == name)
        try:  # one query; a malformed timestamp raises while the row is fetched
            row = conn.execute(query).mappings().first()
            state = None if row is None else migration_from_row(row)
        except UNDECODABLE as exc:
            raise corrupt_rows(name, [undecodable(f"the migration row of '{name}'", exc)]) from exc
        if state is None:
            raise UnknownMigration(
                f"no migration named '{name}' in {self.safe_url}: run `migration-fsm init -m {name}`"
            )
        return state

    def names(self) -> list[str]:
        """Every migration in this database, by name."""
        with self.transaction(readonly=True) as conn:
            return list(
                conn.execute(select(migrations_table.c.name).order_by(migrations_table.c.name))
                .scalars()
                .all()
            )

    def journal(self, migration: MigrationState, *, with_steps: bool = True) -> list[JournalEntry]:
        """The journal, oldest first, with each entry's steps. A row altered outside
        migration-fsm so that it no longer decodes raises `JournalCorrupt` (exit 4) naming
        every such row."""
        entries, bad = self.decoded_journal(migration, with_steps=with_steps)
        if bad:
            raise corrupt_rows(migration.name, bad)
        return entries

    def decoded_journal(
        self, migration: MigrationState, *, with_steps: bool = True
    ) -> tuple[list[JournalEntry], list[str]]:
        """The journal rows that decode, oldest first, and a description of every journal or
        step row that does not (`verify` names them all)."""
        with self.transaction(readonly=True) as conn:
            return self._journal(conn, migration.id, None, with_steps=with_steps)

    def _journal(
        self, conn: Connection, migration_id: int, seq: int | None, *, with_steps: bool
    ) -> tuple[list[JournalEntry], list[str]]:
        """The journal rows of migration `migration_id` (only row `seq` when given), decoded."""
        rows = [journal_table.c.migration_id == migration_id]
        step_rows = [steps_table.c.migration_id == migration_id]
        if seq is not None:
            rows.append(journal_table.c.seq == seq)
            step_rows.append(steps_table.c.seq == seq)
        steps: dict[int, list[StepRecord]] = {}
        bad: list[str] = []
        if with_steps:
            decoded, bad = decode_rows(
                conn,
                steps_table,
                where=step_rows,
                keys=[steps_table.c.seq, steps_table.c.position],
                decode=lambda row: (row["seq"], step_from_row(row)),
                label=lambda key: f"step {key[1]} of row #{key[0]}",
            )
            for at, step in decoded:
                steps.setdefault(at, []).append(step)
        entries, bad_entries = decode_rows(
            conn,
            journal_table,
            where=rows,
            keys=[journal_table.c.seq],
            decode=lambda row: entry_from_row(row, steps.get(row["seq"], [])),
            label=lambda key: f"row #{key[0]}",
        )
        return entries, [*bad_entries, *bad]

    def entry(self, migration: MigrationState, seq: int) -> JournalEntry:
        """One journal entry with its steps."""
        with self.transaction(readonly=True) as conn:
            return self._entry(conn, migration.id, seq)

    def _entry(self, conn: Connection, migration_id: int, seq: int) -> JournalEntry:
        name = conn.execute(
            select(migrations_table.c.name).where(migrations_table.c.id == migration_id)
        ).scalar()
        entries, bad = self._journal(conn, migration_id, seq, with_steps=True)
        if bad:
            raise corrupt_rows(str(name), bad)
        if not entries:
            raise JournalCorrupt(
                f"journal of migration '{name}' does not verify: row #{seq}, the transition in"
                " progress, is missing: restore the database from a backup"
            )
        return entries[0]

    # -- writes -----------------------------------------------------------------------

    def create(self, name: str, actor: str) -> MigrationState:
        """Create `name` in `preparation` with its first journal row (trigger `init`)."""
        if not 1 <= len(name) <= 200:  # the column's width, checked here so every backend agrees
            raise BadInput(f"a migration name has 1 to 200 characters, not {len(name)}")
        now = utcnow()
        entry = JournalEntry(
            seq=1,
            trigger=Trigger.INIT,
            source=None,
            dest=Phase.PREPARATION,
            percent=0,
            status=EntryStatus.COMMITTED,
            actor=actor,
            reason=None,
            forced=False,
            guards=[],
            takeovers=[],
            started_at=now,
            finished_at=now,
            host=socket.gethostname(),
            pid=os.getpid(),
            error=None,
            prev_hash=None,
            hash=None,
        )
        digest = chain_hash(None, name, entry)
        with self.transaction() as conn:
            exists = conn.execute(
                select(migrations_table.c.phase).where(migrations_table.c.name == name)
            ).scalar()
            if exists is not None:
                raise BadInput(f"migration '{name}' already exists (phase {exists}): nothing to do")
            inserted = conn.execute(
                insert(migrations_table).values(
                    name=name,
                    phase=Phase.PREPARATION.value,
                    percent=0,
                    version=1,
                    last_seq=1,
                    head_hash=digest,
                    phase_entered_at=now,
                    created_at=now,
                    updated_at=now,
                )
            ).inserted_primary_key
            assert inserted is not None
            migration_id = inserted[0]
            conn.execute(
                insert(journal_table).values(migration_id=migration_id, **entry_values(entry), hash=digest)
            )
            emit(conn, migration_id, "init", 1)
            return self._get(conn, name)

    def append_refused(self, seen: MigrationState, entry: JournalEntry) -> JournalEntry:
        """Journal a guard's refusal; the phase, percent and version stay as they were."""
        return self._append_closed(seen, entry, EntryStatus.REFUSED)

    def append_approval(self, seen: MigrationState, entry: JournalEntry) -> JournalEntry:
        """Journal an operator's approval of the edge `entry` names; the phase, percent and
        version stay as they were."""
        return self._append_closed(seen, entry, EntryStatus.APPROVED)

    def append_hold(self, seen: MigrationState, entry: JournalEntry) -> JournalEntry | None:
        """Journal a hold (`watch`, `on_failure = "pause"`): `advance` and a ramp up are refused
        while it stands. None, and nothing written, when a hold stands already (another watch
        placed it): the check and the append are one transaction."""
        try:
            return self._append_closed(seen, entry, EntryStatus.HELD, unless_held=True)
        except _AlreadyHeld:
            return None

    def append_release(self, seen: MigrationState, entry: JournalEntry) -> JournalEntry:
        """Journal an operator's release of the standing hold."""
        return self._append_closed(seen, entry, EntryStatus.RELEASED)

    def standing_hold(self, migration: MigrationState) -> JournalEntry | None:
        """The hold row that stands (`held`, with no `released` row and no phase change after
        it), or None."""
        if self._found.__dict__.get("seen") == migration and self._found.__dict__.get("held") is False:
            return None  # `operator_lock` read that none stands, and the migration is as it read it
        with self.transaction(readonly=True) as conn:
            return self._standing_hold(conn, migration.id)

    def _standing_hold(self, conn: Connection, migration_id: int) -> JournalEntry | None:
        j = journal_table.c
        changed_phase = and_(
            j.status == EntryStatus.COMMITTED.value, or_(j.source.is_(None), j.source != j.dest)
        )
        row = (
            conn.execute(
                select(journal_table)
                .where(
                    j.migration_id == migration_id,
                    or_(j.status.in_([EntryStatus.HELD.value, EntryStatus.RELEASED.value]), changed_phase),
                )
                .order_by(j.seq.desc())
                .limit(1)
            )
            .mappings()
            .first()
        )
        if row is None or row["status"] != EntryStatus.HELD.value:
            return None
        return entry_from_row(row, [])

    def _append_closed(
        self, seen: MigrationState, entry: JournalEntry, status: EntryStatus, *, unless_held: bool = False
    ) -> JournalEntry:
        """Append a closed row that changes nothing but the journal (a compare-and-set on
        `seen`: no transition in progress, nothing else appended meanwhile)."""
        with self.transaction() as conn:
            if unless_held and self._standing_hold(conn, seen.id) is not None:
                raise _AlreadyHeld
            seq = seen.last_seq + 1
            entry = replace(entry, seq=seq, status=status, prev_hash=seen.head_hash)
            digest = chain_hash(seen.head_hash, seen.name, entry)
            updated = conn.execute(
                update(migrations_table)
                .where(
                    migrations_table.c.id == seen.id,
                    migrations_table.c.version == seen.version,
                    migrations_table.c.last_seq == seen.last_seq,
                    migrations_table.c.in_progress_seq.is_(None),
                )
                .values(last_seq=seq, head_hash=digest)
            ).rowcount
            if updated != 1:
                raise self._conflict(conn, seen)
            conn.execute(
                insert(journal_table).values(migration_id=seen.id, **entry_values(entry), hash=digest)
            )
            emit_known(conn, _CLOSED_KINDS.get(status, "refused"), seen, entry, [])
        return replace(entry, hash=digest)

    def claim(
        self,
        seen: MigrationState,
        entry: JournalEntry,
        steps: Sequence[tuple[str, str | None]],
        holder: str,
        lease_seconds: float,
    ) -> tuple[Lease, JournalEntry]:
        """Compare-and-set the migration row, take the lease, journal `intent` and the planned
        steps, all in one transaction. Returns our lease and the intent row; `Conflict` (and
        nothing written) if someone else won."""
        now = utcnow()
        seq = seen.last_seq + 1
        entry = replace(
            entry,
            seq=seq,
            status=EntryStatus.INTENT,
            steps=[
                StepRecord(position, name, undo, StepStatus.PENDING, 0, None, None, None, None)
                for position, (name, undo) in enumerate(steps)
            ],
        )
        if pgpath.available(self.engine):
            claimed = pgpath.claim(
                self, seen, entry, steps, holder=holder, lease_seconds=lease_seconds, now=now
            )
            if not claimed:
                with self.transaction(readonly=True) as conn:
                    raise self._conflict(conn, seen)
            return Lease(self, seen.id, seq, holder, lease_seconds), entry
        with self.transaction() as conn:
            updated = conn.execute(
                update(migrations_table)
                .where(
                    migrations_table.c.id == seen.id,
                    migrations_table.c.version == seen.version,
                    migrations_table.c.last_seq == seen.last_seq,
                    migrations_table.c.in_progress_seq.is_(None),
                )
                .values(
                    last_seq=seq,
                    in_progress_seq=seq,
                    lease_holder=holder,
                    lease_expires_at=now + timedelta(seconds=lease_seconds),
                    updated_at=now,
                )
            ).rowcount
            if updated != 1:
                raise self._conflict(conn, seen)
            conn.execute(insert(journal_table).values(migration_id=seen.id, **entry_values(entry)))
            if steps:
                conn.execute(
                    insert(steps_table),
                    [
                        {
                            "migration_id": seen.id,
                            "seq": seq,
                            "position": position,
                            "name": name,
                            "undo": undo,
                            "status": StepStatus.PENDING,
                            "attempts": 0,
                        }
                        for position, (name, undo) in enumerate(steps)
                    ],
                )
            emit_known(conn, "claimed", seen, entry, entry.steps)
        return Lease(self, seen.id, seq, holder, lease_seconds), entry

    def _conflict(self, conn: Connection, seen: MigrationState) -> Conflict:
        return conflict(self._get(conn, seen.name), seen)

    def take_over(
        self,
        migration: MigrationState,
        holder: str,
        lease_seconds: float,
        takeover: dict[str, Any],
    ) -> Lease:
        """Take the lease of the interrupted transition from `migration.lease_holder`
        (compare-and-set on the holder) and record the takeover on its journal row.
        Of two take-overs from the same holder, exactly one wins; the other gets `Conflict`."""
        now = utcnow()
        seq = migration.in_progress_seq
        with self.transaction() as conn:
            if seq is None:  # nothing to take over
                raise self._conflict(conn, migration)
            holder_matches = (
                migrations_table.c.lease_holder.is_(None)
                if migration.lease_holder is None
                else migrations_table.c.lease_holder == migration.lease_holder
            )
            updated = conn.execute(
                update(migrations_table)
                .where(
                    migrations_table.c.id == migration.id,
                    migrations_table.c.in_progress_seq == seq,
                    holder_matches,
                )
                .values(
                    lease_holder=holder,
                    lease_expires_at=now + timedelta(seconds=lease_seconds),
                    updated_at=now,
                )
            ).rowcount
            if updated != 1:
                raise self._conflict(conn, migration)
            takeovers = conn.execute(
                select(journal_table.c.takeovers).where(
                    journal_table.c.migration_id == migration.id,
                    journal_table.c.seq == seq,
                )
            ).scalar_one()
            conn.execute(
                update(journal_table)
                .where(
                    journal_table.c.migration_id == migration.id,
                    journal_table.c.seq == seq,
                )
                .values(takeovers=[*takeovers, takeover])
            )
            emit(conn, migration.id, "takeover", seq, takeover=_public_takeover(takeover))
        return Lease(self, migration.id, seq, holder, lease_seconds)


_CONCURRENT: Final = "another operator changed this migration at the same moment: run `status` and retry"


class _AlreadyHeld(Exception):
    """A hold stands already: `append_hold` writes nothing."""


#: The event of each kind of closed row `_append_closed` writes.
_CLOSED_KINDS: Final = {
    EntryStatus.APPROVED: "approved",
    EntryStatus.HELD: "held",
    EntryStatus.RELEASED: "released",
}


def _public_takeover(record: dict[str, Any]) -> dict[str, Any]:
    """A takeover record as an event shows it: its free text redacted."""
    return {
        key: redact_text(value)
        if key in ("reason", "transition_reason") and isinstance(value, str)
        else value
        for key, value in record.items()
    }
