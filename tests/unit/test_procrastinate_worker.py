"""A real Procrastinate worker (the library's own `Worker`, in this process, on a real
Procrastinate schema) gated by `GatedWorker`: it takes nothing while its side may not consume,
claims every key in the execution ledger around the task, and settles or puts back the jobs the
ledger refuses. The migration database is SQLite or PostgreSQL.

Threads are synchronised by waiting for a state (bounded), never by sleeping a fixed time."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest

from migration_fsm.adapters.procrastinate import ProcrastinateTaskStore
from migration_fsm.adapters.procrastinate.worker import GatedWorker, gated
from migration_fsm.client import PhaseClient, WorkerGate
from migration_fsm.journal import Journal
from migration_fsm.journal.ledger import SUCCEEDED, Ledger
from migration_fsm.migration import Migration
from migration_fsm.tasks.records import TaskStatus
from migration_fsm.testing import changed, make_records
from tests.support.pq_app import EFFECTS_DDL, make_app
from tests.support.queues import libpq_url, procrastinate_schema
from tests.unit.test_gate import wait_until
from tests.unit.test_procrastinate_store import sql

M = "default"


@pytest.fixture
def pq_url(pg_database: str) -> Iterator[str]:
    with procrastinate_schema(pg_database) as url:
        sql(url, EFFECTS_DDL)
        yield url


@pytest.fixture
def pq_store(pq_url: str) -> Iterator[ProcrastinateTaskStore]:
    store = ProcrastinateTaskStore(pq_url)
    yield store
    store.close()


@pytest.fixture
def client(upgraded_url: str, engine: Migration) -> Iterator[PhaseClient]:
    with PhaseClient(upgraded_url, ttl=0.05, listen=False) as phase_client:
        yield phase_client


@contextmanager
def running_worker(pq_url: str, gate: WorkerGate, **options: Any) -> Iterator[GatedWorker]:
    """Procrastinate's own worker on the `default` queue, polling every 20 ms, in a thread."""
    app = make_app(libpq_url(pq_url))
    worker = gated(app, gate, backoff_seconds=0.05)
    loop = asyncio.new_event_loop()
    stop = asyncio.Event()
    errors: list[BaseException] = []

    async def run() -> None:
        async with app.open_async():
            work = asyncio.create_task(
                app.run_worker_async(
                    queues=["default"],
                    fetch_job_polling_interval=0.02,
                    install_signal_handlers=False,
                    listen_notify=False,
                    **{**worker.worker_options(), **options},
                )
            )
            await stop.wait()
            work.cancel()
            with pytest.raises(asyncio.CancelledError):
                await work

    def main() -> None:
        try:
            loop.run_until_complete(run())
        except BaseException as exc:  # noqa: BLE001 - shown by the test
            errors.append(exc)

    thread = threading.Thread(target=main, name="procrastinate-worker")
    thread.start()
    try:
        yield worker
    finally:
        loop.call_soon_threadsafe(stop.set)
        thread.join(timeout=30)
        loop.close()
    assert not thread.is_alive()
    assert not errors, errors


def effects(pq_url: str) -> list[str]:
    return sorted(str(row[0]) for row in sql(pq_url, "SELECT key FROM effects"))


def job_statuses(pq_url: str) -> dict[str, str]:
    rows = sql(
        pq_url,
        "SELECT r.key, j.status::text FROM mfsm_procrastinate_tasks r"
        " JOIN procrastinate_jobs j ON j.id = r.job_id",
    )
    return {str(key): str(status) for key, status in rows}


def pending(keys: list[str]) -> list[Any]:
    return [
        changed(
            record,
            type="effect",
            payload={"key": record.key},
            status=TaskStatus.PENDING,
            attempts=0,
            run_at=None,
        )
        for record in make_records(keys)
    ]


