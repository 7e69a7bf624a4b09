"""The `sql` kind on a real queue's table (DESIGN.md section 10): an integer key, one column
for both timestamps, a scheduled time, task names of its own (`type_map`) and columns the
record does not carry (`constants`), on SQLite and PostgreSQL."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import (
    BigInteger,
    Column,
    DateTime,
    Engine,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    select,
    text,
    update,
)

from migration_fsm.exceptions import ConfigError, DataError
from migration_fsm.journal import make_engine
from migration_fsm.tasks.records import TaskRecord, TaskStatus
from migration_fsm.tasks.sql import RowCopy, SqlTaskStore
from migration_fsm.testing import T0, changed
from migration_fsm.tools.backfill import copy_tasks
from migration_fsm.tools.validate import validate
from tests.support.datatools import create_task_table, everything
from tests.unit.test_fast_paths import RecordsOnly
from tests.unit.test_task_stores import PG, database

COLUMNS = {
    "key": "id",
    "type": "task_name",
    "payload": "args",
    "created_at": "ts",
    "updated_at": "ts",
    "run_at": "scheduled_at",
}
TYPE_MAP = {"app.tasks.send_mail": "send_mail", "app.tasks.report": "report", "app.tasks.mail": "send_mail"}
CONSTANTS: dict[str, Any] = {"queue_name": "default", "priority": 5}


def jobs_table(metadata: MetaData, name: str = "jobs", *, text_key: str | None = None) -> Table:
    """A queue's own table: a BIGINT id (or, with `text_key`, a text key of that dialect), one
    timestamp, a scheduled time, its own task names, and two required columns the record does
    not carry."""
    key = (
        Column("key", String(50, collation="C" if text_key == "postgresql" else None), primary_key=True)
        if text_key
        else Column("id", BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=False)
    )
    return Table(
        name,
        metadata,
        key,
        Column("task_name", String(100), nullable=False),
        Column("args", Text, nullable=False),
        Column("status", String(20), nullable=False),
        Column("ts", DateTime(timezone=True), nullable=False),
        Column("scheduled_at", DateTime(timezone=True), nullable=True),
        Column("queue_name", String(50), nullable=False),
        Column("priority", Integer, nullable=False),
    )


@dataclass
class Queue:
    url: str
    raw: Engine
    table: Table
    store: SqlTaskStore

    def open(self, **changes: Any) -> SqlTaskStore:
        kwargs: dict[str, Any] = {
            "name": "old",
            "columns": COLUMNS,
            "type_map": TYPE_MAP,
            "constants": CONSTANTS,
        }
        kwargs.update(changes)
        return SqlTaskStore(self.url, self.table.name, **kwargs)

    def rows(self) -> list[Any]:
        with self.raw.connect() as conn:
            return list(conn.execute(select(self.table).order_by(self.table.c.id)).all())


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=PG)])
def queue(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Queue]:
    with real_queue(request.param, request, tmp_path) as made:
        yield made


@contextmanager
def real_queue(backend: str, request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Queue]:
    with database(backend, request, tmp_path) as url:
        raw = make_engine(url, create=True)
        metadata = MetaData()
        table = jobs_table(metadata)
        metadata.create_all(raw)
        store = SqlTaskStore(url, "jobs", name="old", columns=COLUMNS, type_map=TYPE_MAP, constants=CONSTANTS)
        try:
            yield Queue(url, raw, table, store)
        finally:
            store.close()
            raw.dispose()


def job(i: int, *, status: TaskStatus = TaskStatus.PENDING) -> TaskRecord:
    """Task `i` as this queue can hold it: one timestamp, no attempts, no metadata."""
    created = T0 + timedelta(seconds=i % 100_000)
    return TaskRecord(
        key=str(i),
        type="send_mail" if i % 2 else "report",
        payload={"n": i},
        status=status,
        created_at=created,
        updated_at=created,
        run_at=created + timedelta(hours=1) if i % 3 == 0 else None,
    )


#: Keys whose text order and numeric order differ (1, 10, 100, 101, 11, ..., 2, 20, ...).
NUMBERS = [0, 1, 2, 9, 10, 11, 19, 20, 99, 100, 101, 110, 999, 1000, 12345, 2**40, 2**63 - 1]


# -- integer keys -------------------------------------------------------------------------


def test_integer_keys_scan_in_text_order_page_by_page(queue: Queue) -> None:
    """An integer key is its decimal text, and scans are in Python `str` order like every
    store's, so both sides of a migration merge by key whatever their key columns hold."""
    records = [job(i) for i in NUMBERS]
    queue.store.put_many(records)
    expected = sorted(str(i) for i in NUMBERS)
    assert expected == [r.key for r in queue.store.scan(None, 100)]
    for size in (1, 2, 3, 5):
        seen: list[str] = []
        after: str | None = None
        while page := queue.store.scan(after, size):
            seen += [r.key for r in page]
            after = page[-1].key
        assert expected == seen
        seen, after = [], None
        while rows := queue.store.scan_identities(after, size):
            seen += [row[0] for row in rows]
            after = rows[-1][0]
        assert expected == seen
    assert ["2", "20"] == [r.key for r in queue.store.scan("19", 2)]
    assert ["2"] == [r.key for r in queue.store.scan("1z", 1)]  # any text as `after`
    assert sorted(records, key=lambda r: r.key) == everything(queue.store)
    assert job(101) == queue.store.get("101")
    assert queue.store.get("0101") is None
    assert queue.store.get("abc") is None
    assert {"1", "2"} == set(queue.store.get_many(["1", "2", "x", "-1", "01"]))


