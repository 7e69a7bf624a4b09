"""What a backend imports to follow the migration: `PhaseClient`, `DualWriter`,
`FallbackReader` and their asyncio twins (DESIGN.md sections 6 and 7).

`PhaseClient.routing(key)` is answered from memory (a snapshot swapped atomically by a
daemon refresher thread), so it is safe on every request path and in asyncio code. This
module imports neither click, rich nor alembic; it logs through the standard `logging`
module (logger `migration_fsm.client`) so that it fits whatever the application uses.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import logging
import random
import sqlite3
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Final
from zlib import crc32  # the same hash as fsm.bucket, bound here: routing(key) is the hot path

from .exceptions import MigrationFSMError
from .fsm import ROUTING, Phase, Routing, routing_for
from .tasks.capabilities import ForwardPut

if TYPE_CHECKING:
    from collections.abc import Callable
    from types import TracebackType

    from .tasks.records import TaskRecord, TaskStore

log = logging.getLogger("migration_fsm.client")

_QUERY: Final = "SELECT phase, percent, version FROM mfsm_migrations WHERE name = "
_CUTOVER: Final = Phase.CUTOVER  # a module constant: Enum attribute lookup is slow on 3.11
_TO_NEW: Final = routing_for(Phase.CUTOVER, 100)
_TO_OLD: Final = routing_for(Phase.CUTOVER, 0)


class DualWriteError(MigrationFSMError):
    """A strict `DualWriter` could not write the second side (a repair entry was recorded)."""


@dataclass(frozen=True, slots=True)
class Snapshot:
    """The migration as last read: immutable, swapped whole by the refresher."""

    migration: str
    phase: Phase
    version: int
    percent: int
    routing: Routing
    stale: bool
    read_at: datetime | None  # when the database was last read successfully (None: never)


class PhaseClient:
    """Follows one migration's phase: cached, refreshed off the caller's path, fail-static.

    The constructor makes one synchronous read (bounded by `connect_timeout`); after that a
    daemon thread reads the database at most once per `ttl` seconds. On PostgreSQL it also
    LISTENs for the NOTIFY that every committed transition sends, which carries the new
    state, so a change is seen within milliseconds without any extra query. When the
    database cannot be read the last snapshot is kept, marked `stale`, and one warning is
    logged per outage; before any successful read the client answers `default_phase`.
    """

    def __init__(
        self,
        url: str,
        migration: str = "default",
        ttl: float = 1.0,
        default_phase: Phase = Phase.PREPARATION,
        *,
        connect_timeout: float = 2.0,
        listen: bool = True,
    ) -> None:
        from sqlalchemy.engine import make_url

        if ttl <= 0:
            raise ValueError("ttl must be positive")
        self.url = url
        self.migration = migration
        self.ttl = ttl
        self.connect_timeout = connect_timeout
        parsed = make_url(url)
        self._backend = parsed.get_backend_name()
        if self._backend == "sqlite":
            self._sqlite_path = parsed.database or ""
        elif self._backend == "postgresql":
            self._conninfo = parsed.set(drivername="postgresql").render_as_string(hide_password=False)
        else:
            raise ValueError(
                f"PhaseClient supports SQLite and PostgreSQL URLs, not {parsed.get_backend_name()}"
            )
        self._listen = listen and self._backend == "postgresql"
        default = Phase(default_phase)
        self._snapshot = Snapshot(migration, default, 0, 0, ROUTING[default], True, None)
        self._stop = threading.Event()
        self._counters_lock = threading.Lock()
        self._counters = {"refreshes": 0, "refresh_errors": 0, "notifications": 0, "outages": 0}
        self._stale_since: float | None = time.monotonic()
        self._stale_total = 0.0
        self._conn: Any = None
        self._refresh()
        self._thread = threading.Thread(
            target=self._run, name=f"migration-fsm-client-{migration}", daemon=True
        )
        self._thread.start()

    # -- the hot path ---------------------------------------------------------------

    def snapshot(self) -> Snapshot:
        """The current snapshot (from memory)."""
        return self._snapshot

    def routing(self, key: str | None = None) -> Routing:
        """Where to write, read and consume; per key during a partial cutover (from memory)."""
        snap = self._snapshot
        if key is None or snap.phase is not _CUTOVER:
            return snap.routing
        return _TO_NEW if crc32(key.encode()) % 100 < snap.percent else _TO_OLD

    @property
    def phase(self) -> Phase:
        return self._snapshot.phase

    def counters(self) -> dict[str, float]:
        """Plain numbers for the application's metrics system."""
        with self._counters_lock:
            values: dict[str, float] = dict(self._counters)
            stale = self._stale_total
            if self._stale_since is not None:
                stale += time.monotonic() - self._stale_since
        values["stale_seconds"] = round(stale, 3)
        values["stale"] = float(self._snapshot.stale)
        values["version"] = float(self._snapshot.version)
        return values

    # -- lifecycle ------------------------------------------------------------------

    def close(self) -> None:
        """Stop the refresher and close its connection (idempotent)."""
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)
        self._close_conn()

    def __enter__(self) -> PhaseClient:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # -- refreshing -----------------------------------------------------------------

    def _run(self) -> None:
        while not self._stop.is_set():
            if self._listen and self._conn is not None:
                self._wait_for_notifications(self.ttl)
            else:
                self._stop.wait(self.ttl)
            if not self._stop.is_set():
                self._refresh()

    def _wait_for_notifications(self, seconds: float) -> None:
        """Block up to `seconds` on LISTEN, applying each notification's state at once."""
        import psycopg

        deadline = time.monotonic() + seconds
        while not self._stop.is_set() and (left := deadline - time.monotonic()) > 0:
            try:
                for note in self._conn.notifies(timeout=min(left, 0.25)):
                    self._apply_notification(note.payload)
            except (psycopg.Error, OSError) as exc:
                self._failed(exc)
                return

    def _apply_notification(self, payload: str) -> None:
        """Apply a notification's state; anything unexpected in it is ignored (and the next
        poll reads the truth), so no payload can stop the refresher."""
        try:
            data = json.loads(payload)
            if not isinstance(data, dict) or data.get("migration") != self.migration:
                return
            state = (Phase(data["phase"]), int(data["percent"]), int(data["version"]))
        except (ValueError, KeyError, TypeError):
            log.debug("ignored a malformed notification: %.200s", payload)
            return
        with self._counters_lock:
            self._counters["notifications"] += 1
        self._install(*state)

    def _refresh(self) -> None:
        try:
            row = self._read_sqlite() if self._backend == "sqlite" else self._read_postgres()
        except Exception as exc:  # noqa: BLE001 - any failure to read means "keep the last snapshot"
            self._failed(exc, reconnect=True)
            return
        with self._counters_lock:
            self._counters["refreshes"] += 1
        try:
            if row is None:
                raise LookupError(f"no migration named '{self.migration}' (yet)")
            state = (Phase(row[0]), int(row[1]), int(row[2]))
        except (LookupError, ValueError, TypeError) as exc:
            # The connection is fine, the row is not (yet) usable: keep listening.
            self._failed(exc, reconnect=False)
            return
        self._install(*state)

    def _read_sqlite(self) -> tuple[Any, ...] | None:
        # Read-only, opened per refresh: it never creates the file and never holds a lock.
        conn = sqlite3.connect(
            f"file:{self._sqlite_path}?mode=ro",
            uri=True,
            timeout=self.connect_timeout,
            check_same_thread=False,
        )
        try:
            row: tuple[Any, ...] | None = conn.execute(_QUERY + "?", (self.migration,)).fetchone()
            return row
        finally:
            conn.close()

    def _read_postgres(self) -> tuple[Any, ...] | None:
        if self._conn is None:
            import psycopg

            self._conn = psycopg.connect(
                self._conninfo,
                autocommit=True,
                connect_timeout=max(1, round(self.connect_timeout)),
                application_name="migration-fsm client",
            )
            if self._listen:
                from .journal import NOTIFY_CHANNEL

                self._conn.execute(f"LISTEN {NOTIFY_CHANNEL}")
        row: tuple[Any, ...] | None = self._conn.execute(_QUERY + "%s", (self.migration,)).fetchone()
        return row

    def _install(self, phase: Phase, percent: int, version: int) -> None:
        current = self._snapshot
        if version < current.version:  # an older read raced a newer notification
            return
        self._snapshot = Snapshot(
            self.migration, phase, version, percent, routing_for(phase, percent), False, datetime.now(UTC)
        )
        with self._counters_lock:
            if self._stale_since is not None:
                self._stale_total += time.monotonic() - self._stale_since
                self._stale_since = None
                if current.read_at is not None:
                    log.warning(
                        "migration-fsm client recovered: %s is %s at %d%%",
                        self.migration,
                        phase.value,
                        percent,
                        extra={"migration": self.migration, "phase": phase.value, "version": version},
                    )

    def _failed(self, exc: BaseException, *, reconnect: bool = True) -> None:
        if reconnect:
            self._close_conn()
        current = self._snapshot
        with self._counters_lock:
            self._counters["refresh_errors"] += 1
            first = self._stale_since is None or (
                current.read_at is None and self._counters["refresh_errors"] == 1
            )
            if self._stale_since is None:
                self._stale_since = time.monotonic()
                self._counters["outages"] += 1
        if not current.stale:
            self._snapshot = Snapshot(
                current.migration,
                current.phase,
                current.version,
                current.percent,
                current.routing,
                True,
                current.read_at,
            )
        if first:  # once per outage, not once per call or per refresh
            log.warning(
                "migration-fsm client cannot read %s, keeping phase %s (stale): %s",
                self.migration,
                current.phase.value,
                _first_line(exc),
                extra={"migration": self.migration, "phase": current.phase.value},
            )

    def _close_conn(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(Exception):  # closing a broken connection may fail; nothing to do
                conn.close()


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}"


