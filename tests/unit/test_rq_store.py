"""`RqTaskStore` over a real RQ queue in a Redis database of the test's own: the `TaskStore`
contract, jobs enqueued through RQ's own API (found by the store, positional arguments named by
the function's signature, a scheduled time as `run_at`), and writes through RQ's API (a job
moved away from pending is cancelled, so no worker runs it; moved back, enqueued again)."""

from __future__ import annotations

import re
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest
import redis
from rq import Queue
from rq.job import Job

from migration_fsm.adapters.rq import RqTaskStore, setup
from migration_fsm.exceptions import DataError
from migration_fsm.tasks.records import ProgressUpdate, TaskStatus
from migration_fsm.testing import T0, TaskStoreContract, changed, make_records
from tests.support.datatools import everything
from tests.support.queues import private_redis_db


def add(a: int, b: int = 0) -> int:
    return a + b


def spread(*numbers: int) -> int:
    return sum(numbers)


@pytest.fixture
def redis_url() -> Iterator[str]:
    with private_redis_db() as url:
        setup(url)
        yield url


@pytest.fixture
def rq_store(redis_url: str) -> Iterator[RqTaskStore]:
    store = RqTaskStore(redis_url, name="old")
    yield store
    store.close()


@pytest.fixture
def queue(redis_url: str) -> Iterator[Queue]:
    connection = redis.Redis.from_url(redis_url)
    yield Queue("default", connection=connection)
    connection.close()


class TestContract(TaskStoreContract):
    def accepts_key(self, key: str) -> bool:
        return bool(re.fullmatch(r"[A-Za-z0-9_-]+", key))

    @pytest.fixture
    def task_store(self, rq_store: RqTaskStore) -> RqTaskStore:
        return rq_store


def test_a_job_enqueued_through_rq_is_found_with_named_arguments(queue: Queue, rq_store: RqTaskStore) -> None:
    now = queue.enqueue(add, 2, b=3)
    later = queue.enqueue_at(datetime(2030, 1, 1, 12, 0, tzinfo=UTC), add, 5)
    by_key = {record.key: record for record in rq_store.scan(None, 10)}
    first, second = by_key[now.id], by_key[later.id]
    assert ("tests.unit.test_rq_store.add", {"a": 2, "b": 3}, TaskStatus.PENDING, None) == (
        first.type, first.payload, first.status, first.run_at,
    )  # fmt: skip
    assert ({"a": 5}, datetime(2030, 1, 1, 12, 0, tzinfo=UTC)) == (second.payload, second.run_at)
    assert 2 == sum(rq_store.count_by_status().values())


def test_star_args_are_refused(queue: Queue, rq_store: RqTaskStore) -> None:
    queue.enqueue(spread, 1, 2, 3)
    with pytest.raises(DataError, match=r"\*args"):
        rq_store.scan(None, 10)


@pytest.mark.parametrize("status", [TaskStatus.COMPLETED, TaskStatus.CANCELLED, TaskStatus.FAILED])
def test_a_job_moved_away_from_pending_is_cancelled_and_back_enqueued_again(
    queue: Queue, rq_store: RqTaskStore, status: TaskStatus
) -> None:
    [record] = make_records(["k"])
    rq_store.put(
        changed(record, type="tests.unit.test_rq_store.add", payload={"a": 1}, status=TaskStatus.PENDING)
    )
    assert ["k"] == queue.get_job_ids()
    assert 1 == rq_store.set_progress_many([ProgressUpdate("k", status, 1, T0, TaskStatus.PENDING)])
    assert [] == queue.get_job_ids()  # no worker takes it
    assert "canceled" == Job.fetch("k", connection=queue.connection).get_status()
    stored = rq_store.get("k")
    assert stored is not None
    assert (status, 1) == (stored.status, stored.attempts)
    assert rq_store.set_progress("k", TaskStatus.PENDING, 2, T0)
    assert ["k"] == queue.get_job_ids()


def test_a_pending_task_with_a_future_run_at_is_scheduled(queue: Queue, rq_store: RqTaskStore) -> None:
    [record] = make_records(["k"])
    at = datetime.now(UTC) + timedelta(hours=1)
    rq_store.put(changed(record, type="tests.unit.test_rq_store.add", status=TaskStatus.PENDING, run_at=at))
    assert [] == queue.get_job_ids()
    assert ["k"] == queue.scheduled_job_registry.get_job_ids()
    stored = rq_store.get("k")
    assert stored is not None
    assert at.replace(microsecond=at.microsecond) == stored.run_at


def test_setup_indexes_what_is_already_there_and_checks(redis_url: str, queue: Queue) -> None:
    queue.enqueue(add, 1)
    store = RqTaskStore(redis_url)
    try:
        assert [] == store.check_setup()
        assert [
            "RQ queue 'default': key index already set up (mfsm:rq:default:keys)",
            "1 jobs indexed",
        ] == setup(redis_url)
        store.redis.delete("mfsm:rq:default:keys:setup")
        [problem] = store.check_setup()
        assert "python -m migration_fsm.adapters.rq setup" in problem
    finally:
        store.close()


def test_count_is_what_a_whole_scan_finds(redis_url: str, queue: Queue, rq_store: RqTaskStore) -> None:
    """`count()` (backfill's total) agrees with a scan: jobs written through the adapter and
    enqueued through RQ count; a job of another queue and a deleted job do not."""
    rq_store.put_many(make_records(["a", "b", "c"], metadata=True, run_at=True))
    queue.enqueue(add, 1, 2)
    connection = redis.Redis.from_url(redis_url)
    Queue("other", connection=connection).enqueue(add, 3, 4)
    assert 4 == rq_store.count()
    Job.fetch("b", connection=connection).delete()
    connection.close()
    assert len(everything(rq_store)) == rq_store.count() == 3
