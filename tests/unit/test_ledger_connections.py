"""The ledger's hot path on PostgreSQL (`claim`, `finish`, `finish_many` on per-thread raw
psycopg connections in autocommit, `journal/ledger.py`): round trips and commits counted
from libpq's protocol trace, a broken connection replaced rather than reused, connection loss
surfacing as `DatabaseUnavailable`, and the same rules through SQLAlchemy for another driver.
On SQLite the ledger has no raw connections (every path is SQLAlchemy's)."""

from __future__ import annotations

import gc
import logging
import os
import threading
from typing import TYPE_CHECKING

import psycopg
import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from migration_fsm.exceptions import DatabaseUnavailable
from migration_fsm.journal.ledger import Ledger
from migration_fsm.journal.workers import Workers
from tests.support.pgbouncer import start_pgbouncer
from tests.support.pgtrace import engine_trace, next_connection, pg_trace
from tests.support.proxy import TcpProxy

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

    from migration_fsm.journal import Journal

M = "default"


@pytest.fixture
def ledger(upgraded_url: str, store: Journal) -> Iterator[Ledger]:
    with Ledger(upgraded_url, workers=Workers(store.engine, ttl_seconds=30)) as opened:
        yield opened


def _backend_pid(ledger: Ledger) -> int:
    """The backend of the connection the ledger's next call takes."""
    return int(next_connection(ledger).info.backend_pid)


#: The raw connections are PostgreSQL's hot path: these tests run on PostgreSQL only (SQLite's
#: ledger has none: `test_ledger.py::test_sqlite_has_no_raw_connections`), never skipped.
pytestmark = pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)


def test_claim_and_finish_are_one_round_trip_and_one_commit_each(ledger: Ledger) -> None:
    with pg_trace(ledger) as claim_trace:
        result = ledger.claim(M, "k", "new", "w")
    assert result.claim is not None
    with pg_trace(ledger) as finish_trace:
        assert ledger.finish(result.claim, "succeeded")
    # Autocommit: no BEGIN / COMMIT around the single statement; it commits by itself.
    assert (claim_trace.statements, claim_trace.round_trips) == (["WITH"], 1)
    assert (finish_trace.statements, finish_trace.round_trips) == (["WITH"], 1)
    # A batch: one transaction (BEGIN, the statements and COMMIT sent as one pipeline).
    claims = [ledger.claim(M, f"b{i}", "new", "w").claim for i in range(3)]
    with pg_trace(ledger) as batch_trace:
        assert ledger.finish_many([(c, "succeeded") for c in claims if c is not None]) == 3
    assert batch_trace.statements == ["BEGIN", "WITH", "WITH", "WITH", "COMMIT"]
    # A lost claim reads the claim row to say why: a second round trip, still no transaction.
    with pg_trace(ledger) as lost_trace:
        assert ledger.claim(M, "k", "new", "w2").reason == "succeeded"
    assert lost_trace.statements[:2] == ["WITH", "SELECT"]
    assert ledger.counts(M).succeeded == 4


def test_finish_many_counts_only_the_claims_still_ours(ledger: Ledger, store: Journal) -> None:
    """The batch's row count is the claims updated, not the history rows."""
    Workers(store.engine, ttl_seconds=30).register(M, "old", "w1")
    first = ledger.claim(M, "a", "old", "w1").claim
    second = ledger.claim(M, "b", "old", "w1").claim
    assert first is not None
    assert second is not None
    assert ledger.hand_over(M, "b", "old", "new").reason == "live"
    assert ledger.finish(second, "failed")
    assert ledger.hand_over(M, "b", "old", "new")  # the failed claim is handed over
    # A repeated failure of b is no longer ours (handed over); a's success is.
    assert ledger.finish_many([(first, "succeeded"), (second, "failed")]) == 1
    assert [e.outcome for e in ledger.executions(M, "b")] == ["failed"]  # recorded once, as it went
    assert ledger.claim_of(M, "b") is not None


