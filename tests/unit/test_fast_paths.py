"""The data tools' fast paths say what the record paths say: identity rows carry the record's
checksum on every store, `validate` reports the same with and without them, and a backfill
copied as rows leaves the rows a record-by-record copy leaves."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import JSON, Engine, MetaData, String, Table, Text, cast, event, literal, select, text, update
from sqlalchemy.engine import make_url

from migration_fsm.exceptions import DataError
from migration_fsm.journal import make_engine
from migration_fsm.tasks.capabilities import IdentityScan
from migration_fsm.tasks.identity import identity_source
from migration_fsm.tasks.records import TaskRecord, TaskStatus
from migration_fsm.tasks.sql import RowCopy, SqlTaskStore, rowcopy
from migration_fsm.tasks.sql.rowcopy import CopiedBatch
from migration_fsm.testing import TRICKY_KEYS, changed, make_records
from migration_fsm.tools.backfill import copy_tasks
from migration_fsm.tools.validate import validate
from tests.support.datatools import create_task_table, everything
from tests.unit import test_task_stores
from tests.unit.test_task_stores import (
    LEGACY_COLUMNS,
    LEGACY_STATUS,
    PG,
    SqlCase,
    StoreCase,
    database,
    legacy_table,
)

BACKENDS = ["sqlite", pytest.param("postgresql", marks=PG)]

#: The store fixtures of test_task_stores: every store (`case`), every SQL store (`sql`).
case = test_task_stores.case
sql = test_task_stores.sql


#: (backend, whether old and new share one database file or database), for the row copy.
BACKENDS_AND_LAYOUTS = [
    ("sqlite", False),
    ("sqlite", True),
    pytest.param("postgresql", False, marks=PG),
    pytest.param("postgresql", True, marks=PG),
]


class RecordsOnly:
    """A store seen only through the `TaskStore` protocol: no fast path applies to it."""

    def __init__(self, store: SqlTaskStore) -> None:
        self.store = store
        self.name = store.name

    def scan(self, after: str | None, limit: int) -> Sequence[TaskRecord]:
        return self.store.scan(after, limit)

    def get(self, key: str) -> TaskRecord | None:
        return self.store.get(key)

    def put(self, record: TaskRecord) -> None:
        self.store.put(record)

    def put_many(self, records: Sequence[TaskRecord]) -> int:
        return self.store.put_many(records)

    def count_by_status(self) -> Mapping[TaskStatus, int]:
        return self.store.count_by_status()


@contextmanager
def task_store(
    backend: str, request: pytest.FixtureRequest, tmp_path: Path, *, layout: str = "plain", name: str = "old"
) -> Iterator[tuple[SqlTaskStore, Engine, Table]]:
    """A store over a fresh table of `layout` in a database of its own, with raw access."""
    with database(backend, request, tmp_path) as url:
        if layout == "legacy":
            raw = make_engine(url, create=True)
            metadata = MetaData()
            legacy_table(metadata)
            metadata.create_all(raw)
            store = SqlTaskStore(url, "job_runs", name=name, columns=LEGACY_COLUMNS, status_map=LEGACY_STATUS)
        else:
            create_task_table(url, "tasks")
            raw = make_engine(url)
            store = SqlTaskStore(url, "tasks", name=name)
        try:
            yield store, raw, store.table
        finally:
            store.close()
            raw.dispose()


def raw_rows(raw: Engine, table: Table) -> list[tuple[Any, ...]]:
    """Every row of `table` as the database holds it, each column as text, in key order."""
    with raw.connect() as conn:
        rows = conn.execute(select(*(cast(column, Text) for column in table.c)).order_by(text("1")))
        return [tuple(row) for row in rows]


# -- identity rows ------------------------------------------------------------------------


def test_identity_rows_carry_each_records_checksum_status_and_attempts(case: StoreCase) -> None:
    """On every store an identity row's checksum is its record's `checksum()`; pages cover every key."""
    records = {record.key: record for record in make_records(TRICKY_KEYS, metadata=case.keeps_metadata)}
    case.store.put_many(list(records.values()))
    source = identity_source(case.store, fast=True)
    assert (case.sql is not None) == isinstance(case.store, IdentityScan)  # SQL stores offer it
    rows = source.scan_identities(None, 1000)
    assert sorted(records) == [row[0] for row in rows]
    for row in rows:
        record = records[row[0]]
        assert record.checksum() == source.identity_checksum(row)
        assert (record.status, record.attempts) == (row[4], row[5])
    paged: list[str] = []
    after: str | None = None
    while page := source.scan_identities(after, 3):
        paged += [row[0] for row in page]
        after = page[-1][0]
    assert sorted(records) == paged


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_same_records_give_the_same_checksums_in_every_layout(
    request: pytest.FixtureRequest, tmp_path: Path, backend: str
) -> None:
    """Raw identity values differ between layouts (text vs DATETIME, JSON vs text); checksums do not."""
    records = make_records(TRICKY_KEYS, metadata=False)
    with (
        task_store(backend, request, tmp_path, layout="plain") as (plain, _, _),
        task_store(backend, request, tmp_path, layout="legacy") as (legacy, _, _),
    ):
        plain.put_many(records)
        legacy.put_many(records)
        a, b = plain.scan_identities(None, 100), legacy.scan_identities(None, 100)
        assert [plain.identity_checksum(row) for row in a] == [legacy.identity_checksum(row) for row in b]
        assert [r.checksum() for r in sorted(records, key=lambda r: r.key)] == [
            plain.identity_checksum(row) for row in a
        ]


def test_identity_rows_name_a_row_they_cannot_read(sql: SqlCase) -> None:
    """An unmapped status or an empty key: the DataError `scan` raises, naming key and column."""
    sql.store.put_many(make_records(["a", "c"], metadata=sql.layout != "legacy"))
    sql.insert_raw(sql.raw_row("b", **{sql.column("status"): "zombie"}))
    with pytest.raises(DataError) as caught:
        sql.store.scan_identities(None, 10)
    for part in ("store 'old'", "key 'b'", f"column '{sql.column('status')}'", "'zombie'"):
        assert part in str(caught.value)
    with sql.raw.begin() as conn:
        conn.execute(text(f"DELETE FROM {sql.table.name}"))
    sql.insert_raw(sql.raw_row(""))
    with pytest.raises(DataError, match="holds an empty key"):
        sql.store.scan_identities(None, 10)


# -- validate with and without the fast path ------------------------------------------------


def respace(payload: dict[str, Any]) -> str:
    """The same JSON object as other text: spaces, keys in reverse order."""
    return json.dumps(dict(reversed(payload.items())), indent=1)


def json_text(raw: Engine, column: Any, value: str) -> Any:
    """`value` as JSON text to store in `column` as it is (SQLAlchemy's JSON type would encode
    it again, as a JSON string)."""
    as_text = literal(value, String())
    if raw.dialect.name == "postgresql" and isinstance(column.type, JSON):
        return cast(as_text, column.type)
    return as_text


@pytest.mark.parametrize(
    ("backend", "layouts"),
    [
        ("sqlite", ("plain", "plain")),
        ("sqlite", ("legacy", "plain")),
        pytest.param("postgresql", ("plain", "plain"), marks=PG),
        pytest.param("postgresql", ("plain", "legacy"), marks=PG),
    ],
)
def test_validate_reports_the_same_with_and_without_the_fast_path(
    request: pytest.FixtureRequest, tmp_path: Path, backend: str, layouts: tuple[str, str]
) -> None:
    """Injected differences are found alike; the same values stored as other text are no difference."""
    base = make_records([f"k{i:04d}" for i in range(300)], metadata=False)
    new = list(base)
    new[20] = changed(base[20], payload={"to": "someone else"})
    new[30] = changed(base[30], type="sms", status=TaskStatus.COMPLETED)
    new[40] = changed(base[40], created_at=base[40].created_at + timedelta(seconds=1))
    other = TaskStatus.FAILED if base[60].status != TaskStatus.FAILED else TaskStatus.PENDING
    new[60] = changed(base[60], status=other)
    new[70] = changed(base[70], attempts=base[70].attempts + 1)
    new[90] = changed(base[90], updated_at=base[0].updated_at)  # not an identity or progress field
    del new[250], new[10]
    new += make_records(["k0100a", "zz"], metadata=False)
    with (
        task_store(backend, request, tmp_path, layout=layouts[0], name="old") as (old, _, _),
        task_store(backend, request, tmp_path, layout=layouts[1], name="new") as (target, raw, table),
    ):
        old.put_many(base)
        target.put_many(new)
        key, payload = target.mapping.by_name["key"].column, target.mapping.by_name["payload"].column
        with raw.begin() as conn:  # the same JSON as other text: raw values differ, identity does not
            stored = json_text(raw, payload, respace(base[50].payload))
            conn.execute(update(table).where(key == "k0050").values({payload.name: stored}))
        fast = validate(old, target, batch_size=64, settle=0).as_json()
        slow = validate(RecordsOnly(old), RecordsOnly(target), batch_size=64, settle=0).as_json()
    assert {**slow, "rows_by_path": None} == {**fast, "rows_by_path": None}  # the paths differ, by design
    assert (2, 2, 3, 2) == (fast["missing"], fast["extra"], fast["mismatched"], fast["status_differs"])
    assert ["k0010", "k0250"] == fast["samples"]["missing"]
    assert [
        {"key": "k0020", "fields": ["payload"]},
        {"key": "k0030", "fields": ["type", "status"]},
        {"key": "k0040", "fields": ["created_at"]},
    ] == fast["samples"]["mismatched"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_validate_flags_a_run_at_difference_on_both_paths(
    request: pytest.FixtureRequest, tmp_path: Path, backend: str
) -> None:
    """run_at is identity: set on one side only, or another time, is a mismatch naming
    run_at, with and without the fast path; the same time in another zone is no difference."""
    base = make_records([f"k{i:03d}" for i in range(60)], run_at=True)
    assert base[3].run_at is not None
    assert base[4].run_at is None
    new = list(base)
    new[3] = changed(base[3], run_at=None)
    new[4] = changed(base[4], run_at=base[4].created_at)
    new[6] = changed(base[6], run_at=base[6].run_at + timedelta(seconds=1))  # type: ignore[operator]
    with (
        task_store(backend, request, tmp_path, name="old") as (old, _, _),
        task_store(backend, request, tmp_path, name="new") as (target, raw, table),
    ):
        old.put_many(base)
        target.put_many(new)
        if backend == "postgresql":  # the same instant, stored through another zone: no difference
            with raw.begin() as conn:
                conn.execute(text("SET TIME ZONE 'Asia/Kolkata'"))
                conn.execute(update(table).where(table.c.key == "k009").values(run_at=base[9].run_at))
        fast = validate(old, target, batch_size=16, settle=0).as_json()
        slow = validate(RecordsOnly(old), RecordsOnly(target), batch_size=16, settle=0).as_json()
    assert {**slow, "rows_by_path": None} == {**fast, "rows_by_path": None}  # the paths differ, by design
    assert (0, 0, 3, 0) == (fast["missing"], fast["extra"], fast["mismatched"], fast["status_differs"])
    assert [{"key": key, "fields": ["run_at"]} for key in ("k003", "k004", "k006")] == fast["samples"][
        "mismatched"
    ]


@pytest.mark.parametrize(("backend", "one_file"), BACKENDS_AND_LAYOUTS)
def test_a_row_copy_into_a_table_without_run_at_refuses_a_scheduled_task(
    request: pytest.FixtureRequest, tmp_path: Path, backend: str, one_file: bool
) -> None:
    """Into a table with no run_at column, batches without a scheduled time go as rows; the
    batch with one goes the record path, which refuses it (DataError), never dropping it."""
    records = make_records([f"k{i:03d}" for i in range(30)])
    records[25] = changed(records[25], run_at=records[25].created_at)
    with two_tables(backend, request, tmp_path, one_file=one_file) as (old, _, _, raw):
        with raw.begin() as conn:
            conn.execute(text("ALTER TABLE record_tasks DROP COLUMN run_at"))
        with SqlTaskStore(raw.url.render_as_string(hide_password=False), "record_tasks", name="new") as new:
            old.put_many(records)
            assert RowCopy.between(old, new) is not None
            with pytest.raises(
                DataError, match="store 'new': key 'k025': table 'record_tasks' has no run_at"
            ):
                copy_tasks(old, new, batch_size=10)
            assert records[:20] == everything(new)


# -- backfill as rows -----------------------------------------------------------------------


@contextmanager
def two_tables(
    backend: str, request: pytest.FixtureRequest, tmp_path: Path, *, one_file: bool
) -> Iterator[tuple[SqlTaskStore, SqlTaskStore, SqlTaskStore, Engine]]:
    """old, new and a third table for the record path's copy, with raw access to the last database."""
    with database(backend, request, tmp_path) as first, database(backend, request, tmp_path) as second:
        create_task_table(first, "old_tasks")
        url = first if one_file else second
        for name in ("new_tasks", "record_tasks"):
            create_task_table(url, name)
        raw = make_engine(url)
        with (
            SqlTaskStore(first, "old_tasks", name="old") as old,
            SqlTaskStore(url, "new_tasks", name="new") as new,
            SqlTaskStore(url, "record_tasks", name="records") as records,
        ):
            yield old, new, records, raw
        raw.dispose()


