"""`PhaseClient` and its `Snapshot`: the migration's phase, followed from memory (DESIGN.md
section 7).

`PhaseClient.routing(key)` is answered from memory (a snapshot swapped atomically by a
daemon refresher thread), so it is safe on every request path and in asyncio code. This
module imports neither click, rich nor alembic; it logs through the standard `logging`
module (logger `migration_fsm.client`) so that it fits whatever the application uses.

**The database row is the only truth.** A NOTIFY is a wake-up, never a state: it makes the
refresher read the row at once (anyone who may `pg_notify` on the channel can wake clients,
none can route them). Reads are serialized and every read's result is adopted, a lower
version too: that is a migration database restored from a backup, logged as a restore. So a
client never holds a state the database does not hold for longer than one `ttl` (plus the
read's bound).

**Every read is bounded.** On PostgreSQL the connection has a connect timeout, TCP
keepalives and `tcp_user_timeout` (libpq parameters; any the URL sets win), and a watchdog
thread shuts the socket of a read that has not answered within `connect_timeout` (a
partition that drops packets, or a proxy that stops forwarding, would otherwise block it for
good), so the refresher reconnects. The watchdog also marks the snapshot `stale` (one
warning) once no read has completed for `ttl + connect_timeout`. No server setting is sent
(`options` would be refused by PgBouncer). On SQLite a read is bounded by the busy timeout
(`connect_timeout`).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import socket
import sqlite3
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final
from zlib import crc32  # the same hash as fsm.bucket, bound here: routing(key) is the hot path

from ..fsm import ROUTING, Phase, Routing, routing_for
from . import metrics
from ._log import first_line, log

if TYPE_CHECKING:
    from collections.abc import Iterator, Mapping
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
    daemon thread reads the database once per `ttl` seconds. On PostgreSQL it also LISTENs
    for the NOTIFY that every committed transition sends: a notification wakes the refresher,
    which reads the row at once (its payload is never applied), so a change is seen within
    milliseconds; where LISTEN cannot work (behind PgBouncer in transaction pooling) it says so
    once and polls. Every read's result is adopted, a lower version too (a restored database,
    logged). When the database cannot be read, or no read has completed for
    `ttl + connect_timeout`, the last snapshot is kept, marked `stale`, and one warning is
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
        self._counters = {
            "refreshes": 0,
            "refresh_errors": 0,
            "notifications": 0,
            "outages": 0,
            "restores": 0,
        }
        self._stale_since: float | None = time.monotonic()
        self._stale_total = 0.0
        metrics.track(self, "phase", migration)
        self._last_read = time.monotonic()  # when a read last completed (the watchdog's clock)
        self._read_lock = threading.Lock()  # one read at a time, adopted in the order made
        self._conn_lock = threading.Lock()  # `_conn`, `_busy_since`, `_timed_out` (the watchdog's view)
        self._conn: Any = None
        self._busy_since: float | None = None  # when the read in flight on `_conn` began
        self._timed_out = False  # the watchdog shut `_conn`'s socket: its read did not answer
        self._wake_watchdog = threading.Event()  # a statement began, or `close()`: look now
        self._query = _QUERY
        self._watchdog: threading.Thread | None = None
        if self._backend == "postgresql":
            self._bounds = _connection_bounds(parsed.query, ttl, connect_timeout)
            self._watchdog = threading.Thread(
                target=self._watch, name=f"migration-fsm-client-watchdog-{migration}", daemon=True
            )
            self._watchdog.start()
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
        metrics.untrack(self)
        self._stop.set()
        self._wake_watchdog.set()
        with self._conn_lock:
            busy = self._busy_since
        if busy is not None:  # a read that hangs would hold the refresher past the join
            self._abort_read(busy)
        for thread in (self._thread, self._watchdog):
            if thread is not None and thread.is_alive() and thread is not threading.current_thread():
                thread.join(timeout=5)
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
        """Block up to `seconds` on LISTEN; a notification of this migration wakes a read of
        the row at once (and restarts the `seconds`: a read was just made)."""
        import psycopg

        deadline = time.monotonic() + seconds
        while not self._stop.is_set() and (left := deadline - time.monotonic()) > 0:
            woken = False
            try:
                # A burst (or what arrived during the last read) yields together: one read.
                # Short waits: a caller's `refresh()` waits for the connection meanwhile.
                wait = min(left, 0.25, self.connect_timeout / 2)
                for note in self._conn.notifies(timeout=wait, stop_after=1):
                    woken = self._wakes(note.payload) or woken
            except (psycopg.Error, OSError) as exc:
                self._failed(exc)
                return
            if woken:
                self._refresh()
                if self._conn is None:  # the read failed: reconnect on the next poll
                    return
                deadline = time.monotonic() + seconds

    def _wakes(self, payload: str) -> bool:
        """Whether a notification is about this migration (it then wakes a read). Its state is
        never applied: anyone allowed to `pg_notify` could forge one, and only the row is the
        truth. Anything unexpected in it is ignored, so no payload can stop the refresher."""
        try:
            data = json.loads(payload)
        except ValueError:
            data = None
        if not isinstance(data, dict) or data.get("migration") != self.migration:
            log.debug("ignored a notification: %.200s", payload)
            return False
        with self._counters_lock:
            self._counters["notifications"] += 1
        return True

    def _refresh(self) -> None:
        # One read at a time (the refresher's, a caller's `refresh()`), each adopted before
        # the next begins: a read's result is never older than the one it replaces.
        with self._read_lock:
            self._refresh_locked()

    def _refresh_locked(self) -> None:
        try:
            row = self._read_sqlite() if self._backend == "sqlite" else self._read_postgres()
        except Exception as exc:  # noqa: BLE001 - any failure to read means "keep the last snapshot"
            if "paused_side" in str(exc) and self._query is _QUERY:  # a database before revision 0004
                self._query = _QUERY_BEFORE_0004
                self._close_conn()
                self._refresh_locked()
                return
            with self._conn_lock:
                timed_out = self._timed_out
            if self._stop.is_set():  # closing (`close()` may have shut a read in flight)
                self._close_conn()
                return
            if timed_out:
                exc = TimeoutError(f"the database did not answer within {self.connect_timeout:g} s")
            self._failed(exc, reconnect=True)
            return
        with self._counters_lock:
            self._counters["refreshes"] += 1
        try:
            if row is None:
                raise LookupError(f"no migration named '{self.migration}' (yet)")
            paused = row[3] if row[3] in ("old", "new") else None  # both queries have 4 columns
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
            conn = self._connect()
            with self._conn_lock:
                self._conn, self._timed_out = conn, False
            if self._listen:
                self._listen = self._listen_works()
            if self._listen:
                from ..journal import NOTIFY_CHANNEL

                with self._busy():
                    self._conn.execute(f"LISTEN {NOTIFY_CHANNEL}")
        with self._busy():
            row: tuple[Any, ...] | None = self._conn.execute(self._query + "%s", (self.migration,)).fetchone()
        return row

    @contextlib.contextmanager
    def _busy(self) -> Iterator[None]:
        """Mark a statement in flight on `_conn`, for the watchdog to bound."""
        with self._conn_lock:
            self._busy_since = time.monotonic()
        self._wake_watchdog.set()  # it may be asleep for up to `ttl`: this read's bound starts now
        try:
            yield
        finally:
            with self._conn_lock:
                self._busy_since = None

    def _watch(self) -> None:
        """The watchdog (PostgreSQL): shuts the socket of a statement that has not answered
        within `connect_timeout` (the blocked read then fails and the refresher reconnects),
        and marks the snapshot stale once no read has completed for `ttl + connect_timeout`
        (whatever the refresher is stuck in). Wakes about once per `ttl`, and whenever a
        statement begins (else a read begun while it slept would be bounded by `ttl`, not by
        `connect_timeout`)."""
        limit = self.connect_timeout
        overdue = self.ttl + limit
        while True:
            self._wake_watchdog.clear()  # before reading `_busy_since`: a later `_busy` wakes us
            now = time.monotonic()
            with self._conn_lock:
                busy = self._busy_since
            if busy is not None and now >= busy + limit:
                self._abort_read(busy)
                busy = None
            with self._counters_lock:
                stale_due = self._last_read + overdue
                stale = self._snapshot.stale
            if not stale and now >= stale_due:
                self._failed(TimeoutError(f"no read completed for {overdue:g} s"), overdue=overdue)
                stale = True
            wake = now + self.ttl
            if not stale:
                wake = min(wake, stale_due)
            if busy is not None:
                wake = min(wake, busy + limit)
            self._wake_watchdog.wait(max(0.01, wake - now))
            if self._stop.is_set():
                return

    def _abort_read(self, busy_since: float) -> None:
        """Shut the socket of `_conn` under the read begun at `busy_since` (not closed: the
        reader's thread owns the connection and closes it when its read fails)."""
        with self._conn_lock:
            if self._conn is None or self._busy_since != busy_since:
                return  # that read finished meanwhile
            try:
                fd = os.dup(self._conn.fileno())  # under the lock: the descriptor is still open
            except Exception:  # noqa: BLE001 - a connection closed meanwhile: nothing to abort
                return
            self._timed_out = True
        with contextlib.suppress(OSError), socket.socket(fileno=fd) as sock:
            sock.shutdown(socket.SHUT_RDWR)

    def _connect(self, name: str = "migration-fsm client") -> Any:
        import psycopg

        # No prepared statements: behind a pooler in transaction pooling (PgBouncer) the next
        # statement may run on a server connection where psycopg's prepared one does not exist.
        return psycopg.connect(
            self._conninfo,
            autocommit=True,
            application_name=name,
            prepare_threshold=None,
            **self._bounds,  # connect timeout, keepalives, tcp_user_timeout
        )

    def _listen_works(self) -> bool:
        """Whether a LISTEN on our connection hears a NOTIFY sent from another one. Behind a
        pooler in transaction pooling (PgBouncer) it never does: the LISTEN ran on whichever
        server connection served that one statement. Then say so once and poll every `ttl`."""
        channel = f"mfsm_probe_{secrets.token_hex(8)}"
        # Each statement on `_conn` is bounded by the watchdog, as a read is: on a connection
        # made just before a partition it would otherwise wait for ever (the wait for the
        # notification has its own bound, and `other`'s connect has `connect_timeout`).
        with self._busy():
            self._conn.execute(f"LISTEN {channel}")
        with self._connect("migration-fsm client (LISTEN probe)") as other:
            other.execute("SELECT pg_notify(%s, '')", (channel,))
        heard = any(True for _ in self._conn.notifies(timeout=_LISTEN_PROBE_SECONDS, stop_after=1))
        with self._busy():
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
        """Adopt what a read found, whatever its version: the row is the only truth. Reads
        are serialized (`_read_lock`), so this is never older than the state it replaces; a
        lower version is the database restored from a backup (logged, counted)."""
        extra = {"migration": self.migration, "phase": phase.value, "version": version}
        with self._counters_lock:
            current = self._snapshot
            self._last_read = time.monotonic()
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
            restored = current.read_at is not None and version < current.version
            if restored:
                self._counters["restores"] += 1
            recovered = self._stale_since is not None and current.read_at is not None
            if self._stale_since is not None:
                self._stale_total += time.monotonic() - self._stale_since
                self._stale_since = None
        if restored:
            log.warning(
                "migration-fsm client: %s went back from version %d (%s) to version %d (%s): the"
                " migration database was restored; following it",
                self.migration,
                current.version,
                current.phase.value,
                version,
                phase.value,
                extra=extra,
            )
        if recovered:
            log.warning(
                "migration-fsm client recovered: %s is %s at %d%%",
                self.migration,
                phase.value,
                percent,
                extra=extra,
            )

    def _failed(self, exc: BaseException, *, reconnect: bool = True, overdue: float | None = None) -> None:
        """Keep the last snapshot, marked stale; one warning per outage. `overdue` (the
        watchdog): only if still no read has completed for that long, and no refresh error
        is counted."""
        if reconnect:
            self._close_conn()
        with self._counters_lock:
            if overdue is not None and time.monotonic() - self._last_read < overdue:
                return  # a read completed meanwhile
            current = self._snapshot
            if overdue is None:
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
        with self._conn_lock:
            conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(Exception):  # closing a broken connection may fail; nothing to do
                conn.close()


#: TCP keepalives on the client's connection (libpq parameters): a dead peer is noticed
#: within about `idle + interval * count` seconds of silence.
_KEEPALIVE_COUNT: Final = 3


def _connection_bounds(query: Mapping[str, Any], ttl: float, connect_timeout: float) -> dict[str, Any]:
    """The libpq parameters that bound the client's connection: the connect timeout, TCP
    keepalives (first probe after `ttl` of silence, then every `connect_timeout`) and
    `tcp_user_timeout` (data unacknowledged for `connect_timeout` drops the connection).
    A parameter the URL sets is left to it."""
    seconds = max(1, round(connect_timeout))
    bounds = {
        "connect_timeout": seconds,
        "keepalives": 1,
        "keepalives_idle": max(1, round(ttl)),
        "keepalives_interval": seconds,
        "keepalives_count": _KEEPALIVE_COUNT,
        "tcp_user_timeout": max(1000, round(connect_timeout * 1000)),
    }
    return {name: value for name, value in bounds.items() if name not in query}
