"""`PhaseClient` and its `Snapshot`: the migration's phase, followed from memory (DESIGN.md
section 7).

`PhaseClient.routing(key)` is answered from memory (a snapshot swapped atomically by a
daemon refresher thread), so it is safe on every request path and in asyncio code. This
module imports neither click, rich nor alembic; it logs through the standard `logging`
module (logger `migration_fsm.client`) so that it fits whatever the application uses.
"""

from __future__ import annotations

import contextlib
import json
import secrets
import sqlite3
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final
from zlib import crc32  # the same hash as fsm.bucket, bound here: routing(key) is the hot path

from ..fsm import ROUTING, Phase, Routing, routing_for
from ._log import first_line, log

if TYPE_CHECKING:
    from collections.abc import Mapping
    from types import TracebackType

#: How long a NOTIFY sent from a second connection may take to reach the listening one
#: before the client decides that LISTEN does not work there (and polls every `ttl`).
_LISTEN_PROBE_SECONDS: Final = 1.0

_QUERY: Final = "SELECT phase, percent, version, paused_side FROM mfsm_migrations WHERE name = "
#: The same before revision 0004 (no pause): a client deployed before `db upgrade` still works.
_QUERY_BEFORE_0004: Final = "SELECT phase, percent, version, NULL FROM mfsm_migrations WHERE name = "

#: The phases whose routing is split per key (read from old for some keys, new for others),
#: read off the routing table: phase -> (the routing of a key whose bucket is below the
#: percent, that of any other key). Computed once: `routing(key)` is the hot path.
_PER_KEY: Final[Mapping[Phase, tuple[Routing, Routing]]] = {
    phase: (routing_for(phase, 100), routing_for(phase, 0))
    for phase, route in ROUTING.items()
    if route.read_from == "split"
}


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
    #: The side whose consumers a transition in progress has paused (DESIGN.md section 10):
    #: its workers' `WorkerGate.may_consume()` answers False. None when no pause is in force.
    paused: str | None = None