@pytest.mark.parametrize(
    ("backend", "one_file", "inside"),
    [
        ("sqlite", False, True),
        ("sqlite", True, True),
        pytest.param("postgresql", False, False, marks=PG),
        pytest.param("postgresql", True, True, marks=PG),
    ],
)
def test_backfill_as_rows_leaves_the_rows_the_record_path_leaves(
    request: pytest.FixtureRequest, tmp_path: Path, backend: str, one_file: bool, inside: bool
) -> None:
    """Row for row, column for column the same as a copy through records, batches and a re-run
    included; scheduled times (set and None) too."""
    records = make_records([f"k{i:04d}" for i in range(230)] + TRICKY_KEYS, run_at=True)
    with two_tables(backend, request, tmp_path, one_file=one_file) as (old, new, through_records, raw):
        old.put_many(records)
        rows = RowCopy.between(old, new)
        assert rows is not None
        assert inside == (rows.inserts is not None)  # inside the database, or through Python
        assert RowCopy.between(old, RecordsOnly(through_records)) is None
        result = copy_tasks(old, new, batch_size=50)
        copy_tasks(old, RecordsOnly(through_records), batch_size=50)
        assert (len(records), len(records)) == (result.copied, result.total)
        moved = [changed(r, status=TaskStatus.CANCELLED, attempts=3) for r in records[::7]]
        old.put_many([changed(r, run_at=r.created_at if r.run_at is None else None) for r in moved])
        for target in (new, RecordsOnly(through_records)):
            copy_tasks(old, target, batch_size=64)  # every key again: updates, not inserts
        assert everything(old) == everything(new)
        assert raw_rows(raw, new.table) == raw_rows(raw, through_records.table)


