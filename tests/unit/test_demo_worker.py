"""The demo's gated workers (`migration_fsm.demo.worker`): a `WorkerPool` takes nothing while
its side is paused (the gate alone gates it), takes again once the pause is lifted and runs
each task once through the execution ledger; a task the ledger refuses is closed (it ran, or
was handed over) or put back (it runs elsewhere); `python -m migration_fsm.demo.worker` runs
the same pool alone in a process, on SQLite and on PostgreSQL.

Threads are synchronised by waiting for a state (never by sleeping a fixed time)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from migration_fsm.client import PhaseClient, WorkerGate
from migration_fsm.demo.systems import ExecutionLog, OldTaskManager
from migration_fsm.demo.worker import Hold, WorkerPool, as_task_database, run_worker, stable_share
from migration_fsm.journal import Journal
from migration_fsm.journal.ledger import Ledger
from migration_fsm.journal.workers import Workers
from tests.support import ROOT
from tests.unit.test_gate import M, _transition, wait_until

if TYPE_CHECKING:
    from collections.abc import Iterator

    from migration_fsm.migration import Migration

TASKS = 12


@pytest.fixture
def client(upgraded_url: str, engine: Migration) -> Iterator[PhaseClient]:  # `engine` inits M
    # A refresher that never fires by itself: the tests refresh explicitly.
    with PhaseClient(upgraded_url, migration=M, ttl=3600, listen=False) as phase_client:
        yield phase_client


def _queue(system: OldTaskManager, tasks: int) -> None:
    """Queue runs task-00, task-01, ... in the old task manager."""
    conn = system.database.connect()
    try:
        for i in range(tasks):
            conn.execute(
                system.database.sql(
                    "INSERT INTO runs (run_id, task_name, args, state, enqueued_at, modified_at)"
                    " VALUES (?, 'send_email', '{}', 'queued', '2026-12-06', '2026-12-06')"
                ),
                (f"task-{i:02d}",),
            )
    finally:
        conn.close()


@pytest.fixture
def old_system(tmp_path: Path) -> OldTaskManager:
    """The demo's old task manager (a SQLite file) with TASKS queued runs, task-00 .. task-11."""
    system = OldTaskManager(tmp_path / "old.db")
    _queue(system, TASKS)
    return system


@pytest.fixture
def log(tmp_path: Path) -> Iterator[ExecutionLog]:
    execution_log = ExecutionLog(tmp_path / "log.db")
    yield execution_log
    execution_log.close()


def _states(system: OldTaskManager) -> dict[str, tuple[str, int]]:
    conn = system.database.connect()
    try:
        return {
            key: (state, tries) for key, state, tries in conn.execute("SELECT run_id, state, tries FROM runs")
        }
    finally:
        conn.close()


def test_a_gated_pool_takes_nothing_while_its_side_is_paused(
    client: PhaseClient, store: Journal, old_system: OldTaskManager, log: ExecutionLog
) -> None:
    gate = WorkerGate(client, "old", "o1", background=False)
    pool = WorkerPool(old_system, log, gate, workers=2, work_seconds=0.001, idle_seconds=0.002)
    lease = _transition(store)
    lease.pause("old")
    client.refresh()
    gate.refresh()  # the pause is applied (and acknowledged) before any worker dequeues
    assert not gate.may_consume()
    pool.start()
    try:
        wait_until(lambda: pool.dequeues >= 50, "the workers dequeue again and again")
        assert {("queued", 0)} == set(_states(old_system).values())  # nothing taken
        assert {} == log.executions()
        assert 0 == pool.executed
        lease.abort()  # lifts the pause: the side consumes again
        client.refresh()
        gate.refresh()
        wait_until(lambda: pool.executed == TASKS, "every task runs once the pause is lifted")
    finally:
        pool.stop()
        gate.close()
    assert {f"task-{i:02d}": 1 for i in range(TASKS)} == log.executions()
    assert {("done", 1)} == set(_states(old_system).values())
    with Ledger.open(client.url) as ledger:
        counts = ledger.counts(M)
    assert (TASKS, 0, 0) == (counts.succeeded, counts.executed_twice, counts.refused_executions)
    assert {"old": TASKS} == log.by_side()
    assert pool.figures()["gate"]["claimed"] == TASKS


def test_a_refused_task_is_closed_when_it_ran_and_put_back_when_it_runs_elsewhere(
    client: PhaseClient, old_system: OldTaskManager, log: ExecutionLog
) -> None:
    old = WorkerGate(client, "old", "o1", background=False)
    new = WorkerGate(client, "new", "n1", background=False)
    pool = WorkerPool(old_system, log, old, workers=1, backoff_seconds=0.001)
    try:
        with new.executing("task-00") as ran:  # task-00 ran on the new side
            assert ran.allowed
        running = new.ledger.claim(M, "task-02", "new", "n1")  # task-02 runs there now (a live worker)
        assert running.allowed
        assert running.claim is not None
        conn = old_system.database.connect()
        try:
            assert "task-00" == pool.take(conn, "old-0")
            assert not pool.run_one(conn, "task-00")
            assert "task-01" == pool.take(conn, "old-0")
            assert pool.run_one(conn, "task-01")
            assert "task-02" == pool.take(conn, "old-0")
            assert not pool.run_one(conn, "task-02")
            assert "task-02" == pool.take(conn, "old-0")  # put back: the next dequeue takes it again
            new.ledger.finish(running.claim, "failed")  # failed on new, which alone retries it
            assert not pool.run_one(conn, "task-02")
        finally:
            conn.close()
    finally:
        old.close()
        new.close()
    states = _states(old_system)
    assert ("done", 1) == states["task-00"]  # it ran: this copy is closed, not run
    assert ("done", 1) == states["task-01"]
    assert ("queued", 0) == states["task-02"]  # back in the queue, its try undone
    assert {"task-01": 1} == log.executions()
    assert {"succeeded": 1, "running": 1, "failed": 1} == pool.refused
    assert 1 == pool.executed