class PhaseClient:
    """Follows one migration's phase: cached, refreshed off the caller's path, fail-static.

    The constructor makes one synchronous read (bounded by `connect_timeout`); after that a
    daemon thread reads the database at most once per `ttl` seconds. On PostgreSQL it also
    LISTENs for the NOTIFY that every committed transition sends, which carries the new
    state, so a change is seen within milliseconds without any extra query; where LISTEN
    cannot work (behind PgBouncer in transaction pooling) it says so once and polls. When the
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
            # An escaped read-only URI, fixed now (a later chdir changes nothing): a path
            # holding '#', '?' or '%' still names its own file, and it is never created.
            self._sqlite_uri = f"{Path(self._sqlite_path).absolute().as_uri()}?mode=ro"
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
        self._query = _QUERY
        self._refresh()
        self._thread = threading.Thread(
            target=self._run, name=f"migration-fsm-client-{migration}", daemon=True
        )
        self._thread.start()

    # -- the hot path ---------------------------------------------------------------

    def snapshot(self) -> Snapshot:
        """The current snapshot (from memory)."""
        return self._snapshot

    def refresh(self) -> Snapshot:
        """Read the database now, on the caller's thread (the refresher does it anyway every
        `ttl`); for a worker that wants the latest state before it starts, and for tests."""
        self._refresh()
        return self._snapshot

    def routing(self, key: str | None = None) -> Routing:
        """Where to write, read and consume; per key during a partial cutover (from memory)."""
        snap = self._snapshot
        if key is None or snap.routing.read_from != "split":
            return snap.routing  # the same for every key (a partial cutover at 0 or 100 too)
        below, above = _PER_KEY[snap.phase]
        return below if crc32(key.encode()) % 100 < snap.percent else above

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
            paused = data.get("paused")
            state = (
                Phase(data["phase"]),
                int(data["percent"]),
                int(data["version"]),
                paused if paused in ("old", "new") else None,
            )
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
            if "paused_side" in str(exc) and self._query is _QUERY:  # a database before revision 0004
                self._query = _QUERY_BEFORE_0004
                self._close_conn()
                self._refresh()
                return
            self._failed(exc, reconnect=True)
            return
        with self._counters_lock:
            self._counters["refreshes"] += 1
        try:
            if row is None:
                raise LookupError(f"no migration named '{self.migration}' (yet)")
            paused = row[3] if len(row) > 3 and row[3] in ("old", "new") else None
            state = (Phase(row[0]), int(row[1]), int(row[2]), paused)
        except (LookupError, ValueError, TypeError) as exc:
            # The connection is fine, the row is not (yet) usable: keep listening.
            self._failed(exc, reconnect=False)
            return
        self._install(*state)

    def _read_sqlite(self) -> tuple[Any, ...] | None:
        # Read-only, opened per refresh: it never creates the file and never holds a lock.
        conn = sqlite3.connect(
            self._sqlite_uri,
            uri=True,
            timeout=self.connect_timeout,
            check_same_thread=False,
        )
        try:
            row: tuple[Any, ...] | None = conn.execute(self._query + "?", (self.migration,)).fetchone()
            return row
        finally:
            conn.close()

    def _read_postgres(self) -> tuple[Any, ...] | None:
        if self._conn is None:
            self._conn = self._connect()
            if self._listen:
                self._listen = self._listen_works()
            if self._listen:
                from ..journal import NOTIFY_CHANNEL

                self._conn.execute(f"LISTEN {NOTIFY_CHANNEL}")
        row: tuple[Any, ...] | None = self._conn.execute(self._query + "%s", (self.migration,)).fetchone()
        return row

    def _connect(self, name: str = "migration-fsm client") -> Any:
        import psycopg

        # No prepared statements: behind a pooler in transaction pooling (PgBouncer) the next
        # statement may run on a server connection where psycopg's prepared one does not exist.
        return psycopg.connect(
            self._conninfo,
            autocommit=True,
            connect_timeout=max(1, round(self.connect_timeout)),
            application_name=name,
            prepare_threshold=None,
        )

    def _listen_works(self) -> bool:
        """Whether a LISTEN on our connection hears a NOTIFY sent from another one. Behind a
        pooler in transaction pooling (PgBouncer) it never does: the LISTEN ran on whichever
        server connection served that one statement. Then say so once and poll every `ttl`."""
        channel = f"mfsm_probe_{secrets.token_hex(8)}"
        self._conn.execute(f"LISTEN {channel}")
        with self._connect("migration-fsm client (LISTEN probe)") as other:
            other.execute("SELECT pg_notify(%s, '')", (channel,))
        heard = any(True for _ in self._conn.notifies(timeout=_LISTEN_PROBE_SECONDS, stop_after=1))
        self._conn.execute(f"UNLISTEN {channel}")
        if not heard:
            log.warning(
                "migration-fsm client: LISTEN does not work through %s (a pooler in transaction"
                " pooling?): following %s by polling every %g s",
                self._safe_target(),
                self.migration,
                self.ttl,
                extra={"migration": self.migration},
            )
        return heard

    def _safe_target(self) -> str:
        from sqlalchemy.engine import make_url

        url = make_url(self.url)
        return f"{url.host or 'localhost'}:{url.port or 5432}/{url.database or ''}"

    def _install(self, phase: Phase, percent: int, version: int, paused: str | None = None) -> None:
        current = self._snapshot
        if version < current.version:  # an older read raced a newer notification: never go back
            return
        self._snapshot = Snapshot(
            self.migration,
            phase,
            version,
            percent,
            routing_for(phase, percent),
            False,
            datetime.now(UTC),
            paused,
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
                current.paused,
            )
        if first:  # once per outage, not once per call or per refresh
            log.warning(
                "migration-fsm client cannot read %s, keeping phase %s (stale): %s",
                self.migration,
                current.phase.value,
                first_line(exc),
                extra={"migration": self.migration, "phase": current.phase.value},
            )

    def _close_conn(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(Exception):  # closing a broken connection may fail; nothing to do
                conn.close()
