"""`PhaseClient` (`client/phase.py`) read by `refresh()` on the caller's thread (a ttl of an
hour: the refresher never reads during a test): what a read adopts from the row (phase,
percent, version, the paused side, on a database from before revision 0004 too), what it
counts, and how a row that cannot be used is reported (the last snapshot kept, stale, one
warning naming the error) and recovered from. On SQLite and PostgreSQL."""

from __future__ import annotations

import functools
import logging
import os
import socket
import sqlite3
import threading
from collections.abc import Callable, Iterator
from dataclasses import replace
from datetime import UTC
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text, update
from sqlalchemy.engine import make_url

from migration_fsm.client import PhaseClient, Snapshot
from migration_fsm.config import Settings
from migration_fsm.fsm import Phase, routing_for
from migration_fsm.journal import Journal, make_engine
from migration_fsm.journal.schema import migrations_table
from migration_fsm.migration import Migration
from tests.support import PG_ADMIN_URL
from tests.support.clock import FakeClock
from tests.support.proxy import TcpProxy
from tests.unit.test_client_rules import wait_for

HOUR = 3600.0


@pytest.fixture
def client(engine: Migration, upgraded_url: str) -> Iterator[PhaseClient]:
    with PhaseClient(upgraded_url, ttl=HOUR, listen=False) as phase_client:
        yield phase_client


def _set_row(engine: Migration, **values: Any) -> None:
    """Write columns of the migration's row directly, as a restore or a broken tool would."""
    with engine.store.engine.begin() as conn:
        conn.execute(update(migrations_table).where(migrations_table.c.name == "default").values(**values))


def _warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "migration_fsm.client"]


def test_refresh_adopts_the_row_and_counts_each_read(engine: Migration, client: PhaseClient) -> None:
    """`refresh()` reads the row now and returns the new snapshot; every read is counted."""
    first = client.snapshot()
    assert (Phase.PREPARATION, 1, 0, False, None) == (
        first.phase,
        first.version,
        first.percent,
        first.stale,
        first.paused,
    )
    assert first.read_at is not None
    assert UTC == first.read_at.tzinfo  # an aware time: comparable with the journal's
    engine.advance()
    engine.advance()
    engine.ramp(40)
    assert first is client.snapshot()  # nothing is read until the refresh
    snap = client.refresh()
    assert snap is client.snapshot()
    state = engine.store.get("default")
    assert (Phase.CUTOVER, 40, state.version, routing_for(Phase.CUTOVER, 40), False, "default") == (
        snap.phase,
        snap.percent,
        snap.version,
        snap.routing,
        snap.stale,
        snap.migration,
    )
    client.refresh()
    counters = client.counters()
    assert (3, 0, 0, 0, 0, float(state.version), 0.0) == tuple(
        counters[k]
        for k in ("refreshes", "refresh_errors", "outages", "restores", "notifications", "version", "stale")
    )


def test_the_paused_side_is_read_and_anything_else_is_no_pause(
    engine: Migration, client: PhaseClient
) -> None:
    """The snapshot carries the paused side (`old` or `new`); any other value is no pause."""
    for stored, seen in (("old", "old"), ("new", "new"), ("both", None), (None, None)):
        _set_row(engine, paused_side=stored)
        assert seen == client.refresh().paused, stored


