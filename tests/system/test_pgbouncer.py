"""Everything through PgBouncer in transaction pooling, with other clients churning its pool:
every CLI command, racing operators, a SIGKILL then `resume --steal`, a hung holder stolen
from, `status --watch` and `PhaseClient` (which falls back to polling); no advisory lock of
ours is ever left behind.

Each test starts its own `pgbouncer` (the distribution's package; `make test` installs it)
on a free port in front of the shared server, with its own config file in `tmp_path`
(`pool_mode = transaction`, `default_pool_size = 2`, so server connections really are
shared), and stops it by its pid. Each test creates a database of its own on the shared
server (PgBouncer passes no `options`, so a per-test schema cannot be chosen through it).
"""

from __future__ import annotations

import json
import logging
import os
import pty
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from migration_fsm import PhaseClient
from migration_fsm.config import load_settings
from migration_fsm.fsm import Phase
from migration_fsm.journal import Journal
from migration_fsm.journal.ledger import Ledger
from migration_fsm.journal.locks import LOCK_CLASS
from migration_fsm.tasks.factory import build_store
from migration_fsm.tasks.sql.store import SqlTaskStore
from tests.support import PG_ADMIN_URL
from tests.support.cli import CliResult, ctrl_c_interrupts, run_cli
from tests.support.datatools import create_task_table, sql_stores, tasks, write_stores_config
from tests.support.forkserver import ForkServer
from tests.support.pgbouncer import start_pgbouncer
from tests.support.steps import PROC_DIR_ENV
from tests.system.test_processes import (
    HOLD,
    QUICK,
    RACERS,
    SLEEPY,
    WAIT,
    Operator,
    create_migration,
    finished,
    holder,
    race_once,
    spawn,
    wait_for,
    write_config,
)
from tests.system.test_watch_and_logs import _read_until, _wait_reading

pytestmark = pytest.mark.slow

#: Clients that churn the pool while a test runs, each looping over short transactions.
CHURNERS = 3


@dataclass
class Bouncer:
    """A PgBouncer in transaction pooling and the database behind it."""

    url: str  # the test's database, through PgBouncer
    direct: str  # the same database, straight to the server
    database: str

    def advisory_locks(self) -> int:
        """Our advisory locks held in the test's database, by anyone."""
        with psycopg.connect(conninfo(self.direct), autocommit=True) as conn:
            row = conn.execute(
                "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND classid = %s"
                " AND database = (SELECT oid FROM pg_database WHERE datname = %s)",
                (LOCK_CLASS, self.database),
            ).fetchone()
        assert row is not None
        return int(row[0])


def conninfo(url: str) -> str:
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


def churn(url: str, stop: threading.Event) -> None:
    """Short transactions through the pool until `stop`, so server connections change hands."""
    while not stop.is_set():
        try:
            with psycopg.connect(conninfo(url), autocommit=True, prepare_threshold=None) as conn:
                for _ in range(50):
                    if stop.is_set():
                        return
                    conn.execute("SELECT pg_backend_pid(), pg_sleep(0.002)")
        except psycopg.Error:
            time.sleep(0.05)


@pytest.fixture
def bouncer(tmp_path: Path) -> Iterator[Bouncer]:
    """A database of its own on the shared server, a PgBouncer in front of it, and clients
    churning that PgBouncer's pool."""
    name = f"mfsm_bouncer_{os.getpid()}_{uuid.uuid4().hex[:8]}"
    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT", connect_args={"connect_timeout": 5})
    try:
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
    except Exception as exc:  # noqa: BLE001 - no server: a failure, as everywhere in the suite
        admin.dispose()
        pytest.fail(f"PostgreSQL is unreachable: {exc}")
    direct = make_url(PG_ADMIN_URL).set(database=name)
    folder = tmp_path / "pgbouncer"
    folder.mkdir()
    proc, port = start_pgbouncer(folder, PG_ADMIN_URL)
    url = direct.set(host="127.0.0.1", port=port).render_as_string(hide_password=False)
    stop = threading.Event()
    churners = [threading.Thread(target=churn, args=(url, stop), daemon=True) for _ in range(CHURNERS)]
    for thread in churners:
        thread.start()
    try:
        yield Bouncer(url, direct.render_as_string(hide_password=False), name)
    finally:
        stop.set()
        for thread in churners:
            thread.join(timeout=10)
        proc.terminate()  # by its pid
        proc.wait(timeout=10)
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@pytest.fixture
def fork_server(tmp_path: Path) -> Iterator[ForkServer]:
    folder = tmp_path / "fork_server"
    folder.mkdir()
    server = ForkServer(folder, {"MFSM_PROC_DIR": str(tmp_path)})
    yield server
    server.close()


