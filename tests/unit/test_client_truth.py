"""The `PhaseClient` follows the database row and nothing else, and always within a bound
(issue 11 items 2 and 3): a partition that silently drops packets makes it stale within
`ttl + connect_timeout` (one warning) and it recovers when packets flow again; a forged
NOTIFY routes no client; a migration database restored from a backup (a lower version) is
followed within one `ttl` and logged as a restore, by the client and by `WorkerGate`.

Real databases (SQLite, and PostgreSQL through a proxy of the test's own); no mocks."""

from __future__ import annotations

import json
import logging
import time
from typing import TYPE_CHECKING, Any

import pytest
from sqlalchemy import delete, select, text, update
from sqlalchemy.engine import make_url

from migration_fsm.client import PhaseClient, WorkerGate
from migration_fsm.fsm import Phase
from migration_fsm.journal import make_engine
from migration_fsm.journal.schema import journal_table, migrations_table
from migration_fsm.journal.workers import Workers
from tests.support.proxy import TcpProxy

if TYPE_CHECKING:
    from collections.abc import Callable

    from migration_fsm.journal import Journal
    from migration_fsm.migration import Migration


def wait_for(predicate: Callable[[], bool], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return predicate()


def _client_logs(caplog: pytest.LogCaptureFixture, words: str) -> list[str]:
    return [
        r.getMessage() for r in caplog.records if r.name == "migration_fsm.client" and words in r.getMessage()
    ]


# -- a partition that drops packets -----------------------------------------------------


@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
def test_a_blackhole_partition_makes_the_client_stale_within_its_bound_and_it_recovers(
    engine: Migration, upgraded_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Through a proxy that keeps every connection open but forwards nothing (no error, no
    reset: a read just never answers), the client says `stale` once no read has completed
    for `ttl + connect_timeout`, warns once, keeps answering from memory, and follows the
    database again when packets flow."""
    parsed = make_url(upgraded_url)
    proxy = TcpProxy(parsed.host or "127.0.0.1", parsed.port or 5432)
    url = parsed.set(host="127.0.0.1", port=proxy.port).render_as_string(hide_password=False)
    ttl, connect_timeout = 0.3, 1.0
    caplog.set_level(logging.WARNING, logger="migration_fsm.client")
    try:
        with PhaseClient(url, ttl=ttl, connect_timeout=connect_timeout) as client:
            engine.advance()
            assert wait_for(lambda: client.phase is Phase.DUAL_WRITE and not client.snapshot().stale)
            proxy.blackhole()
            started = time.monotonic()
            # The bound runs from the last completed read, at most `ttl` before the blackhole;
            # 1.5 s of slack for a shared machine.
            assert wait_for(lambda: client.snapshot().stale, timeout=ttl + connect_timeout + 1.5)
            print(f"stale {time.monotonic() - started:.2f} s into the partition")  # measured
            engine.advance()  # made during the partition, directly on the database
            assert Phase.DUAL_WRITE == client.phase
            time.sleep(ttl + connect_timeout)  # reconnects into the blackhole time out too
            assert (Phase.DUAL_WRITE, True) == (client.phase, client.snapshot().stale)
            proxy.restore()
            assert wait_for(lambda: client.phase is Phase.CUTOVER and not client.snapshot().stale)
            assert 1 == client.counters()["outages"]
    finally:
        proxy.close()
    assert 1 == len(_client_logs(caplog, "cannot read")), caplog.text
    assert 1 == len(_client_logs(caplog, "recovered")), caplog.text


@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
def test_cli_engines_bound_their_postgresql_connections(upgraded_url: str) -> None:
    """`make_engine` (every CLI command) connects with TCP keepalives and `tcp_user_timeout`
    (so a dropped peer fails a statement instead of hanging it) and no statement timeout
    unless asked (a backfill batch or a validate scan may run long); the URL's own wins."""
    engine = make_engine(upgraded_url)
    try:
        with engine.connect() as conn:
            params = conn.connection.dbapi_connection.info.get_parameters()  # type: ignore[union-attr]
            timeout = conn.execute(text("SHOW statement_timeout")).scalar()
    finally:
        engine.dispose()
    assert ("1", "10", "5", "3", "30000") == tuple(
        params.get(name)
        for name in (
            "keepalives",
            "keepalives_idle",
            "keepalives_interval",
            "keepalives_count",
            "tcp_user_timeout",
        )
    ), params
    assert "0" == timeout
    own = (
        make_url(upgraded_url)
        .update_query_dict({"keepalives_idle": "77"})
        .render_as_string(hide_password=False)
    )
    engine = make_engine(own, timeout_seconds=600)
    try:
        with engine.connect() as conn:
            params = conn.connection.dbapi_connection.info.get_parameters()  # type: ignore[union-attr]
            timeout = conn.execute(text("SHOW statement_timeout")).scalar()
    finally:
        engine.dispose()
    assert ("77", "30000") == (params.get("keepalives_idle"), params.get("tcp_user_timeout"))
    assert "10min" == timeout


@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
def test_the_ledger_and_the_client_bound_their_postgresql_connections(
    upgraded_url: str, store: Journal
) -> None:
    """The gate's ledger (raw psycopg connections) connects as `make_engine` does; the
    client with keepalives after `ttl` of silence and `tcp_user_timeout` of `connect_timeout`."""
    from migration_fsm.journal.ledger import Ledger

    ledger = Ledger(upgraded_url)
    try:
        with ledger._pg.cursor() as cur:  # type: ignore[union-attr]
            params = cur.connection.info.get_parameters()
    finally:
        ledger.close()
    assert ("1", "10", "30000") == tuple(
        params.get(n) for n in ("keepalives", "keepalives_idle", "tcp_user_timeout")
    )
    with PhaseClient(upgraded_url, migration="none", ttl=7, connect_timeout=3) as client:
        params = client._conn.info.get_parameters()
    assert ("1", "7", "3", "3000") == tuple(
        params.get(n) for n in ("keepalives", "keepalives_idle", "keepalives_interval", "tcp_user_timeout")
    )


# -- a forged notification ---------------------------------------------------------------


@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
def test_a_forged_notification_routes_no_client(engine: Migration, upgraded_url: str) -> None:
    """A NOTIFY on the channel that names a far higher version and another phase wakes a
    read of the row, which says otherwise: the routing never changes (ttl=30, so no poll
    could put it back), and the real transitions after it are followed."""
    engine.advance()
    with PhaseClient(upgraded_url, ttl=30) as client:
        version = client.snapshot().version
        assert Phase.DUAL_WRITE == client.phase
        refreshes = client.counters()["refreshes"]
        forged = {"migration": "default", "phase": "complete", "percent": 100, "version": version + 10**6}
        with engine.store.engine.connect() as conn:
            conn.execute(text("SELECT pg_notify('migration_fsm', :p)"), {"p": json.dumps(forged)})
            conn.commit()
        assert wait_for(lambda: client.counters()["refreshes"] > refreshes)  # woken: it read the row
        assert 1 == client.counters()["notifications"]
        snap = client.snapshot()
        assert (Phase.DUAL_WRITE, version, False) == (snap.phase, snap.version, snap.stale)
        engine.advance()  # a real transition is still followed, by its NOTIFY
        assert wait_for(lambda: client.phase is Phase.CUTOVER, timeout=10)
        assert engine.store.get("default").version == client.snapshot().version


# -- a restored database -----------------------------------------------------------------


def _backup(store: Journal) -> tuple[dict[str, Any], int]:
    """The migration's row and how far its journal went: what a backup holds."""
    with store.engine.connect() as conn:
        row = (
            conn.execute(select(migrations_table).where(migrations_table.c.name == "default"))
            .mappings()
            .one()
        )
    return dict(row), int(row["last_seq"])


def _restore(store: Journal, backup: tuple[dict[str, Any], int]) -> None:
    """Put the migration back as the backup holds it: its row, and no journal entry after."""
    row, last_seq = backup
    with store.engine.begin() as conn:
        conn.execute(
            delete(journal_table).where(
                journal_table.c.migration_id == row["id"], journal_table.c.seq > last_seq
            )
        )
        conn.execute(update(migrations_table).where(migrations_table.c.id == row["id"]).values(**row))


def test_a_restored_database_is_followed_within_one_ttl_and_logged(
    engine: Migration, caplog: pytest.LogCaptureFixture, upgraded_url: str
) -> None:
    """The migration database goes back to a backup taken in `dual_write`: a client that saw
    `cutover` (a higher version) follows the row within one ttl, warns that it was restored,
    and follows the transitions made after the restore, whose versions it had seen before."""
    ttl = 0.2
    caplog.set_level(logging.WARNING, logger="migration_fsm.client")
    engine.advance()
    backup = _backup(engine.store)
    with PhaseClient(upgraded_url, ttl=ttl, listen=False) as client:  # polling only: no NOTIFY help
        engine.advance()
        engine.ramp(100)
        assert wait_for(lambda: (client.phase, client.snapshot().percent) == (Phase.CUTOVER, 100))
        high = client.snapshot().version
        _restore(engine.store, backup)
        restored = time.monotonic()
        assert wait_for(lambda: client.phase is Phase.DUAL_WRITE, timeout=ttl + 2)
        print(f"followed {time.monotonic() - restored:.2f} s after the restore (ttl {ttl})")  # measured
        assert backup[0]["version"] == client.snapshot().version < high
        assert 1 == client.counters()["restores"]
        engine.advance()  # the next transition: a version the client had already seen
        assert engine.store.get("default").version <= high
        assert wait_for(lambda: (client.phase, client.snapshot().percent) == (Phase.CUTOVER, 0))
    (message,) = _client_logs(caplog, "restored")
    assert (
        f"went back from version {high} (cutover) to version {backup[0]['version']} (dual_write)" in message
    )


def test_a_gate_follows_a_restore_and_acknowledges_the_lower_version(
    engine: Migration, store: Journal, upgraded_url: str
) -> None:
    """A `WorkerGate` of the old side applies the restored (lower) version: it consumes again
    as `dual_write` says, and `seen_version` in `mfsm_workers` goes back to that version (a
    stale higher one would count as acknowledging the next transitions, a pause among them,
    before the worker applied them)."""
    engine.advance()
    backup = _backup(store)
    with PhaseClient(upgraded_url, ttl=3600, listen=False) as client:
        gate = WorkerGate(client, "old", "o1", background=False)
        try:
            assert gate.may_consume()  # dual_write: old consumes
            engine.advance()
            client.refresh()
            gate.refresh()
            assert not gate.may_consume()  # cutover: new consumes
            high = gate.applied_version
            _restore(store, backup)
            client.refresh()
            assert backup[0]["version"] == gate.refresh() < high
            assert gate.may_consume()
            (record,) = Workers(store.engine).records("default", "old")
            assert backup[0]["version"] == record.seen_version == gate.acknowledged_version
            engine.advance()  # the next transition (a version the gate applied before) applies
            client.refresh()
            assert engine.store.get("default").version == gate.refresh()
            assert not gate.may_consume()
        finally:
            gate.close()
