"""`WorkerGate` (`client/gate.py`) on SQLite and on PostgreSQL: `may_consume()` per the
routing and the pause it has applied; a new version acknowledged only after the dequeues
begun under the old one have finished; `executing(key)` claiming in the ledger, finishing
succeeded or failed; an unreachable ledger starts no task and is logged once.

Threads are synchronised with `threading.Event`s and by waiting for a state (never by
sleeping a fixed time), and nothing asserts wall-clock durations."""

from __future__ import annotations

import contextlib
import logging
import threading
from datetime import timedelta
from typing import TYPE_CHECKING

import pytest

from migration_fsm import commands
from migration_fsm.client import PhaseClient, Run, WorkerGate
from migration_fsm.journal import Journal, Lease, utcnow, workers_table
from migration_fsm.journal.workers import Workers
from tests.support.pgtrace import next_connection
from tests.unit.test_lease import _intent

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

    from migration_fsm.config import Settings
    from migration_fsm.migration import Migration
    from tests.support.cli import CliResult

M = "default"


def wait_until(predicate: Callable[[], bool], what: str) -> None:
    """Wait for a state another thread reaches (bounded, so a bug fails instead of hanging)."""
    tick = threading.Event()
    for _ in range(2000):
        if predicate():
            return
        tick.wait(0.005)
    raise AssertionError(f"never happened: {what}")


@pytest.fixture
def client(upgraded_url: str, engine: Migration) -> Iterator[PhaseClient]:
    # A refresher that never fires by itself: the tests refresh explicitly.
    with PhaseClient(upgraded_url, ttl=3600, listen=False) as phase_client:
        yield phase_client


def _gate(client: PhaseClient, side: str, worker_id: str, **kwargs: object) -> WorkerGate:
    return WorkerGate(client, side, worker_id, background=False, **kwargs)  # type: ignore[arg-type]


def _transition(store: Journal) -> Lease:
    state = store.get(M)
    lease, _ = store.claim(state, _intent(), [], "operator [h:1]", 30)
    return lease


def _seen(store: Journal, side: str, worker_id: str) -> int:
    (record,) = [w for w in Workers(store.engine).records(M, side) if w.worker_id == worker_id]
    return record.seen_version


def test_may_consume_follows_routing_and_the_pause_and_abort_lifts_it(
    client: PhaseClient, store: Journal
) -> None:
    old, new = _gate(client, "old", "o1"), _gate(client, "new", "n1")
    try:
        assert old.may_consume()  # preparation consumes from old
        assert not new.may_consume()
        assert _seen(store, "old", "o1") == store.get(M).version  # registered and acknowledged
        lease = _transition(store)
        paused = lease.pause("old")
        assert old.may_consume()  # not applied yet: the gate answers from memory
        client.refresh()
        assert client.snapshot().paused == "old"
        assert old.refresh() == paused
        assert not old.may_consume()
        assert _seen(store, "old", "o1") == paused
        new.refresh()
        assert not new.may_consume()  # the receiving side consumes only at the commit
        lifted = lease.abort().version
        client.refresh()
        old.refresh()
        assert old.may_consume()
        assert _seen(store, "old", "o1") == lifted
    finally:
        old.close()
        new.close()
    assert Workers(store.engine).records(M) == []  # closing deregisters


def test_the_ack_waits_for_the_dequeues_begun_under_the_old_version(
    client: PhaseClient, store: Journal
) -> None:
    gate = _gate(client, "old", "o1")
    before = gate.applied_version
    inside, release = threading.Event(), threading.Event()
    took: list[bool] = []

    def dequeue() -> None:
        with gate.dequeuing():
            took.append(gate.may_consume())
            inside.set()
            release.wait()

    worker = threading.Thread(target=dequeue)
    worker.start()
    inside.wait()
    paused = _transition(store).pause("old")
    client.refresh()
    applier = threading.Thread(target=gate.refresh)
    applier.start()
    wait_until(lambda: gate._lock._waiting == 1, "the apply waits for the dequeue")
    # The dequeue begun under the old version is still in progress: nothing applied or acknowledged.
    assert gate.applied_version == before
    assert _seen(store, "old", "o1") == before
    assert gate.may_consume()
    release.set()
    worker.join()
    applier.join()
    assert took == [True]
    assert gate.applied_version == paused
    assert _seen(store, "old", "o1") == paused
    with gate.dequeuing():
        assert not gate.may_consume()  # every later dequeue sees the pause
    gate.close()


