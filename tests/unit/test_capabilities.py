"""Optional store capabilities (`tasks.capabilities`): who offers which, and the plain path
a store without one takes; `ColumnKind` and `TableMapping` (`tasks.sql.mapping`)."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import JSON, Column, DateTime, Integer, MetaData, String, Table, Text, create_engine
from sqlalchemy.dialects.postgresql import JSONB

from migration_fsm.client._base import _forward_put
from migration_fsm.config import Settings, StoreConfig
from migration_fsm.exceptions import ConfigError
from migration_fsm.fsm import Side
from migration_fsm.tasks.capabilities import BulkGet, Closeable, Count, ForwardPut, IdentityScan, SetProgress
from migration_fsm.tasks.identity import RecordRows, get_many, identity_source
from migration_fsm.tasks.memory import MemoryTaskStore
from migration_fsm.tasks.records import TaskRecord, TaskStatus, utc_text
from migration_fsm.tasks.sides import open_side
from migration_fsm.tasks.sql import ColumnKind, SqlTaskStore, TableMapping
from migration_fsm.tools.backfill import total_of

T0 = datetime(2024, 5, 17, 12, 30, 45, 123456, tzinfo=UTC)
ALL = (BulkGet, IdentityScan, ForwardPut, SetProgress, Count, Closeable)


def record(key: str, status: TaskStatus = TaskStatus.PENDING) -> TaskRecord:
    return TaskRecord(
        key=key, type="mail", payload={"n": 1}, status=status, created_at=T0, updated_at=T0, metadata={"m": 2}
    )


class PlainStore:
    """A `TaskStore` with no optional capability at all, that logs which methods ran."""

    def __init__(self, records: Sequence[TaskRecord] = ()) -> None:
        self.name = "plain"
        self.inner = MemoryTaskStore(records=records)
        self.calls: list[str] = []

    def scan(self, after: str | None, limit: int) -> Sequence[TaskRecord]:
        self.calls.append("scan")
        return self.inner.scan(after, limit)

    def get(self, key: str) -> TaskRecord | None:
        self.calls.append("get")
        return self.inner.get(key)

    def put(self, record: TaskRecord) -> None:
        self.calls.append("put")
        self.inner.put(record)

    def put_many(self, records: Sequence[TaskRecord]) -> int:
        self.calls.append("put_many")
        return self.inner.put_many(records)

    def count_by_status(self) -> Mapping[TaskStatus, int]:
        self.calls.append("count_by_status")
        return self.inner.count_by_status()


class CountingStore(PlainStore):
    """A plain store that also offers `Count` and `Closeable`, with a count of its own."""

    closed = 0

    def count(self) -> int:
        self.calls.append("count")
        return 42

    def close(self) -> None:
        CountingStore.closed += 1


def counting_store() -> CountingStore:
    """A factory for `kind = "tests.unit.test_capabilities:counting_store"`."""
    return CountingStore()


@pytest.fixture
def sqlite_store(tmp_path: Path) -> Iterator[SqlTaskStore]:
    url = f"sqlite:///{tmp_path / 'tasks.db'}"
    engine = create_engine(url)
    metadata = MetaData()
    Table(
        "tasks",
        metadata,
        Column("key", String, primary_key=True),
        Column("type", String, nullable=False),
        Column("payload", JSON, nullable=False),
        Column("status", String, nullable=False),
        Column("attempts", Integer, nullable=False),
        Column("created_at", DateTime, nullable=False),
        Column("updated_at", DateTime, nullable=False),
        Column("metadata", JSON),
    )
    metadata.create_all(engine)
    engine.dispose()
    with SqlTaskStore(url, "tasks", name="old") as store:
        yield store


def test_memory_store_offers_bulk_get_forward_put_and_set_progress_only() -> None:
    """`MemoryTaskStore` is `BulkGet`, `ForwardPut` and `SetProgress`, and none of the others."""
    store = MemoryTaskStore()
    assert [BulkGet, ForwardPut, SetProgress] == [cap for cap in ALL if isinstance(store, cap)]


def test_set_progress_changes_progress_only_and_falls_back_without_it() -> None:
    """`SetProgress` changes status, attempts and updated_at of a task it has (False for one it
    has not); the transfer's helper uses `put_forward` for a store without it."""
    from migration_fsm.plugins.handover import set_progress

    base = record("a")
    store = MemoryTaskStore("m", [base])
    later = base.updated_at.replace(year=2030)
    assert store.set_progress("a", TaskStatus.COMPLETED, 2, later)
    assert base.model_copy(
        update={"status": TaskStatus.COMPLETED, "attempts": 2, "updated_at": later}
    ) == store.get("a")
    assert not store.set_progress("zz", TaskStatus.COMPLETED, 2, later)
    plain = PlainStore([base])
    set_progress(plain, base, TaskStatus.FAILED, 1, later)
    assert ("put", TaskStatus.FAILED, 1) == (plain.calls[-1], plain.get("a").status, plain.get("a").attempts)  # type: ignore[union-attr]