class RepairLog:
    """The dual-write repair log in the migration database: failed second writes."""

    def __init__(self, url: str, migration: str) -> None:
        self.url = url
        self.migration = migration
        self._engine: Any = None
        self._lock = threading.Lock()

    def _get_engine(self) -> Any:
        with self._lock:
            if self._engine is None:
                from .journal import make_engine

                self._engine = make_engine(self.url)
            return self._engine

    def record(self, key: str, side: str, error: str) -> None:
        """Add an open entry: `side` missed the write of `key`."""
        from sqlalchemy import insert

        from .journal import repair_log_table

        with self._get_engine().begin() as conn:
            conn.execute(
                insert(repair_log_table).values(
                    migration=self.migration,
                    key=key,
                    side=side,
                    error=error[:2000],
                    status="open",
                    attempts=0,
                    created_at=datetime.now(UTC),
                )
            )

    def close(self) -> None:
        with self._lock:
            if self._engine is not None:
                self._engine.dispose()
                self._engine = None


class _WriterBase:
    def __init__(
        self,
        client: PhaseClient,
        old: TaskStore,
        new: TaskStore,
        *,
        strict: bool = False,
        repair: RepairLog | None,
    ) -> None:
        self.client = client
        self.old = old
        self.new = new
        self.strict = strict
        self.repair = repair or RepairLog(client.url, client.migration)
        self._lock = threading.Lock()
        self._counters = {
            "writes": 0,
            "second_writes": 0,
            "second_writes_behind": 0,
            "repair_entries": 0,
            "failed_writes": 0,
        }

    def _plan(self, key: str) -> tuple[tuple[str, TaskStore], tuple[str, TaskStore] | None]:
        route = self.client.routing(key)
        if route.authoritative == "old":
            first, second, write_second = ("old", self.old), ("new", self.new), route.write_new
        else:
            first, second, write_second = ("new", self.new), ("old", self.old), route.write_old
        return first, second if write_second else None

    def _count(self, name: str) -> None:
        with self._lock:
            self._counters[name] += 1

    def counters(self) -> dict[str, int]:
        """Plain numbers for the application's metrics system."""
        with self._lock:
            return dict(self._counters)

    def close(self) -> None:
        """Close the repair log's connections (the client and stores are the caller's)."""
        self.repair.close()

    def __enter__(self) -> Any:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _describe(self, exc: BaseException) -> str:
        if isinstance(exc, asyncio.CancelledError):
            return "cancelled between the two writes"
        if isinstance(exc, KeyboardInterrupt):
            return "interrupted between the two writes"
        return _first_line(exc)