def run_here(op: Operator, *command: str, actor: str = "observer") -> CliResult:
    """`op.run` in this process (faster than a subprocess; the racing and the crash are real processes)."""
    return run_cli(*op.args(list(command), actor), env={PROC_DIR_ENV: str(op.proc_dir)})


def status_here(op: Operator) -> dict[str, Any]:
    report: dict[str, Any] = json.loads(ok(run_here(op, "status", "--json")).stdout)
    return report


def ok(result: CliResult) -> CliResult:
    assert 0 == result.code, result.stderr
    return result


def test_every_command_through_pgbouncer(bouncer: Bouncer, tmp_path: Path) -> None:
    """Each command, data tools included, works through transaction pooling and leaves no lock."""
    for table in ("old_tasks", "new_tasks"):
        create_task_table(bouncer.direct, table)
    config = write_stores_config(
        tmp_path / "cfg.toml",
        sql_stores(bouncer.url),
        ["backfill_batch_size = 7", "drain_timeout_seconds = 0", 'drain_policy = "requeue"'],
    )
    common = ["--db", bouncer.url, "--config", config, "--actor", "op"]

    def cli(*args: str) -> CliResult:
        result = run_cli(*args, *common)
        assert 0 == bouncer.advisory_locks(), (args, result.stderr)
        return result

    ok(cli("db", "upgrade"))
    ok(cli("init"))
    settings = load_settings(Path(config), database_url=bouncer.url, actor="setup")
    old = build_store(settings.stores["old"], "old")
    assert isinstance(old, SqlTaskStore)
    old.put_many(tasks(30))
    old.close()

    for _ in range(3):
        assert "preparation" == json.loads(ok(cli("status", "--json")).stdout)["phase"]
    ok(cli("status"))
    ok(cli("advance", "--dry-run"))
    ok(cli("advance"))
    ok(cli("backfill"))
    ok(cli("reconcile"))
    ok(cli("validate", "--json"))
    ok(cli("export", "--side", "old", "--out", str(tmp_path / "old.jsonl")))
    ok(cli("import", "--side", "new", "--in", str(tmp_path / "old.jsonl"), "--into-other-side"))
    ok(cli("advance"))
    ok(cli("ramp", "40", "--reason", "through pgbouncer"))
    ok(cli("rollback", "--reason", "through pgbouncer"))
    ok(cli("validate"))
    ok(cli("advance"))
    ok(cli("ramp", "100"))
    history = json.loads(ok(cli("history", "--json")).stdout)
    assert all(row["status"] == "committed" for row in history), history
    ok(cli("verify"))
    ok(run_cli("diagram"))
    report = json.loads(ok(cli("status", "--json")).stdout)
    assert ("cutover", 100, None) == (report["phase"], report["percent"], report["interrupted"])

    # A failing step, `resume`, and `abort`, on a migration of their own.
    (tmp_path / "flaky.toml").write_text(
        '[steps]\n"preparation->dual_write" = ["tests.support.steps:flaky"]\n'
        '"dual_write->cutover" = ["tests.support.steps:flaky"]\n',
        encoding="utf-8",
    )
    flaky = ["-m", "flaky", "--db", bouncer.url, "--config", str(tmp_path / "flaky.toml"), "--actor", "op"]
    fail = {"STEPS_FAIL": "1"}
    ok(run_cli("init", *flaky))
    assert 1 == run_cli("advance", *flaky, env=fail).code
    assert 0 == bouncer.advisory_locks()
    ok(run_cli("resume", *flaky))
    assert 1 == run_cli("advance", "--force", "--reason", "no validate here", *flaky, env=fail).code
    ok(run_cli("abort", "--reason", "through pgbouncer", *flaky))
    assert "dual_write" == json.loads(ok(run_cli("status", "--json", *flaky)).stdout)["phase"]
    ok(run_cli("verify", *flaky))
    assert 0 == bouncer.advisory_locks()