@pytest.mark.parametrize(("backend", "one_file"), BACKENDS_AND_LAYOUTS)
def test_backfill_as_rows_leaves_rows_that_need_converting_to_the_record_path(
    request: pytest.FixtureRequest, tmp_path: Path, backend: str, one_file: bool
) -> None:
    """JSON as other text is copied as it is; a timestamp in another form is converted; a bad
    row stops the copy naming its key, and its batch writes nothing."""
    records = make_records([f"k{i:03d}" for i in range(30)])
    with two_tables(backend, request, tmp_path, one_file=one_file) as (old, new, _, raw):
        old.put_many(records)
        source = make_engine(old.url)
        table, key = old.table, old.table.c.key
        with source.begin() as conn:
            other_text = json_text(source, table.c.payload, respace(records[13].payload))
            conn.execute(update(table).where(key == "k013").values(payload=other_text))
            if backend == "sqlite":  # a timestamp, but not in the DATETIME text the writer writes
                moved = text("'2024-05-17T14:30:45+02:00'")
                conn.execute(update(table).where(key == "k005").values(created_at=moved))
        copy_tasks(old, new, batch_size=10)
        assert everything(old) == everything(new)
        with raw.connect() as conn:
            stored = conn.execute(
                select(new.table.c.payload.cast(Text)).where(new.table.c.key == "k013")
            ).scalar()
        assert respace(records[13].payload) == stored  # copied as the old side holds it
        if backend == "sqlite":  # converted through its record, to the writer's text
            with raw.connect() as conn:
                created = select(new.table.c.created_at.cast(Text)).where(new.table.c.key == "k005")
                assert "2024-05-17 12:30:45.000000" == conn.execute(created).scalar()
        with source.begin() as conn:
            conn.execute(update(table).where(key == "k015").values(status="zombie"))
        source.dispose()
        with raw.begin() as conn:
            conn.execute(text(f"DELETE FROM {new.table.name}"))
        with pytest.raises(DataError, match=r"'k015'.*'zombie'"):
            copy_tasks(old, new, batch_size=10)
        assert [r.key for r in records[:10]] == [r.key for r in everything(new)]


