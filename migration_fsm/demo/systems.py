"""The demo's two task systems, small but real: each has its own table, schema and status
vocabulary, and its own workers that claim, run and complete tasks.

- the old task manager (`runs` table): states queued/running/done/error/cancelled;
- the new queue (`jobs` table): claimed with a lease, statuses pending/running/completed/...

A shared execution log (`ExecutionLog`) records every execution: it is the tasks' own side
effect, so the demo can count tasks lost or run twice. It is not the migration's execution
ledger (`migration_fsm.journal.ledger.Ledger`), which the workers' `WorkerGate` claims in
before each task runs (`migration_fsm.demo.worker`).

Each lives in a SQLite file (the demo) or a PostgreSQL database (the load run,
`bench/load.py`): `SqliteDatabase` and `PostgresDatabase` are the small dialect switch.
On PostgreSQL the tables are the same but for the types a server has (`BIGSERIAL`, `DOUBLE
PRECISION`), keys that sort by code point (`COLLATE "C"`, as `SqlTaskStore.scan` wants) and
partial indexes for the claims, and a claim is one `UPDATE ... WHERE id = (SELECT ... FOR
UPDATE SKIP LOCKED)`, so any number of workers claim side by side, each row exactly once.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

#: A DB-API connection in autocommit mode: `sqlite3.Connection` or `psycopg.Connection`.
Connection = Any

OLD_SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS runs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    run_id TEXT NOT NULL UNIQUE,
    task_name TEXT NOT NULL,
    args TEXT NOT NULL,
    state TEXT NOT NULL,
    tries INTEGER NOT NULL DEFAULT 0,
    enqueued_at TEXT NOT NULL,
    modified_at TEXT NOT NULL,
    worker TEXT
)"""