def test_a_waiting_apply_holds_new_dequeues_back(client: PhaseClient, store: Journal) -> None:
    """The exclusive side is preferred: a dequeue that starts while an apply waits runs after it."""
    gate = _gate(client, "old", "o1")
    inside, release, second_in = threading.Event(), threading.Event(), threading.Event()
    seen_by_second: list[bool] = []

    def first() -> None:
        with gate.dequeuing():
            inside.set()
            release.wait()

    def second() -> None:
        with gate.dequeuing():
            seen_by_second.append(gate.may_consume())
            second_in.set()

    t1 = threading.Thread(target=first)
    t1.start()
    inside.wait()
    _transition(store).pause("old")
    client.refresh()
    applier = threading.Thread(target=gate.refresh)
    applier.start()
    wait_until(lambda: gate._lock._waiting == 1, "the apply waits")
    t2 = threading.Thread(target=second)
    t2.start()
    assert not second_in.is_set()
    release.set()
    for t in (t1, applier, t2):
        t.join()
    assert seen_by_second == [False]
    gate.close()


def test_executing_claims_and_finishes(client: PhaseClient, store: Journal) -> None:
    old, new = _gate(client, "old", "o1"), _gate(client, "new", "n1")
    with old.executing("k1") as run:
        assert run.allowed
        assert run.reason == "claimed"
    assert run.outcome == "succeeded"
    with new.executing("k1") as again:
        assert not again.allowed
        assert again.reason == "succeeded"
    runs: list[Run] = []

    def fail_in(gate: WorkerGate, key: str) -> None:
        with gate.executing(key) as failing:
            runs.append(failing)
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        fail_in(old, "k2")
    assert runs[0].allowed
    assert runs[0].outcome == "failed"
    with new.executing("k2") as other_side:
        assert not other_side.allowed  # a failed attempt is retried by its own side only
    with old.executing("k2") as retry:
        assert retry.allowed
    counts = old.ledger.counts(M)
    assert (counts.succeeded, counts.refused_executions, counts.executed_twice) == (2, 2, 0)
    assert old.counters()["claimed"] == 3
    old.close()
    new.close()


def test_an_unreachable_ledger_starts_no_task_and_logs_once(
    client: PhaseClient, caplog: pytest.LogCaptureFixture
) -> None:
    gate = _gate(client, "old", "o1", ledger_url="postgresql+psycopg://postgres@127.0.0.1:1/nowhere")
    ran = []
    with caplog.at_level(logging.WARNING, logger="migration_fsm.client"):
        for key in ("a", "b", "c"):
            with gate.executing(key) as run:
                if run.allowed:
                    ran.append(key)
                assert run.reason == "ledger_unavailable"
    assert ran == []
    assert sum("execution ledger" in r.getMessage() for r in caplog.records) == 1
    assert gate.counters()["unavailable"] == 3
    gate.close()


