"""SQLAlchemy tables, the journal with its hash chain, step records and the lease.

Every change to the migration row is a compare-and-set (`UPDATE ... WHERE version = :seen`
or `WHERE in_progress_seq = :seq AND lease_holder = :me`) checked by its rowcount.
Transactions are short: no transaction is held open while a step runs.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import socket
import time
import zlib
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, TypeVar

from sqlalchemy import (
    JSON,
    Boolean,
    Column,
    Connection,
    DateTime,
    Dialect,
    Engine,
    ForeignKey,
    Integer,
    MetaData,
    PrimaryKeyConstraint,
    String,
    Table,
    Text,
    TypeDecorator,
    create_engine,
    event,
    insert,
    select,
    text,
    update,
)
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, DBAPIError, IntegrityError, NoSuchModuleError

from ..exceptions import (
    BadInput,
    ConcurrentChange,
    ConfigError,
    Conflict,
    DatabaseUnavailable,
    LeaseHeld,
    SchemaNotCurrent,
    TransitionInterrupted,
    UnknownMigration,
)
from ..fsm import Phase, Trigger

if TYPE_CHECKING:
    from collections.abc import Iterator, Sequence

    from sqlalchemy.pool import ConnectionPoolEntry

SQLITE_BUSY_TIMEOUT_MS: Final = 15_000
_Record = TypeVar("_Record", "JournalEntry", "MigrationState")


def utcnow() -> datetime:
    """The current time, timezone-aware UTC, microsecond precision."""
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """A timestamp that always reads back as timezone-aware UTC (SQLite stores it naive)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


metadata = MetaData()

migrations_table = Table(
    "mfsm_migrations",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("name", String(200), nullable=False, unique=True),
    Column("phase", String(32), nullable=False),
    Column("percent", Integer, nullable=False),
    Column("version", Integer, nullable=False),
    Column("last_seq", Integer, nullable=False),
    Column("head_hash", String(64), nullable=True),
    Column("in_progress_seq", Integer, nullable=True),
    Column("lease_holder", String(400), nullable=True),
    Column("lease_expires_at", UTCDateTime, nullable=True),
    Column("phase_entered_at", UTCDateTime, nullable=False),
    Column("created_at", UTCDateTime, nullable=False),
    Column("updated_at", UTCDateTime, nullable=False),
)

journal_table = Table(
    "mfsm_journal",
    metadata,
    Column("migration_id", Integer, ForeignKey("mfsm_migrations.id"), nullable=False),
    Column("seq", Integer, nullable=False),
    Column("trigger", String(16), nullable=False),
    Column("source", String(32), nullable=True),
    Column("dest", String(32), nullable=False),
    Column("percent", Integer, nullable=False),
    Column("status", String(16), nullable=False),
    Column("actor", String(200), nullable=False),
    Column("reason", Text, nullable=True),
    Column("forced", Boolean, nullable=False),
    Column("guards", JSON, nullable=False),
    Column("takeovers", JSON, nullable=False),
    Column("started_at", UTCDateTime, nullable=False),
    Column("finished_at", UTCDateTime, nullable=True),
    Column("host", String(255), nullable=False),
    Column("pid", Integer, nullable=False),
    Column("error", Text, nullable=True),
    Column("prev_hash", String(64), nullable=True),
    Column("hash", String(64), nullable=True),
    PrimaryKeyConstraint("migration_id", "seq"),
)

steps_table = Table(
    "mfsm_steps",
    metadata,
    Column("migration_id", Integer, nullable=False),
    Column("seq", Integer, nullable=False),
    Column("position", Integer, nullable=False),
    Column("name", String(400), nullable=False),
    Column("undo", String(400), nullable=True),
    Column("status", String(16), nullable=False),
    Column("attempts", Integer, nullable=False),
    Column("checkpoint", JSON, nullable=True),
    Column("error", Text, nullable=True),
    Column("started_at", UTCDateTime, nullable=True),
    Column("finished_at", UTCDateTime, nullable=True),
    PrimaryKeyConstraint("migration_id", "seq", "position"),
)