def test_racing_operators_through_pgbouncer(
    bouncer: Bouncer, tmp_path: Path, fork_server: ForkServer
) -> None:
    """Of eight `advance` processes released together, one wins, seven exit 3 naming it."""
    ok(run_cli("db", "upgrade", "--db", bouncer.url))
    config = write_config(tmp_path / "cfg.toml", steps=[HOLD], lease_seconds=120, heartbeat_seconds=1)
    op = Operator(bouncer.url, config, tmp_path)
    for round_ in range(2):
        migration = f"race{round_}"
        create_migration(bouncer.url, migration)
        racers = race_once(op, fork_server, migration)
        codes = [result.code for _, result in racers]
        assert [0] + [3] * (RACERS - 1) == sorted(codes), [result.stderr for _, result in racers]
        winner = codes.index(0)
        for _, loser in racers:
            if loser.code:
                assert holder(f"racer{winner}", racers[winner][0]) in loser.error_line
        with Journal.open(bouncer.url) as store:
            state = store.get(migration)
        assert (Phase.DUAL_WRITE, None) == (state.phase, state.in_progress_seq)
        assert 0 == bouncer.advisory_locks()
        ok(op.run("rollback", "--reason", "the next command is not blocked", migration=migration))
        assert 0 == bouncer.advisory_locks()


def _advance_into_a_sleepy_step(
    bouncer: Bouncer,
    tmp_path: Path,
    reaper: list[subprocess.Popen[bytes]],
    actor: str,
    *,
    lease: float,
    heartbeat: float,
) -> tuple[Operator, subprocess.Popen[bytes]]:
    """An `advance` process of `actor` through the PgBouncer, inside its sleepy step."""
    ok(run_cli("db", "upgrade", "--db", bouncer.url))
    config = write_config(
        tmp_path / "cfg.toml", steps=[QUICK, SLEEPY], lease_seconds=lease, heartbeat_seconds=heartbeat
    )
    op = Operator(bouncer.url, config, tmp_path)
    create_migration(bouncer.url)
    log = tmp_path / actor
    proc = spawn(["-m", "migration_fsm", *op.args(["advance"], actor)], tmp_path, log)
    reaper.append(proc)
    wait_for(lambda: (tmp_path / "inside_sleepy_step").exists() or proc.poll() is not None, "the step")
    assert None is proc.poll(), finished(proc, log).stderr
    return op, proc


def test_sigkill_then_resume_steal_through_pgbouncer(
    bouncer: Bouncer, tmp_path: Path, reaper: list[subprocess.Popen[bytes]]
) -> None:
    """A SIGKILLed transition's lock goes with it; `resume --steal` finishes it; a later command works."""
    op, proc = _advance_into_a_sleepy_step(bouncer, tmp_path, reaper, "doomed", lease=120, heartbeat=1)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=WAIT)
    # PgBouncer closes the server connection its client left in a transaction: the lock goes.
    wait_for(lambda: bouncer.advisory_locks() == 0, "the dead operator's lock to go")

    blocked = run_here(op, "advance", actor="rescuer")
    assert 3 == blocked.code, blocked.stderr
    assert holder("doomed", proc.pid) in blocked.error_line  # the live lease, not a leftover lock
    ok(run_here(op, "resume", "--steal", actor="rescuer"))
    report = status_here(op)
    assert ("dual_write", None) == (report["phase"], report["interrupted"])
    ok(run_here(op, "verify"))
    ok(run_here(op, "advance", "--dry-run", actor="later"))
    assert 0 == bouncer.advisory_locks()


def test_resume_steal_ends_a_hung_holder_through_pgbouncer(
    bouncer: Bouncer, tmp_path: Path, reaper: list[subprocess.Popen[bytes]]
) -> None:
    """`resume --steal` takes over from a holder that hangs (SIGSTOP) holding the lock."""
    op, proc = _advance_into_a_sleepy_step(bouncer, tmp_path, reaper, "hung", lease=300, heartbeat=100)
    os.kill(proc.pid, signal.SIGSTOP)
    try:
        assert 1 == bouncer.advisory_locks()  # held by the hung command's open transaction
        ok(run_here(op, "resume", "--steal", actor="rescuer"))
        report = status_here(op)
        assert ("dual_write", None) == (report["phase"], report["interrupted"])
        ok(run_here(op, "verify"))
        assert 0 == bouncer.advisory_locks()
    finally:
        proc.kill()
        os.kill(proc.pid, signal.SIGCONT)


