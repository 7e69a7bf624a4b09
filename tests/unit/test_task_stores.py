"""Task stores: `MemoryTaskStore` and `SqlTaskStore` (SQLite and PostgreSQL, two table
layouts) keep the `TaskStore` contract alike; `build_store` builds each kind from config."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import (
    JSON,
    CheckConstraint,
    Column,
    DateTime,
    Engine,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    create_engine,
    event,
    func,
    insert,
    select,
    text,
    update,
)
from sqlalchemy.exc import IntegrityError

from migration_fsm.config import StoreConfig, load_settings
from migration_fsm.exceptions import ConfigError, DatabaseUnavailable, DataError
from migration_fsm.journal import make_engine
from migration_fsm.tasks.capabilities import BulkGet
from migration_fsm.tasks.factory import build_store
from migration_fsm.tasks.memory import MemoryTaskStore
from migration_fsm.tasks.records import TaskRecord, TaskStatus, TaskStore
from migration_fsm.tasks.sql import SqlTaskStore
from migration_fsm.testing import FORWARD_CASES, T0, TRICKY_KEYS, TaskStoreContract, changed, make_records

# -- table layouts ------------------------------------------------------------------------

#: The legacy layout's own status vocabulary: two stored values mean `failed`.
LEGACY_STATUS = {
    "queued": "pending",
    "started": "running",
    "done": "completed",
    "error": "failed",
    "crashed": "failed",
    "killed": "cancelled",
}
LEGACY_COLUMNS = {
    "key": "run_id",
    "type": "job_kind",
    "payload": "args",
    "status": "state",
    "attempts": "tries",
    "created_at": "enqueued",
    "updated_at": "modified",
}


def plain_table(
    metadata: MetaData, *, key_type: String | None = None, primary: bool = True, extra: tuple[Any, ...] = ()
) -> Table:
    """Every field in the column of its name: JSON payload, timezone-aware timestamps.
    `primary=False` leaves the table with no primary key (add uniqueness through `extra`)."""
    return Table(
        "tasks",
        metadata,
        Column("key", key_type or String(200), primary_key=primary, nullable=False),
        Column("type", String(100), nullable=False),
        Column("payload", JSON, nullable=False),
        Column("status", String(20), nullable=False),
        Column("attempts", Integer, nullable=False),
        Column("created_at", DateTime(timezone=True), nullable=False),
        Column("updated_at", DateTime(timezone=True), nullable=False),
        Column("metadata", JSON, nullable=False),
        Column("run_at", DateTime(timezone=True), nullable=True),
        CheckConstraint("type <> 'forbidden'", name="tasks_type_allowed"),
        *extra,
    )


def legacy_table(metadata: MetaData) -> Table:
    """An old task manager's own table: integer id, unique index on `run_id`, text JSON,
    text and naive timestamps, its own statuses, no metadata, a column we do not map."""
    return Table(
        "job_runs",
        metadata,
        Column("id", Integer, primary_key=True, autoincrement=True),
        Column("run_id", String(200), nullable=False),
        Column("job_kind", String(100), nullable=False),
        Column("args", Text, nullable=False),
        Column("state", String(20), nullable=False),
        Column("tries", Integer, nullable=False, server_default="0"),
        Column("enqueued", Text, nullable=False),
        Column("modified", DateTime(timezone=False), nullable=False),
        Column("worker", String(50), nullable=False, server_default="nobody"),
        Index("job_runs_run_id", "run_id", unique=True),
        CheckConstraint("job_kind <> 'forbidden'", name="job_runs_kind_allowed"),
    )


@dataclass
class SqlCase:
    """A `SqlTaskStore` over a table built by the test, and raw access to that table."""

    backend: str
    layout: str
    url: str
    raw: Engine
    table: Table
    store: SqlTaskStore

    @property
    def columns(self) -> dict[str, str]:
        return dict(LEGACY_COLUMNS) if self.layout == "legacy" else {}

    @property
    def status_map(self) -> dict[str, str]:
        return dict(LEGACY_STATUS) if self.layout == "legacy" else {}

    def column(self, field: str) -> str:
        return self.columns.get(field, field)

    def reopen(self, **changes: Any) -> SqlTaskStore:
        """Another store over the same table; `changes` override its constructor arguments."""
        kwargs: dict[str, Any] = {
            "name": "old",
            "columns": self.columns,
            "status_map": self.status_map,
        }
        kwargs.update(changes)
        table = kwargs.pop("table", self.table.name)
        return SqlTaskStore(self.url, table, **kwargs)

    def raw_row(self, key: str, **columns: Any) -> dict[str, Any]:
        """A row as the owning application writes it, with `columns` overriding defaults."""
        if self.layout == "legacy":
            row: dict[str, Any] = {
                "run_id": key,
                "job_kind": "mail",
                "args": '{"to": "a@example.com"}',
                "state": "queued",
                "tries": 0,
                "enqueued": "2024-01-01T00:00:00Z",
                "modified": datetime(2024, 1, 1),  # naive, as the old system keeps it
            }
        else:
            row = {
                "key": key,
                "type": "mail",
                "payload": {"to": "a@example.com"},
                "status": "pending",
                "attempts": 0,
                "created_at": T0,
                "updated_at": T0,
                "metadata": {},
            }
        row.update(columns)
        return row

    def insert_raw(self, *rows: dict[str, Any]) -> None:
        with self.raw.begin() as conn:
            conn.execute(insert(self.table), list(rows))

    def row_count(self) -> int:
        with self.raw.connect() as conn:
            return int(conn.execute(select(func.count()).select_from(self.table)).scalar_one())


@contextmanager
def database(backend: str, request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """An empty database: a SQLite file, or a fresh schema in the session's PostgreSQL database."""
    if backend == "sqlite":
        yield f"sqlite:///{tmp_path / f'tasks-{uuid.uuid4().hex[:6]}.db'}"
        return
    base = request.getfixturevalue("pg_database")
    schema = f"s_{uuid.uuid4().hex[:12]}"
    admin = create_engine(base, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.execute(text(f'CREATE SCHEMA "{schema}"'))
        yield f"{base}?options=-csearch_path%3D{schema}"
        with admin.connect() as conn:
            conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
    finally:
        admin.dispose()


@contextmanager
def sql_case(backend: str, layout: str, request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[SqlCase]:
    """A table of `layout` in a fresh `backend` database, and a `SqlTaskStore` named 'old' on it."""
    with database(backend, request, tmp_path) as url:
        raw = make_engine(url, create=True)
        metadata = MetaData()
        table = legacy_table(metadata) if layout == "legacy" else plain_table(metadata)
        metadata.create_all(raw)
        columns = LEGACY_COLUMNS if layout == "legacy" else {}
        status_map = LEGACY_STATUS if layout == "legacy" else {}
        store = SqlTaskStore(url, table.name, name="old", columns=columns, status_map=status_map)
        try:
            yield SqlCase(backend, layout, url, raw, table, store)
        finally:
            store.close()
            raw.dispose()


PG = pytest.mark.postgres
SQL_PARAMS = [
    "sqlite-plain",
    "sqlite-legacy",
    pytest.param("postgresql-plain", marks=PG),
    pytest.param("postgresql-legacy", marks=PG),
]


@dataclass
class StoreCase:
    """A store under test; `sql` is set for the SQL ones."""

    store: TaskStore
    sql: SqlCase | None

    @property
    def keeps_metadata(self) -> bool:
        return self.sql is None or self.sql.layout != "legacy"


@pytest.fixture(params=["memory", *SQL_PARAMS])
def case(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[StoreCase]:
    """Each store: in memory, and SQL on SQLite and PostgreSQL in both table layouts."""
    if request.param == "memory":
        yield StoreCase(MemoryTaskStore("old"), None)
        return
    backend, layout = request.param.split("-")
    with sql_case(backend, layout, request, tmp_path) as sql:
        yield StoreCase(sql.store, sql)


@pytest.fixture(params=SQL_PARAMS)
def sql(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[SqlCase]:
    """Each SQL store, with raw access to its table."""
    backend, layout = request.param.split("-")
    with sql_case(backend, layout, request, tmp_path) as made:
        yield made


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=PG)])
def legacy(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[SqlCase]:
    """The legacy layout on SQLite and on PostgreSQL."""
    with sql_case(request.param, "legacy", request, tmp_path) as made:
        yield made


# -- records ------------------------------------------------------------------------------

# -- the contract, on every store ---------------------------------------------------------


def test_put_many_then_get_round_trips(case: StoreCase) -> None:
    """Every field of every record reads back equal, through get and through scan."""
    records = make_records(TRICKY_KEYS, metadata=case.keeps_metadata)
    assert len(records) == case.store.put_many(records)
    for record in records:
        assert record == case.store.get(record.key)
    assert sorted(records, key=lambda r: r.key) == list(case.store.scan(None, 1000))


def test_scan_is_python_string_order(case: StoreCase) -> None:
    """Keys come back in `sorted()` order of Python strings: case, digits, '-', '_', 'é', emoji."""
    case.store.put_many(make_records(TRICKY_KEYS, metadata=case.keeps_metadata))
    assert sorted(TRICKY_KEYS) == [record.key for record in case.store.scan(None, 1000)]


def test_scan_pages_with_after_and_limit(case: StoreCase) -> None:
    """Pages of 3 from each last key cover every key once, in order; past the end is empty."""
    case.store.put_many(make_records(TRICKY_KEYS, metadata=case.keeps_metadata))
    seen: list[str] = []
    after: str | None = None
    while page := case.store.scan(after, 3):
        assert len(page) <= 3
        seen += [record.key for record in page]
        after = page[-1].key
    assert sorted(TRICKY_KEYS) == seen
    assert ["a", "a b"] == [r.key for r in case.store.scan("_x", 2)]
    assert [] == list(case.store.scan(max(TRICKY_KEYS), 10))
    assert [] == list(case.store.scan(None, 0))


def test_put_many_twice_writes_each_key_once(case: StoreCase) -> None:
    """A batch written twice leaves the same records and no duplicate rows."""
    records = make_records(TRICKY_KEYS, metadata=case.keeps_metadata)
    case.store.put_many(records)
    first = list(case.store.scan(None, 1000))
    assert len(records) == case.store.put_many(records)
    assert first == list(case.store.scan(None, 1000))
    assert len(records) == sum(case.store.count_by_status().values())
    if case.sql is not None:
        assert len(records) == case.sql.row_count()


def test_put_replaces_status_and_attempts(case: StoreCase) -> None:
    """An upsert of a known key replaces it: status, attempts and updated_at move."""
    record = make_records(["job-1"], metadata=case.keeps_metadata)[0]
    case.store.put(record)
    later = changed(
        record, status=TaskStatus.FAILED, attempts=3, updated_at=record.updated_at + timedelta(hours=1)
    )
    case.store.put(later)
    assert later == case.store.get("job-1")
    assert 1 == case.store.count_by_status()[TaskStatus.FAILED]
    assert 1 == sum(case.store.count_by_status().values())


def test_put_many_last_record_of_a_key_wins(case: StoreCase) -> None:
    """Two records of one key in a batch leave one row: the last one."""
    first, second = make_records(["k", "k"], metadata=case.keeps_metadata)
    case.store.put_many([first, changed(second, status=TaskStatus.COMPLETED)])
    assert [changed(second, status=TaskStatus.COMPLETED)] == list(case.store.scan(None, 10))


def test_count_by_status_counts_every_status(case: StoreCase) -> None:
    """Every status is present, zero included, and the counts add up."""
    assert dict.fromkeys(TaskStatus, 0) == dict(case.store.count_by_status())
    records = make_records([f"k{i}" for i in range(12)], metadata=case.keeps_metadata)
    case.store.put_many(records[:7])  # statuses cycle: 2 pending, 2 running, 1 of the others
    expected = dict.fromkeys(TaskStatus, 0)
    for record in records[:7]:
        expected[record.status] += 1
    assert expected == dict(case.store.count_by_status())


def test_checksums_are_the_same_on_every_store(case: StoreCase) -> None:
    """A record's checksum read back from any store equals the one computed before writing."""
    records = make_records(TRICKY_KEYS, metadata=case.keeps_metadata)
    case.store.put_many(records)
    expected = {record.key: record.checksum() for record in records}
    assert expected == {record.key: record.checksum() for record in case.store.scan(None, 1000)}


def test_get_unknown_key_is_none(case: StoreCase) -> None:
    """A key never written reads as None."""
    case.store.put_many(make_records(["a"], metadata=case.keeps_metadata))
    assert case.store.get("b") is None
    assert case.store.get("A") is None


@pytest.mark.parametrize(("stored", "written", "writes"), FORWARD_CASES)
def test_put_forward_never_moves_a_task_back(
    case: StoreCase, stored: TaskStatus | None, written: TaskStatus, writes: bool
) -> None:
    """`put_forward` (DualWriter's second write) writes like `put` unless the stored task is
    further along; then it writes nothing and says so."""
    [base] = make_records(["k"], metadata=case.keeps_metadata)
    if stored is not None:
        case.store.put(changed(base, status=stored, attempts=1))
    before = case.store.get("k")
    record = changed(base, status=written, payload={"changed": True})
    assert isinstance(case.store, (SqlTaskStore, MemoryTaskStore))
    assert writes is case.store.put_forward(record)
    assert (record if writes else before) == case.store.get("k")


def test_get_many_reads_what_get_reads(case: StoreCase) -> None:
    """`get_many` (validation's batched re-read) answers as one `get` per key would: absent
    keys are left out, and lists longer than one `IN (...)` chunk are read whole."""
    keys = [*TRICKY_KEYS, *(f"bulk-{i:04d}" for i in range(1200))]
    records = make_records(keys, metadata=case.keeps_metadata)
    case.store.put_many(records)
    assert isinstance(case.store, BulkGet)
    asked = [*keys[::2], "never-written", "A-not-there"]
    found = case.store.get_many(asked)
    assert set(found) == set(keys[::2])
    for key in keys[::2]:
        assert found[key] == case.store.get(key)
    assert case.store.get_many([]) == {}


# -- SQL specifics ------------------------------------------------------------------------


def test_naive_and_text_timestamps_read_as_utc(legacy: SqlCase) -> None:
    """A naive timestamp is UTC; a text one is ISO 8601, with or without an offset."""
    legacy.insert_raw(
        legacy.raw_row("a", enqueued="2024-01-01T12:00:00+02:00", modified=datetime(2024, 1, 1, 10)),
        legacy.raw_row("b", enqueued="2024-01-01 10:00:00", modified=datetime(2024, 1, 1, 10, 0, 0, 5)),
        legacy.raw_row("c", enqueued="2024-01-01T10:00:00.000007Z"),
    )
    ten = datetime(2024, 1, 1, 10, tzinfo=UTC)
    a, b, c = legacy.store.scan(None, 10)
    assert (ten, ten) == (a.created_at, a.updated_at)
    assert (ten, ten + timedelta(microseconds=5)) == (b.created_at, b.updated_at)
    assert ten + timedelta(microseconds=7) == c.created_at
    assert UTC == a.created_at.tzinfo == b.updated_at.tzinfo


def test_own_status_vocabulary(legacy: SqlCase) -> None:
    """Two stored values read as `failed`; writing `failed` stores the first of them."""
    legacy.insert_raw(
        legacy.raw_row("a", state="error"),
        legacy.raw_row("b", state="crashed"),
        legacy.raw_row("c", state="done"),
    )
    assert TaskStatus.FAILED == getattr(legacy.store.get("b"), "status", None)
    assert 2 == legacy.store.count_by_status()[TaskStatus.FAILED]
    record = legacy.store.get("c")
    assert record is not None
    legacy.store.put(changed(record, status=TaskStatus.FAILED))
    with legacy.raw.connect() as conn:
        states = dict(conn.execute(select(legacy.table.c.run_id, legacy.table.c.state)).all())
    assert {"a": "error", "b": "crashed", "c": "error"} == states


def test_unmapped_columns_keep_their_defaults_and_values(legacy: SqlCase) -> None:
    """Insert leaves `id` and `worker` to the database; update leaves them as they were."""
    record = make_records(["a"], metadata=False)[0]
    legacy.store.put(record)
    with legacy.raw.begin() as conn:
        row = conn.execute(select(legacy.table)).one()
        assert ("nobody", 1) == (row.worker, row.id)
        conn.execute(update(legacy.table).values(worker="w-7"))
    legacy.store.put(changed(record, status=TaskStatus.RUNNING))
    with legacy.raw.connect() as conn:
        row = conn.execute(select(legacy.table)).one()
    assert ("w-7", 1, "started") == (row.worker, row.id, row.state)


def test_run_at_in_every_form_a_column_holds(
    request: pytest.FixtureRequest, tmp_path: Path, backend: str
) -> None:
    """run_at in a timezone-aware, a naive and a text column: set and None read back alike, in
    UTC; a row the owning application wrote with a naive or text time reads as UTC."""
    with database(backend, request, tmp_path) as url:
        raw = make_engine(url, create=True)
        metadata = MetaData()
        plain_table(metadata)
        for name, kind in (("naive", DateTime(timezone=False)), ("text", Text())):
            Table(
                f"tasks_{name}",
                metadata,
                *(Column(c.name, c.type, primary_key=c.primary_key) for c in metadata.tables["tasks"].c
                  if c.name != "run_at"),
                Column("run_at", kind, nullable=True),
            )  # fmt: skip
        metadata.create_all(raw)
        records = make_records(TRICKY_KEYS, run_at=True)
        assert any(r.run_at is None for r in records)
        assert any(r.run_at is not None for r in records)
        try:
            for table in ("tasks", "tasks_naive", "tasks_text"):
                with SqlTaskStore(url, table, name="new") as store:
                    store.put_many(records)
                    assert sorted(records, key=lambda r: r.key) == list(store.scan(None, 1000))
                    assert {r.key: r.checksum() for r in records} == {
                        r.key: store.identity_checksum(row) for r, row in
                        zip(store.scan(None, 1000), store.scan_identities(None, 1000), strict=True)
                    }  # fmt: skip
            with raw.begin() as conn:
                conn.execute(
                    text("UPDATE tasks_text SET run_at = '2024-01-01T12:00:00+02:00' WHERE key = 'a'")
                )
            with SqlTaskStore(url, "tasks_text", name="new") as store:
                assert datetime(2024, 1, 1, 10, tzinfo=UTC) == getattr(store.get("a"), "run_at", None)
        finally:
            raw.dispose()


def test_a_scheduled_time_the_table_cannot_hold_is_refused_not_dropped(legacy: SqlCase) -> None:
    """No run_at column: a task without one is written; one with one is a DataError naming the
    store and the key, on every write path, and nothing of its batch is written."""
    scheduled, plain = make_records(["a", "b"], metadata=False, run_at=True)
    assert scheduled.run_at is not None
    legacy.store.put(plain)
    for write in (
        lambda: legacy.store.put(scheduled),
        lambda: legacy.store.put_many([changed(plain, key="c"), scheduled]),
        lambda: legacy.store.put_forward(scheduled),
    ):
        with pytest.raises(
            DataError, match=r"store 'old': key 'a': table 'job_runs' has no run_at column"
        ) as caught:
            write()
        assert 1 == caught.value.exit_code
    assert [plain] == list(legacy.store.scan(None, 10))


def test_absent_metadata_column_reads_empty(legacy: SqlCase) -> None:
    """With no metadata column, metadata reads as {} and writing some stores nothing."""
    record = changed(make_records(["a"], metadata=False)[0], metadata={"lost": True})
    legacy.store.put(record)
    assert changed(record, metadata={}) == legacy.store.get("a")


def test_key_unique_only_through_a_partial_index(
    request: pytest.FixtureRequest, tmp_path: Path, backend: str
) -> None:
    """Upserts work when the key is unique only through a partial unique index."""
    with database(backend, request, tmp_path) as url:
        raw = make_engine(url, create=True)
        metadata = MetaData()
        archived = Column("archived", Integer, nullable=False, server_default="0")
        live = Index(
            "tasks_live_key",
            "key",
            unique=True,
            sqlite_where=archived == 0,
            postgresql_where=archived == 0,
        )
        table = plain_table(metadata, primary=False, extra=(archived, live))
        metadata.create_all(raw)
        try:
            with SqlTaskStore(url, "tasks", name="new") as store:
                records = make_records(TRICKY_KEYS)
                store.put_many(records)
                store.put_many([changed(r, status=TaskStatus.CANCELLED) for r in records])
                assert {TaskStatus.CANCELLED: len(records)} == {
                    s: n for s, n in store.count_by_status().items() if n
                }
                with raw.connect() as conn:
                    assert len(records) == conn.execute(select(func.count()).select_from(table)).scalar()
                # put_forward cannot name the index in ON CONFLICT here: its two-statement path.
                assert store.statements.forward(TaskStatus.PENDING) is None
                first, second = records[0], records[1]
                assert not store.put_forward(changed(first, status=TaskStatus.PENDING))
                assert store.put_forward(changed(second, status=TaskStatus.FAILED, attempts=3))
                assert store.put_forward(changed(first, key="brand-new"))
                assert TaskStatus.CANCELLED == store.get(first.key).status  # type: ignore[union-attr]
                assert changed(second, status=TaskStatus.FAILED, attempts=3) == store.get(second.key)
                assert changed(first, key="brand-new") == store.get("brand-new")
        finally:
            raw.dispose()


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=PG)])
def backend(request: pytest.FixtureRequest) -> str:
    """The database kind a test builds its own table in."""
    return str(request.param)