def test_sql_store_offers_every_capability(sqlite_store: SqlTaskStore) -> None:
    """`SqlTaskStore` is every capability the module declares."""
    assert list(ALL) == [cap for cap in ALL if isinstance(sqlite_store, cap)]


def test_a_store_without_capabilities_has_none() -> None:
    """A store with only the `TaskStore` methods is no capability."""
    assert [] == [cap for cap in ALL if isinstance(PlainStore(), cap)]


def test_get_many_without_bulk_get_is_one_get_per_key() -> None:
    """`identity.get_many` falls back to `get`, leaving out absent keys."""
    store = PlainStore([record("a"), record("b")])
    assert {"a", "b"} == set(get_many(store, ["a", "b", "zz"]))
    assert ["get", "get", "get"] == store.calls


def test_identity_source_without_identity_scan_builds_rows_from_records() -> None:
    """A store without `IdentityScan` is read through `RecordRows`, even when fast."""
    assert isinstance(identity_source(PlainStore(), fast=True), RecordRows)


def test_identity_source_uses_the_store_when_it_scans_identities(sqlite_store: SqlTaskStore) -> None:
    """A store with `IdentityScan` is its own identity source when fast, not otherwise."""
    assert identity_source(sqlite_store, fast=True) is sqlite_store
    assert isinstance(identity_source(sqlite_store, fast=False), RecordRows)


def test_total_counts_by_status_without_count() -> None:
    """Backfill's total of a store without `Count` is the sum of `count_by_status`."""
    store = PlainStore([record("a"), record("b", TaskStatus.COMPLETED)])
    assert 2 == total_of(store)
    assert ["count_by_status"] == store.calls


def test_total_uses_count_when_offered() -> None:
    """Backfill's total of a store with `Count` is its `count()`, not `count_by_status`."""
    store = CountingStore()
    assert 42 == total_of(store)
    assert ["count"] == store.calls


def test_second_write_without_forward_put_is_a_put() -> None:
    """`DualWriter`'s second write is `put_forward` where offered, else `put`."""
    assert ("put", False) == _forward_put(PlainStore())
    assert ("put_forward", True) == _forward_put(MemoryTaskStore())


def test_open_side_closes_a_closeable_store_and_leaves_others() -> None:
    """`open_side` closes a store that is `Closeable`; a store that is not is simply let go."""
    stores: dict[Side, StoreConfig] = {
        "old": StoreConfig(kind="tests.unit.test_capabilities:counting_store"),
        "new": StoreConfig(kind="memory"),
    }
    settings = Settings(database_url="sqlite://", actor="test", stores=stores)
    before = CountingStore.closed
    with open_side(settings, "old") as store:
        assert isinstance(store, CountingStore)
    assert before + 1 == CountingStore.closed
    with open_side(settings, "new") as store:
        assert isinstance(store, MemoryTaskStore)


# -- ColumnKind and TableMapping ------------------------------------------------------


def tasks_table(payload: Any = JSON, created_at: Any = None, status: Any = String) -> Table:
    return Table(
        "tasks",
        MetaData(),
        Column("key", String, primary_key=True),
        Column("type", String),
        Column("payload", payload),
        Column("status", status),
        Column("created_at", created_at if created_at is not None else DateTime(timezone=True)),
        Column("updated_at", Text),
    )


