"""The dual-write repair log, as the writers fill it: one open row per failed second write.

A repair entry is written after the authoritative write succeeded, so it must never cost the
caller the task (a retry would schedule it twice) nor block it for long, and it must never
be lost. So `record` writes with a bounded wait (`timeout_seconds`), and when the migration
database cannot take the entry (locked, down, unreachable) the entry goes to a **spool**: in
memory, bounded (`max_spooled`), and also appended to a local file when `spool_path` is set
(one JSON line per entry, flushed and fsynced before `record` returns, so it survives a
restart of the process: the next `RepairLog` on that file sends them). A background thread
sends the spooled entries in their order, every `retry_seconds`, as soon as the database
takes them; later entries wait behind them (order kept). `pending()` counts the spooled
entries; the first failure of an outage and the recovery are logged once each.

Only when the spool is full (and no file spool is set) does `record` raise
`RepairNotRecorded`: the task is stored on the authoritative side, and the caller must be
told that its repair entry could not be kept.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
from collections import deque
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy.exc import SQLAlchemyError

from ..exceptions import DualWriteError, MigrationFSMError
from ..fsm import RepairStatus
from ._log import first_line, log

_UNREACHABLE = (SQLAlchemyError, OSError, MigrationFSMError)


class RepairNotRecorded(DualWriteError):
    """A repair entry could neither be written nor spooled (the spool is full). The task
    itself is stored on the authoritative side."""


class RepairLog:
    """The dual-write repair log in the migration database: failed second writes. Thread-safe.

    See the module's docstring for the spool (`timeout_seconds`, `spool_path`, `max_spooled`,
    `retry_seconds`)."""

    def __init__(
        self,
        url: str,
        migration: str,
        *,
        timeout_seconds: float = 2.0,
        spool_path: str | Path | None = None,
        max_spooled: int = 100_000,
        retry_seconds: float = 1.0,
    ) -> None:
        if timeout_seconds <= 0 or retry_seconds <= 0 or max_spooled < 1:
            raise ValueError("timeout_seconds and retry_seconds must be positive, max_spooled >= 1")
        self.url = url
        self.migration = migration
        self.timeout_seconds = timeout_seconds
        self.retry_seconds = retry_seconds
        self.max_spooled = max_spooled
        self.spool_path = None if spool_path is None else Path(spool_path)
        self._engine: Any = None
        self._lock = threading.Lock()  # the engine
        self._spool_lock = threading.Lock()  # the spool, its file and the flusher
        self._flush_lock = threading.Lock()  # one send at a time: two would send one entry twice
        self._spool: deque[dict[str, Any]] = deque()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._flusher: threading.Thread | None = None
        self._down = False
        if self.spool_path is not None and self.spool_path.exists():
            self._spool.extend(_read_spool(self.spool_path))
            if self._spool:
                log.warning(
                    "migration-fsm repair log: %d entries spooled in %s by an earlier process are sent now",
                    len(self._spool),
                    self.spool_path,
                    extra={"migration": migration},
                )
                self._start_flusher()

    def _get_engine(self) -> Any:
        with self._lock:
            if self._engine is None:
                from ..journal import make_engine

                self._engine = make_engine(self.url, timeout_seconds=self.timeout_seconds)
            return self._engine

    # -- writing ---------------------------------------------------------------------------

    def record(self, key: str, side: str, error: str) -> None:
        """Add an open entry: `side` missed the write of `key`. Returns within about
        `timeout_seconds` whether or not the database takes it (spooled when it does not)."""
        entry = {"key": key, "side": side, "error": error[:2000], "created_at": datetime.now(UTC).isoformat()}
        with self._spool_lock:
            queued = bool(self._spool)
            if queued:  # entries are waiting: this one goes behind them, in order
                self._enqueue(entry)
        if queued:
            self._wake.set()
            return
        try:
            self._insert([entry])
        except _UNREACHABLE as exc:
            with self._spool_lock:
                self._enqueue(entry)
            self._outage(exc)
            return

    def _enqueue(self, entry: dict[str, Any]) -> None:
        """Spool `entry` (the spool lock held): to the file first when there is one."""
        if self.spool_path is not None:
            line = (json.dumps(entry, ensure_ascii=False) + "\n").encode("utf-8")
            with self.spool_path.open("ab") as handle:
                handle.write(line)
                handle.flush()
                os.fsync(handle.fileno())
        elif len(self._spool) >= self.max_spooled:
            raise RepairNotRecorded(
                f"repair entry for {entry['key']} (side {entry['side']}) not kept: {len(self._spool)}"
                " entries already wait for the migration database; the task IS stored on the"
                " authoritative side, run `migration-fsm reconcile` once the database is back"
            )
        self._spool.append(entry)
        self._start_flusher()

    def _insert(self, entries: list[dict[str, Any]]) -> None:
        from sqlalchemy import insert

        from ..journal import repair_log_table

        rows = [
            {
                "migration": self.migration,
                "key": e["key"],
                "side": e["side"],
                "error": e["error"],
                "status": RepairStatus.OPEN,
                "attempts": 0,
                "created_at": datetime.fromisoformat(e["created_at"]),
            }
            for e in entries
        ]
        with self._get_engine().begin() as conn:
            conn.execute(insert(repair_log_table), rows)

    # -- the spool ---------------------------------------------------------------------------

    def pending(self) -> int:
        """How many entries wait in the spool for the migration database."""
        with self._spool_lock:
            return len(self._spool)

    def flush(self) -> bool:
        """Send the spooled entries now, in order; True when none is left waiting. One send at a
        time (the sender thread's, the caller's, `close`'s): each takes what the one before it
        left."""
        with self._flush_lock:
            return self._send_spooled()

    def _send_spooled(self) -> bool:
        with self._spool_lock:
            batch = list(self._spool)
        if not batch:
            return True
        try:
            self._insert(batch)
        except _UNREACHABLE as exc:
            self._outage(exc)
            return False
        with self._spool_lock:
            for _ in batch:
                self._spool.popleft()
            if self.spool_path is not None:
                _rewrite_spool(self.spool_path, self._spool)
            left = len(self._spool)
        if self._down:
            self._down = False
            log.warning(
                "migration-fsm repair log: the migration database takes entries again (%d sent)",
                len(batch),
                extra={"migration": self.migration},
            )
        return left == 0

    def _start_flusher(self) -> None:
        if self._flusher is None or not self._flusher.is_alive():
            self._flusher = threading.Thread(
                target=self._flush_loop, name=f"migration-fsm-repair-{self.migration}", daemon=True
            )
            self._flusher.start()

    def _flush_loop(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self.retry_seconds)
            self._wake.clear()
            if self._stop.is_set():
                return
            try:
                if self.flush():
                    with self._spool_lock:
                        if not self._spool:
                            self._flusher = None
                            return
            except Exception as exc:  # noqa: BLE001 - the flusher must survive anything
                log.warning("migration-fsm repair log: %s", first_line(exc))

    def _outage(self, exc: BaseException) -> None:
        if not self._down:
            self._down = True
            log.warning(
                "migration-fsm repair log: the migration database does not take entries (%s);"
                " %d spooled, retried every %g s",
                first_line(exc),
                self.pending(),
                self.retry_seconds,
                extra={"migration": self.migration},
            )

    def close(self) -> None:
        """Send what is spooled (one last try), stop the flusher, close the connections.
        Entries still spooled then are kept in `spool_path` when set, else logged as lost."""
        self._stop.set()
        self._wake.set()
        flusher = self._flusher
        if flusher is not None and flusher is not threading.current_thread():
            flusher.join(timeout=self.timeout_seconds + 5)
        # The last try, unless a send still under way holds it (close stays bounded).
        if self._flush_lock.acquire(timeout=self.timeout_seconds + 5):
            try:
                with contextlib.suppress(*_UNREACHABLE):
                    self._send_spooled()
            finally:
                self._flush_lock.release()
        left = self.pending()
        if left and self.spool_path is None:
            log.error(
                "migration-fsm repair log closes with %d entries the migration database never took:"
                " run `migration-fsm reconcile`, and `validate` to find the tasks (set a spool_path"
                " to keep them across a restart)",
                left,
                extra={"migration": self.migration},
            )
        elif left:
            log.warning(
                "migration-fsm repair log closes with %d entries kept in %s for the next start",
                left,
                self.spool_path,
                extra={"migration": self.migration},
            )
        with self._lock:
            if self._engine is not None:
                self._engine.dispose()
                self._engine = None
        self._stop.clear()  # a closed log may record again (it reopens its engine)


def _read_spool(path: Path) -> list[dict[str, Any]]:
    """The entries of a spool file; a torn last line (a crash mid-append) is skipped."""
    entries = []
    for line in path.read_bytes().splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if isinstance(entry, dict) and {"key", "side", "error", "created_at"} <= entry.keys():
            entries.append(entry)
    return entries


def _rewrite_spool(path: Path, entries: deque[dict[str, Any]]) -> None:
    """The spool file holds exactly `entries` (atomically: a new file renamed over it)."""
    if not entries:
        path.unlink(missing_ok=True)
        return
    temporary = path.with_name(f".{path.name}.tmp")
    with temporary.open("wb") as handle:
        for entry in entries:
            handle.write((json.dumps(entry, ensure_ascii=False) + "\n").encode("utf-8"))
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)
