"""`HueyTaskStore` over a real `SqliteHuey` file: the `TaskStore` contract, tasks enqueued
through Huey's own API (seen without the adapter's help, positional arguments named by the
function's signature, an eta as `run_at`), and writes into Huey through its own paths (a task
moved away from pending is revoked, so Huey's own consumer skips it; moved back, restored and
enqueued again)."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from huey import SqliteHuey

from migration_fsm.adapters.huey import HueyTaskStore, setup
from migration_fsm.exceptions import DataError
from migration_fsm.tasks.records import ProgressUpdate, TaskStatus
from migration_fsm.testing import T0, TaskStoreContract, changed, make_records


def make_huey(path: Path) -> SqliteHuey:
    huey = SqliteHuey("app", filename=str(path))

    @huey.task()
    def add(a: int, b: int = 0) -> int:
        return a + b

    @huey.task(name="mail")
    def mail(**payload: Any) -> None:
        return None

    @huey.task()
    def spread(*numbers: int) -> int:
        return sum(numbers)

    return huey


@pytest.fixture
def huey(tmp_path: Path) -> Iterator[SqliteHuey]:
    app = make_huey(tmp_path / "huey.db")
    setup(app)
    yield app
    app.storage.close()


@pytest.fixture
def huey_store(huey: SqliteHuey) -> HueyTaskStore:
    return HueyTaskStore(huey, name="old")


class TestContract(TaskStoreContract):
    @pytest.fixture
    def task_store(self, huey_store: HueyTaskStore) -> HueyTaskStore:
        return huey_store


def task_name(huey: SqliteHuey, short: str) -> str:
    [name] = [name for name in huey._registry._registry if name.endswith(f".{short}")]
    return str(name)


def message_ids(huey: SqliteHuey) -> list[str]:
    return [
        str(huey.serializer.deserialize(data).id)
        for data in (*huey.storage.enqueued_items(), *huey.storage.scheduled_items())
    ]


def test_a_task_enqueued_through_huey_is_seen_with_named_arguments(
    huey: SqliteHuey, huey_store: HueyTaskStore
) -> None:
    add = huey._registry._registry[task_name(huey, "add")]
    result = huey.enqueue(add((2,), {"b": 3}))
    later = huey.enqueue(add((5,), {}, eta=datetime(2030, 1, 1, 12, 0)))
    [first, second] = sorted(huey_store.scan(None, 10), key=lambda r: r.run_at is not None)
    assert (result.id, task_name(huey, "add"), {"a": 2, "b": 3}, TaskStatus.PENDING, None) == (
        first.key, first.type, first.payload, first.status, first.run_at,
    )  # fmt: skip
    assert (later.id, {"a": 5}, datetime(2030, 1, 1, 12, 0, tzinfo=UTC)) == (
        second.key, second.payload, second.run_at,
    )  # fmt: skip
    assert first == huey_store.get(result.id)  # registered once, read back the same
    assert 2 == sum(huey_store.count_by_status().values())


def test_positional_arguments_without_a_signature_are_refused(tmp_path: Path, huey: SqliteHuey) -> None:
    add = huey._registry._registry[task_name(huey, "add")]
    huey.enqueue(add((2, 3), {}))
    bare = HueyTaskStore(filename=str(tmp_path / "huey.db"), queue="app")  # no application: no signatures
    try:
        with pytest.raises(DataError, match="positional arguments"):
            bare.scan(None, 10)
    finally:
        bare.close()


def test_star_args_are_refused(huey: SqliteHuey, huey_store: HueyTaskStore) -> None:
    spread = huey._registry._registry[task_name(huey, "spread")]
    huey.enqueue(spread((1, 2, 3), {}))
    with pytest.raises(DataError, match=r"\*args"):
        huey_store.scan(None, 10)


def test_a_pending_task_written_through_the_adapter_is_a_huey_message(
    huey: SqliteHuey, huey_store: HueyTaskStore
) -> None:
    [now, later] = make_records(["now", "later"])
    now = changed(now, type=task_name(huey, "mail"), status=TaskStatus.PENDING, run_at=None)
    later = changed(
        later,
        type=task_name(huey, "mail"),
        status=TaskStatus.PENDING,
        run_at=datetime.now(UTC) + timedelta(hours=1),
    )
    huey_store.put_many([now, later])
    huey_store.put(now)  # written again: still one message
    assert ["now"] == [str(huey.serializer.deserialize(d).id) for d in huey.storage.enqueued_items()]
    [scheduled] = [huey.serializer.deserialize(d) for d in huey.storage.scheduled_items()]
    assert ("later", later.payload) == (scheduled.id, scheduled.kwargs)
    task = huey.dequeue()
    assert ("now", now.payload) == (task.id, task.kwargs)


@pytest.mark.parametrize("status", [TaskStatus.COMPLETED, TaskStatus.CANCELLED, TaskStatus.RUNNING])
def test_a_task_moved_away_from_pending_is_revoked_and_back_restored(
    huey: SqliteHuey, huey_store: HueyTaskStore, status: TaskStatus
) -> None:
    [record] = make_records(["k"])
    huey_store.put(changed(record, type=task_name(huey, "mail"), status=TaskStatus.PENDING))
    assert not huey.is_revoked("k")
    assert 1 == huey_store.set_progress_many([ProgressUpdate("k", status, 1, T0, TaskStatus.PENDING)])
    assert huey.is_revoked("k")  # Huey's own consumer skips the message
    huey.dequeue()  # a stock consumer took the message (and skipped it)
    assert [] == message_ids(huey)
    assert huey_store.set_progress("k", TaskStatus.PENDING, 2, T0)
    assert not huey.is_revoked("k")
    assert ["k"] == message_ids(huey)  # enqueued again: the rollback's task runs on Huey again


def test_setup_registers_what_is_already_queued_and_checks(tmp_path: Path) -> None:
    huey = make_huey(tmp_path / "pre.db")
    add = huey._registry._registry[task_name(huey, "add")]
    huey.enqueue(add((1,), {}))
    store = HueyTaskStore(huey)
    try:
        [problem] = store.check_setup()
        assert "python -m migration_fsm.adapters.huey setup" in problem
        assert [
            "mfsm_huey_tasks created in " + str(tmp_path / "pre.db"),
            "1 queued or scheduled tasks registered",
        ] == setup(huey)
        assert [] == store.check_setup()
        assert [
            "mfsm_huey_tasks already exists in " + str(tmp_path / "pre.db"),
            "0 queued or scheduled tasks registered",
        ] == setup(huey)
    finally:
        store.close()
