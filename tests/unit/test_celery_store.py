"""`CeleryTaskStore` over a real Celery application (`tests.support.celery_app`) whose broker and
result backend are a Redis database of the test's own, with no worker: the `TaskStore` contract;
tasks sent through Celery's own API (`delay`, `apply_async`, with an ETA, positional arguments
named by the task's signature) found by the store; the status mapping from Celery's result
records and the registry; writes through Celery's API (a task written twice is one message; a
task moved away from pending leaves the broker, moved back is sent again); refusals that write
nothing; the settings `check_setup` asks for."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from migration_fsm.adapters.celery import CeleryTaskStore, register_published_tasks, setup
from migration_fsm.client import DualWriter, PhaseClient
from migration_fsm.exceptions import ConfigError, DataError
from migration_fsm.tasks.memory import MemoryTaskStore
from migration_fsm.tasks.records import ProgressUpdate, TaskRecord, TaskStatus
from migration_fsm.testing import T0, TaskStoreContract, changed, make_records
from tests.support.queues import private_redis_db


@pytest.fixture
def app() -> Iterator[Any]:
    from tests.support import celery_app

    with private_redis_db() as url:
        celery_app.use_redis(url)
        setup(celery_app.app)
        try:
            yield celery_app.app
        finally:
            celery_app.use_redis(celery_app.REDIS)


@pytest.fixture
def celery_store(app: Any) -> Iterator[CeleryTaskStore]:
    store = CeleryTaskStore(app, name="old")
    yield store
    store.close()


def queued(store: CeleryTaskStore) -> list[str]:
    """The ids of the messages waiting in the queue, oldest first."""
    raws: list[bytes] = store.broker.lrange("celery", 0, -1)  # type: ignore[assignment]
    return [json.loads(raw)["headers"]["id"] for raw in reversed(raws)]


def result(store: CeleryTaskStore, key: str, state: str) -> None:
    """Celery's result record of `key` in `state`, as a worker writes it."""
    store.app.backend.store_result(key, None, state)


class TestContract(TaskStoreContract):
    @pytest.fixture
    def task_store(self, celery_store: CeleryTaskStore) -> CeleryTaskStore:
        return celery_store


def test_tasks_sent_through_celery_are_found_with_named_arguments(celery_store: CeleryTaskStore) -> None:
    from tests.support import celery_app

    now = celery_app.add.delay(2, b=3).id
    at = datetime(2030, 1, 1, 12, 0, tzinfo=UTC)
    later = celery_app.add.apply_async((5, 6), eta=at).id
    by_key = {record.key: record for record in celery_store.scan(None, 10)}
    first, second = by_key[now], by_key[later]
    assert ("add", {"a": 2, "b": 3}, TaskStatus.PENDING, None) == (
        first.type, first.payload, first.status, first.run_at,
    )  # fmt: skip
    assert ({"a": 5, "b": 6}, at) == (second.payload, second.run_at)
    assert 2 == celery_store.count()


def test_a_task_a_worker_holds_unacknowledged_is_found_and_withdrawn_when_stopped(
    celery_store: CeleryTaskStore,
) -> None:
    """An ETA task a worker took sits in kombu's `unacked` hash, out of the queue's list."""
    from tests.support import celery_app

    key = celery_app.add.apply_async((1, 2), countdown=3600).id
    [raw] = celery_store.broker.lrange("celery", 0, -1)
    celery_store.broker.delete("celery")
    celery_store.broker.hset("unacked", "tag-1", json.dumps([json.loads(raw), "", "celery"]))
    found = celery_store.get(key)
    assert found is not None
    assert (TaskStatus.PENDING, {"a": 1, "b": 2}) == (found.status, found.payload)
    assert celery_store.set_progress(key, TaskStatus.CANCELLED, 0, T0)
    assert 0 == celery_store.broker.hlen("unacked")  # the worker's restore brings nothing back


def test_register_published_tasks_records_a_task_as_it_is_sent(celery_store: CeleryTaskStore) -> None:
    from celery.signals import after_task_publish

    from tests.support import celery_app

    handler = register_published_tasks(celery_app.app)
    try:
        key = celery_app.add.delay(4, 5).id
    finally:
        after_task_publish.disconnect(handler)
    celery_store.broker.delete("celery")  # taken by a stock worker: only the registry knows it
    found = celery_store.get(key)
    assert found is not None
    assert ("add", {"a": 4, "b": 5}) == (found.type, found.payload)