def kinds(mapping: TableMapping) -> dict[str, ColumnKind]:
    return {field.name: field.kind for field in mapping.fields}


def test_column_kinds_on_postgresql() -> None:
    """Each column's type decides its kind: JSON or JSONB natively, zoned or naive timestamps,
    ISO text for a text timestamp."""
    mapping = TableMapping("s", tasks_table(), dialect="postgresql")
    assert {
        "key": ColumnKind.TEXT,
        "type": ColumnKind.TEXT,
        "payload": ColumnKind.JSON,
        "status": ColumnKind.TEXT,
        "created_at": ColumnKind.TIMESTAMPTZ,
        "updated_at": ColumnKind.ISO_TEXT,
    } == kinds(mapping)
    naive = TableMapping("s", tasks_table(JSONB, DateTime()), dialect="postgresql")
    assert (ColumnKind.JSONB, ColumnKind.TIMESTAMP) == (
        naive.by_name["payload"].kind,
        naive.by_name["created_at"].kind,
    )


def test_column_kinds_on_sqlite() -> None:
    """On SQLite JSON is text and DATETIME is SQLAlchemy's text; the key sorts BINARY."""
    mapping = TableMapping("s", tasks_table(), dialect="sqlite")
    assert ColumnKind.JSON_TEXT == mapping.by_name["payload"].kind
    assert ColumnKind.SQLITE_DATETIME == mapping.by_name["created_at"].kind
    assert "BINARY" in str(mapping.key_order)


def test_column_kind_properties() -> None:
    """`native_json`, `holds_json`, `zoned` and `text_shape` sort the kinds for the row copy."""
    assert {ColumnKind.JSON, ColumnKind.JSONB} == {k for k in ColumnKind if k.native_json}
    assert {ColumnKind.JSON, ColumnKind.JSONB, ColumnKind.JSON_TEXT} == {
        k for k in ColumnKind if k.holds_json
    }
    assert {ColumnKind.TIMESTAMP, ColumnKind.TIMESTAMPTZ} == {k for k in ColumnKind if k.zoned}
    assert {ColumnKind.SQLITE_DATETIME, ColumnKind.ISO_TEXT} == {
        k for k in ColumnKind if k.text_shape is not None
    }
    sqlite_shape, iso_shape = ColumnKind.SQLITE_DATETIME.text_shape, ColumnKind.ISO_TEXT.text_shape
    assert sqlite_shape is not None
    assert iso_shape is not None
    moment = datetime(2024, 5, 17, 12, 30, 45, 123456, tzinfo=UTC)
    assert sqlite_shape[0] == len(moment.replace(tzinfo=None).isoformat(" ", "microseconds"))
    assert iso_shape[0] == len(utc_text(moment))


def test_mapping_encodes_and_decodes_a_record_through_an_integer_status_map() -> None:
    """A record written through the mapping's writers reads back equal through its readers."""
    status_map = {str(i): status.value for i, status in enumerate(TaskStatus)}
    mapping = TableMapping("s", tasks_table(status=Integer), dialect="sqlite", status_map=status_map)
    original = record("k", TaskStatus.RUNNING)
    row = mapping.encode(original)
    assert 1 == row[3]  # RUNNING is stored as the integer 1
    assert original.model_copy(update={"attempts": 0, "metadata": {}}) == mapping.decode(row)


def test_mapping_refuses_what_does_not_fit() -> None:
    """An unknown field, a missing column and a status map onto integers that is not one
    are `ConfigError`s naming the store."""
    with pytest.raises(ConfigError, match=r"store 's': columns\.colour: 'colour' is not a task field"):
        TableMapping("s", tasks_table(), dialect="sqlite", columns={"colour": "x"})
    with pytest.raises(ConfigError, match="has no column 'nope'"):
        TableMapping("s", tasks_table(), dialect="sqlite", columns={"type": "nope"})
    with pytest.raises(ConfigError, match="holds integers"):
        TableMapping("s", tasks_table(status=Integer), dialect="sqlite", status_map={"done": "completed"})