NEW_SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS jobs (
    job_id INTEGER PRIMARY KEY AUTOINCREMENT,
    idempotency_key TEXT NOT NULL,
    name TEXT NOT NULL,
    body TEXT NOT NULL,
    status TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    lease_until REAL,
    created TEXT NOT NULL,
    updated TEXT NOT NULL
);
CREATE UNIQUE INDEX IF NOT EXISTS jobs_key ON jobs (idempotency_key)"""

LEDGER_SCHEMA: Final = (
    "CREATE TABLE IF NOT EXISTS executions (key TEXT NOT NULL, side TEXT NOT NULL, at REAL NOT NULL)"
)

# The same tables on PostgreSQL. Partial indexes keep a claim one short index probe however
# many finished rows pile up behind it; keys sort by code point, as `SqlTaskStore.scan` wants.
OLD_SCHEMA_PG: Final = """
CREATE TABLE IF NOT EXISTS runs (
    id BIGSERIAL PRIMARY KEY,
    run_id TEXT COLLATE "C" NOT NULL UNIQUE,
    task_name TEXT NOT NULL,
    args TEXT NOT NULL,
    state TEXT NOT NULL,
    tries INTEGER NOT NULL DEFAULT 0,
    enqueued_at TEXT NOT NULL,
    modified_at TEXT NOT NULL,
    worker TEXT
);
CREATE INDEX IF NOT EXISTS runs_queued ON runs (id) WHERE state = 'queued'"""

NEW_SCHEMA_PG: Final = """
CREATE TABLE IF NOT EXISTS jobs (
    job_id BIGSERIAL PRIMARY KEY,
    idempotency_key TEXT COLLATE "C" NOT NULL UNIQUE,
    name TEXT NOT NULL,
    body TEXT NOT NULL,
    status TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    lease_until DOUBLE PRECISION,
    created TEXT NOT NULL,
    updated TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS jobs_pending ON jobs (job_id) WHERE status = 'pending';
CREATE INDEX IF NOT EXISTS jobs_leased ON jobs (lease_until) WHERE status = 'running'"""

LEDGER_SCHEMA_PG: Final = (
    "CREATE TABLE IF NOT EXISTS executions"
    " (key TEXT NOT NULL, side TEXT NOT NULL, at DOUBLE PRECISION NOT NULL)"
)

# A claim on PostgreSQL: one statement, the row locked by the subquery and skipped by every
# other worker. Expired leases first (a short partial index, almost always empty), then the
# oldest pending job: two index probes, where one `pending OR expired` query would scan.
CLAIM_OLD_PG: Final = (
    "UPDATE runs SET state = 'running', tries = tries + 1, worker = %s, modified_at = %s"
    " WHERE id = (SELECT id FROM runs WHERE state = 'queued' ORDER BY id LIMIT 1 FOR UPDATE SKIP LOCKED)"
    " RETURNING run_id"
)
CLAIM_EXPIRED_PG: Final = (
    "UPDATE jobs SET status = 'running', attempts = attempts + 1, lease_until = %s, updated = %s"
    " WHERE job_id = (SELECT job_id FROM jobs WHERE status = 'running' AND lease_until < %s"
    " ORDER BY lease_until LIMIT 1 FOR UPDATE SKIP LOCKED) RETURNING idempotency_key"
)
CLAIM_PENDING_PG: Final = (
    "UPDATE jobs SET status = 'running', attempts = attempts + 1, lease_until = %s, updated = %s"
    " WHERE job_id = (SELECT job_id FROM jobs WHERE status = 'pending'"
    " ORDER BY job_id LIMIT 1 FOR UPDATE SKIP LOCKED) RETURNING idempotency_key"
)

#: How the migration sees each system (the `[stores.*]` config of the demo).
OLD_STORE: Final[dict[str, Any]] = {
    "kind": "sql",
    "table": "runs",
    "columns": {
        "key": "run_id",
        "type": "task_name",
        "payload": "args",
        "status": "state",
        "attempts": "tries",
        "created_at": "enqueued_at",
        "updated_at": "modified_at",
    },
    "status_map": {
        "queued": "pending",
        "running": "running",
        "done": "completed",
        "error": "failed",
        "cancelled": "cancelled",
    },
}
NEW_STORE: Final[dict[str, Any]] = {
    "kind": "sql",
    "table": "jobs",
    "columns": {
        "key": "idempotency_key",
        "type": "name",
        "payload": "body",
        "created_at": "created",
        "updated_at": "updated",
    },
}


def _now_text() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds")


def connect(path: Path) -> sqlite3.Connection:
    """A connection that waits for the write lock instead of failing."""
    conn = sqlite3.connect(path, timeout=30, isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA busy_timeout = 30000")
    return conn


def create(path: Path, schema: str) -> None:
    conn = connect(path)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.executescript(schema)
    conn.close()


class SqliteDatabase:
    """A task system's SQLite file (the demo's)."""

    dialect: Final = "sqlite"

    def __init__(self, path: Path) -> None:
        self.path = path

    def connect(self) -> Connection:
        return connect(self.path)

    def create(self, schema: str) -> None:
        create(self.path, schema)

    def sql(self, statement: str) -> str:
        """`statement` (written with `?` placeholders) in this driver's paramstyle."""
        return statement


class PostgresDatabase:
    """A task system's PostgreSQL database (the load run's), by SQLAlchemy or libpq URL.

    `synchronous_commit=False` makes this process's commits return before their WAL is
    flushed (`SET synchronous_commit = off`, per session; a crash may lose the last few, which
    no one reads): for bookkeeping such as the ledger, never for the systems under test.
    """

    dialect: Final = "postgresql"

    def __init__(self, url: str, *, synchronous_commit: bool = True) -> None:
        from sqlalchemy.engine import make_url

        self.url = url
        self.conninfo = make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)
        self.synchronous_commit = synchronous_commit

    def connect(self) -> Connection:
        import psycopg

        conn = psycopg.connect(self.conninfo, autocommit=True, application_name="migration-fsm demo")
        if not self.synchronous_commit:
            conn.execute("SET synchronous_commit = off")
        return conn

    def create(self, schema: str) -> None:
        with self.connect() as conn:
            for statement in schema.split(";"):
                if statement.strip():
                    conn.execute(statement)

    def sql(self, statement: str) -> str:
        """`statement` (written with `?` placeholders) in this driver's paramstyle."""
        return statement.replace("?", "%s")


