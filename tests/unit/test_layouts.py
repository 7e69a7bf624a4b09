"""The layout matrix (`tasks/sql/layouts.py`) holds the same tasks in every layout, on SQLite and
PostgreSQL, and integer time columns (`epoch_units`) are read and written as their unit."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import Engine, select, text

from migration_fsm.config import StoreConfig
from migration_fsm.exceptions import ConfigError, DataError
from migration_fsm.journal import make_engine
from migration_fsm.tasks.factory import build_store
from migration_fsm.tasks.records import TaskRecord
from migration_fsm.tasks.sql import SqlTaskStore
from migration_fsm.tasks.sql.layouts import LAYOUTS, Layout, layout_named, layouts_for
from migration_fsm.testing import changed, make_records
from tests.support.datatools import everything
from tests.unit.test_task_stores import PG, database

#: (backend, layout) for every layout of the matrix that applies on the backend.
MATRIX = [
    pytest.param(backend, layout, id=f"{backend}-{layout.name}", marks=[PG] * (backend == "postgresql"))
    for backend in ("sqlite", "postgresql")
    for layout in layouts_for(backend)
]


@contextmanager
def layout_store(
    backend: str, request: pytest.FixtureRequest, tmp_path: Path, layout: Layout, *, rows: int = 0
) -> Iterator[tuple[SqlTaskStore, Engine]]:
    """A store over a fresh table of `layout` holding rows 0 to `rows` - 1, with raw access."""
    with database(backend, request, tmp_path) as url:
        raw = make_engine(url, create=True)
        with raw.begin() as conn:
            layout.create(conn, "tasks")
            layout.fill(conn, "tasks", rows)
        try:
            with SqlTaskStore(url, "tasks", name="old", **layout.store_options()) as store:
                yield store, raw
        finally:
            raw.dispose()


def truncated(record: TaskRecord, layout: Layout) -> TaskRecord:
    """`record` as `layout` holds it: its times cut to what the layout's form keeps, its key
    and metadata as far as it has them."""
    unit = {"current_timestamp": timedelta(seconds=1), "epoch_s": timedelta(seconds=1)}.get(layout.time)
    unit = timedelta(milliseconds=1) if layout.time == "epoch_ms" else unit
    epoch = datetime(1970, 1, 1, tzinfo=UTC)

    def cut(moment: datetime) -> datetime:
        return moment if unit is None else epoch + (moment - epoch) // unit * unit

    return changed(
        record,
        key=str(int(record.key.removeprefix("task-"))) if layout.integer_key else record.key,
        created_at=cut(record.created_at),
        updated_at=cut(record.updated_at),
        metadata=record.metadata if layout.metadata else {},
    )


@pytest.mark.parametrize(("backend", "layout"), MATRIX)
def test_every_layout_holds_the_same_tasks(
    request: pytest.FixtureRequest, tmp_path: Path, backend: str, layout: Layout
) -> None:
    """Row i of any layout reads as row i of the default layout, times cut to what the layout
    keeps; the fill starts where it is told."""
    with (
        layout_store(backend, request, tmp_path, layout_named("default"), rows=40) as (reference, _),
        layout_store(backend, request, tmp_path, layout, rows=0) as (store, raw),
    ):
        with raw.begin() as conn:
            layout.fill(conn, "tasks", 25, start=15)
            layout.fill(conn, "tasks", 15)
        expected = sorted((truncated(r, layout) for r in everything(reference)), key=lambda r: r.key)
        assert expected == everything(store)
        assert 5 == len({r.status for r in expected})
        assert 190 < len(expected[7].model_dump_json(include={"payload"}))


def test_the_matrix_covers_what_people_have() -> None:
    """Every form of time, payload, metadata, renamed columns, a status map and integer keys."""
    times = {layout.time for layout in LAYOUTS}
    assert {"iso_z", "iso_offset", "iso_naive", "current_timestamp", "epoch_s", "epoch_ms"} <= times
    assert {"timestamp", "timestamptz"} <= times
    assert {"text", "json", "jsonb"} == {layout.payload for layout in LAYOUTS}
    assert {True, False} == {layout.metadata for layout in LAYOUTS}
    assert any(layout.columns and layout.status_map for layout in LAYOUTS)
    assert any(layout.integer_key for layout in LAYOUTS)
    assert len(layouts_for("sqlite")) < len(layouts_for("postgresql")) == len(LAYOUTS)
    with pytest.raises(KeyError, match="no layout 'nope'"):
        layout_named("nope")


# -- integer time columns -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("backend", "unit"),
    [
        ("sqlite", "s"),
        ("sqlite", "ms"),
        pytest.param("postgresql", "s", marks=PG),
        pytest.param("postgresql", "ms", marks=PG),
    ],
)
def test_an_epoch_column_holds_whole_units_since_1970(
    request: pytest.FixtureRequest, tmp_path: Path, backend: str, unit: str
) -> None:
    """Written as whole seconds or milliseconds (finer parts cut off, toward the past, before
    1970 too), read back as those UTC times; a value that is no count is a DataError naming
    the key and the column."""
    layout = layout_named(f"epoch_{unit}")
    step = timedelta(seconds=1) if unit == "s" else timedelta(milliseconds=1)
    records = make_records([f"k{i}" for i in range(6)], metadata=False)
    records[5] = changed(records[5], created_at=datetime(1969, 12, 31, 23, 59, 58, 500_000, tzinfo=UTC))
    with layout_store(backend, request, tmp_path, layout) as (store, raw):
        store.put_many(records)
        epoch = datetime(1970, 1, 1, tzinfo=UTC)
        with raw.connect() as conn:
            stored = dict(conn.execute(select(store.table.c.key, store.table.c.created_at)).all())
        assert {r.key: (r.created_at - epoch) // step for r in records} == stored
        assert (-2 if unit == "s" else -1500) == stored["k5"]
        assert [truncated(r, layout) for r in records] == everything(store)
        if backend == "sqlite":  # SQLite keeps any value in any column
            with raw.begin() as conn:
                conn.execute(text("UPDATE tasks SET updated_at = '2026-01-01' WHERE key = 'k3'"))
            with pytest.raises(DataError, match=r"key 'k3': column 'updated_at' holds '2026-01-01', not a"):
                everything(store)


def test_epoch_units_are_required_for_an_integer_time_column_and_only_there(
    request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    """An integer time column without a unit, a unit for a text column, or a unit that is
    not s or ms: a ConfigError (exit 2) naming the store and the key; the config says so
    when it is loaded."""
    with layout_store("sqlite", request, tmp_path, layout_named("epoch_s")) as (store, _):
        with pytest.raises(ConfigError, match=r"store 'x': column 'created_at' \(field 'created_at'\) holds"):
            SqlTaskStore(store.url, "tasks", name="x")
        with pytest.raises(ConfigError, match=r"epoch_units\.created_at = 'h'"):
            SqlTaskStore(store.url, "tasks", name="x", epoch_units={"created_at": "h", "updated_at": "s"})
        config = StoreConfig(**layout_named("epoch_s").store_config(store.url, "tasks"))
        built = build_store(config, "old")
        assert isinstance(built, SqlTaskStore)
        built.close()
    with (
        layout_store("sqlite", request, tmp_path, layout_named("iso_z")) as (store, _),
        pytest.raises(ConfigError, match=r"epoch_units\.created_at: column 'created_at' has type TEXT"),
    ):
        SqlTaskStore(store.url, "tasks", name="x", epoch_units={"created_at": "s"})
    with pytest.raises(ValueError, match="epoch_units: payload = 's'"):
        StoreConfig(kind="sql", url="sqlite:///x.db", table="t", epoch_units={"payload": "s"})