def _second_put(store: Any) -> tuple[str, bool]:
    """The method for a second write to `store`, and whether it says if it wrote: the store's
    `put_forward` when it offers `capabilities.ForwardPut` (`SqlTaskStore` and
    `MemoryTaskStore` do), else `put`."""
    return ("put_forward", True) if isinstance(store, ForwardPut) else ("put", False)


class DualWriter(_WriterBase):
    """Writes each task per the phase's routing: the authoritative side first (its failure
    raises and nothing is written to the other side), then the other side when the phase
    writes both; a failed second write goes to the repair log (or raises when `strict`).

    The second write never moves a task back: through the store's `put_forward`, it leaves
    alone a task the other side holds as running or finished (a write delayed past a state
    transfer or a worker's claim there), so the task is not handed out a second time; such
    writes are counted as `second_writes_behind`. A store without `put_forward` gets `put`."""

    def __init__(
        self,
        client: PhaseClient,
        old: TaskStore,
        new: TaskStore,
        *,
        strict: bool = False,
        repair: RepairLog | None = None,
    ) -> None:
        super().__init__(client, old, new, strict=strict, repair=repair)

    def write(self, record: TaskRecord) -> str:
        """Write `record`; returns the authoritative side's name ("old" or "new")."""
        (first_name, first), second = self._plan(record.key)
        try:
            first.put(record)
        except Exception:
            self._count("failed_writes")
            raise
        self._count("writes")
        if second is None:
            return first_name
        second_name, store = second
        method, answers = _second_put(store)
        try:
            wrote = getattr(store, method)(record)
        except BaseException as exc:
            self.repair.record(record.key, second_name, self._describe(exc))
            self._count("repair_entries")
            if isinstance(exc, Exception) and self.strict:
                raise DualWriteError(
                    f"write of {record.key} to {second_name} failed: {_first_line(exc)}"
                ) from exc
            if not isinstance(exc, Exception):
                raise
            return first_name
        self._count("second_writes")
        if answers and not wrote:
            self._count("second_writes_behind")
        return first_name