@pytest.mark.parametrize("how", ["put", "put_many"])
def test_concurrent_insert_of_the_same_new_key(sql: SqlCase, how: str) -> None:
    """A writer that loses the race to insert a new key updates it instead: one row, its values.
    `put` (one `INSERT ... ON CONFLICT` where the key is unique on its own) waits for the
    winner and updates; `put_many` probes first, so its INSERT fails and is retried once."""
    first, second = make_records(["race", "race"], metadata=sql.layout != "legacy")
    second = changed(second, status=TaskStatus.COMPLETED)
    integrity_errors: list[BaseException] = []

    def seen(context: Any) -> None:
        if isinstance(context.sqlalchemy_exception, IntegrityError):
            integrity_errors.append(context.sqlalchemy_exception)

    event.listen(sql.store.engine, "handle_error", seen)
    errors: list[BaseException] = []

    def put_second() -> None:
        try:
            if how == "put":
                sql.store.put(second)
            else:
                sql.store.put_many([second])
        except Exception as exc:  # noqa: BLE001 -- reported by the assert below
            errors.append(exc)

    writer = threading.Thread(target=put_second)
    with sql.raw.begin() as conn:  # the first writer inserts and holds its transaction open
        conn.execute(insert(sql.table), [sql_row(sql, first)])
        writer.start()
        wait_until_blocked(sql, writer)
    writer.join(timeout=30)
    assert [] == errors
    assert second == sql.store.get("race")
    assert 1 == sql.row_count()
    if sql.backend == "postgresql":  # SQLite's writers queue for the file's lock instead
        assert (1 if how == "put_many" else 0) == len(integrity_errors)