def test_a_side_that_may_not_consume_takes_nothing_then_runs_each_task_once(
    pq_url: str, pq_store: ProcrastinateTaskStore, client: PhaseClient, engine: Migration, store: Journal
) -> None:
    keys = [f"t{i}" for i in range(6)]
    pq_store.put_many(pending(keys))
    with WorkerGate(client, "new", "pq-1") as gate, running_worker(pq_url, gate) as worker:
        wait_until(lambda: worker.counters["fetch_refused"] >= 5, "the gate refused five fetches")
        assert [] == effects(pq_url)  # preparation: the new side consumes nothing
        assert set(job_statuses(pq_url).values()) == {"todo"}
        engine.advance()
        engine.advance()  # cutover: the new side consumes
        wait_until(lambda: len(effects(pq_url)) == len(keys), "every task ran")
        wait_until(lambda: set(job_statuses(pq_url).values()) == {"succeeded"}, "every job succeeded")
    assert keys == effects(pq_url)
    claims = Ledger(store.url, engine=store.engine).claims_of(M, keys)
    assert dict.fromkeys(keys, SUCCEEDED) == {key: claim.state for key, claim in claims.items()}
    assert worker.counters["ran"] == len(keys)


def test_a_job_deferred_without_the_adapter_runs_once_under_its_reserved_key(
    pq_url: str, client: PhaseClient, engine: Migration, store: Journal
) -> None:
    """Code that knows nothing of the migration defers through Procrastinate itself: the gated
    worker claims the job under its reserved key and runs it."""
    engine.advance()
    engine.advance()
    [(job_id,)] = sql(
        pq_url,
        "SELECT (procrastinate_defer_jobs_v1(ARRAY[ROW('default', 'effect', 0, NULL, NULL,"
        ' \'{"key": "outsider"}\'::jsonb, NULL)::procrastinate_job_to_defer_v1]))[1]',
    )
    key = f"procrastinate-job-{job_id:020d}"
    with WorkerGate(client, "new", "pq-1") as gate, running_worker(pq_url, gate):
        wait_until(lambda: ["outsider"] == effects(pq_url), "the outsider ran")
        wait_until(
            lambda: [("succeeded",)] == sql(pq_url, "SELECT status::text FROM procrastinate_jobs"),
            "its job succeeded",
        )
    claim = Ledger(store.url, engine=store.engine).claims_of(M, [key])[key]
    assert ("new", SUCCEEDED) == (claim.side, claim.state)


def test_ledger_refusals_settle_or_put_back_the_job(
    pq_url: str, pq_store: ProcrastinateTaskStore, client: PhaseClient, engine: Migration, store: Journal
) -> None:
    """Ran on old: finished `succeeded` here without running. Handed over to old: `aborted`.
    Running on old right now: put back `todo` untouched, and once old finishes it, settled."""
    engine.advance()
    engine.advance()  # cutover: new consumes
    pq_store.put_many(pending(["ran-on-old", "handed-to-old", "running-on-old"]))
    ledger = Ledger(store.url, engine=store.engine)
    with WorkerGate(client, "old", "old-1", background=False) as old:
        with old.executing("ran-on-old") as run:
            assert run.allowed
        ledger.hand_over(M, "handed-to-old", "new", "old")
        holding = old.executing("running-on-old")
        assert holding.__enter__().allowed
        with WorkerGate(client, "new", "pq-1") as gate, running_worker(pq_url, gate) as worker:
            wait_until(lambda: worker.counters["put_back"] >= 2, "the running task was put back twice")
            wait_until(
                lambda: (
                    job_statuses(pq_url)["ran-on-old"] == "succeeded"
                    and job_statuses(pq_url)["handed-to-old"] == "aborted"
                ),
                "the settled jobs finished",
            )
            holding.__exit__(None, None, None)  # old finishes it
            wait_until(
                lambda: job_statuses(pq_url)["running-on-old"] == "succeeded", "settled once old finished"
            )
    assert [] == effects(pq_url)  # none of the three ran here
    stored = pq_store.get("running-on-old")
    assert stored is not None
    assert 1 == stored.attempts  # Procrastinate's own finish counts one; the put-backs count none


def test_a_worker_that_deletes_finished_jobs_runs_nothing(
    pq_url: str, pq_store: ProcrastinateTaskStore, client: PhaseClient, engine: Migration
) -> None:
    engine.advance()
    engine.advance()
    pq_store.put_many(pending(["a", "b"]))
    with (
        WorkerGate(client, "new", "pq-1") as gate,
        running_worker(pq_url, gate, delete_jobs="successful") as worker,
    ):
        wait_until(lambda: worker.counters["put_back"] >= 4, "the jobs were put back")
    assert [] == effects(pq_url)
    assert {"a": "todo", "b": "todo"} == job_statuses(pq_url)