async def _call(store: Any, method: str, *args: Any) -> Any:
    """Call a store method: awaited when it is a coroutine function, else in a worker thread."""
    fn = getattr(store, method)
    if inspect.iscoroutinefunction(fn):
        return await fn(*args)
    return await asyncio.to_thread(fn, *args)


class AsyncDualWriter(_WriterBase):
    """`DualWriter` for asyncio: stores may be async (`async def put`) or plain (run in a
    thread). A cancellation between the two writes still leaves a repair entry."""

    def __init__(
        self,
        client: PhaseClient,
        old: Any,
        new: Any,
        *,
        strict: bool = False,
        repair: RepairLog | None = None,
    ) -> None:
        super().__init__(client, old, new, strict=strict, repair=repair)

    async def write(self, record: TaskRecord) -> str:
        """Write `record`; returns the authoritative side's name."""
        (first_name, first), second = self._plan(record.key)
        try:
            await _call(first, "put", record)
        except Exception:
            self._count("failed_writes")
            raise
        self._count("writes")
        if second is None:
            return first_name
        second_name, store = second
        method, answers = _second_put(store)
        try:
            wrote = await _call(store, method, record)
        except BaseException as exc:
            # Shielded: recording the repair must survive the cancellation that caused it.
            await asyncio.shield(
                asyncio.to_thread(self.repair.record, record.key, second_name, self._describe(exc))
            )
            self._count("repair_entries")
            if isinstance(exc, Exception) and self.strict:
                raise DualWriteError(
                    f"write of {record.key} to {second_name} failed: {_first_line(exc)}"
                ) from exc
            if not isinstance(exc, Exception):
                raise
            return first_name
        self._count("second_writes")
        if answers and not wrote:
            self._count("second_writes_behind")
        return first_name