def sql_row(sql: SqlCase, record: TaskRecord) -> dict[str, Any]:
    """`record` as a raw row of the case's table."""
    if sql.layout == "legacy":
        return sql.raw_row(record.key, args='{"to": "x"}', state="queued")
    return sql.raw_row(record.key, payload=record.payload, metadata=record.metadata)


def wait_until_blocked(sql: SqlCase, writer: threading.Thread) -> None:
    """Return once the writer waits on the open transaction's lock (or a short while on SQLite)."""
    if sql.backend == "sqlite":
        time.sleep(0.3)  # BEGIN IMMEDIATE: it waits for the write lock before reading
        return
    admin = create_engine(sql.url.split("?")[0])
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and writer.is_alive():
            with admin.connect() as conn:
                waiting = conn.execute(
                    text(
                        "SELECT count(*) FROM pg_stat_activity"
                        " WHERE wait_event_type = 'Lock' AND datname = current_database()"
                    )
                ).scalar()
            if waiting:
                return
            time.sleep(0.02)
        pytest.fail("the second writer never waited for the first one's lock")
    finally:
        admin.dispose()


@PG
def test_non_code_point_collation_still_scans_in_python_order(
    request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    """A PostgreSQL key column with a linguistic collation still scans in Python order."""
    with database("postgresql", request, tmp_path) as url:
        raw = make_engine(url)
        try:
            with raw.connect() as conn:
                found = conn.execute(text("SELECT 1 FROM pg_collation WHERE collname = 'en-x-icu'")).scalar()
            if not found:
                pytest.skip("this PostgreSQL has no ICU collation 'en-x-icu'")
            metadata = MetaData()
            plain_table(metadata, key_type=String(200, collation="en-x-icu"))
            metadata.create_all(raw)
            with SqlTaskStore(url, "tasks", name="new") as store:
                store.put_many(make_records(TRICKY_KEYS))
                assert sorted(TRICKY_KEYS) == [r.key for r in store.scan(None, 1000)]
                assert ["a", "a b"] == [r.key for r in store.scan("_x", 2)]
        finally:
            raw.dispose()


# -- bad input ----------------------------------------------------------------------------


def test_missing_table_is_a_config_error(sql: SqlCase) -> None:
    """A table that does not exist: exit 2, naming the store and the table."""
    with pytest.raises(ConfigError) as caught:
        sql.reopen(table="no_such_tasks")
    assert 2 == caught.value.exit_code
    assert "store 'old'" in str(caught.value)
    assert "'no_such_tasks' does not exist" in str(caught.value)


def test_missing_mapped_column_is_a_config_error(sql: SqlCase) -> None:
    """A mapped column, or a field's default column, that does not exist: exit 2, naming both."""
    with pytest.raises(ConfigError) as caught:
        sql.reopen(columns={**sql.columns, "key": "task_uuid"})
    assert 2 == caught.value.exit_code
    assert "store 'old'" in str(caught.value)
    assert "no column 'task_uuid' (columns.key" in str(caught.value)
    if sql.layout == "legacy":
        with pytest.raises(ConfigError, match=r"no column 'type' \(the default for field 'type'"):
            sql.reopen(columns={k: v for k, v in sql.columns.items() if k != "type"})
    else:
        with pytest.raises(ConfigError, match=r"no column 'extra' \(columns\.metadata"):
            sql.reopen(columns={"metadata": "extra"})


def test_missing_sqlite_file_is_a_config_error(tmp_path: Path) -> None:
    """A SQLite file that does not exist is not created: exit 2, naming the store."""
    path = tmp_path / "absent.db"
    with pytest.raises(ConfigError, match=r"store 'old': database .* does not exist") as caught:
        SqlTaskStore(f"sqlite:///{path}", "tasks", name="old")
    assert 2 == caught.value.exit_code
    assert not path.exists()


def test_unreachable_database_hides_the_password() -> None:
    """A database that cannot be reached: exit 4, and the password is never printed."""
    with pytest.raises(DatabaseUnavailable) as caught:
        SqlTaskStore("postgresql+psycopg://mfsm:s3cret-pw@127.0.0.1:1/tasks", "tasks", name="new")
    assert 4 == caught.value.exit_code
    assert "store 'new'" in str(caught.value)
    assert "s3cret-pw" not in str(caught.value)


def test_unmapped_stored_status_is_a_data_error(sql: SqlCase) -> None:
    """A stored status with no mapping: exit 1, naming the store, the column, the value, the key."""
    sql.store.put_many(make_records(["a", "c"], metadata=sql.layout != "legacy"))
    sql.insert_raw(sql.raw_row("b", **{sql.column("status"): "zombie"}))
    for read in (lambda: sql.store.scan(None, 10), lambda: sql.store.get("b"), sql.store.count_by_status):
        with pytest.raises(DataError) as caught:
            read()
        message = str(caught.value)
        assert 1 == caught.value.exit_code
        for part in ("store 'old'", "key 'b'", f"column '{sql.column('status')}'", "'zombie'"):
            assert part in message


def test_payload_that_is_not_json_is_a_data_error(sql: SqlCase) -> None:
    """A payload that is not a JSON object: exit 1, naming the store, the column, the key."""
    column = sql.column("payload")
    bad = [1, 2] if isinstance(sql.table.c[column].type, JSON) else "{not json"
    sql.insert_raw(sql.raw_row("bad", **{column: bad}))
    with pytest.raises(DataError) as caught:
        sql.store.scan(None, 10)
    assert 1 == caught.value.exit_code
    for part in ("store 'old'", "key 'bad'", f"column '{column}'"):
        assert part in str(caught.value)


def test_payload_json_cannot_hold_is_a_data_error(sql: SqlCase) -> None:
    """A payload JSON cannot encode: exit 1, naming the store, the key, the column; nothing written."""
    good, bad = make_records(["a", "b"], metadata=sql.layout != "legacy")
    with pytest.raises(DataError) as caught:
        sql.store.put_many([good, changed(bad, payload={"tags": {"a", "b"}})])
    assert 1 == caught.value.exit_code
    for part in ("store 'old'", "key 'b'", f"column '{sql.column('payload')}'"):
        assert part in str(caught.value)
    assert 0 == sql.row_count()


def test_empty_key_is_a_data_error(sql: SqlCase) -> None:
    """An empty key, stored or written: exit 1, naming the store and the column; nothing written."""
    sql.insert_raw(sql.raw_row(""))
    with pytest.raises(DataError, match=f"store 'old': column '{sql.column('key')}' holds an empty key"):
        sql.store.scan(None, 10)
    with sql.raw.begin() as conn:
        conn.execute(text(f"DELETE FROM {sql.table.name}"))
    good = make_records(["a"], metadata=sql.layout != "legacy")[0]
    empty = TaskRecord.model_construct(**{**good.model_dump(), "key": ""})
    with pytest.raises(DataError, match="a task with an empty key") as caught:
        sql.store.put_many([good, empty])
    assert 1 == caught.value.exit_code
    assert 0 == sql.row_count()


def test_duplicate_keys_in_the_table_are_a_data_error(
    request: pytest.FixtureRequest, tmp_path: Path, backend: str
) -> None:
    """A key stored twice (its unique index dropped after the store was built): exit 1 from
    scan and get, naming the key."""
    with database(backend, request, tmp_path) as url:
        raw = make_engine(url, create=True)
        metadata = MetaData()
        table = plain_table(metadata, primary=False, extra=(Index("tasks_key_once", "key", unique=True),))
        metadata.create_all(raw)
        try:
            with SqlTaskStore(url, "tasks", name="old") as store:
                records = make_records(["a", "b", "c"])
                store.put_many(records)
                with raw.begin() as conn:
                    conn.execute(text("DROP INDEX tasks_key_once"))
                    conn.execute(insert(table), [{**records[1].model_dump(), "status": "running"}])
                for limit in (1, 2, 10):  # the duplicate inside a page, and just past its end
                    after = None if limit != 1 else "a"
                    with pytest.raises(DataError, match="key 'b' appears more than once in column 'key'"):
                        store.scan(after, limit)
                with pytest.raises(DataError, match="key 'b' appears more than once") as caught:
                    store.get("b")
                assert 1 == caught.value.exit_code
        finally:
            raw.dispose()


@pytest.mark.parametrize("uniqueness", ["none", "with another column"])
def test_a_table_whose_key_is_not_unique_is_refused(
    request: pytest.FixtureRequest, tmp_path: Path, backend: str, uniqueness: str
) -> None:
    """Concurrent writers would store a key twice (308 rows for 300 keys were seen): bad
    config (exit 2), one line naming the table and the index to create; nothing written."""
    with database(backend, request, tmp_path) as url:
        raw = make_engine(url, create=True)
        metadata = MetaData()
        queue = Column("queue", String(20), nullable=False, server_default="default")
        extra: tuple[Any, ...] = (queue,)
        if uniqueness != "none":
            extra += (Index("tasks_key_queue", "key", "queue", unique=True),)
        plain_table(metadata, primary=False, extra=extra)
        metadata.create_all(raw)
        try:
            with pytest.raises(ConfigError) as caught:
                SqlTaskStore(url, "tasks", name="old")
            message = str(caught.value)
            assert 2 == caught.value.exit_code
            assert "\n" not in message
            assert "table 'tasks' has no unique index on its key column 'key'" in message
            assert "CREATE UNIQUE INDEX tasks_key_unique ON tasks (key)" in message
            with raw.connect() as conn:
                assert 0 == conn.execute(text("SELECT count(*) FROM tasks")).scalar()
        finally:
            raw.dispose()


def test_failing_batch_writes_nothing(sql: SqlCase) -> None:
    """A batch the database refuses part of leaves every row as it was: exit 1."""
    meta = sql.layout != "legacy"
    before = make_records(["a", "b", "c"], metadata=meta)
    sql.store.put_many(before)
    batch = [changed(r, status=TaskStatus.CANCELLED) for r in before]
    batch += make_records(["d", "e"], metadata=meta)
    batch.insert(3, changed(make_records(["x"], metadata=meta)[0], type="forbidden"))
    with pytest.raises(DataError) as caught:
        sql.store.put_many(batch)
    assert 1 == caught.value.exit_code
    assert "store 'old'" in str(caught.value)
    assert "nothing was written" in str(caught.value)
    assert before == list(sql.store.scan(None, 100))
    assert 3 == sql.row_count()


@pytest.mark.parametrize("how", ["put", "put_forward"])
def test_a_refused_single_write_is_a_data_error_and_writes_nothing(sql: SqlCase, how: str) -> None:
    """`put` and `put_forward` of a row the table refuses: exit 1, naming store and key."""
    meta = sql.layout != "legacy"
    before = make_records(["a"], metadata=meta)
    sql.store.put_many(before)
    for key in ("a", "new"):  # an update and an insert
        bad = changed(make_records([key], metadata=meta)[0], type="forbidden")
        with pytest.raises(DataError) as caught:
            getattr(sql.store, how)(bad)
        assert 1 == caught.value.exit_code
        assert f"store 'old': table '{sql.store.table_name}' refused task '{key}'" in str(caught.value)
    assert before == list(sql.store.scan(None, 100))


def test_status_without_a_stored_value_is_a_config_error(legacy: SqlCase) -> None:
    """Writing a status the status map cannot store: exit 2, naming the store and the status."""
    store = legacy.reopen(status_map={"queued": "pending"})
    try:
        record = changed(make_records(["a"], metadata=False)[0], status=TaskStatus.RUNNING)
        with pytest.raises(ConfigError, match="store 'old': key 'a': no stored value for status 'running'"):
            store.put(record)
        assert 0 == legacy.row_count()
    finally:
        store.close()


# -- build_store ----------------------------------------------------------------------------


def make_store(label: str, size: int = 0) -> MemoryTaskStore:
    """A factory for `kind = "tests.unit.test_task_stores:make_store"`: `size` records, named `label`."""
    return MemoryTaskStore(label, make_records([f"k{i}" for i in range(size)]))


def not_a_store(**options: Any) -> dict[str, Any]:
    """A factory that returns something else."""
    return options


def test_build_store_memory() -> None:
    """`kind = "memory"` is an empty MemoryTaskStore with the side's name."""
    store = build_store(StoreConfig(kind="memory"), "new")
    assert isinstance(store, MemoryTaskStore)
    assert "new" == store.name


def test_build_store_sql(legacy: SqlCase) -> None:
    """`kind = "sql"` reflects the table through the configured columns and status map."""
    config = StoreConfig(
        kind="sql", url=legacy.url, table="job_runs", columns=LEGACY_COLUMNS, status_map=LEGACY_STATUS
    )
    store = build_store(config, "old")
    assert isinstance(store, SqlTaskStore)
    try:
        record = make_records(["a"], metadata=False)[0]
        store.put(record)
        assert record == legacy.store.get("a")
        assert "old" == store.name
    finally:
        store.close()


def test_build_store_factory_from_a_config_file(tmp_path: Path) -> None:
    """A factory kind is called with the table's other keys, read from TOML."""
    config = tmp_path / "mfsm.toml"
    config.write_text(
        '[stores.new]\nkind = "tests.unit.test_task_stores:make_store"\nlabel = "queue"\nsize = 3\n',
        encoding="utf-8",
    )
    settings = load_settings(config)
    store = build_store(settings.stores["new"], "new")
    assert "queue" == store.name
    assert ["k0", "k1", "k2"] == [r.key for r in store.scan(None, 10)]


@pytest.mark.parametrize(
    ("table", "key", "message"),
    [
        ({"kind": "tests.no_such_module:make"}, "kind", "cannot import module 'tests.no_such_module'"),
        ({"kind": "tests.unit.test_task_stores:nope"}, "kind", "has no attribute 'nope'"),
        ({"kind": "tests.unit.test_task_stores:make_store", "colour": "red"}, "kind", "'colour'"),
        ({"kind": "tests.unit.test_task_stores:not_a_store"}, "kind", "not a TaskStore"),
        ({"kind": "memory", "url": "sqlite:///x.db"}, "url", "a 'memory' store takes no such key"),
    ],
)
def test_build_store_errors_name_the_store_and_key(table: dict[str, Any], key: str, message: str) -> None:
    """A store table build_store cannot use: exit 2, naming `stores.<side>.<key>`."""
    with pytest.raises(ConfigError) as caught:
        build_store(StoreConfig.model_validate(table), "old")
    assert 2 == caught.value.exit_code
    assert f"config key 'stores.old.{key}' is invalid" in str(caught.value)
    assert message in str(caught.value)


class TestShippedContractOnTheMemoryStore(TaskStoreContract):
    """`migration_fsm.testing.TaskStoreContract`, as an adapter author runs it, passes on
    `MemoryTaskStore` (the SQL stores run the same checks through the `case` fixture above)."""

    @pytest.fixture
    def task_store(self) -> MemoryTaskStore:
        return MemoryTaskStore("old")


class TestShippedContractOnThePlainTable(TaskStoreContract):
    """The shipped contract on a table with every column, run_at included."""

    @pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=PG)])
    def task_store(self, request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[SqlTaskStore]:
        with sql_case(request.param, "plain", request, tmp_path) as made:
            yield made.store


class TestShippedContractOnTheLegacyTable(TaskStoreContract):
    """The shipped contract on a table with no metadata and no run_at column: it says so."""

    keeps_metadata = False
    keeps_run_at = False

    @pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=PG)])
    def task_store(self, request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[SqlTaskStore]:
        with sql_case(request.param, "legacy", request, tmp_path) as made:
            yield made.store