TaskDatabase = SqliteDatabase | PostgresDatabase


def as_database(where: Path | TaskDatabase) -> TaskDatabase:
    """A path is a SQLite file (how the demo names its databases)."""
    return SqliteDatabase(where) if isinstance(where, Path) else where


def _schema(database: TaskDatabase, sqlite: str, postgresql: str) -> str:
    return sqlite if database.dialect == "sqlite" else postgresql


class OldTaskManager:
    """The system being left: a `runs` table worked by in-process threads."""

    side = "old"

    def __init__(self, where: Path | TaskDatabase) -> None:
        self.database = as_database(where)
        self.database.create(_schema(self.database, OLD_SCHEMA, OLD_SCHEMA_PG))
        self._complete = self.database.sql(
            "UPDATE runs SET state = 'done', modified_at = ? WHERE run_id = ? AND state = 'running'"
        )
        self._release = self.database.sql(
            "UPDATE runs SET state = 'queued', tries = tries - 1, worker = NULL, modified_at = ?"
            " WHERE run_id = ? AND state = 'running'"
        )
        self._settle = self.database.sql(
            "UPDATE runs SET state = ?, modified_at = ? WHERE run_id = ? AND state = 'running'"
        )

    def claim(self, conn: Connection, worker: str) -> str | None:
        """Mark the oldest queued run `running` for `worker`; its key, or None."""
        if self.database.dialect == "postgresql":
            row = conn.execute(CLAIM_OLD_PG, (worker, _now_text())).fetchone()
            return None if row is None else str(row[0])
        conn.execute("BEGIN IMMEDIATE")
        try:
            row = conn.execute(
                "SELECT run_id FROM runs WHERE state = 'queued' ORDER BY id LIMIT 1"
            ).fetchone()
            if row is not None:
                conn.execute(
                    "UPDATE runs SET state = 'running', tries = tries + 1, worker = ?, modified_at = ?"
                    " WHERE run_id = ?",
                    (worker, _now_text(), row[0]),
                )
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        return None if row is None else str(row[0])

    def complete(self, conn: Connection, key: str) -> None:
        conn.execute(self._complete, (_now_text(), key))

    def release(self, conn: Connection, key: str) -> None:
        """Put a run this worker claimed but did not start back in the queue (`queued`, the
        try it counted undone): the execution ledger refused it for now."""
        conn.execute(self._release, (_now_text(), key))

    def settle(self, conn: Connection, key: str, *, ran: bool) -> None:
        """Close a run this worker claimed but must not start: `done` when it ran elsewhere
        (`ran`), else `cancelled` (it was handed over to the other side)."""
        conn.execute(self._settle, ("done" if ran else "cancelled", _now_text(), key))


