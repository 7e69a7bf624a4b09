"""Test helpers for people who integrate migration-fsm: the `TaskStore` contract as a
pytest suite you run against your own store (as `alembic.testing.suite` does for dialects).

Needs pytest (it is not a dependency of the package). In your tests::

    import pytest
    from migration_fsm.testing import TaskStoreContract

    class TestMyQueueStore(TaskStoreContract):
        @pytest.fixture
        def task_store(self):
            store = MyQueueStore(...)   # an empty store
            yield store
            store.drop_everything()

Every test writes through the store and reads back through it, so it holds for any
backing system. A store that cannot keep `metadata` sets `keeps_metadata = False`; one that
cannot keep a scheduled time sets `keeps_run_at = False`, and must then refuse a record with
a `run_at` (a `DataError`) rather than drop it, since the task would run early. The optional
capabilities (`put_forward`, `get_many`) are tested only where the store has them.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from typing import TYPE_CHECKING, Any

import pytest

from .exceptions import DataError
from .tasks.records import ProgressUpdate, TaskRecord, TaskStatus

if TYPE_CHECKING:
    from .tasks.records import TaskStore

__all__ = ["FORWARD_CASES", "T0", "TRICKY_KEYS", "TaskStoreContract", "changed", "make_records"]

T0 = datetime(2024, 5, 17, 12, 30, 45, 123456, tzinfo=UTC)

#: Keys whose order differs between code point order and any linguistic collation.
TRICKY_KEYS: list[str] = [
    "a", "B", "Z", "z", "A", "Zebra", "zebra", "aB", "ab", "a-b", "a_b", "a b", "_x", "-x",
    "0", "9", "10", "e", "é", "f", "É", "ß", "ss", "日本", "😀", "~", "task-0001", "task-0010",
]  # fmt: skip


def make_records(keys: list[str], *, metadata: bool = True, run_at: bool = False) -> list[TaskRecord]:
    """One record per key, varied in every field (non-UTC offsets included); with `run_at`,
    every third one is scheduled (an hour after it was created) and the others are not."""
    statuses = list(TaskStatus)
    plus_two = timezone(timedelta(hours=2))
    records = []
    for i, key in enumerate(keys):
        created = T0 + timedelta(minutes=i, microseconds=i)
        records.append(
            TaskRecord(
                key=key,
                type=f"mail.send.{i % 3}",
                payload={"to": f"user{i}@example.com", "n": i, "nested": {"ü": [1, 2.5, None, True]}},
                status=statuses[i % len(statuses)],
                attempts=i % 4,
                created_at=created.astimezone(plus_two) if i % 2 else created,
                updated_at=created + timedelta(seconds=30),
                metadata={"source": "test", "i": i} if metadata else {},
                run_at=(created + timedelta(hours=1)).astimezone(plus_two) if run_at and i % 3 == 0 else None,
            )
        )
    return records


def changed(record: TaskRecord, **changes: Any) -> TaskRecord:
    """A copy of `record` with `changes`."""
    return record.model_copy(update=changes)


#: (stored status or None, written status, whether `put_forward` writes)
FORWARD_CASES: list[tuple[TaskStatus | None, TaskStatus, bool]] = [
    (None, TaskStatus.PENDING, True),
    (TaskStatus.PENDING, TaskStatus.PENDING, True),
    (TaskStatus.PENDING, TaskStatus.COMPLETED, True),
    (TaskStatus.RUNNING, TaskStatus.PENDING, False),
    (TaskStatus.COMPLETED, TaskStatus.PENDING, False),
    (TaskStatus.FAILED, TaskStatus.RUNNING, False),
    (TaskStatus.CANCELLED, TaskStatus.PENDING, False),
    (TaskStatus.COMPLETED, TaskStatus.FAILED, True),
    (TaskStatus.RUNNING, TaskStatus.COMPLETED, True),
]


class TaskStoreContract:
    """The `TaskStore` contract (DESIGN.md section 6). Subclass it as `Test...` and provide a
    `task_store` fixture that yields an empty store."""

    #: False for a store whose table has no metadata column (metadata then reads as {}).
    keeps_metadata: bool = True
    #: False for a store that cannot hold a scheduled time (run_at then reads as None, and a
    #: record with one is refused with a `DataError`).
    keeps_run_at: bool = True

    @pytest.fixture
    def task_store(self) -> TaskStore:
        raise NotImplementedError("provide a `task_store` fixture that yields an empty store")

    def accepts_key(self, key: str) -> bool:
        """Whether the store can hold a task with this key. A store whose system limits its ids
        (RQ: letters, digits, `_` and `-`) overrides it, and must refuse any other key with a
        `DataError` that writes nothing; the key tests then run on the keys it accepts."""
        return bool(key)

    @property
    def tricky_keys(self) -> list[str]:
        return [key for key in TRICKY_KEYS if self.accepts_key(key)]

    def records(self, keys: list[str]) -> list[TaskRecord]:
        return make_records(keys, metadata=self.keeps_metadata, run_at=self.keeps_run_at)

    def test_a_key_the_store_cannot_hold_is_refused_and_writes_nothing(self, task_store: TaskStore) -> None:
        refused = [key for key in TRICKY_KEYS if not self.accepts_key(key)]
        if not refused:
            pytest.skip("this store holds every key")
        with pytest.raises(DataError):
            task_store.put_many(self.records(["fine", refused[0]]))
        assert [] == list(task_store.scan(None, 10))

    def test_run_at_round_trips_set_and_none(self, task_store: TaskStore) -> None:
        """A scheduled time reads back equal (in UTC), and no scheduled time reads back as None;
        a store that cannot keep one refuses it and writes nothing."""
        scheduled, unscheduled = make_records(["s", "u"], metadata=self.keeps_metadata, run_at=True)
        assert scheduled.run_at is not None
        assert unscheduled.run_at is None
        task_store.put(unscheduled)
        read = task_store.get(unscheduled.key)
        assert read is not None
        assert read.run_at is None
        assert unscheduled == read
        if not self.keeps_run_at:
            with pytest.raises(DataError):
                task_store.put_many([scheduled])
            assert task_store.get(scheduled.key) is None
            return
        task_store.put_many([scheduled])
        assert scheduled == task_store.get(scheduled.key)
        assert UTC == getattr(task_store.get(scheduled.key), "run_at", scheduled.run_at).tzinfo
        later = changed(scheduled, run_at=scheduled.run_at + timedelta(minutes=5))
        task_store.put(later)
        assert later == task_store.get(scheduled.key)
        task_store.put(changed(later, run_at=None))
        assert getattr(task_store.get(scheduled.key), "run_at", "gone") is None

    def test_put_many_then_get_round_trips(self, task_store: TaskStore) -> None:
        """Every field of every record reads back equal, through get and through scan."""
        records = self.records(self.tricky_keys)
        assert len(records) == task_store.put_many(records)
        for record in records:
            assert record == task_store.get(record.key)
        assert sorted(records, key=lambda r: r.key) == list(task_store.scan(None, 1000))

    def test_scan_is_python_string_order(self, task_store: TaskStore) -> None:
        """Keys come back in `sorted()` order of Python strings: case, digits, '-', '_', 'é', emoji."""
        task_store.put_many(self.records(self.tricky_keys))
        assert sorted(self.tricky_keys) == [record.key for record in task_store.scan(None, 1000)]

    def test_scan_pages_with_after_and_limit(self, task_store: TaskStore) -> None:
        """Pages of 3 from each last key cover every key once, in order; past the end is empty."""
        keys = self.tricky_keys
        task_store.put_many(self.records(keys))
        seen: list[str] = []
        after: str | None = None
        while page := task_store.scan(after, 3):
            assert len(page) <= 3
            seen += [record.key for record in page]
            after = page[-1].key
        assert sorted(keys) == seen
        assert [key for key in sorted(keys) if key > "_x"][:2] == [r.key for r in task_store.scan("_x", 2)]
        assert [] == list(task_store.scan(max(keys), 10))
        assert [] == list(task_store.scan(None, 0))

    def test_put_many_twice_writes_each_key_once(self, task_store: TaskStore) -> None:
        """A batch written twice leaves the same records and no duplicates."""
        records = self.records(self.tricky_keys)
        task_store.put_many(records)
        first = list(task_store.scan(None, 1000))
        assert len(records) == task_store.put_many(records)
        assert first == list(task_store.scan(None, 1000))
        assert len(records) == sum(task_store.count_by_status().values())

    def test_put_replaces_status_and_attempts(self, task_store: TaskStore) -> None:
        """An upsert of a known key replaces it: status, attempts and updated_at move."""
        record = self.records(["job-1"])[0]
        task_store.put(record)
        later = changed(
            record, status=TaskStatus.FAILED, attempts=3, updated_at=record.updated_at + timedelta(hours=1)
        )
        task_store.put(later)
        assert later == task_store.get("job-1")
        assert 1 == task_store.count_by_status()[TaskStatus.FAILED]
        assert 1 == sum(task_store.count_by_status().values())

    def test_put_many_last_record_of_a_key_wins(self, task_store: TaskStore) -> None:
        """Two records of one key in a batch leave one row: the last one."""
        first, second = self.records(["k", "k"])
        task_store.put_many([first, changed(second, status=TaskStatus.COMPLETED)])
        assert [changed(second, status=TaskStatus.COMPLETED)] == list(task_store.scan(None, 10))

    def test_count_by_status_counts_every_status(self, task_store: TaskStore) -> None:
        """Every status is present, zero included, and the counts add up."""
        assert dict.fromkeys(TaskStatus, 0) == dict(task_store.count_by_status())
        records = self.records([f"k{i}" for i in range(12)])
        task_store.put_many(records[:7])  # statuses cycle: 2 pending, 2 running, 1 of the others
        expected = dict.fromkeys(TaskStatus, 0)
        for record in records[:7]:
            expected[record.status] += 1
        assert expected == dict(task_store.count_by_status())

    def test_checksums_are_the_same_on_every_store(self, task_store: TaskStore) -> None:
        """A record's checksum read back equals the one computed before writing."""
        records = self.records(self.tricky_keys)
        task_store.put_many(records)
        expected = {record.key: record.checksum() for record in records}
        assert expected == {record.key: record.checksum() for record in task_store.scan(None, 1000)}

    def test_get_unknown_key_is_none(self, task_store: TaskStore) -> None:
        """A key never written reads as None (keys are case-sensitive)."""
        task_store.put_many(self.records(["a"]))
        assert task_store.get("b") is None
        assert task_store.get("A") is None

    @pytest.mark.parametrize(("stored", "written", "writes"), FORWARD_CASES)
    def test_put_forward_never_moves_a_task_back(
        self, task_store: TaskStore, stored: TaskStatus | None, written: TaskStatus, writes: bool
    ) -> None:
        """`put_forward` (DualWriter's second write) writes like `put` unless the stored task is
        further along; then it writes nothing and says so."""
        put_forward = getattr(task_store, "put_forward", None)
        if put_forward is None:
            pytest.skip("this store has no put_forward (the DualWriter then refuses it as a second side)")
        [base] = self.records(["k"])
        if stored is not None:
            task_store.put(changed(base, status=stored, attempts=1))
        before = task_store.get("k")
        record = changed(base, status=written, payload={"changed": True})
        assert writes is put_forward(record)
        assert (record if writes else before) == task_store.get("k")

    def test_get_many_reads_what_get_reads(self, task_store: TaskStore) -> None:
        """`get_many` (validation's batched re-read) answers as one `get` per key would: absent
        keys are left out, and long lists are read whole."""
        get_many = getattr(task_store, "get_many", None)
        if get_many is None:
            pytest.skip("this store has no get_many (validate then re-reads one key at a time)")
        keys = [*self.tricky_keys, *(f"bulk-{i:04d}" for i in range(1200))]
        task_store.put_many(self.records(keys))
        asked = [*keys[::2], "never-written", "A-not-there"]
        found = get_many(asked)
        assert set(found) == set(keys[::2])
        for key in keys[::2]:
            assert found[key] == task_store.get(key)
        assert {} == get_many([])

    def test_set_progress_many_applies_each_row_under_its_own_condition(self, task_store: TaskStore) -> None:
        """`set_progress_many` (the batched transfer, hand-over and `retire_old`) changes only the
        status and attempts of the rows it names, each under its own condition: a key the store
        lacks changes nothing, and a row whose status is no longer `expected` is left as it is;
        it returns how many rows changed, so running it again is safe."""
        set_progress_many = getattr(task_store, "set_progress_many", None)
        if set_progress_many is None:
            pytest.skip("this store has no set_progress_many (one set_progress per row is used)")
        a, b, c = (changed(r, status=TaskStatus.PENDING, attempts=0) for r in self.records(["a", "b", "c"]))
        task_store.put_many([a, b, c])
        at = T0 + timedelta(days=1)
        updates = [
            ProgressUpdate("a", TaskStatus.COMPLETED, 2, at, expected=TaskStatus.PENDING),
            ProgressUpdate("b", TaskStatus.FAILED, 3, at, expected=TaskStatus.RUNNING),  # not running: kept
            ProgressUpdate("never-written", TaskStatus.FAILED, 1, at),
            ProgressUpdate("c", TaskStatus.RUNNING, 1, at),
        ]
        assert 2 == set_progress_many(updates)
        found = {key: task_store.get(key) for key in ("a", "b", "c", "never-written")}
        assert found["never-written"] is None
        for key, record, status, attempts in (
            ("a", a, TaskStatus.COMPLETED, 2),
            ("b", b, TaskStatus.PENDING, 0),
            ("c", c, TaskStatus.RUNNING, 1),
        ):
            stored = found[key]
            assert stored is not None
            assert (status, attempts) == (stored.status, stored.attempts)
            assert record.checksum() == stored.checksum()  # identity untouched
        assert 1 == set_progress_many(updates)  # a moved on from pending; c has no condition
        assert 0 == set_progress_many([])