repair_log_table = Table(
    "mfsm_repair_log",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("migration", String(200), nullable=False),
    Column("key", String(400), nullable=False),
    Column("side", String(8), nullable=False),
    Column("error", Text, nullable=False),
    Column("status", String(16), nullable=False),
    Column("attempts", Integer, nullable=False, default=0),
    Column("created_at", UTCDateTime, nullable=False),
    Column("resolved_at", UTCDateTime, nullable=True),
)

#: PostgreSQL channel every committed transition NOTIFYs; the payload is a JSON object
#: with the migration's name and its new phase, percent and version.
NOTIFY_CHANNEL: Final = "migration_fsm"


@dataclass(frozen=True, slots=True)
class MigrationState:
    """One row of `mfsm_migrations`: where a migration stands."""

    id: int
    name: str
    phase: Phase
    percent: int
    version: int
    last_seq: int
    head_hash: str | None
    in_progress_seq: int | None
    lease_holder: str | None
    lease_expires_at: datetime | None
    phase_entered_at: datetime
    created_at: datetime
    updated_at: datetime

    def lease_live(self, now: datetime | None = None) -> bool:
        """Whether someone holds an unexpired lease."""
        return (
            self.lease_holder is not None
            and self.lease_expires_at is not None
            and self.lease_expires_at > (now or utcnow())
        )


@dataclass(frozen=True, slots=True)
class StepRecord:
    """One step of one transition, as recorded."""

    position: int
    name: str
    undo: str | None
    status: str  # pending, started, done, failed, undone
    attempts: int
    checkpoint: dict[str, Any] | None
    error: str | None
    started_at: datetime | None
    finished_at: datetime | None


@dataclass(frozen=True, slots=True)
class JournalEntry:
    """One journal row: a transition's intent and outcome."""

    seq: int
    trigger: Trigger
    source: Phase | None
    dest: Phase
    percent: int
    status: str  # intent, committed, refused, aborted
    actor: str
    reason: str | None
    forced: bool
    guards: list[dict[str, Any]]
    takeovers: list[dict[str, Any]]
    started_at: datetime
    finished_at: datetime | None
    host: str
    pid: int
    error: str | None
    prev_hash: str | None
    hash: str | None
    steps: list[StepRecord] = field(default_factory=list)

    def chained_fields(self, migration: str) -> dict[str, Any]:
        """The fields the hash covers."""
        return {
            "migration": migration,
            "seq": self.seq,
            "trigger": str(self.trigger),
            "source": None if self.source is None else str(self.source),
            "dest": str(self.dest),
            "percent": self.percent,
            "status": self.status,
            "actor": self.actor,
            "reason": self.reason,
            "forced": self.forced,
            "guards": self.guards,
            "takeovers": self.takeovers,
            "started_at": _iso(self.started_at),
            "finished_at": _iso(self.finished_at),
            "host": self.host,
            "pid": self.pid,
            "error": self.error,
        }


def _iso(value: datetime | None) -> str | None:
    return None if value is None else value.astimezone(UTC).isoformat(timespec="microseconds")


def chain_hash(prev_hash: str | None, migration: str, entry: JournalEntry) -> str:
    """`H(prev_hash, row)`: SHA-256 over the previous hash and the row's canonical JSON."""
    body = json.dumps(
        entry.chained_fields(migration),
        sort_keys=True,
        separators=(",", ":"),
        ensure_ascii=False,
    )
    return hashlib.sha256(f"{prev_hash or ''}\n{body}".encode()).hexdigest()


def migrations_dir() -> Path:
    """The Alembic revisions: inside the installed package, or `migrations/` of a checkout."""
    packaged = Path(str(resources.files("migration_fsm"))) / "_migrations"
    if (packaged / "env.py").is_file():
        return packaged
    return Path(__file__).resolve().parents[2] / "migrations"