def test_a_database_before_revision_0004_is_read_without_a_pause(
    engine: Migration, upgraded_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A client deployed before `db upgrade` added `paused_side` still follows the phase,
    with no pause and no warning."""
    engine.advance()
    with engine.store.engine.begin() as conn:
        conn.execute(text("ALTER TABLE mfsm_migrations DROP COLUMN paused_side"))
    caplog.set_level(logging.WARNING, logger="migration_fsm.client")
    with PhaseClient(upgraded_url, ttl=HOUR, listen=False) as client:
        snap = client.refresh()
        assert (Phase.DUAL_WRITE, None, False) == (snap.phase, snap.paused, snap.stale)
        assert (2, 0) == (client.counters()["refreshes"], client.counters()["refresh_errors"])
    assert [] == _warnings(caplog)


def test_an_unusable_row_keeps_the_last_snapshot_stale_and_warns_once(
    engine: Migration, client: PhaseClient, caplog: pytest.LogCaptureFixture
) -> None:
    """A phase the client does not know: the last snapshot is kept whole (phase, percent,
    routing, paused side, version, when it was read), marked stale, with one warning naming
    the error (and the migration and phase as log fields) however many reads fail; the next
    good read recovers it. A second outage is counted and reported as such."""
    caplog.set_level(logging.WARNING, logger="migration_fsm.client")
    engine.advance()
    engine.advance()
    engine.ramp(40)
    _set_row(engine, paused_side="old")
    good = client.refresh()
    assert (Phase.CUTOVER, 40, "old") == (good.phase, good.percent, good.paused)
    _set_row(engine, phase="nonsense")
    for _ in range(3):
        assert replace(good, stale=True) == client.refresh()
    counters = client.counters()
    assert (5, 3, 1, 1.0) == tuple(counters[k] for k in ("refreshes", "refresh_errors", "outages", "stale"))
    _set_row(engine, phase="cutover", percent=0)
    snap = client.refresh()
    assert (Phase.CUTOVER, False) == (snap.phase, snap.stale)
    _set_row(engine, phase="")  # a second outage
    assert client.refresh().stale
    _set_row(engine, phase="dual_write")
    assert not client.refresh().stale
    counters = client.counters()
    assert (8, 4, 2, 0.0) == tuple(counters[k] for k in ("refreshes", "refresh_errors", "outages", "stale"))
    assert [
        "migration-fsm client cannot read default, keeping phase cutover (stale):"
        " ValueError: 'nonsense' is not a valid Phase",
        "migration-fsm client recovered: default is cutover at 0%",
        "migration-fsm client cannot read default, keeping phase cutover (stale):"
        " ValueError: '' is not a valid Phase",
        "migration-fsm client recovered: default is dual_write at 0%",
    ] == _warnings(caplog)
    first = next(r for r in caplog.records if r.name == "migration_fsm.client")
    assert ("default", "cutover") == (vars(first)["migration"], vars(first)["phase"])


def test_stale_seconds_are_counted_to_the_millisecond(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`counters()["stale_seconds"]`: the time without a good read, rounded to 3 decimals."""
    from migration_fsm.client import phase as phase_module

    clock = FakeClock(100.0)
    monkeypatch.setattr(phase_module, "time", clock)
    with PhaseClient(f"sqlite:///{tmp_path / 'absent.db'}", ttl=HOUR) as client:
        clock.now = 100.12346
        assert 0.123 == client.counters()["stale_seconds"]


def test_a_migration_not_created_yet_is_named_in_the_warning(
    engine: Migration, upgraded_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A client of a migration that does not exist (yet) answers its default phase, stale,
    and says why once; its first good read is not a recovery."""
    caplog.set_level(logging.WARNING, logger="migration_fsm.client")
    with PhaseClient(upgraded_url, "later", ttl=HOUR, default_phase=Phase.DUAL_WRITE, listen=False) as client:
        client.refresh()
        snap = client.snapshot()
        assert (Phase.DUAL_WRITE, True, None, 0) == (snap.phase, snap.stale, snap.read_at, snap.version)
        assert (2, 2, 0) == tuple(client.counters()[k] for k in ("refreshes", "refresh_errors", "outages"))
        Migration(engine.store, engine.settings, "later").init()
        snap = client.refresh()
        assert (Phase.PREPARATION, False) == (snap.phase, snap.stale)
    assert [
        "migration-fsm client cannot read later, keeping phase dual_write (stale):"
        " LookupError: no migration named 'later' (yet)"
    ] == _warnings(caplog)


def test_a_read_error_is_reported_and_the_pause_is_read_once_the_database_exists(
    tmp_path: Path, make_settings: Callable[..., Settings], caplog: pytest.LogCaptureFixture
) -> None:
    """A database that cannot be opened is reported with its error (not taken for a database
    before revision 0004): once it exists, the client reads the phase and the paused side."""
    caplog.set_level(logging.WARNING, logger="migration_fsm.client")
    url = f"sqlite:///{tmp_path / 'later.db'}"
    with PhaseClient(url, ttl=HOUR) as client:
        assert client.refresh().stale
        Journal(url, engine=make_engine(url, create=True)).upgrade()
        with Journal.open(url) as store:
            Migration(store, make_settings(database_url=url), "default").init()
            with store.engine.begin() as conn:
                conn.execute(update(migrations_table).values(paused_side="new"))
        snap = client.refresh()
        assert (Phase.PREPARATION, "new", False) == (snap.phase, snap.paused, snap.stale)
    assert [
        "migration-fsm client cannot read default, keeping phase preparation (stale):"
        " OperationalError: unable to open database file"
    ] == _warnings(caplog)


def test_every_restore_is_counted_and_logged(
    engine: Migration, client: PhaseClient, caplog: pytest.LogCaptureFixture
) -> None:
    """Each read that finds a lower version (the database restored) is adopted, counted and
    logged with the migration, the phase and the version it went back to."""
    caplog.set_level(logging.WARNING, logger="migration_fsm.client")
    engine.advance()
    engine.advance()
    high = client.refresh().version
    for restored in (high - 1, high - 2):
        _set_row(engine, version=restored, phase="dual_write")
        assert (restored, Phase.DUAL_WRITE) == (client.refresh().version, client.phase)
    assert 2 == client.counters()["restores"]
    records = [r for r in caplog.records if r.name == "migration_fsm.client"]
    assert [
        f"migration-fsm client: default went back from version {high} (cutover) to version {high - 1}"
        " (dual_write): the migration database was restored; following it",
        f"migration-fsm client: default went back from version {high - 1} (dual_write) to version"
        f" {high - 2} (dual_write): the migration database was restored; following it",
    ] == [r.getMessage() for r in records]
    assert ("default", "dual_write", high - 2) == tuple(
        vars(records[-1])[k] for k in ("migration", "phase", "version")
    )


def test_the_documented_defaults(tmp_path: Path) -> None:
    """A read every second, bounded by 2 s, of migration `default`, in `preparation` until
    read (the refusals of a ttl and a URL: `test_client_rules.py`)."""
    with PhaseClient(f"sqlite:///{tmp_path / 'absent.db'}") as client:
        assert (1.0, 2.0, "default", Phase.PREPARATION) == (
            client.ttl,
            client.connect_timeout,
            client.migration,
            client.phase,
        )


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_close_waits_for_the_refresher_s_read_in_progress(
    engine: Migration, upgraded_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`close()` returns only once the refresher has finished the read it was making: nothing
    reads the database after it (its file may be removed next)."""
    client = PhaseClient(upgraded_url, ttl=0.01, listen=False)
    real_read = client._read_sqlite
    reading, release = threading.Event(), threading.Event()
    events: list[str] = []

    def held_read() -> tuple[Any, ...] | None:
        if threading.current_thread() is not client._thread:
            return real_read()
        reading.set()
        release.wait(10)
        row = real_read()
        events.append("read")
        return row

    monkeypatch.setattr(client, "_read_sqlite", held_read)
    assert reading.wait(10)

    def close() -> None:
        client.close()
        events.append("closed")

    closer = threading.Thread(target=close)
    closer.start()
    closer.join(0.5)  # close() is waiting for the read (not timed: the order below tells)
    release.set()
    closer.join(10)
    assert ["read", "closed"] == events
    assert not client._thread.is_alive()


def test_before_its_first_read_the_client_is_its_default_phase_stale(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While the constructor's first read is in progress (a metrics scrape may ask then: the
    client is tracked before it reads) and after it failed, the snapshot is the default phase
    at 0 %, stale, of the migration asked for, never read."""
    default = Snapshot("later", Phase.DUAL_WRITE, 0, 0, routing_for(Phase.DUAL_WRITE, 0), True, None)
    during: list[tuple[Snapshot, float]] = []
    real_read = PhaseClient._read_sqlite

    def first_read(self: PhaseClient) -> tuple[Any, ...] | None:
        during.append((self.snapshot(), self.counters()["stale"]))
        return real_read(self)

    monkeypatch.setattr(PhaseClient, "_read_sqlite", first_read)
    url = f"sqlite:///{tmp_path / 'absent.db'}"
    with PhaseClient(url, "later", ttl=HOUR, default_phase=Phase.DUAL_WRITE) as client:
        assert [(default, 1.0)] == during
        assert default == client.snapshot()


def test_the_client_s_threads_are_daemons_named_after_its_migration(
    engine: Migration, upgraded_url: str
) -> None:
    """A refresher thread, and on PostgreSQL a watchdog (SQLite's reads are bounded by the
    busy timeout: no watchdog); daemons, so they never hold the application's exit; both end
    with `close()`."""

    def ours() -> list[threading.Thread]:
        return [t for t in threading.enumerate() if t.name.startswith("migration-fsm-client")]

    before = ours()
    with PhaseClient(upgraded_url, ttl=HOUR, listen=False) as client:
        threads = [t for t in ours() if t not in before]
        expected = [("migration-fsm-client-default", True)]
        if client._backend == "postgresql":
            expected.append(("migration-fsm-client-watchdog-default", True))
        assert sorted(expected) == sorted((t.name, t.daemon) for t in threads)
    assert [] == [t for t in threads if t.is_alive()]


def test_a_read_opens_its_file_read_only_as_a_uri_bounded_by_connect_timeout(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each SQLite read opens the file by its escaped `file:` URI read-only (never created,
    whatever the path holds) and waits for a lock `connect_timeout` seconds at most."""
    opened: list[tuple[str, Any, Any]] = []
    real_connect = sqlite3.connect

    def connect(database: str, *args: Any, **kwargs: Any) -> sqlite3.Connection:
        if str(database).endswith("?mode=ro"):
            opened.append((database, kwargs.get("uri"), kwargs.get("timeout")))
        conn: sqlite3.Connection = real_connect(database, *args, **kwargs)
        return conn

    monkeypatch.setattr(sqlite3, "connect", connect)
    path = tmp_path / "a#b%c.db"
    with PhaseClient(f"sqlite:///{path}", ttl=HOUR, connect_timeout=0.25) as client:
        assert client.snapshot().stale
    assert [(f"{path.absolute().as_uri()}?mode=ro", True, 0.25)] == opened
    assert not path.exists()


# -- PostgreSQL only: the watchdog, LISTEN and the connection --------------------------------

pg_only = pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)


def _through(proxy: TcpProxy, url: str) -> str:
    return make_url(url).set(host="127.0.0.1", port=proxy.port).render_as_string(hide_password=False)


def _backend_pid(client: PhaseClient) -> int:
    pid: int = client._conn.info.backend_pid
    return pid


@pg_only
def test_a_read_that_never_answers_is_cut_after_connect_timeout_and_the_next_one_reconnects(
    engine: Migration, upgraded_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A read sent into a partition that drops packets (no error, no reset: it would wait for
    ever) is cut by the watchdog after `connect_timeout`, well before the stale bound (ttl of
    an hour): the read fails with a timeout, named in the one warning, and once packets flow
    the next read reconnects and recovers."""
    caplog.set_level(logging.WARNING, logger="migration_fsm.client")
    proxy = TcpProxy(*_server(upgraded_url))
    try:
        with PhaseClient(_through(proxy, upgraded_url), ttl=HOUR, connect_timeout=1, listen=False) as client:
            first = _backend_pid(client)
            proxy.blackhole()
            done = threading.Event()

            def read() -> None:
                client.refresh()
                done.set()

            threading.Thread(target=read, daemon=True).start()
            assert done.wait(20), "the read sent into the partition was never cut"
            counters = client.counters()
            assert (True, 1, 1) == (client.snapshot().stale, counters["refresh_errors"], counters["outages"])
            assert client._conn is None
            proxy.restore()
            engine.advance()
            snap = client.refresh()
            assert (Phase.DUAL_WRITE, False) == (snap.phase, snap.stale)
            assert first != _backend_pid(client)
    finally:
        proxy.close()
    assert [
        "migration-fsm client cannot read default, keeping phase preparation (stale):"
        " TimeoutError: the database did not answer within 1 s",
        "migration-fsm client recovered: default is dual_write at 0%",
    ] == _warnings(caplog)


@pg_only
def test_a_listen_probe_that_never_answers_is_cut_after_connect_timeout(
    engine: Migration, upgraded_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A partition that drops packets begins right after the client's connection is made, so
    the LISTEN probe's first statement (not a read) is sent into it: the watchdog cuts it after
    `connect_timeout` as it cuts a read (it waited for ever before), the client starts stale
    with the one warning, and once packets flow the next read reconnects and listens (its first
    good read, as any client's, is not announced as a recovery)."""
    caplog.set_level(logging.WARNING, logger="migration_fsm.client")
    proxy = TcpProxy(*_server(upgraded_url))

    class PartitionedOnce(PhaseClient):
        partitioned = False

        def _connect(self, name: str = "migration-fsm client") -> Any:
            conn = super()._connect(name)
            if not PartitionedOnce.partitioned:
                PartitionedOnce.partitioned = True
                proxy.blackhole()
            return conn

    made: list[PhaseClient] = []
    starting = threading.Thread(
        target=lambda: made.append(
            PartitionedOnce(_through(proxy, upgraded_url), ttl=HOUR, connect_timeout=1)
        ),
        daemon=True,
    )
    try:
        starting.start()
        starting.join(20)
        assert made, "the LISTEN probe sent into the partition was never cut"
        with made[0] as client:  # no read has succeeded yet: an error, not an outage (none began)
            counters = client.counters()
            assert (True, 1, 0) == (client.snapshot().stale, counters["refresh_errors"], counters["outages"])
            assert client._conn is None
            proxy.restore()
            engine.advance()
            snap = client.refresh()
            assert (Phase.DUAL_WRITE, False) == (snap.phase, snap.stale)
            assert client._listen
    finally:
        proxy.close()
    assert [
        "migration-fsm client cannot read default, keeping phase preparation (stale):"
        " TimeoutError: the database did not answer within 1 s",
    ] == _warnings(caplog)


def _server(url: str) -> tuple[str, int]:
    parsed = make_url(url)
    return parsed.host or "127.0.0.1", parsed.port or 5432


@pg_only
def test_the_watchdog_leaves_a_finished_read_s_connection_alone(engine: Migration, upgraded_url: str) -> None:
    """The watchdog shuts the socket of the read it found in flight only: when that read has
    finished meanwhile (another began, or none is in flight), the connection is left as it is
    and the next read uses it, without an error."""
    with PhaseClient(upgraded_url, ttl=HOUR, listen=False) as client:
        pid = _backend_pid(client)
        client._abort_read(12.5)  # no read in flight
        with client._conn_lock:
            client._busy_since = 20.0  # a read in flight, begun at 20.0
        client._abort_read(10.0)  # the read the watchdog saw at 10.0 finished
        with client._conn_lock:
            client._busy_since = None
        engine.advance()
        snap = client.refresh()
        assert (Phase.DUAL_WRITE, False, 0) == (snap.phase, snap.stale, client.counters()["refresh_errors"])
        assert pid == _backend_pid(client)
        assert not client._timed_out


@pg_only
def test_the_watchdog_does_not_mark_stale_when_a_read_completed_meanwhile(
    engine: Migration, upgraded_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The watchdog decides "overdue" and then reports it: a read that completed between the
    two wins (nothing marked stale, no warning, no outage)."""
    caplog.set_level(logging.WARNING, logger="migration_fsm.client")
    with PhaseClient(upgraded_url, ttl=HOUR, listen=False) as client:
        client.refresh()
        client._failed(TimeoutError("no read completed for 60 s"), overdue=60.0)
        assert (False, 0, 0) == (
            client.snapshot().stale,
            client.counters()["outages"],
            client.counters()["refresh_errors"],
        )
    assert [] == _warnings(caplog)


@pg_only
def test_a_listening_connection_that_breaks_is_replaced_at_once(
    engine: Migration, upgraded_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The server ends the client's session while it waits for notifications (a restart, an
    administrator): the client says why (the driver's error), reconnects and reads at once
    (ttl of an hour: no poll), one outage, and goes on hearing the transitions."""
    caplog.set_level(logging.WARNING, logger="migration_fsm.client")
    with PhaseClient(upgraded_url, ttl=HOUR) as client:
        first = _backend_pid(client)
        with engine.store.engine.connect() as conn:
            conn.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": first})
        assert wait_for(lambda: client._conn is not None and _backend_pid(client) != first)
        assert wait_for(lambda: not client.snapshot().stale)
        assert (1, 1) == (client.counters()["refresh_errors"], client.counters()["outages"])
        engine.advance()
        assert wait_for(lambda: client.phase is Phase.DUAL_WRITE)
    warning, recovered = _warnings(caplog)
    assert warning.startswith(
        "migration-fsm client cannot read default, keeping phase preparation (stale): OperationalError: "
    ), warning
    assert "migration-fsm client recovered: default is preparation at 0%" == recovered


@pg_only
def test_where_listen_does_not_work_the_client_says_so_once_and_polls(
    engine: Migration, upgraded_url: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The LISTEN probe's NOTIFY is sent from another connection; when it is not heard (here
    it goes to another database, as a pooler in transaction pooling loses it), the client
    warns once, naming the server and database without credentials, and polls every ttl."""
    caplog.set_level(logging.WARNING, logger="migration_fsm.client")
    real_connect = PhaseClient._connect
    elsewhere = make_url(PG_ADMIN_URL).set(drivername="postgresql").render_as_string(hide_password=False)

    def connect(self: PhaseClient, name: str = "migration-fsm client") -> Any:
        if "probe" not in name:
            return real_connect(self, name)
        import psycopg

        return psycopg.connect(elsewhere, autocommit=True)

    monkeypatch.setattr(PhaseClient, "_connect", connect)
    host, port = _server(upgraded_url)
    database = make_url(upgraded_url).database
    with PhaseClient(upgraded_url, ttl=0.05) as client:
        assert not client._listen
        engine.advance()
        assert wait_for(lambda: client.phase is Phase.DUAL_WRITE)
        assert 0 == client.counters()["notifications"]
    assert [
        f"migration-fsm client: LISTEN does not work through {host}:{port}/{database} (a pooler in"
        " transaction pooling?): following default by polling every 0.05 s"
    ] == _warnings(caplog)
    (record,) = [r for r in caplog.records if r.name == "migration_fsm.client"]
    assert "default" == vars(record)["migration"]


def test_the_postgresql_server_named_in_a_warning_has_defaults_for_what_the_url_leaves_out() -> None:
    """`localhost`, port 5432 and no database name, as libpq would take them."""
    from types import SimpleNamespace

    def target(url: str) -> str:
        return PhaseClient._safe_target(SimpleNamespace(url=url))  # type: ignore[arg-type]

    assert "localhost:5432/" == target("postgresql+psycopg://")
    assert "db.example:6432/app" == target("postgresql://u:secret@db.example:6432/app")


def test_a_notification_about_another_migration_is_ignored_and_logged_for_debugging(
    client: PhaseClient, caplog: pytest.LogCaptureFixture
) -> None:
    """Only a JSON object naming this client's migration wakes a read (and is counted);
    anything else is ignored, shown at DEBUG level, cut to 200 characters."""
    caplog.set_level(logging.DEBUG, logger="migration_fsm.client")
    long = '{"migration": "other", "pad": "' + "x" * 300 + '"}'
    assert [False, False, False, True] == [
        client._wakes(payload)
        for payload in ('{"migration": "other"}', "[1]", long, '{"migration": "default"}')
    ]
    assert 1 == client.counters()["notifications"]
    assert [
        'ignored a notification: {"migration": "other"}',
        "ignored a notification: [1]",
        f"ignored a notification: {long[:200]}",
    ] == [r.getMessage() for r in caplog.records if r.name == "migration_fsm.client"]


def test_the_postgresql_connection_bounds_follow_ttl_and_connect_timeout() -> None:
    """Whole seconds (at least 1) for the connect timeout, the keepalives' idle time (`ttl`)
    and interval (`connect_timeout`), three probes, `tcp_user_timeout` in milliseconds (at
    least 1000); a parameter the URL sets is left to it."""
    from migration_fsm.client.phase import _connection_bounds

    def bounds(ttl: float, connect_timeout: float) -> tuple[int, ...]:
        got = _connection_bounds({}, ttl, connect_timeout)
        names = ("connect_timeout", "keepalives", "keepalives_idle", "keepalives_interval")
        assert [*names, "keepalives_count", "tcp_user_timeout"] == list(got)
        return tuple(got.values())

    assert (3, 1, 7, 3, 3, 3000) == bounds(7, 3)
    assert (1, 1, 1, 1, 3, 1000) == bounds(0.2, 0.4)
    assert (2, 1, 3, 2, 3, 2500) == bounds(2.6, 2.5)
    assert {"keepalives": 1, "keepalives_interval": 3, "keepalives_count": 3, "tcp_user_timeout": 3000} == (
        _connection_bounds({"connect_timeout": "9", "keepalives_idle": "77"}, 7, 3)
    )


_CLOSE, _CLOSE_WAIT = 7, 8  # Linux's TCP states (tcp_states.h), as TCP_INFO gives them


def _tcp_state(client: PhaseClient) -> int:
    with socket.socket(fileno=os.dup(client._conn.fileno())) as sock:
        state: int = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1)[0]
    return state


def _tcp_state_is(client: PhaseClient, state: int) -> bool:
    return _tcp_state(client) == state


@pg_only
def test_cutting_a_read_on_a_connection_the_server_closed_is_quiet(
    engine: Migration, upgraded_url: str
) -> None:
    """The watchdog may cut a read whose connection the server has closed meanwhile (its
    socket no longer connected): nothing is raised (the watchdog thread must live on), and
    the next read reconnects."""
    with PhaseClient(upgraded_url, ttl=HOUR, listen=False) as client:
        with engine.store.engine.connect() as conn:
            conn.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": _backend_pid(client)})
        # The server closed its end (CLOSE_WAIT); the first cut closes ours, the second meets a
        # socket no longer connected (CLOSE: `shutdown` fails with ENOTCONN).
        for state in (_CLOSE_WAIT, _CLOSE):
            assert wait_for(functools.partial(_tcp_state_is, client, state)), _tcp_state(client)
            with client._conn_lock:
                client._busy_since = 5.0
            client._abort_read(5.0)
            assert client._timed_out
        with client._conn_lock:
            client._busy_since = None
        engine.advance()
        assert client.refresh().stale  # the read on the closed connection fails
        snap = client.refresh()
        assert (Phase.DUAL_WRITE, False) == (snap.phase, snap.stale)


@pg_only
def test_a_client_polling_more_often_than_once_a_second_still_listens(
    engine: Migration, upgraded_url: str
) -> None:
    """With a ttl under a second the refresher still waits on LISTEN between its reads: a
    notification naming the migration is heard (and counted) as it arrives."""
    with PhaseClient(upgraded_url, ttl=0.5) as client:
        with engine.store.engine.connect() as conn:
            conn.execute(text("SELECT pg_notify('migration_fsm', :p)"), {"p": '{"migration": "default"}'})
            conn.commit()
        assert wait_for(lambda: client.counters()["notifications"] == 1)


@pg_only
def test_a_listening_client_reads_only_when_woken_or_after_its_ttl(
    engine: Migration, upgraded_url: str
) -> None:
    """Waiting on LISTEN, the refresher reads the row when a notification of its migration
    arrives, once, and otherwise not before its ttl (an hour here): a second passes without
    a read."""
    with PhaseClient(upgraded_url, ttl=HOUR) as client:
        with engine.store.engine.connect() as conn:
            conn.execute(text("SELECT pg_notify('migration_fsm', :p)"), {"p": '{"migration": "default"}'})
            conn.commit()
        assert wait_for(lambda: client.counters()["refreshes"] == 2)
        assert not wait_for(lambda: client.counters()["refreshes"] > 2, timeout=1.0)
        assert 1 == client.counters()["notifications"]


@pg_only
def test_the_postgresql_client_s_connections_name_themselves_and_prepare_nothing(
    engine: Migration, upgraded_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The client's connection and its LISTEN probe's say what they are in
    `application_name` (an administrator's `pg_stat_activity`), run in autocommit and never
    prepare a statement (a pooler in transaction pooling would lose it)."""
    opened: list[tuple[str | None, bool, int | None]] = []
    real_connect = PhaseClient._connect

    def connect(self: PhaseClient, *args: Any, **kwargs: Any) -> Any:
        conn = real_connect(self, *args, **kwargs)
        opened.append(
            (conn.info.parameter_status("application_name"), conn.autocommit, conn.prepare_threshold)
        )
        return conn

    monkeypatch.setattr(PhaseClient, "_connect", connect)
    with PhaseClient(upgraded_url, ttl=HOUR):
        pass
    assert [
        ("migration-fsm client", True, None),
        ("migration-fsm client (LISTEN probe)", True, None),
    ] == opened


@pg_only
def test_the_watchdog_marks_a_refresher_stuck_outside_a_statement_stale_and_warns_once(
    engine: Migration, upgraded_url: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A read held up where the watchdog cannot cut it (not in a statement: here it waits on
    an event): once no read has completed for `ttl + connect_timeout`, the watchdog marks the
    snapshot stale with one warning saying so, counts an outage but no refresh error, and the
    read that finally completes recovers it."""
    caplog.set_level(logging.WARNING, logger="migration_fsm.client")
    release, held = threading.Event(), threading.Event()
    real_read = PhaseClient._read_postgres

    def read(self: PhaseClient) -> tuple[Any, ...] | None:
        if threading.current_thread() is self._thread:
            held.set()
            release.wait(30)
        return real_read(self)

    with PhaseClient(upgraded_url, ttl=0.2, connect_timeout=0.3, listen=False) as client:
        monkeypatch.setattr(PhaseClient, "_read_postgres", read)
        try:
            assert held.wait(10)
            assert wait_for(lambda: client.snapshot().stale)
            counters = client.counters()
            assert (1, 0) == (counters["outages"], counters["refresh_errors"])
        finally:
            release.set()
        assert wait_for(lambda: not client.snapshot().stale)
    assert [
        "migration-fsm client cannot read default, keeping phase preparation (stale):"
        " TimeoutError: no read completed for 0.5 s",
        "migration-fsm client recovered: default is preparation at 0%",
    ] == _warnings(caplog)[:2]


def test_the_postgresql_client_gives_the_driver_the_url_s_password(monkeypatch: pytest.MonkeyPatch) -> None:
    """The password of the URL reaches libpq as written (not masked), with a plain
    `postgresql://` scheme whatever driver the URL names (no server needed)."""
    import psycopg

    seen: list[str] = []

    def connect(conninfo: str, **kwargs: Any) -> Any:
        seen.append(conninfo)
        raise psycopg.OperationalError("no server here")

    monkeypatch.setattr(psycopg, "connect", connect)
    with PhaseClient("postgresql+psycopg://u:s3cret@127.0.0.1:1/db", ttl=HOUR, listen=False) as client:
        assert client.snapshot().stale
    assert ["postgresql://u:s3cret@127.0.0.1:1/db"] == seen[:1]
