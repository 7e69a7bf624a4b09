"""Huey's own consumer (its `Consumer`, thread workers, in this process, on a real SqliteHuey
file) gated by `gate_consumer`'s `GatedConsumer`: it takes nothing while the old side may not
consume, claims every task in the execution ledger around its execution, records the outcome in
the registry (completed, failed, pending again for a retry), and settles or puts back the tasks
the ledger refuses. The migration database is SQLite or PostgreSQL.

Threads are synchronised by waiting for a state (bounded), never by sleeping a fixed time."""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from huey import SqliteHuey

from migration_fsm.adapters.huey import HueyTaskStore, setup
from migration_fsm.adapters.huey.worker import GatedConsumer
from migration_fsm.client import PhaseClient, WorkerGate
from migration_fsm.journal import Journal
from migration_fsm.journal.ledger import SUCCEEDED, Ledger
from migration_fsm.migration import Migration
from migration_fsm.tasks.records import TaskStatus
from tests.unit.test_gate import wait_until

M = "default"


class App:
    """A Huey application whose tasks append their id to `ran` (the side effect counted)."""

    def __init__(self, path: Path) -> None:
        self.huey = SqliteHuey("app", filename=str(path))
        self.ran: list[str] = []
        lock = threading.Lock()

        @self.huey.task(context=True)
        def work(n: int, task: Any = None) -> int:
            with lock:
                self.ran.append(str(task.id))
            return n

        @self.huey.task(retries=2, context=True)
        def fails_once(task: Any = None) -> None:
            with lock:
                self.ran.append(str(task.id))
            if task.retries == 2:
                raise RuntimeError("the first attempt fails")

        self.work = work
        self.fails_once = fails_once
        setup(self.huey)


@pytest.fixture
def app(tmp_path: Path) -> Iterator[App]:
    application = App(tmp_path / "huey.db")
    yield application
    application.huey.storage.close()


@pytest.fixture
def client(upgraded_url: str, engine: Migration) -> Iterator[PhaseClient]:
    with PhaseClient(upgraded_url, ttl=0.05, listen=False) as phase_client:
        yield phase_client


@contextmanager
def consuming(app: App, client: PhaseClient) -> Iterator[GatedConsumer]:
    """Huey's consumer (2 thread workers), gated; its signal handlers are put back after. The
    shared client reads the current phase first (a consumer's own client reads it when built)."""
    client.refresh()
    gated = GatedConsumer(app.huey, lambda: WorkerGate(client, "old", "huey-1"), backoff_seconds=0.05)
    consumer = app.huey.create_consumer(
        workers=2, worker_type="thread", initial_delay=0.01, max_delay=0.02, check_worker_health=False
    )
    saved = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    consumer.start()
    for signum, handler in saved.items():
        signal.signal(signum, handler)
    try:
        wait_until(lambda: gated.gate is not None, "the startup hook built the gate")
        yield gated
    finally:
        consumer.stop(graceful=True)


def statuses(store: HueyTaskStore) -> dict[str, TaskStatus]:
    return {record.key: record.status for record in store.scan(None, 100)}


def test_a_paused_side_takes_nothing_then_each_task_runs_once_and_is_recorded(
    app: App, client: PhaseClient, engine: Migration, store: Journal
) -> None:
    engine.advance()
    engine.advance()  # cutover: the old side does not consume
    results = [app.work(n) for n in range(5)]
    keys = sorted(result.id for result in results)
    huey_store = HueyTaskStore(app.huey)
    with consuming(app, client) as gated:
        wait_until(lambda: gated.counters["dequeue_refused"] >= 5, "the gate refused five dequeues")
        assert [] == app.ran
        assert dict.fromkeys(keys, TaskStatus.PENDING) == statuses(huey_store)
        engine.rollback(reason="the old side consumes again")
        wait_until(lambda: sorted(app.ran) == keys, "every task ran")
        wait_until(lambda: set(statuses(huey_store).values()) == {TaskStatus.COMPLETED}, "recorded completed")
    claims = Ledger(store.url, engine=store.engine).claims_of(M, keys)
    assert dict.fromkeys(keys, SUCCEEDED) == {key: claim.state for key, claim in claims.items()}


def test_a_retried_task_is_pending_again_with_one_more_attempt_then_completed(
    app: App, client: PhaseClient, store: Journal
) -> None:
    result = app.fails_once()
    huey_store = HueyTaskStore(app.huey)
    with consuming(app, client):
        wait_until(lambda: statuses(huey_store).get(result.id) is TaskStatus.COMPLETED, "completed on retry")
    record = huey_store.get(result.id)
    assert record is not None
    assert (TaskStatus.COMPLETED, 1) == (record.status, record.attempts)
    assert [result.id, result.id] == app.ran
    claim = Ledger(store.url, engine=store.engine).claims_of(M, [result.id])[result.id]
    assert (SUCCEEDED, 2) == (claim.state, claim.attempt)


def test_ledger_refusals_settle_or_put_back_the_task(
    app: App, client: PhaseClient, engine: Migration, store: Journal
) -> None:
    """Ran on new: completed here without running. Handed over to new: cancelled. Running on
    new now: put back (the very message), and once new finishes it, completed here."""
    ran, handed, running = (app.work(n).id for n in range(3))
    ledger = Ledger(store.url, engine=store.engine)
    huey_store = HueyTaskStore(app.huey)
    with WorkerGate(client, "new", "new-1", background=False) as new:
        with new.executing(ran) as run:
            assert run.allowed
        ledger.hand_over(M, handed, "old", "new")
        holding = new.executing(running)
        assert holding.__enter__().allowed
        with consuming(app, client) as gated:
            wait_until(lambda: gated.counters["put_back"] >= 2, "the running task was put back twice")
            wait_until(
                lambda: (
                    statuses(huey_store).get(ran) is TaskStatus.COMPLETED
                    and statuses(huey_store).get(handed) is TaskStatus.CANCELLED
                ),
                "the settled tasks recorded",
            )
            holding.__exit__(None, None, None)
            wait_until(
                lambda: statuses(huey_store).get(running) is TaskStatus.COMPLETED, "settled once new finished"
            )
    assert [] == app.ran