class NewQueue:
    """The system being adopted: a `jobs` table whose workers take a lease on each job."""

    side = "new"
    lease_seconds = 30.0

    def __init__(self, where: Path | TaskDatabase) -> None:
        self.database = as_database(where)
        self.database.create(_schema(self.database, NEW_SCHEMA, NEW_SCHEMA_PG))
        self._complete = self.database.sql(
            "UPDATE jobs SET status = 'completed', lease_until = NULL, updated = ?"
            " WHERE idempotency_key = ? AND status = 'running'"
        )
        self._release = self.database.sql(
            "UPDATE jobs SET status = 'pending', attempts = attempts - 1, lease_until = NULL, updated = ?"
            " WHERE idempotency_key = ? AND status = 'running'"
        )
        self._settle = self.database.sql(
            "UPDATE jobs SET status = ?, lease_until = NULL, updated = ?"
            " WHERE idempotency_key = ? AND status = 'running'"
        )

    def claim(self, conn: Connection, worker: str) -> str | None:  # noqa: ARG002  same call as OldManager.claim
        """Lease the oldest pending job (or one whose lease expired); its key, or None."""
        now = time.time()
        if self.database.dialect == "postgresql":
            return self._claim_postgres(conn, now)
        conn.execute("BEGIN IMMEDIATE")
        try:
            row = conn.execute(
                "SELECT job_id, idempotency_key FROM jobs WHERE status = 'pending'"
                " OR (status = 'running' AND lease_until < ?) ORDER BY job_id LIMIT 1",
                (now,),
            ).fetchone()
            if row is not None:
                conn.execute(
                    "UPDATE jobs SET status = 'running', attempts = attempts + 1, lease_until = ?,"
                    " updated = ?"
                    " WHERE job_id = ?",
                    (now + self.lease_seconds, _now_text(), row[0]),
                )
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        return None if row is None else str(row[1])

    def _claim_postgres(self, conn: Connection, now: float) -> str | None:
        lease = (now + self.lease_seconds, _now_text())
        row = conn.execute(CLAIM_EXPIRED_PG, (*lease, now)).fetchone()
        if row is None:
            row = conn.execute(CLAIM_PENDING_PG, lease).fetchone()
        return None if row is None else str(row[0])

    def complete(self, conn: Connection, key: str) -> None:
        conn.execute(self._complete, (_now_text(), key))

    def release(self, conn: Connection, key: str) -> None:
        """Put a job this worker leased but did not start back (`pending`, the attempt it
        counted undone, no lease): the execution ledger refused it for now."""
        conn.execute(self._release, (_now_text(), key))

    def settle(self, conn: Connection, key: str, *, ran: bool) -> None:
        """Close a job this worker leased but must not start: `completed` when it ran
        elsewhere (`ran`), else `cancelled` (it was handed over to the other side)."""
        conn.execute(self._settle, ("completed" if ran else "cancelled", _now_text(), key))


class ExecutionLog:
    """Every execution of every task, on either side: the tasks' own side effect (not the
    migration's execution ledger, `migration_fsm.journal.ledger.Ledger`).

    On SQLite one connection records for every worker (SQLite has one writer anyway); on
    PostgreSQL each worker thread records through a connection of its own, so recording
    never queues workers behind one another.
    """

    def __init__(self, where: Path | TaskDatabase) -> None:
        self.database = as_database(where)
        self.database.create(_schema(self.database, LEDGER_SCHEMA, LEDGER_SCHEMA_PG))
        self._insert = self.database.sql("INSERT INTO executions VALUES (?, ?, ?)")
        self._conn = self.database.connect()
        self._lock = threading.Lock()
        self._local = threading.local()
        self._thread_connections: list[Connection] = []

    def record(self, key: str, side: str) -> None:
        if self.database.dialect == "sqlite":
            with self._lock:
                self._conn.execute(self._insert, (key, side, time.time()))
            return
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._local.conn = self.database.connect()
            with self._lock:
                self._thread_connections.append(conn)
        conn.execute(self._insert, (key, side, time.time()))

    def executions(self) -> dict[str, int]:
        """How many times each key ran."""
        with self._lock:
            rows = self._conn.execute("SELECT key, count(*) FROM executions GROUP BY key").fetchall()
        return {str(key): int(count) for key, count in rows}

    def times(self, side: str, *, since: float) -> list[float]:
        """When each execution on `side` at or after `since` (Unix time) happened."""
        with self._lock:
            rows = self._conn.execute(
                self.database.sql("SELECT at FROM executions WHERE side = ? AND at >= ?"), (side, since)
            ).fetchall()
        return [float(at) for (at,) in rows]

    def by_side(self) -> dict[str, int]:
        with self._lock:
            rows = self._conn.execute("SELECT side, count(*) FROM executions GROUP BY side").fetchall()
        return {str(side): int(count) for side, count in rows}

    def close(self) -> None:
        with self._lock:
            connections, self._thread_connections = self._thread_connections, []
        for conn in connections:
            conn.close()
        self._conn.close()