def test_star_args_are_refused_and_nothing_is_registered(celery_store: CeleryTaskStore) -> None:
    from tests.support import celery_app

    celery_app.add.delay(1, 2)
    celery_app.spread.delay(1, 2, 3)
    with pytest.raises(DataError, match=r"\*args"):
        celery_store.scan(None, 10)
    assert 0 == celery_store.results.zcard(celery_store.index)


def test_positional_arguments_of_a_task_the_application_does_not_know_are_refused(
    celery_store: CeleryTaskStore,
) -> None:
    celery_store.app.send_task("elsewhere.unknown", args=(1,))
    with pytest.raises(DataError, match="not registered"):
        celery_store.scan(None, 10)
    assert 0 == celery_store.results.zcard(celery_store.index)


@pytest.mark.parametrize(
    ("state", "status"),
    [
        ("STARTED", TaskStatus.RUNNING),
        ("RETRY", TaskStatus.PENDING),
        ("SUCCESS", TaskStatus.COMPLETED),
        ("FAILURE", TaskStatus.FAILED),
        ("REVOKED", TaskStatus.CANCELLED),
        ("PROGRESS", TaskStatus.RUNNING),  # a custom state a running task set
    ],
)
def test_celery_states_map_to_statuses(celery_store: CeleryTaskStore, state: str, status: TaskStatus) -> None:
    [record] = make_records(["k"])
    celery_store.put(changed(record, type="add", payload={"a": 1, "b": 1}, status=TaskStatus.PENDING))
    result(celery_store, "k", state)
    stored = celery_store.get("k")
    assert stored is not None
    assert status == stored.status


def test_the_migrations_status_stands_until_celery_writes_another_result(
    celery_store: CeleryTaskStore,
) -> None:
    [record] = make_records(["k"])
    celery_store.put(changed(record, type="add", payload={"a": 1, "b": 1}, status=TaskStatus.PENDING))
    result(celery_store, "k", "SUCCESS")
    assert celery_store.set_progress("k", TaskStatus.PENDING, 1, T0)  # run it again
    assert TaskStatus.PENDING == getattr(celery_store.get("k"), "status", None)
    assert ["k", "k"] == queued(celery_store)  # sent again
    result(celery_store, "k", "STARTED")
    assert TaskStatus.RUNNING == getattr(celery_store.get("k"), "status", None)


def test_a_task_written_twice_is_one_message(celery_store: CeleryTaskStore) -> None:
    """DualWriter re-sends a record: the second write finds the task and sends nothing."""
    [record] = make_records(["k"])
    pending = changed(record, type="add", payload={"a": 1, "b": 1}, status=TaskStatus.PENDING)
    new = MemoryTaskStore()
    with PhaseClient("sqlite:///:memory:", default_phase="preparation") as client:  # type: ignore[arg-type]
        writer = DualWriter(client, celery_store, new)
        writer.write(pending)
        writer.write(pending)
        writer.close()
    assert ["k"] == queued(celery_store)
    assert pending == celery_store.get("k")


@pytest.mark.parametrize("status", [TaskStatus.COMPLETED, TaskStatus.CANCELLED, TaskStatus.FAILED])
def test_a_task_moved_away_from_pending_leaves_the_broker_and_back_is_sent_again(
    celery_store: CeleryTaskStore, status: TaskStatus
) -> None:
    [record] = make_records(["k"])
    celery_store.put(changed(record, type="add", payload={"a": 1, "b": 1}, status=TaskStatus.PENDING))
    assert ["k"] == queued(celery_store)
    assert 1 == celery_store.set_progress_many([ProgressUpdate("k", status, 1, T0, TaskStatus.PENDING)])
    assert [] == queued(celery_store)  # no worker finds it
    fields = celery_store.read(["k"])[0][0]
    assert ("1", "1") == (fields["stopped"], fields["revoked"])
    stored = celery_store.get("k")
    assert stored is not None
    assert (status, 1) == (stored.status, stored.attempts)
    assert celery_store.set_progress("k", TaskStatus.PENDING, 2, T0)
    assert ["k"] == queued(celery_store)
    assert "" == celery_store.read(["k"])[0][0]["stopped"]