def test_a_ledger_connection_killed_by_the_server_starts_no_task_then_recovers(
    client: PhaseClient, upgraded_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """PostgreSQL: the hot path's raw connection is terminated by the server; the next task is
    not started (`ledger_unavailable`, never a driver error escaping `executing`), and the one
    after runs on a new connection. SQLite: the option is ignored and tasks run as usual."""
    gate = _gate(client, "old", "o1", ledger_prepared_statements=True)
    with gate.executing("k1") as run:
        assert run.allowed
    if gate.ledger.dialect == "postgresql":
        victim = next_connection(gate.ledger).info.backend_pid
        with Journal(upgraded_url) as journal, journal.engine.connect() as conn:
            conn.exec_driver_sql(f"SELECT pg_terminate_backend({int(victim)})")
            conn.commit()
        with caplog.at_level(logging.WARNING, logger="migration_fsm.client"), gate.executing("k2") as lost:
            assert not lost.allowed
            assert lost.reason == "ledger_unavailable"
        assert sum("execution ledger" in r.getMessage() for r in caplog.records) == 1
    with gate.executing("k2") as run:
        assert run.allowed
    assert gate.ledger.counts(M).succeeded == 2
    gate.close()


@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
@pytest.mark.parametrize(("given", "threshold"), [({}, 5), ({"ledger_prepared_statements": False}, None)])
def test_the_gate_s_ledger_prepares_its_statements_unless_told_not_to(
    client: PhaseClient, given: dict[str, bool], threshold: int | None
) -> None:
    """By default the ledger's raw connections prepare a statement after psycopg's threshold
    (5 runs); `ledger_prepared_statements=False` (PgBouncer in transaction pooling): never."""
    gate = _gate(client, "old", "o1", **given)
    try:
        assert next_connection(gate.ledger).prepare_threshold == threshold
    finally:
        gate.close()


def test_the_background_thread_applies_and_acknowledges(
    upgraded_url: str, engine: Migration, store: Journal
) -> None:
    with (
        PhaseClient(upgraded_url, ttl=3600, listen=False) as phase_client,
        WorkerGate(phase_client, "old", "bg", poll_seconds=0.01) as gate,
    ):
        paused = _transition(store).pause("old")
        phase_client.refresh()
        wait_until(lambda: gate.acknowledged_version == paused, "the background thread acknowledges")
        assert not gate.may_consume()
        assert _seen(store, "old", "bg") == paused


def test_status_shows_workers_per_side_and_the_ledger(
    client: PhaseClient, store: Journal, make_settings: Callable[..., Settings], cli: Callable[..., CliResult]
) -> None:
    old, new = _gate(client, "old", "o1"), _gate(client, "new", "n1")
    with old.executing("k") as run:
        assert run.allowed
    with new.executing("k") as refused:
        assert not refused.allowed
    Workers(store.engine).heartbeat(M, "old", "ghost", seen_version=0)
    with store.transaction() as conn:
        conn.execute(
            workers_table.update()
            .where(workers_table.c.worker_id == "ghost")
            .values(heartbeat_at=utcnow() - timedelta(hours=1))
        )
    shown = commands.status(make_settings(), M).as_json()
    assert shown["workers"]["old"] == {
        "live": 1,
        "acknowledged": 1,
        "gone": 1,
        "gone_ids": ["ghost"],
        "waiting_ids": [],
    }
    assert shown["workers"]["new"]["live"] == 1
    assert shown["ledger"]["succeeded"] == 1
    assert shown["ledger"]["refused_executions"] == 1
    assert shown["ledger"]["executed_twice"] == 0
    assert shown["paused"] is None
    table = cli("status", "--db", make_settings().database_url, env={"COLUMNS": "200"})
    assert "ghost" in table.stdout
    assert "executed twice 0" in table.stdout
    old.close()
    new.close()


def _age(store: Journal, worker_id: str) -> None:
    """Make a worker's heartbeat an hour old: it is gone (its process "crashed")."""
    with store.transaction() as conn:
        conn.execute(
            workers_table.update()
            .where(workers_table.c.worker_id == worker_id)
            .values(heartbeat_at=utcnow() - timedelta(hours=1))
        )


def test_batched_finishes_are_written_by_flush_size_and_close(client: PhaseClient, store: Journal) -> None:
    gate = _gate(client, "old", "o1", finish_batch_seconds=60, finish_batch_size=3)
    other = _gate(client, "new", "n1")
    for key in ("a", "b"):
        with gate.executing(key) as run:
            assert run.allowed
    assert gate.counters()["pending_finishes"] == 2
    assert gate.ledger.counts(M).running == 2  # not written yet
    with other.executing("a") as early:
        assert (early.allowed, early.reason) == (False, "running")
    with gate.executing("c"):
        pass  # the third finish fills the batch: written by this thread (no background thread)
    assert gate.counters()["pending_finishes"] == 0
    assert gate.ledger.counts(M).succeeded == 3
    with gate.executing("d"):
        pass
    assert gate.flush()
    with gate.executing("e"):
        pass
    gate.close()
    counts = other.ledger.counts(M)
    assert (counts.succeeded, counts.running) == (5, 0)
    assert Workers(store.engine).records(M, "old") == []  # everything written: deregistered
    other.close()


def test_a_crashed_batching_worker_s_claims_are_not_taken_over(client: PhaseClient, store: Journal) -> None:
    """A finish `succeeded` lost in a crash leaves a running claim of a gone worker: a gate that
    batched its finishes is never taken over (the task ran), a gate that did not is."""
    batching = _gate(client, "old", "batching", finish_batch_seconds=60)
    plain = _gate(client, "old", "plain")
    with batching.executing("ran") as run:
        assert run.allowed  # succeeded, but the finish is only in memory ...
    with contextlib.suppress(RuntimeError), plain.executing("cut") as cut:
        assert cut.allowed
        raise RuntimeError  # (failed, so that `plain` holds no running claim)
    claim = plain.ledger.claim(M, "mid-task", "old", "plain")  # a claim the crash interrupted
    assert claim.allowed
    # ... and both processes die: nothing flushed, nothing deregistered.
    _age(store, "batching")
    _age(store, "plain")
    assert Workers(store.engine).records(M, "old")[0].defers_finishes
    heir = _gate(client, "old", "heir")
    with heir.executing("ran") as again:
        assert (again.allowed, again.reason) == (False, "running")
    with heir.executing("mid-task") as taken:
        assert (taken.allowed, taken.reason) == (True, "taken_over")
    # The task's own side says "ran" is still running at the drain's timeout: handed over.
    assert heir.ledger.hand_over(M, "ran", "old", "new")
    new = _gate(client, "new", "n1")
    with new.executing("ran") as handed:
        assert handed.allowed
    heir.close()
    new.close()
    for crashed in (batching, plain):  # what the dead processes' exit would have released
        crashed.ledger.close()
        crashed.workers.close()