@pytest.mark.parametrize("key", ["abc", "01", "-3", "1.5", str(2**63), " 7"])
def test_a_key_an_integer_column_cannot_hold_is_refused(queue: Queue, key: str) -> None:
    with pytest.raises(DataError, match=f"key '{key}': column 'id' holds integers") as caught:
        queue.store.put_many([job(1), changed(job(2), key=key)])
    assert 1 == caught.value.exit_code
    assert [] == queue.rows()


def test_a_negative_stored_key_is_refused(queue: Queue) -> None:
    queue.store.put_many([job(1), job(2)])
    with queue.raw.begin() as conn:
        conn.execute(update(queue.table).where(queue.table.c.id == 2).values(id=-2))
    for read in (lambda: queue.store.scan(None, 10), lambda: queue.store.scan_identities(None, 10)):
        with pytest.raises(DataError, match="holds the negative key -2"):
            read()


def test_backfill_between_integer_and_text_keys_in_order_both_ways(
    queue: Queue, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    """Integer keys into a text-key table of the same database (as rows) and back (text keys
    into an integer column: the record path): every task, in order, resumable from a
    checkpoint; validate agrees on both paths."""
    records = [job(i, status=TaskStatus.COMPLETED if i % 4 else TaskStatus.PENDING) for i in range(1, 260)]
    queue.store.put_many(records)
    create_task_table(queue.url, "new_tasks")
    with SqlTaskStore(queue.url, "new_tasks", name="new") as new:
        assert RowCopy.between(queue.store, new) is not None
        assert RowCopy.between(new, queue.store) is None
        checkpoints: list[str] = []
        first = copy_tasks(queue.store, new, batch_size=50, checkpoint=lambda key, _: checkpoints.append(key))
        assert (259, 259) == (first.copied, first.total)
        assert 259 == first.fast
        assert checkpoints == sorted(checkpoints)
        assert everything(queue.store) == everything(new)
        for old, other in ((queue.store, new), (RecordsOnly(queue.store), RecordsOnly(new))):
            report = validate(old, other, batch_size=32, settle=0)
            assert (True, 259, 0) == (report.ok, report.new_count, report.status_differs)
        with queue.raw.begin() as conn:
            conn.execute(text("DELETE FROM jobs"))
        copy_tasks(new, queue.store, batch_size=40, after=None)
        assert everything(new) == everything(queue.store)
        assert {("default", 5)} == {(row.queue_name, row.priority) for row in queue.rows()}


# -- one column for both timestamps, run_at ---------------------------------------------------


def test_one_column_holds_created_at_and_updated_at_reads_it(queue: Queue) -> None:
    """The shared column holds created_at (identity); updated_at reads as it and is not written."""
    record = changed(job(3), updated_at=job(3).created_at + timedelta(minutes=9))
    queue.store.put(record)
    assert changed(record, updated_at=record.created_at) == queue.store.get("3")
    assert record.checksum() == queue.store.get("3").checksum()  # type: ignore[union-attr]
    [row] = queue.rows()
    assert record.created_at == (row.ts if row.ts.tzinfo else row.ts.replace(tzinfo=UTC))
    assert record.run_at == queue.store.get("3").run_at  # type: ignore[union-attr]
    queue.store.put(
        changed(record, status=TaskStatus.COMPLETED, updated_at=record.created_at + timedelta(hours=2))
    )
    assert record.created_at == queue.store.get("3").updated_at  # type: ignore[union-attr]


def test_only_the_two_timestamps_may_share_a_column(queue: Queue) -> None:
    with pytest.raises(
        ConfigError, match=r"columns\.payload: column 'task_name' is already mapped to field 'type'"
    ):
        queue.open(columns={**COLUMNS, "payload": "task_name"})


# -- type_map ------------------------------------------------------------------------------


def test_type_map_both_ways(queue: Queue) -> None:
    """Stored names read as the record's type; types are written as their first stored name."""
    queue.store.put_many([job(1), job(2)])
    assert {1: "app.tasks.send_mail", 2: "app.tasks.report"} == {
        row.id: row.task_name for row in queue.rows()
    }
    with queue.raw.begin() as conn:
        conn.execute(update(queue.table).where(queue.table.c.id == 2).values(task_name="app.tasks.mail"))
    assert "send_mail" == queue.store.get("2").type  # type: ignore[union-attr]


def test_a_type_or_stored_name_the_map_does_not_map_is_refused(queue: Queue) -> None:
    """Writing an unmapped type would make the queue guess which task to run: refused, nothing
    written; reading an unmapped stored name is a DataError naming the key and the name."""
    with pytest.raises(DataError, match="key '2': type 'sms' has no stored task name in the type map"):
        queue.store.put_many([job(1), changed(job(2), type="sms")])
    assert [] == queue.rows()
    queue.store.put_many([job(1), job(2)])
    with queue.raw.begin() as conn:
        conn.execute(update(queue.table).where(queue.table.c.id == 2).values(task_name="app.tasks.other"))
    for read in (lambda: queue.store.scan(None, 10), lambda: queue.store.get("2")):
        with pytest.raises(DataError, match=r"key '2': column 'task_name' holds task name 'app.tasks.other'"):
            read()


# -- constants -------------------------------------------------------------------------------


def test_constants_are_written_on_insert_and_left_alone_on_update(queue: Queue) -> None:
    queue.store.put(job(1))
    assert [("default", 5)] == [(row.queue_name, row.priority) for row in queue.rows()]
    with queue.raw.begin() as conn:
        conn.execute(update(queue.table).values(queue_name="urgent"))
    queue.store.put_many([changed(job(1), status=TaskStatus.RUNNING), job(2)])
    assert queue.store.put_forward(changed(job(1), status=TaskStatus.COMPLETED))
    assert queue.store.put_forward(job(3))
    assert [("urgent", 5), ("default", 5), ("default", 5)] == [
        (r.queue_name, r.priority) for r in queue.rows()
    ]


@pytest.mark.parametrize(
    ("constants", "message"),
    [
        ({"lane": "x"}, "constants.lane: table 'jobs' has no column 'lane'"),
        ({"status": "x"}, "constants.status: column 'status' holds the field 'status'"),
        ({"priority": "high"}, "constants.priority: 'high' does not fit column 'priority'"),
        ({"priority": True}, "constants.priority: True does not fit"),
        ({"queue_name": "x" * 51}, "constants.queue_name: 'x+' does not fit column 'queue_name'"),
    ],
)
def test_constants_are_checked_against_the_table_at_open(
    queue: Queue, constants: dict[str, Any], message: str
) -> None:
    with pytest.raises(ConfigError, match=f"store 'old': {message}") as caught:
        queue.open(constants=constants)
    assert 2 == caught.value.exit_code


def test_a_row_copy_into_the_queue_maps_names_and_writes_constants(
    request: pytest.FixtureRequest, tmp_path: Path, queue: Queue
) -> None:
    """Between two text-key tables (one with the queue's names, one shared timestamp, constants)
    the row copy leaves what the record path leaves."""
    jobs_columns = {**COLUMNS, "key": "key"}
    metadata = MetaData()
    for name in ("rows_jobs", "record_jobs"):
        jobs_table(metadata, name, text_key=queue.raw.dialect.name)
    metadata.create_all(queue.raw)
    create_task_table(queue.url, "old_tasks")
    records = [changed(job(i), key=f"k{i:03d}") for i in range(1, 40)]
    kwargs: dict[str, Any] = {"columns": jobs_columns, "type_map": TYPE_MAP, "constants": CONSTANTS}
    with (
        SqlTaskStore(queue.url, "old_tasks", name="old") as old,
        SqlTaskStore(queue.url, "rows_jobs", name="new", **kwargs) as as_rows,
        SqlTaskStore(queue.url, "record_jobs", name="records", **kwargs) as as_records,
    ):
        old.put_many(records)
        assert RowCopy.between(old, as_rows) is not None
        copy_tasks(old, as_rows, batch_size=10)
        copy_tasks(old, RecordsOnly(as_records), batch_size=10)
        assert everything(old) == everything(as_rows) == everything(as_records)
        with queue.raw.connect() as conn:
            both = [
                conn.execute(text(f"SELECT key, task_name, queue_name, priority FROM {t} ORDER BY key")).all()
                for t in ("rows_jobs", "record_jobs")
            ]
        assert both[0] == both[1]
        assert {("default", 5)} == {(row.queue_name, row.priority) for row in both[0]}
        assert RowCopy.between(as_rows, old) is not None  # and back, the names mapped back
        with queue.raw.begin() as conn:
            conn.execute(text("DELETE FROM old_tasks"))
        copy_tasks(as_rows, old, batch_size=10)
        assert records == everything(old)
