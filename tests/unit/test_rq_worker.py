"""RQ's own worker (`SimpleWorker`, burst mode, in this process, on a Redis database of the
test's own) gated by `GatedSimpleWorker`: it takes nothing while the old side may not consume,
claims every job in the execution ledger around its execution (succeeded or failed as RQ ends
it), and settles or puts back the jobs the ledger refuses. The migration database is SQLite or
PostgreSQL."""

from __future__ import annotations

import signal
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from rq import Queue, get_current_job
from rq.job import Job

from migration_fsm.adapters.rq import RqTaskStore, setup
from migration_fsm.adapters.rq.worker import GatedSimpleWorker
from migration_fsm.client import PhaseClient, WorkerGate
from migration_fsm.journal import Journal
from migration_fsm.journal.ledger import FAILED, SUCCEEDED, Ledger
from migration_fsm.migration import Migration
from migration_fsm.tasks.records import TaskStatus
from tests.support.queues import private_redis_db

M = "default"


def work(n: int) -> int:
    """A job: records that it ran (its id) in the `effects` list of its own Redis."""
    job = get_current_job()
    assert job is not None
    job.connection.rpush("effects", job.id)
    return n


def boom() -> None:
    job = get_current_job()
    assert job is not None
    job.connection.rpush("effects", job.id)
    raise RuntimeError("this job fails")


@pytest.fixture
def connection() -> Iterator[redis.Redis]:
    with private_redis_db() as url:
        setup(url)
        client = redis.Redis.from_url(url)
        yield client
        client.close()


@pytest.fixture
def client(upgraded_url: str, engine: Migration) -> Iterator[PhaseClient]:
    with PhaseClient(upgraded_url, ttl=0.05, listen=False) as phase_client:
        yield phase_client


def burst(connection: redis.Redis, client: PhaseClient, max_jobs: int | None = None) -> GatedSimpleWorker:
    """One burst of a gated RQ worker (until the queue looks empty to it, or `max_jobs` jobs were
    taken); RQ's signal handlers are put back afterwards."""
    client.refresh()
    saved = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}
    with WorkerGate(client, "old", "rq-1") as gate:
        worker = GatedSimpleWorker(["default"], connection=connection, gate=gate, backoff_seconds=0.01)
        try:
            worker.work(burst=True, max_jobs=max_jobs)
        finally:
            for signum, handler in saved.items():
                signal.signal(signum, handler)
    return worker


def effects(connection: redis.Redis) -> list[str]:
    return sorted(
        raw.decode() if isinstance(raw, bytes) else str(raw) for raw in connection.lrange("effects", 0, -1)
    )


def test_a_paused_side_takes_nothing_then_each_job_runs_once(
    connection: redis.Redis, client: PhaseClient, engine: Migration, store: Journal
) -> None:
    queue = Queue("default", connection=connection)
    keys = sorted(queue.enqueue(work, n).id for n in range(4))
    failing = queue.enqueue(boom).id
    engine.advance()
    engine.advance()  # cutover: the old side does not consume
    burst(connection, client)
    assert [] == effects(connection)
    assert len(keys) + 1 == queue.count
    engine.rollback(reason="the old side consumes again")
    burst(connection, client)
    assert sorted([*keys, failing]) == effects(connection)
    claims = Ledger(store.url, engine=store.engine).claims_of(M, [*keys, failing])
    assert {**dict.fromkeys(keys, SUCCEEDED), failing: FAILED} == {k: c.state for k, c in claims.items()}
    statuses = {r.key: r.status for r in RqTaskStore(_url(connection)).scan(None, 10)}
    assert {**dict.fromkeys(keys, TaskStatus.COMPLETED), failing: TaskStatus.FAILED} == statuses


def _url(connection: redis.Redis) -> str:
    kwargs: dict[str, Any] = connection.connection_pool.connection_kwargs
    return f"redis://{kwargs['host']}:{kwargs['port']}/{kwargs['db']}"


def test_ledger_refusals_settle_or_put_back_the_job(
    connection: redis.Redis, client: PhaseClient, store: Journal
) -> None:
    queue = Queue("default", connection=connection)
    ran, handed, running = (queue.enqueue(work, n).id for n in range(3))
    ledger = Ledger(store.url, engine=store.engine)
    with WorkerGate(client, "new", "new-1", background=False) as new:
        with new.executing(ran) as run:
            assert run.allowed
        ledger.hand_over(M, handed, "old", "new")
        holding = new.executing(running)
        assert holding.__enter__().allowed
        worker = burst(connection, client, max_jobs=3)  # each job taken once (a put-back one would come back)
        holding.__exit__(None, None, None)
    assert [] == effects(connection)
    assert ["canceled", "canceled", "queued"] == [
        Job.fetch(key, connection=connection).get_status() for key in (ran, handed, running)
    ]
    assert [running] == queue.get_job_ids()  # put back, untouched
    found = {r.key: r.status for r in RqTaskStore(_url(connection)).scan(None, 10)}
    assert {ran: TaskStatus.COMPLETED, handed: TaskStatus.CANCELLED, running: TaskStatus.PENDING} == found
    assert {"succeeded": 1, "handed_over": 1} == {k: v for k, v in worker.refusals.items() if k != "running"}
    burst(connection, client)  # new finished it: settled here without running
    assert [] == effects(connection)
    settled = RqTaskStore(_url(connection)).get(running)
    assert settled is not None
    assert TaskStatus.COMPLETED == settled.status