def test_a_held_pool_stops_before_the_effect_and_says_so(
    client: PhaseClient, old_system: OldTaskManager, log: ExecutionLog, tmp_path: Path
) -> None:
    """`Hold` (`--hold-file`, for a test's SIGKILL): once armed, each worker thread stops at its
    next task inside `executing()`, claimed in the ledger and before the effect, and the
    marker names the held tasks; when the pool stops, the held tasks run as usual."""
    gate = WorkerGate(client, "old", "o1", background=False)
    arm = tmp_path / "arm"
    arm.touch()
    pool = WorkerPool(
        old_system, log, gate, workers=2, work_seconds=0.001, idle_seconds=0.002, hold=Hold(arm)
    )
    marker = tmp_path / "arm.held"
    pool.start()
    try:
        wait_until(
            lambda: marker.exists() and len(marker.read_text(encoding="utf-8").split()) == 2,
            "both worker threads hold a task",
        )
        held = marker.read_text(encoding="utf-8").split()
        assert {} == log.executions()  # no effect happened
        with Ledger.open(client.url) as ledger:
            claims = [ledger.claim_of(M, key) for key in held]
        assert [("old", "o1", "running")] * 2 == [
            (c.side, c.worker_id, c.state) for c in claims if c is not None
        ]
    finally:
        pool.stop()
        gate.close()
    assert dict.fromkeys(held, 1) == log.executions()  # released by the stop: run once


def test_a_stable_share_of_the_keys_is_slow(old_system: OldTaskManager, log: ExecutionLog) -> None:
    """`--slow-ms/--slow-share`: the same keys are slow in every process (crc32)."""
    gate = WorkerGate.__new__(WorkerGate)
    gate.side = "old"
    pool = WorkerPool(old_system, log, gate, work_seconds=0.01, slow_seconds=0.3, slow_share=0.1)
    keys = [f"task-{i:06d}" for i in range(2000)]
    slow = [key for key in keys if pool.task_seconds(key) == 0.3]
    assert 100 < len(slow) < 300
    assert all(stable_share(key) < 0.1 for key in slow)
    assert 0.01 == pool.task_seconds(next(key for key in keys if key not in slow))


def test_a_lease_is_the_new_queue_s_alone(tmp_path: Path) -> None:
    """`--lease-seconds` shortens the new queue's lease; the old task manager has none."""
    with pytest.raises(ValueError, match="only for --side new"):
        run_worker(
            "old",
            "sqlite:///unused.db",
            f"sqlite:///{tmp_path / 'old.db'}",
            "sqlite:///unused-log.db",
            lease_seconds=1,
        )


def test_a_pool_of_the_other_side_is_refused() -> None:
    """One gate per side: a pool refuses a gate of the other side (it would gate nothing)."""

    class NewGate:
        side = "new"

    with pytest.raises(ValueError, match="cannot gate"):
        WorkerPool(OldTaskManager.__new__(OldTaskManager), None, NewGate())  # type: ignore[arg-type]


def test_the_worker_runs_alone_in_a_process(
    upgraded_url: str,
    engine: Migration,  # inits M
    store: Journal,
    tmp_path: Path,
) -> None:
    """`python -m migration_fsm.demo.worker`: a worker process of one side runs the queued
    tasks through its gate (on SQLite files, or in the PostgreSQL test schema), and on SIGTERM
    finishes, deregisters and prints its figures."""
    if upgraded_url.startswith("sqlite"):
        system_url, log_url = f"sqlite:///{tmp_path / 'old.db'}", f"sqlite:///{tmp_path / 'log.db'}"
    else:
        system_url = log_url = upgraded_url  # the test's own schema (search_path in the URL)
    system = OldTaskManager(as_task_database(system_url))
    _queue(system, TASKS)
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "migration_fsm.demo.worker",
            *("--side", "old", "--control", upgraded_url, "--migration", M),
            *("--system", system_url, "--log", log_url, "--work-ms", "1"),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    try:
        deadline = time.monotonic() + 120  # a process starting on a busy machine: bounded, not timed
        while {("done", 1)} != set(_states(system).values()):
            assert proc.poll() is None, proc.communicate()[1][-3000:]
            assert time.monotonic() < deadline, "the worker process did not run every task"
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert 0 == proc.returncode, err[-3000:]
    figures = json.loads(out)
    assert ("old", TASKS, [], {}) == (
        figures["side"],
        figures["executed"],
        figures["errors"],
        figures["refused"],
    )
    log = ExecutionLog(as_task_database(log_url))
    try:
        assert {f"task-{i:02d}": 1 for i in range(TASKS)} == log.executions()
    finally:
        log.close()
    with Ledger.open(upgraded_url) as ledger:
        assert TASKS == ledger.counts(M).succeeded
    assert [] == Workers(store.engine).records(M)  # deregistered on the way out