def test_a_pending_task_with_a_run_at_is_sent_with_that_eta(celery_store: CeleryTaskStore) -> None:
    [record] = make_records(["k"])
    at = datetime.now(UTC) + timedelta(hours=1)
    celery_store.put(changed(record, type="add", status=TaskStatus.PENDING, run_at=at))
    [raw] = celery_store.broker.lrange("celery", 0, -1)
    assert at == datetime.fromisoformat(json.loads(raw)["headers"]["eta"])
    assert at == getattr(celery_store.get("k"), "run_at", None)


def test_a_store_whose_application_is_not_on_redis_is_refused() -> None:
    from celery import Celery

    with pytest.raises(ConfigError, match="Redis"):
        CeleryTaskStore(Celery("x", broker="memory://", backend="redis://127.0.0.1:6379/0"))


def test_setup_registers_what_is_waiting_and_check_asks_for_the_settings(app: Any) -> None:
    from tests.support import celery_app

    celery_app.add.delay(1, 1)
    store = CeleryTaskStore(app)
    try:
        assert [] == store.check_setup()
        assert [
            "Celery queue 'celery': registry already set up (mfsm:celery:celery:*)",
            "1 waiting tasks registered",
        ] == setup(app)
        store.results.delete("mfsm:celery:celery:setup")
        app.conf.task_acks_late = False
        app.conf.result_expires = timedelta(days=1)
        try:
            problems = store.check_setup()
        finally:
            app.conf.task_acks_late = True
            app.conf.result_expires = None
        assert 3 == len(problems), problems
        assert "python -m migration_fsm.adapters.celery setup" in problems[0]
        assert "task_acks_late is False; set it to True" in problems[1]
        assert "result_expires" in problems[2]
    finally:
        store.close()


def test_a_batch_with_a_record_celery_cannot_carry_writes_nothing(celery_store: CeleryTaskStore) -> None:
    """A payload that is not JSON cannot be a Celery message: the batch is refused, nothing sent."""
    now = datetime.now(UTC)
    records = [
        TaskRecord(
            key=key, type="add", payload=payload, status=TaskStatus.PENDING, created_at=now, updated_at=now
        )
        for key, payload in (("fine", {"a": 1}), ("bad", {"a": now}))
    ]
    with pytest.raises(DataError, match="bad's payload or metadata is not JSON"):
        celery_store.put_many(records)
    assert ([], []) == (celery_store.scan(None, 10), queued(celery_store))


def test_writing_the_status_a_task_already_has_does_not_stop_it(celery_store: CeleryTaskStore) -> None:
    """A running task written as running (or a completed one as completed) is not a refusal:
    the message Celery gives back after a lost pool child must still run."""
    [record] = make_records(["k"])
    celery_store.put(changed(record, type="add", payload={"a": 1, "b": 1}, status=TaskStatus.PENDING))
    result(celery_store, "k", "STARTED")
    celery_store.put(changed(record, type="add", payload={"a": 1, "b": 1}, status=TaskStatus.RUNNING))
    assert "" == celery_store.read(["k"])[0][0]["stopped"]
    assert TaskStatus.RUNNING == getattr(celery_store.get("k"), "status", None)


def test_a_revoked_record_of_a_task_the_migration_finished_keeps_the_migrations_status(
    celery_store: CeleryTaskStore,
) -> None:
    """A worker that discards a task after the adapter's revoke writes REVOKED: the echo of the
    migration's own stop, not a cancellation (the task ran on the other side)."""
    [record] = make_records(["k"])
    celery_store.put(changed(record, type="add", payload={"a": 1, "b": 1}, status=TaskStatus.PENDING))
    assert celery_store.set_progress("k", TaskStatus.COMPLETED, 1, T0)
    result(celery_store, "k", "REVOKED")
    assert TaskStatus.COMPLETED == getattr(celery_store.get("k"), "status", None)


def test_a_pending_task_whose_message_was_never_sent_is_sent_by_its_next_write(
    celery_store: CeleryTaskStore,
) -> None:
    """The registry is written first, then Celery: after a crash in between (the message not
    `sent`), writing the task again (a repair, a re-send) sends it, once."""
    [record] = make_records(["k"])
    pending = changed(record, type="add", payload={"a": 1, "b": 1}, status=TaskStatus.PENDING)
    celery_store.put(pending)
    celery_store.broker.delete("celery")
    celery_store.results.hset(celery_store.task_key("k"), "sent", "")
    celery_store.put(pending)
    celery_store.put(pending)
    assert ["k"] == queued(celery_store)