def test_concurrent_calls_take_their_own_connections_and_idle_ones_are_reused(ledger: Ledger) -> None:
    """As many connections as calls ran at once: two threads inside a call at the same time
    hold two; afterwards both are idle, reused by the next calls, and closed by close()."""
    assert ledger._pg is not None
    pg = ledger._pg
    inside, release = threading.Barrier(2), threading.Event()
    seen: list[int] = []

    def work() -> None:
        with pg.cursor() as cur:
            row = cur.execute("SELECT pg_backend_pid()").fetchone()
            assert row is not None
            seen.append(int(row[0]))
            inside.wait(timeout=10)
            release.wait(timeout=10)

    threads = [threading.Thread(target=work) for _ in range(2)]
    for t in threads:
        t.start()
    while len(seen) < 2:  # both are inside a call (bounded by the barrier's timeout)
        release.wait(0.005)
    release.set()
    for t in threads:
        t.join()
    assert len(set(seen)) == 2
    assert len(pg._idle) == 2  # given back, not closed
    for i in range(5):  # one thread: the same connection again and again
        assert ledger.claim(M, f"k{i}", "new", "w").allowed
    assert len(pg._idle) == 2
    assert _backend_pid(ledger) in seen
    idle = list(pg._idle)
    ledger.close()
    assert all(conn.closed for conn in idle)
    # Used again after close(): it connects afresh.
    assert ledger.claim(M, "after-close", "new", "w").allowed
    assert _backend_pid(ledger) not in seen