def alembic_config() -> Any:
    """An Alembic `Config` pointing at our revisions (no ini file needed)."""
    from alembic.config import Config  # imported lazily: the backend client never needs it

    cfg = Config()
    cfg.set_main_option("script_location", str(migrations_dir()).replace("%", "%%"))
    return cfg


def head_revisions() -> set[str]:
    """The Alembic head revision(s) this code expects."""
    from alembic.script import ScriptDirectory

    return set(ScriptDirectory.from_config(alembic_config()).get_heads())


def safe_url(url: str) -> str:
    """The URL with its password masked, for any message a person may see."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except (ArgumentError, ValueError):  # ValueError: a non-numeric port
        return re.sub(r"//([^:/@]*):[^@]*@", r"//\1:***@", url)


def _scrub(message: str, url: str) -> str:
    """Remove the password of `url` from a driver message, and keep its first line."""
    try:
        password = make_url(url).password
    except (ArgumentError, ValueError):
        password = None
    first = message.strip().splitlines()[0] if message.strip() else message
    if password:
        first = first.replace(str(password), "***")
    return first


def _sqlite_file(url: str) -> Path | None:
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite":
        return None
    database = parsed.database or ""
    if database in ("", ":memory:") or database.startswith("file:"):
        return None
    return Path(database)


def make_engine(url: str, *, create: bool = False, wal: bool = True) -> Engine:
    """An engine for `url`. SQLite gets a busy timeout, `BEGIN IMMEDIATE` transactions (so two
    writers queue instead of deadlocking) and, when `wal`, the WAL journal; a missing SQLite
    file is an error unless `create`."""
    try:
        parsed = make_url(url)
    except (ArgumentError, ValueError) as exc:  # ValueError: a non-numeric port
        raise ConfigError(f"database URL '{safe_url(url)}' is not a valid SQLAlchemy URL") from exc
    sqlite_file = _sqlite_file(url)
    if sqlite_file is not None and not create and not sqlite_file.exists():
        raise DatabaseUnavailable(
            f"database file {sqlite_file} does not exist: run `migration-fsm db upgrade` to create it"
        )
    if parsed.get_backend_name() == "postgresql" and parsed.get_driver_name() in (
        "",
        "psycopg2",
    ):
        parsed = parsed.set(drivername="postgresql+psycopg")
    kwargs: dict[str, Any] = {}
    if parsed.get_backend_name() == "postgresql":
        kwargs["connect_args"] = {"connect_timeout": 5}
    try:
        engine = create_engine(parsed, **kwargs)
    except (ArgumentError, NoSuchModuleError) as exc:
        raise ConfigError(f"database URL '{safe_url(url)}' is not usable: {exc}") from exc
    if engine.dialect.name == "sqlite":
        event.listen(engine, "connect", _sqlite_on_connect_wal if wal else _sqlite_on_connect)
        event.listen(engine, "begin", _sqlite_on_begin)
    return engine


def _sqlite_on_connect(dbapi_connection: Any, record: ConnectionPoolEntry) -> None:
    # Let SQLAlchemy's "begin" event emit BEGIN itself (see _sqlite_on_begin).
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    cursor.execute(f"PRAGMA busy_timeout = {SQLITE_BUSY_TIMEOUT_MS}")
    cursor.execute("PRAGMA foreign_keys = ON")
    cursor.close()


def _sqlite_on_connect_wal(dbapi_connection: Any, record: ConnectionPoolEntry) -> None:
    # WAL lets PhaseClients read while an operator writes; only for our own database
    # (a user's task database keeps whatever journal mode it has).
    _sqlite_on_connect(dbapi_connection, record)
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode = WAL")
    cursor.close()


def _sqlite_on_begin(conn: Connection) -> None:
    readonly = conn.get_execution_options().get("mfsm_readonly", False)
    conn.exec_driver_sql("BEGIN" if readonly else "BEGIN IMMEDIATE")


def _lock_key(name: str) -> int:
    return zlib.crc32(name.encode("utf-8")) & 0x7FFFFFFF


_LOCK_CLASS: Final = 0x6D66736D  # "mfsm"


def lease_holder_name(actor: str) -> str:
    """How a lease names its holder: the actor, its host and its process."""
    return f"{actor} [{socket.gethostname()}:{os.getpid()}]"


class Journal:
    """The migration database: migrations, journal and steps. Thread-safe."""

    def __init__(self, url: str, *, engine: Engine | None = None) -> None:
        self.url = url
        self.safe_url = safe_url(url)
        self.engine = engine or make_engine(url)

    @classmethod
    def open(cls, url: str) -> Journal:
        """Open an existing database whose schema is at the Alembic head (else exit 4)."""
        store = cls(url)
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
            f"database {self.safe_url} is unavailable: {_scrub(str(exc.orig or exc), self.url)}"
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
            raise ConcurrentChange(
                "another operator changed this migration at the same moment: run `status` and retry"
            ) from exc
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
            at = ", ".join(sorted(current)) or "no schema"
            raise SchemaNotCurrent(
                f"database {self.safe_url} is at {at}, expected {', '.join(sorted(head))}:"
                " run `migration-fsm db upgrade`"
            )

    def upgrade(self) -> tuple[set[str], set[str]]:
        """Create or upgrade the schema to the Alembic head; returns (before, after)."""
        from alembic import command

        before = self.current_revisions()
        cfg = alembic_config()
        with self.transaction() as conn:
            if self.dialect == "postgresql":  # two concurrent upgrades queue up
                conn.execute(text("SELECT pg_advisory_xact_lock(:c, 0)"), {"c": _LOCK_CLASS})
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, "head")
        return before, self.current_revisions()

    # -- operator lock (PostgreSQL) -----------------------------------------------------

    @contextmanager
    def operator_lock(self, name: str, holder: str, *, steal: bool = False) -> Iterator[None]:
        """Hold a session advisory lock on PostgreSQL for the duration of a command, so two
        commands never interleave and a dead operator's lock vanishes with its connection.
        With `steal` (`resume --steal`), a session that still holds the lock (a hung
        operator) is terminated first, so its command cannot write any more.
        On SQLite the `BEGIN IMMEDIATE` transactions and the lease are enough."""
        if self.dialect != "postgresql":
            yield
            return
        try:
            conn = self.engine.connect().execution_options(isolation_level="AUTOCOMMIT")
        except DBAPIError as exc:
            raise self._unavailable(exc) from exc
        params = {"c": _LOCK_CLASS, "k": _lock_key(name)}
        try:
            self._acquire(conn, name, holder, params, steal=steal)
        except DBAPIError as exc:
            conn.invalidate()
            conn.close()
            raise self._unavailable(exc) from exc
        except BaseException:
            conn.close()
            raise
        try:
            yield
        finally:
            try:
                conn.execute(
                    text("SELECT pg_advisory_unlock(:c, :k), set_config('application_name', '', false)"),
                    params,
                )
            except DBAPIError:
                conn.invalidate()  # a broken connection's session lock is already gone
            conn.close()

    def _acquire(
        self, conn: Connection, name: str, holder: str, params: dict[str, int], *, steal: bool
    ) -> None:
        # The application name lets a refused operator see who holds the lock.
        try_lock = text("SELECT pg_try_advisory_lock(:c, :k), set_config('application_name', :n, false)")
        values = {**params, "n": f"migration-fsm {holder}"[:63]}
        if conn.execute(try_lock, values).scalar():
            return
        who_sql = text(
            "SELECT a.pid, a.application_name FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid"
            " WHERE l.locktype = 'advisory' AND l.granted AND l.database = ("
            "   SELECT oid FROM pg_database WHERE datname = current_database())"
            " AND l.classid = :c AND l.objid = :k AND l.objsubid = 2"
        )
        row = conn.execute(who_sql, params).first()
        who = str(row[1]).removeprefix("migration-fsm ") if row and row[1] else "another operator"
        if steal and row is not None:
            conn.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": row[0]})
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                if conn.execute(try_lock, values).scalar():
                    return
                time.sleep(0.05)
            raise LeaseHeld(
                f"migration '{name}': could not end the session of {who} that holds the PostgreSQL"
                " advisory lock: ask a database administrator to terminate it"
            )
        raise LeaseHeld(
            f"migration '{name}' is being changed by {who} right now"
            " (PostgreSQL advisory lock held): wait for that command to finish, or if it hangs,"
            " run `migration-fsm resume --steal`"
        )

    # -- reads ------------------------------------------------------------------------

    def get(self, name: str) -> MigrationState:
        """The migration named `name`, or `UnknownMigration`."""
        with self.transaction(readonly=True) as conn:
            return self._get(conn, name)

    def _get(self, conn: Connection, name: str) -> MigrationState:
        row = conn.execute(select(migrations_table).where(migrations_table.c.name == name)).mappings().first()
        if row is None:
            raise UnknownMigration(
                f"no migration named '{name}' in {self.safe_url}: run `migration-fsm init -m {name}`"
            )
        return _migration_from_row(row)

    def names(self) -> list[str]:
        """Every migration in this database, by name."""
        with self.transaction(readonly=True) as conn:
            return list(
                conn.execute(select(migrations_table.c.name).order_by(migrations_table.c.name))
                .scalars()
                .all()
            )

    def journal(self, migration: MigrationState, *, with_steps: bool = True) -> list[JournalEntry]:
        """The journal, oldest first, with each entry's steps."""
        with self.transaction(readonly=True) as conn:
            rows = (
                conn.execute(
                    select(journal_table)
                    .where(journal_table.c.migration_id == migration.id)
                    .order_by(journal_table.c.seq)
                )
                .mappings()
                .all()
            )
            steps: dict[int, list[StepRecord]] = {}
            if with_steps:
                for row in conn.execute(
                    select(steps_table)
                    .where(steps_table.c.migration_id == migration.id)
                    .order_by(steps_table.c.seq, steps_table.c.position)
                ).mappings():
                    steps.setdefault(row["seq"], []).append(_step_from_row(row))
        return [_entry_from_row(row, steps.get(row["seq"], [])) for row in rows]

    def entry(self, migration: MigrationState, seq: int) -> JournalEntry:
        """One journal entry with its steps."""
        with self.transaction(readonly=True) as conn:
            return self._entry(conn, migration.id, seq)

    def _entry(self, conn: Connection, migration_id: int, seq: int) -> JournalEntry:
        row = (
            conn.execute(
                select(journal_table).where(
                    journal_table.c.migration_id == migration_id,
                    journal_table.c.seq == seq,
                )
            )
            .mappings()
            .one()
        )
        steps = [
            _step_from_row(step)
            for step in conn.execute(
                select(steps_table)
                .where(steps_table.c.migration_id == migration_id, steps_table.c.seq == seq)
                .order_by(steps_table.c.position)
            ).mappings()
        ]
        return _entry_from_row(row, steps)

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
            status="committed",
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
                insert(journal_table).values(migration_id=migration_id, **_entry_values(entry), hash=digest)
            )
            return self._get(conn, name)

    def append_refused(self, seen: MigrationState, entry: JournalEntry) -> JournalEntry:
        """Journal a guard's refusal; the phase, percent and version stay as they were."""
        with self.transaction() as conn:
            seq = seen.last_seq + 1
            entry = _replace(entry, seq=seq, status="refused", prev_hash=seen.head_hash)
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
                insert(journal_table).values(migration_id=seen.id, **_entry_values(entry), hash=digest)
            )
        return _replace(entry, hash=digest)

    def claim(
        self,
        seen: MigrationState,
        entry: JournalEntry,
        steps: Sequence[tuple[str, str | None]],
        holder: str,
        lease_seconds: float,
    ) -> JournalEntry:
        """Compare-and-set the migration row, take the lease, journal `intent` and the planned
        steps, all in one transaction. Returns the intent row; `Conflict` if someone else won."""
        now = utcnow()
        seq = seen.last_seq + 1
        entry = _replace(
            entry,
            seq=seq,
            status="intent",
            steps=[
                StepRecord(position, name, undo, "pending", 0, None, None, None, None)
                for position, (name, undo) in enumerate(steps)
            ],
        )
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
            conn.execute(insert(journal_table).values(migration_id=seen.id, **_entry_values(entry)))
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
                            "status": "pending",
                            "attempts": 0,
                        }
                        for position, (name, undo) in enumerate(steps)
                    ],
                )
        return entry

    def _conflict(self, conn: Connection, seen: MigrationState) -> Conflict:
        now = self._get(conn, seen.name)
        if now.in_progress_seq is not None and now.lease_live():
            return lease_held_error(now)
        if now.in_progress_seq is not None:
            return TransitionInterrupted(
                f"migration '{seen.name}' has an interrupted transition #{now.in_progress_seq}:"
                " run `migration-fsm resume` or `migration-fsm abort --reason TEXT`"
            )
        return ConcurrentChange(
            f"migration '{seen.name}' changed while this command ran (version {seen.version}"
            f" -> {now.version}, phase {now.phase}): run `migration-fsm status` and decide again"
        )

    def take_over(
        self,
        migration: MigrationState,
        holder: str,
        lease_seconds: float,
        takeover: dict[str, Any],
    ) -> None:
        """Take the lease of the interrupted transition from `migration.lease_holder`
        (compare-and-set on the holder) and record the takeover on its journal row."""
        now = utcnow()
        seq = migration.in_progress_seq
        with self.transaction() as conn:
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

    def heartbeat(self, migration_id: int, seq: int, holder: str, lease_seconds: float) -> bool:
        """Renew our lease; False when it is no longer ours."""
        now = utcnow()
        with self.transaction() as conn:
            return (
                conn.execute(
                    update(migrations_table)
                    .where(
                        migrations_table.c.id == migration_id,
                        migrations_table.c.in_progress_seq == seq,
                        migrations_table.c.lease_holder == holder,
                    )
                    .values(lease_expires_at=now + timedelta(seconds=lease_seconds))
                ).rowcount
                == 1
            )

    def set_step(
        self,
        migration_id: int,
        seq: int,
        position: int,
        *,
        holder: str,
        status: str,
        error: str | None = None,
        checkpoint: dict[str, Any] | None = None,
        count_attempt: bool = False,
    ) -> None:
        """Record a step's progress, as long as we still hold the lease."""
        now = utcnow()
        values: dict[str, Any] = {"status": status, "error": error}
        if count_attempt:
            values["attempts"] = steps_table.c.attempts + 1
            values["started_at"] = now
            values["finished_at"] = None
        if status in ("done", "failed", "undone"):
            values["finished_at"] = now
        if checkpoint is not None:
            values["checkpoint"] = checkpoint
        with self.transaction() as conn:
            self._assert_holder(conn, migration_id, seq, holder)
            conn.execute(
                update(steps_table)
                .where(
                    steps_table.c.migration_id == migration_id,
                    steps_table.c.seq == seq,
                    steps_table.c.position == position,
                )
                .values(**values)
            )

    def save_checkpoint(
        self,
        migration_id: int,
        seq: int,
        position: int,
        holder: str,
        checkpoint: dict[str, Any],
    ) -> None:
        """Journal a step's checkpoint (a plain JSON object) while we hold the lease."""
        with self.transaction() as conn:
            self._assert_holder(conn, migration_id, seq, holder)
            conn.execute(
                update(steps_table)
                .where(
                    steps_table.c.migration_id == migration_id,
                    steps_table.c.seq == seq,
                    steps_table.c.position == position,
                )
                .values(checkpoint=checkpoint)
            )

    def _assert_holder(self, conn: Connection, migration_id: int, seq: int, holder: str) -> None:
        row = (
            conn.execute(
                select(migrations_table).where(
                    migrations_table.c.id == migration_id,
                )
            )
            .mappings()
            .one()
        )
        if row["in_progress_seq"] != seq or row["lease_holder"] != holder:
            raise _lease_lost(_migration_from_row(row), seq)

    def fail(self, migration_id: int, seq: int, holder: str, error: str) -> None:
        """Record a step's error on the journal row and release the lease (row stays `intent`)."""
        with self.transaction() as conn:
            self._assert_holder(conn, migration_id, seq, holder)
            conn.execute(
                update(journal_table)
                .where(
                    journal_table.c.migration_id == migration_id,
                    journal_table.c.seq == seq,
                )
                .values(error=error)
            )
            conn.execute(
                update(migrations_table)
                .where(migrations_table.c.id == migration_id)
                .values(lease_holder=None, lease_expires_at=None, updated_at=utcnow())
            )

    def finish(self, migration_id: int, seq: int, holder: str, status: str) -> MigrationState:
        """Close the interrupted transition `seq` as `committed` (phase, percent and version
        move) or `aborted` (they stay); chain its hash; release the lease. One transaction."""
        now = utcnow()
        with self.transaction() as conn:
            current = _migration_from_row(
                conn.execute(select(migrations_table).where(migrations_table.c.id == migration_id))
                .mappings()
                .one()
            )
            if current.in_progress_seq != seq or current.lease_holder != holder:
                raise _lease_lost(current, seq)
            row = (
                conn.execute(
                    select(journal_table).where(
                        journal_table.c.migration_id == migration_id, journal_table.c.seq == seq
                    )
                )
                .mappings()
                .one()
            )
            entry = _entry_from_row(row, [])
            entry = _replace(
                entry,
                status=status,
                finished_at=now,
                prev_hash=current.head_hash,
                error=None if status == "committed" else entry.error,
            )
            digest = chain_hash(current.head_hash, current.name, entry)
            after = _replace(
                current,
                in_progress_seq=None,
                lease_holder=None,
                lease_expires_at=None,
                head_hash=digest,
                updated_at=now,
            )
            if status == "committed":
                after = _replace(
                    after,
                    phase=entry.dest,
                    percent=entry.percent,
                    version=current.version + 1,
                    phase_entered_at=now if entry.dest is not current.phase else current.phase_entered_at,
                )
            updated = conn.execute(
                update(migrations_table)
                .where(
                    migrations_table.c.id == migration_id,
                    migrations_table.c.version == current.version,
                    migrations_table.c.in_progress_seq == seq,
                    migrations_table.c.lease_holder == holder,
                )
                .values(
                    phase=after.phase.value,
                    percent=after.percent,
                    version=after.version,
                    phase_entered_at=after.phase_entered_at,
                    in_progress_seq=None,
                    lease_holder=None,
                    lease_expires_at=None,
                    head_hash=digest,
                    updated_at=now,
                )
            ).rowcount
            if updated != 1:
                raise self._conflict(conn, current)
            conn.execute(
                update(journal_table)
                .where(journal_table.c.migration_id == migration_id, journal_table.c.seq == seq)
                .values(
                    status=status,
                    finished_at=now,
                    prev_hash=current.head_hash,
                    hash=digest,
                    error=entry.error,
                )
            )
            if status == "committed" and self.dialect == "postgresql":
                # Delivered at commit, carrying the new state: PhaseClients apply it without a query.
                payload = json.dumps(
                    {
                        "migration": after.name,
                        "phase": after.phase.value,
                        "percent": after.percent,
                        "version": after.version,
                    }
                )
                conn.execute(
                    text("SELECT pg_notify(:channel, :payload)"),
                    {"channel": NOTIFY_CHANNEL, "payload": payload},
                )
            return after