class _ReaderBase:
    def __init__(self, client: PhaseClient, old: Any, new: Any, *, shadow_sample: float = 0.0) -> None:
        if not 0.0 <= shadow_sample <= 1.0:
            raise ValueError("shadow_sample must be between 0 and 1")
        self.client = client
        self.old = old
        self.new = new
        self.shadow_sample = shadow_sample
        self._random: Callable[[], float] = random.random
        self._lock = threading.Lock()
        self._counters = {
            "reads": 0,
            "fallbacks": 0,
            "new_errors": 0,
            "shadow_reads": 0,
            "shadow_mismatches": 0,
        }

    def counters(self) -> dict[str, int]:
        """Plain numbers for the application's metrics system."""
        with self._lock:
            return dict(self._counters)

    def _count(self, name: str) -> None:
        with self._lock:
            self._counters[name] += 1

    def _should_shadow(self) -> bool:
        return (
            self.shadow_sample > 0
            and self.client.phase is Phase.DUAL_WRITE
            and self._random() < self.shadow_sample
        )

    def _compare(self, key: str, primary: TaskRecord | None, shadow: TaskRecord | None) -> None:
        self._count("shadow_reads")
        if primary is None and shadow is None:
            return
        if primary is None or shadow is None:
            fields = ["(missing on new)" if shadow is None else "(missing on old)"]
        else:
            fields = primary.differing_fields(shadow)
        if fields:
            self._count("shadow_mismatches")
            log.warning(
                "shadow read of %s differs on %s",
                key,
                ", ".join(fields),
                extra={"migration": self.client.migration, "key": key, "fields": fields},
            )


class FallbackReader(_ReaderBase):
    """Reads per routing; in `cutover` and `cleanup` a miss or an error on new falls back to
    old (counted). With `shadow_sample`, a sampled read in `dual_write` is also done on new
    and compared; mismatches are counted and logged, never raised."""

    def get(self, key: str) -> TaskRecord | None:
        route = self.client.routing(key)
        self._count("reads")
        if route.read_from != "new":
            record: TaskRecord | None = self.old.get(key)
            if self._should_shadow():
                try:
                    self._compare(key, record, self.new.get(key))
                except Exception as exc:  # noqa: BLE001 - a shadow read never fails the caller
                    log.warning("shadow read of %s failed: %s", key, _first_line(exc))
            return record
        try:
            record = self.new.get(key)
        except Exception:
            if route.read_fallback != "old":
                raise
            self._count("new_errors")
            record = None
        if record is None and route.read_fallback == "old":
            self._count("fallbacks")
            record = self.old.get(key)
        return record


class AsyncFallbackReader(_ReaderBase):
    """`FallbackReader` for asyncio (async stores are awaited, plain ones run in a thread)."""

    async def get(self, key: str) -> TaskRecord | None:
        route = self.client.routing(key)
        self._count("reads")
        if route.read_from != "new":
            record: TaskRecord | None = await _call(self.old, "get", key)
            if self._should_shadow():
                try:
                    self._compare(key, record, await _call(self.new, "get", key))
                except Exception as exc:  # noqa: BLE001 - a shadow read never fails the caller
                    log.warning("shadow read of %s failed: %s", key, _first_line(exc))
            return record
        try:
            record = await _call(self.new, "get", key)
        except Exception:
            if route.read_fallback != "old":
                raise
            self._count("new_errors")
            record = None
        if record is None and route.read_fallback == "old":
            self._count("fallbacks")
            record = await _call(self.old, "get", key)
        return record
