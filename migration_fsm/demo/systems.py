"""The demo's two task systems, small but real: each has its own SQLite table, schema and
status vocabulary, and its own workers that claim, run and complete tasks.

- the old task manager (`runs` table): states queued/running/done/error/cancelled;
- the new queue (`jobs` table): claimed with a lease, statuses pending/running/completed/...

A shared ledger records every execution, so the demo can count tasks lost or run twice.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Final

if TYPE_CHECKING:
    from collections.abc import Callable
    from pathlib import Path

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


class OldTaskManager:
    """The system being left: a `runs` table worked by in-process threads."""

    side = "old"

    def __init__(self, path: Path) -> None:
        self.path = path
        create(path, OLD_SCHEMA)

    def claim(self, conn: sqlite3.Connection, worker: str) -> str | None:
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

    def complete(self, conn: sqlite3.Connection, key: str) -> None:
        conn.execute(
            "UPDATE runs SET state = 'done', modified_at = ? WHERE run_id = ? AND state = 'running'",
            (_now_text(), key),
        )


class NewQueue:
    """The system being adopted: a `jobs` table whose workers take a lease on each job."""

    side = "new"
    lease_seconds = 30.0

    def __init__(self, path: Path) -> None:
        self.path = path
        create(path, NEW_SCHEMA)

    def claim(self, conn: sqlite3.Connection, worker: str) -> str | None:
        now = time.time()
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

    def complete(self, conn: sqlite3.Connection, key: str) -> None:
        conn.execute(
            "UPDATE jobs SET status = 'completed', lease_until = NULL, updated = ?"
            " WHERE idempotency_key = ? AND status = 'running'",
            (_now_text(), key),
        )


class Ledger:
    """Every execution of every task, on either side."""

    def __init__(self, path: Path) -> None:
        self.path = path
        create(path, LEDGER_SCHEMA)
        self._conn = connect(path)
        self._lock = threading.Lock()

    def record(self, key: str, side: str) -> None:
        with self._lock:
            self._conn.execute("INSERT INTO executions VALUES (?, ?, ?)", (key, side, time.time()))

    def executions(self) -> dict[str, int]:
        """How many times each key ran."""
        with self._lock:
            rows = self._conn.execute("SELECT key, count(*) FROM executions GROUP BY key").fetchall()
        return {str(key): int(count) for key, count in rows}

    def by_side(self) -> dict[str, int]:
        with self._lock:
            rows = self._conn.execute("SELECT side, count(*) FROM executions GROUP BY side").fetchall()
        return {str(side): int(count) for side, count in rows}

    def close(self) -> None:
        self._conn.close()


class WorkerPool:
    """Threads that claim and run tasks of one system while `allowed()` says they may.

    `pause()` returns only once no worker can start a new claim, which is what the
    migration's "stop old workers" hook needs before it drains the in-flight tasks.
    """

    def __init__(
        self,
        system: OldTaskManager | NewQueue,
        ledger: Ledger,
        allowed: Callable[[], bool],
        *,
        workers: int = 2,
        work_seconds: float = 0.01,
    ) -> None:
        self.system = system
        self.ledger = ledger
        self.allowed = allowed
        self.work_seconds = work_seconds
        self._claim_lock = threading.Lock()
        self._paused = False
        self._stop = threading.Event()
        self.executed = 0
        self._threads = [
            threading.Thread(target=self._work, args=(f"{system.side}-{i}",), daemon=True)
            for i in range(workers)
        ]

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def pause(self) -> None:
        with self._claim_lock:
            self._paused = True

    def resume(self) -> None:
        with self._claim_lock:
            self._paused = False

    @property
    def paused(self) -> bool:
        return self._paused

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=10)

    def _work(self, name: str) -> None:
        conn = connect(self.system.path)
        try:
            while not self._stop.is_set():
                with self._claim_lock:
                    key = None if self._paused or not self.allowed() else self.system.claim(conn, name)
                if key is None:
                    self._stop.wait(0.02)
                    continue
                self.ledger.record(key, self.system.side)
                time.sleep(self.work_seconds)
                self.system.complete(conn, key)
                self.executed += 1
        finally:
            conn.close()