def lease_held_error(migration: MigrationState) -> LeaseHeld:
    """The exit-3 error naming the lease holder and when the lease expires."""
    expires = migration.lease_expires_at
    left = "" if expires is None else f" (in {max(0, round((expires - utcnow()).total_seconds()))} s)"
    return LeaseHeld(
        f"migration '{migration.name}' transition #{migration.in_progress_seq} is held by"
        f" {migration.lease_holder} until {_iso_short(expires)}{left}: wait for it, or if that"
        " operator is gone, run `migration-fsm resume --steal` (or `abort --reason TEXT` once"
        " the lease has expired)"
    )


def _lease_lost(migration: MigrationState, seq: int) -> LeaseHeld:
    return LeaseHeld(
        f"the lease on transition #{seq} of migration '{migration.name}' was taken over by"
        f" {migration.lease_holder or 'nobody'}: this command stops here"
    )


def _iso_short(value: datetime | None) -> str:
    return "?" if value is None else value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _replace(record: _Record, **changes: Any) -> _Record:
    return dataclasses.replace(record, **changes)


def _entry_values(entry: JournalEntry) -> dict[str, Any]:
    return {
        "seq": entry.seq,
        "trigger": entry.trigger.value,
        "source": None if entry.source is None else entry.source.value,
        "dest": entry.dest.value,
        "percent": entry.percent,
        "status": entry.status,
        "actor": entry.actor,
        "reason": entry.reason,
        "forced": entry.forced,
        "guards": entry.guards,
        "takeovers": entry.takeovers,
        "started_at": entry.started_at,
        "finished_at": entry.finished_at,
        "host": entry.host,
        "pid": entry.pid,
        "error": entry.error,
        "prev_hash": entry.prev_hash,
    }