def test_a_terminated_connection_raises_database_unavailable_once_then_is_replaced(
    ledger: Ledger, upgraded_url: str
) -> None:
    """The server kills the backend: the next call fails as DatabaseUnavailable (the task is
    not started), the broken connection is dropped, and the call after that reconnects."""
    assert ledger.claim(M, "k1", "new", "w").allowed
    victim = _backend_pid(ledger)
    admin = create_engine(upgraded_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        assert conn.execute(text("SELECT pg_terminate_backend(:p)"), {"p": victim}).scalar()
    admin.dispose()
    with pytest.raises(DatabaseUnavailable, match="ledger database"):
        ledger.claim(M, "k2", "new", "w")
    assert ledger.claim_of(M, "k2") is None  # nothing was claimed
    result = ledger.claim(M, "k2", "new", "w")
    assert result.claim is not None
    assert _backend_pid(ledger) != victim
    assert ledger.finish(result.claim, "succeeded")


def test_a_cut_network_surfaces_as_database_unavailable_and_recovers(upgraded_url: str) -> None:
    """Through a proxy that drops every connection: claims and finishes fail as
    DatabaseUnavailable (never a raw driver error), and work again once it is back."""
    parsed = make_url(upgraded_url)
    proxy = TcpProxy(parsed.host or "127.0.0.1", parsed.port or 5432)
    url = parsed.set(host="127.0.0.1", port=proxy.port).render_as_string(hide_password=False)
    try:
        with Ledger(url) as ledger:
            held = ledger.claim(M, "k1", "new", "w").claim
            assert held is not None
            proxy.cut()
            with pytest.raises(DatabaseUnavailable, match="ledger database"):
                ledger.finish(held, "succeeded")
            with pytest.raises(DatabaseUnavailable, match="ledger database"):
                ledger.claim(M, "k2", "new", "w")  # reconnecting fails too
            proxy.restore()
            assert ledger.finish(held, "succeeded")  # the finish kept by the caller, written now
            assert ledger.claim(M, "k2", "new", "w").allowed
    finally:
        proxy.close()


def test_an_interrupted_statement_drops_the_connection(
    ledger: Ledger, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Anything escaping a statement (here an interrupt) closes the connection: it is never
    reused in an unknown state."""
    assert ledger.claim(M, "k1", "new", "w").allowed
    conn = next_connection(ledger)

    class Interrupted(BaseException):
        pass

    def interrupt(*_: object, **__: object) -> None:
        raise Interrupted

    with monkeypatch.context() as patch:
        patch.setattr(type(conn), "cursor", interrupt)
        with pytest.raises(Interrupted):
            ledger.claim(M, "k2", "new", "w")
    assert conn.closed
    assert ledger.claim(M, "k2", "new", "w").allowed


def test_prepared_statements_are_the_default_and_can_be_turned_off(upgraded_url: str) -> None:
    """Prepared after psycopg's default threshold; off for PgBouncer in transaction pooling
    (`prepared_statements=False`)."""
    with Ledger(upgraded_url) as prepared, Ledger(upgraded_url, prepared_statements=False) as plain:
        for ledger, name in ((plain, "p"), (prepared, "q")):
            for i in range(6):
                result = ledger.claim(M, f"{name}{i}", "new", "w")
                assert result.claim is not None
                assert ledger.finish(result.claim, "succeeded")
        assert plain._pg is not None
        assert prepared._pg is not None
        count = "SELECT count(*) FROM pg_prepared_statements"
        assert next_connection(plain).execute(count).fetchone() == (0,)
        row = next_connection(prepared).execute(count).fetchone()
        assert row is not None
        assert row[0] >= 2  # the claim and the finish


def test_another_postgresql_driver_runs_the_same_statements_through_sqlalchemy(
    ledger: Ledger, store: Journal
) -> None:
    """Without psycopg 3 (`_pg` None) the same claim and finish statements go through the engine."""
    Workers(store.engine, ttl_seconds=30).register(M, "old", "w1")
    ledger._pg = None
    first = ledger.claim(M, "k", "old", "w1")
    assert first.claim is not None
    assert (True, "claimed", ("old", "w1", 1)) == (
        first.allowed,
        first.reason,
        (first.claim.side, first.claim.worker_id, first.claim.attempt),
    )
    assert not ledger.claim(M, "k", "new", "n1").allowed
    assert ledger.finish(first.claim, "failed")
    retry = ledger.claim(M, "k", "old", "w2")
    assert retry.claim is not None
    assert retry.claim.attempt == 2
    other = ledger.claim(M, "k2", "old", "w2").claim
    assert other is not None
    assert ledger.finish_many([(retry.claim, "succeeded"), (other, "succeeded")]) == 2
    assert [e.outcome for e in ledger.executions(M, "k")] == ["failed", "succeeded"]


def test_another_postgresql_driver_commits_each_call_by_itself_and_a_batch_in_one_transaction(
    ledger: Ledger, store: Journal
) -> None:
    """Without psycopg 3 (`_pg` None) the engine sends what the raw connections send: a claim,
    the read of a lost one and a single finish are one statement each, committed by itself (no
    BEGIN); a batch of finishes is one transaction, so a batch that fails half-way writes
    nothing."""
    Workers(store.engine, ttl_seconds=30).register(M, "old", "w1")
    ledger._pg = None
    with engine_trace(ledger.engine) as claim_trace:
        first = ledger.claim(M, "k", "old", "w1").claim
    assert first is not None
    with engine_trace(ledger.engine) as lost_trace:
        assert ledger.claim(M, "k", "new", "n1").reason == "running"
    with engine_trace(ledger.engine) as finish_trace:
        assert ledger.finish(first, "succeeded")
    batch = [ledger.claim(M, f"b{i}", "old", "w1").claim for i in range(2)]
    with engine_trace(ledger.engine) as batch_trace:
        assert ledger.finish_many([(c, "succeeded") for c in batch if c is not None]) == 2
    assert claim_trace.statements == ["WITH"]
    assert finish_trace.statements == ["WITH"]
    # The read is a statement of its own; the refusal is counted in a transaction after it.
    assert lost_trace.statements[:3] == ["WITH", "SELECT", "BEGIN"]
    assert batch_trace.statements == ["BEGIN", "WITH", "WITH", "COMMIT"]


def test_the_raw_connections_get_the_engine_s_timeout_and_keepalives_unless_the_url_sets_them(
    upgraded_url: str,
) -> None:
    """As `make_engine`'s: a 5 s connect timeout, TCP keepalives and `tcp_user_timeout`; a
    value the URL gives is kept."""
    given = f"{upgraded_url}&connect_timeout=3&keepalives_idle=7"
    for url, timeout, idle in ((upgraded_url, "5", "10"), (given, "3", "7")):
        with Ledger(url) as ledger:
            dsn = dict(part.split("=", 1) for part in next_connection(ledger).info.dsn.split())
        expected = {
            "connect_timeout": timeout,
            "keepalives": "1",
            "keepalives_idle": idle,
            "keepalives_interval": "5",
            "keepalives_count": "3",
            "tcp_user_timeout": "30000",
        }
        assert {name: dsn.get(name) for name in expected} == expected


def test_a_ledger_dropped_without_close_closes_its_idle_connections(upgraded_url: str) -> None:
    ledger = Ledger(upgraded_url)
    assert ledger.claim(M, "k", "new", "w").allowed
    conn = next_connection(ledger)
    assert not conn.closed
    del ledger
    gc.collect()
    assert conn.closed


def test_a_connection_left_in_a_transaction_is_closed_not_reused(ledger: Ledger) -> None:
    """A block that leaves its connection inside a transaction (no error) does not give it
    back: it is closed, and the next call connects afresh."""
    assert ledger._pg is not None
    with ledger._pg.cursor() as cur:
        cur.execute("BEGIN")
        left = cur.connection
    assert left.closed
    assert ledger._pg._idle == []
    assert ledger.claim(M, "k", "new", "w").allowed
    assert next_connection(ledger) is not left


def test_a_forked_child_opens_its_own_connection_and_reuses_it(ledger: Ledger) -> None:
    """The parent's idle connections are not the child's: a forked child connects once and
    reuses that connection for its next calls; the parent's is still there, and works, after
    the child has ended."""
    assert ledger.claim(M, "before", "new", "w").allowed
    parent = _backend_pid(ledger)
    assert ledger._pg is not None
    pg = ledger._pg
    read, write = os.pipe()
    child = os.fork()
    if child == 0:  # the child: report the backends of its two calls, then leave at once
        try:
            pids = []
            for _ in range(2):
                with pg.cursor() as cur:
                    row = cur.execute("SELECT pg_backend_pid()").fetchone()
                    assert row is not None
                    pids.append(int(row[0]))
            os.write(write, f"{pids[0]} {pids[1]} {len(pg._idle)}".encode())
        finally:
            os._exit(0)
    os.close(write)
    with os.fdopen(read) as report:
        first, second, idle = (int(word) for word in report.read().split())
    os.waitpid(child, 0)
    assert (first == second, first != parent, idle) == (True, True, 1)
    assert _backend_pid(ledger) == parent
    assert ledger.claim(M, "after", "new", "w").allowed


@pytest.fixture
def pooled(upgraded_url: str, tmp_path: Path) -> Iterator[str]:
    """The test's schema through a private PgBouncer in transaction pooling with one server
    connection: every client's statements run on it, so a statement one client prepares there
    is met by the others (the search_path is PgBouncer's `connect_query`: it passes no
    `options`). Stopped by its pid."""
    url = make_url(upgraded_url)
    options = url.query["options"]
    assert isinstance(options, str)
    schema = options.removeprefix("-csearch_path=")
    folder = tmp_path / "pgbouncer"
    folder.mkdir()
    database = f"dbname={url.database} connect_query='SET search_path = {schema}'"
    proc, port = start_pgbouncer(folder, upgraded_url, pool_size=1, databases={"mfsm": database})
    try:
        yield url.set(host="127.0.0.1", port=port, database="mfsm", query={}).render_as_string(
            hide_password=False
        )
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def _other_client(url: str) -> psycopg.Connection[tuple[object, ...]]:
    """Another client of the pool, in autocommit, preparing nothing by itself."""
    conninfo = make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)
    return psycopg.connect(conninfo, autocommit=True, prepare_threshold=None)


def _turned_off(ledger: Ledger, caplog: pytest.LogCaptureFixture) -> list[str]:
    prefix = f"ledger database {ledger.safe_url}: "
    suffix = (
        "; prepared statements are off for this ledger (behind a pooler in transaction pooling,"
        " pass prepared_statements=False)"
    )
    said = [r.getMessage() for r in caplog.records if r.name == "migration_fsm.ledger"]
    assert all(m.startswith(prefix) and m.endswith(suffix) for m in said), said
    return [m.removeprefix(prefix).removesuffix(suffix) for m in said]


def test_a_prepared_statement_taken_on_the_pooler_s_server_connection_turns_them_off_once(
    pooled: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Behind a pooler in transaction pooling, psycopg's first prepared statement's name is
    already taken on the server connection (another client prepared it there): the call is
    made again without preparing, said once, and no later call prepares."""
    caplog.set_level(logging.WARNING, logger="migration_fsm.ledger")
    with _other_client(pooled) as other, Ledger(pooled) as ledger:
        other.execute("PREPARE _pg3_0 AS SELECT 1")  # psycopg's first name on any connection
        for i in range(12):  # psycopg prepares a statement on its 6th run on a connection
            result = ledger.claim(M, f"k{i}", "new", "w")
            assert result.claim is not None, result
            assert ledger.finish(result.claim, "succeeded")
        counts = ledger.counts(M)
        assert (12, 0, 0) == (counts.succeeded, counts.running, counts.executed_twice)
        assert [e.attempt for e in ledger.executions(M, "k5")] == [1]
        # Only the other client's statement was ever prepared on the one server connection.
        assert other.execute("SELECT name FROM pg_prepared_statements").fetchall() == [("_pg3_0",)]
    assert _turned_off(ledger, caplog) == ['prepared statement "_pg3_0" already exists']


def test_a_prepared_statement_lost_on_the_pooler_s_server_connection_turns_them_off_once(
    pooled: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The ledger's prepared statements vanish from the server connection (another client of
    the pool ran DEALLOCATE ALL there): a batch of finishes fails on the first one, its
    transaction rolls back, and it runs once more without preparing; said once."""
    caplog.set_level(logging.WARNING, logger="migration_fsm.ledger")
    with _other_client(pooled) as other, Ledger(pooled) as ledger:
        for i in range(7):  # the claim and the finish statements are prepared now
            result = ledger.claim(M, f"k{i}", "new", "w")
            assert result.claim is not None, result
            assert ledger.finish(result.claim, "succeeded")
        names = other.execute("SELECT name FROM pg_prepared_statements ORDER BY name").fetchall()
        assert names == [("_pg3_0",), ("_pg3_1",)]
        held = [ledger.claim(M, f"b{i}", "new", "w").claim for i in range(3)]
        other.execute("DEALLOCATE ALL")
        assert ledger.finish_many([(c, "succeeded") for c in held if c is not None]) == 3
        for i in range(7):
            result = ledger.claim(M, f"c{i}", "new", "w")
            assert result.claim is not None, result
            assert ledger.finish(result.claim, "failed")
        counts = ledger.counts(M)
        assert (10, 7, 0, 0) == (counts.succeeded, counts.failed, counts.running, counts.executed_twice)
        assert [e.outcome for e in ledger.executions(M, "b0")] == ["succeeded"]
        assert other.execute("SELECT count(*) FROM pg_prepared_statements").fetchone() == (0,)
    assert _turned_off(ledger, caplog) == ['prepared statement "_pg3_1" does not exist']