def test_status_watch_through_pgbouncer(bouncer: Bouncer, tmp_path: Path) -> None:
    """`status --watch` keeps redrawing through the pool (many statements on one connection)."""
    ok(run_cli("db", "upgrade", "--db", bouncer.url))
    create_migration(bouncer.url)
    primary, secondary = pty.openpty()
    env = {k: v for k, v in os.environ.items() if not k.startswith("MIGRATION_FSM_")}
    env.update(COLUMNS="120", LINES="40", TERM="xterm")
    with (tmp_path / "stderr").open("wb") as stderr:
        proc = subprocess.Popen(
            [sys.executable, "-m", "migration_fsm", "status", "--watch", "--db", bouncer.url],
            stdin=secondary,
            stdout=secondary,
            stderr=stderr,
            env=env,
            preexec_fn=ctrl_c_interrupts,  # noqa: PLW1509 -- a test's child, no threads of ours in between
        )
        os.close(secondary)
        try:
            assert b"preparation" in _read_until(primary, b"preparation", timeout=30)
            # A few redraws, one a second, on the same pooled connections; a failing one would
            # show "database ... is unavailable" and keep watching.
            seen = _read_until(primary, b"never printed", timeout=3)
            assert b"unavailable" not in seen
            ok(run_cli("advance", "--db", bouncer.url, "--actor", "op"))
            assert b"rollback" in _read_until(primary, b"rollback", timeout=30)
            assert None is proc.poll()
            proc.send_signal(signal.SIGINT)
            assert 0 == _wait_reading(primary, proc, timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            os.close(primary)
    assert "prepared statement" not in (tmp_path / "stderr").read_text()
    assert 0 == bouncer.advisory_locks()


def test_phase_client_polls_through_pgbouncer(bouncer: Bouncer, caplog: pytest.LogCaptureFixture) -> None:
    """`PhaseClient` finds that LISTEN cannot work, says so once, polls every ttl and never goes stale."""
    ok(run_cli("db", "upgrade", "--db", bouncer.url))
    create_migration(bouncer.url)
    caplog.set_level(logging.INFO, logger="migration_fsm.client")
    with PhaseClient(bouncer.url, ttl=0.1) as client:
        assert Phase.PREPARATION == client.phase
        time.sleep(1.0)  # ten polls on one connection: past psycopg's prepare threshold
        ok(run_cli("advance", "--db", bouncer.url, "--actor", "op"))
        wait_for(lambda: client.phase == Phase.DUAL_WRITE, "the client to see dual_write", timeout=20)
        ok(run_cli("advance", "--db", bouncer.url, "--actor", "op"))
        wait_for(lambda: client.phase == Phase.CUTOVER, "the client to see cutover", timeout=20)
        counters = client.counters()
        assert not client.snapshot().stale
        assert (0, 0) == (counters["refresh_errors"], counters["notifications"]), counters
    said = [r.getMessage() for r in caplog.records if "LISTEN" in r.getMessage()]
    assert 1 == len(said), said


def test_ledger_turns_prepared_statements_off_through_pgbouncer(
    bouncer: Bouncer, caplog: pytest.LogCaptureFixture
) -> None:
    """A ledger left preparing its hot path's statements meets a missing or taken prepared
    statement through the pool once: it says so once, stops preparing, and loses no call."""
    ok(run_cli("db", "upgrade", "--db", bouncer.url))
    caplog.set_level(logging.WARNING, logger="migration_fsm.ledger")
    with Ledger(bouncer.url) as ledger:
        for i in range(40):  # psycopg prepares a statement on its 6th run on a connection
            result = ledger.claim("m", f"k{i}", "new", "w")
            assert result.claim is not None, result
            assert ledger.finish(result.claim, "succeeded")
        counts = ledger.counts("m")
        assert (40, 0, 0) == (counts.succeeded, counts.running, counts.executed_twice)
    said = [r.getMessage() for r in caplog.records if "prepared statements are off" in r.getMessage()]
    assert 1 == len(said), said