def _migration_from_row(row: Any) -> MigrationState:
    return MigrationState(
        id=row["id"],
        name=row["name"],
        phase=Phase(row["phase"]),
        percent=row["percent"],
        version=row["version"],
        last_seq=row["last_seq"],
        head_hash=row["head_hash"],
        in_progress_seq=row["in_progress_seq"],
        lease_holder=row["lease_holder"],
        lease_expires_at=row["lease_expires_at"],
        phase_entered_at=row["phase_entered_at"],
        created_at=row["created_at"],
        updated_at=row["updated_at"],
    )


def _step_from_row(row: Any) -> StepRecord:
    return StepRecord(
        position=row["position"],
        name=row["name"],
        undo=row["undo"],
        status=row["status"],
        attempts=row["attempts"],
        checkpoint=row["checkpoint"],
        error=row["error"],
        started_at=row["started_at"],
        finished_at=row["finished_at"],
    )


def _entry_from_row(row: Any, steps: list[StepRecord]) -> JournalEntry:
    return JournalEntry(
        seq=row["seq"],
        trigger=Trigger(row["trigger"]),
        source=None if row["source"] is None else Phase(row["source"]),
        dest=Phase(row["dest"]),
        percent=row["percent"],
        status=row["status"],
        actor=row["actor"],
        reason=row["reason"],
        forced=bool(row["forced"]),
        guards=list(row["guards"] or []),
        takeovers=list(row["takeovers"] or []),
        started_at=row["started_at"],
        finished_at=row["finished_at"],
        host=row["host"],
        pid=row["pid"],
        error=row["error"],
        prev_hash=row["prev_hash"],
        hash=row["hash"],
        steps=steps,
    )