@PG
def test_a_batch_refused_after_postgresql_wrote_it_is_undone(
    request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Inside PostgreSQL one statement checks and writes a batch; when Python then refuses the
    page (a key out of order, say), the batch is rolled back and goes the record path."""
    with two_tables("postgresql", request, tmp_path, one_file=True) as (old, new, _, _):
        old.put_many(make_records([f"k{i:03d}" for i in range(30)]))
        rows = RowCopy.between(old, new)
        assert rows is not None
        assert rows.inserts is not None

        def out_of_order(after: str | None, limit: int, found: list[Any]) -> list[Any]:
            raise rowcopy._PageChanged

        monkeypatch.setattr(rows, "checked", out_of_order)
        assert rows.copy_batch(None, 10) is None
        assert [] == everything(new)
        monkeypatch.undo()
        assert CopiedBatch(10, 0, "k009") == rows.copy_batch(None, 10)
        copy_tasks(old, new, batch_size=10)
        assert everything(old) == everything(new)


def test_a_copy_inside_sqlite_write_locks_the_target_and_not_the_source(
    request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While a batch is copied inside SQLite, another writer waits for the target (locked up
    front, as BEGIN IMMEDIATE would) but may start writing to the source, the live old side."""
    with two_tables("sqlite", request, tmp_path, one_file=False) as (old, new, _, _):
        old.put_many(make_records([f"k{i:03d}" for i in range(30)]))
        rows = RowCopy.between(old, new)
        assert rows is not None
        assert rows.attach is not None
        checked = rows.checked
        seen: dict[str, bool] = {}

        def can_write(url: str) -> bool:
            other = sqlite3.connect(make_url(url).database or "", timeout=0.05, isolation_level=None)
            try:
                other.execute("BEGIN IMMEDIATE")
                other.execute("ROLLBACK")
                return True
            except sqlite3.OperationalError:
                return False
            finally:
                other.close()

        def during(after: str | None, limit: int, found: list[Any]) -> list[Any] | None:
            seen.update(source=can_write(old.url), target=can_write(new.url))
            return checked(after, limit, found)

        monkeypatch.setattr(rows, "checked", during)
        assert CopiedBatch(10, 0, "k009") == rows.copy_batch(None, 10)
        assert {"source": True, "target": False} == seen


@pytest.mark.parametrize(("backend", "one_file"), BACKENDS_AND_LAYOUTS)
def test_making_a_row_copy_reads_no_rows(
    request: pytest.FixtureRequest, tmp_path: Path, backend: str, one_file: bool
) -> None:
    """The copy's statements are tried once when it is made, on a page of none: a regression
    test for a probe that read the whole old table."""
    with two_tables(backend, request, tmp_path, one_file=one_file) as (old, new, _, _):
        old.put_many(make_records([f"k{i:03d}" for i in range(30)]))
        read: list[int] = []

        def count(conn: Any, cursor: Any, *args: Any) -> None:
            if cursor.description:
                read.append(len(cursor.fetchall()))

        for engine in (old.engine, new.engine):
            event.listen(engine, "after_cursor_execute", count)
        assert RowCopy.between(old, new) is not None
        assert read
        assert {0} == set(read)
