"""Backfill's fast path on every layout of the matrix: a row copy leaves the rows a copy
through records leaves, every row that needs no decoding goes as a row, and a row that does
goes the record path alone."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, Table, Text, cast, select, text

from migration_fsm.exceptions import DataError
from migration_fsm.journal import make_engine
from migration_fsm.tasks.sql import RowCopy, SqlTaskStore
from migration_fsm.tasks.sql.layouts import Layout, layout_named
from migration_fsm.tools import backfill
from migration_fsm.tools.backfill import copy_tasks
from tests.support.datatools import create_task_table, everything
from tests.unit.test_fast_paths import RecordsOnly
from tests.unit.test_layouts import MATRIX
from tests.unit.test_task_stores import PG, database

ROWS = 150
#: Rows given a time only the record path converts (where the layout can hold one).
ODD = (7, 70, 71)


def odd_time(layout: Layout, backend: str) -> str | None:
    """SQL for a created_at the record path reads but the row copy leaves to it: another UTC
    offset written without its colon in text; a time before 1970 as an epoch count on SQLite;
    another offset in SQLite's DATETIME text."""
    if layout.time in ("iso_z", "iso_offset", "iso_naive", "current_timestamp"):
        return "'2026-03-01T12:00:00.5+0200'"
    if layout.time.startswith("epoch") and backend == "sqlite":
        return "-1500"
    if layout.time in ("timestamptz", "timestamp") and backend == "sqlite":  # DATETIME text there
        return "'2026-03-01T12:00:00.5+02:00'"
    return None


def key_of(layout: Layout, i: int) -> str:
    return str(i) if layout.integer_key else f"task-{i:09d}"


@contextmanager
def source_and_targets(
    backend: str,
    request: pytest.FixtureRequest,
    tmp_path: Path,
    layout: Layout,
    *,
    one_file: bool,
    rows: int = ROWS,
) -> Iterator[tuple[SqlTaskStore, SqlTaskStore, SqlTaskStore, Engine, Engine]]:
    """old (the layout, `rows` rows), new and a table for the record path's copy (the default
    layout), and raw access to both databases."""
    with database(backend, request, tmp_path) as first, database(backend, request, tmp_path) as second:
        url = first if one_file else second
        source_raw, raw = make_engine(first, create=True), make_engine(url, create=True)
        with source_raw.begin() as conn:
            layout.create(conn, "old_tasks")
            layout.fill(conn, "old_tasks", rows)
        for name in ("new_tasks", "record_tasks"):
            create_task_table(url, name)
        try:
            with (
                SqlTaskStore(first, "old_tasks", name="old", **layout.store_options()) as old,
                SqlTaskStore(url, "new_tasks", name="new") as new,
                SqlTaskStore(url, "record_tasks", name="records") as records,
            ):
                yield old, new, records, source_raw, raw
        finally:
            source_raw.dispose()
            raw.dispose()


def stored_rows(raw: Engine, table: Table) -> list[tuple[Any, ...]]:
    """Every row as the database holds it, as text, JSON decoded (a row copy keeps the
    source's JSON text; the record path writes it canonical), in key order."""
    with raw.connect() as conn:
        rows = conn.execute(select(*(cast(column, Text) for column in table.c)).order_by(text("1")))
        decoded = {"payload", "metadata"}
        return [
            tuple(
                json.loads(value) if name in decoded and value is not None else value
                for name, value in zip(table.c.keys(), row, strict=True)
            )
            for row in rows
        ]


#: Between two SQLite files and inside one the copy is the same INSERT ... SELECT (attached or
#: not); on PostgreSQL one database runs one statement a batch, two pass the rows through Python.
PLACES = [
    pytest.param(*param.values, one_file, id=f"{param.id}-{'one' if one_file else 'two'}", marks=param.marks)
    for param in MATRIX
    for one_file in (False, True)
    if not (one_file and param.values[0] == "sqlite")
]


@pytest.mark.parametrize(("backend", "layout", "one_file"), PLACES)
def test_a_backfill_as_rows_leaves_what_the_record_path_leaves_on_every_layout(
    request: pytest.FixtureRequest, tmp_path: Path, backend: str, layout: Layout, one_file: bool
) -> None:
    """Column for column the rows a copy through records leaves (JSON as JSON); every row
    takes the fast path but the few with a time only the record path converts, each alone."""
    odd = odd_time(layout, backend)
    with source_and_targets(backend, request, tmp_path, layout, one_file=one_file) as (
        old,
        new,
        through_records,
        source_raw,
        raw,
    ):
        if odd is not None:
            keys = ", ".join(f"'{key_of(layout, i)}'" for i in ODD)
            column, key = layout.column("created_at"), layout.column("key")
            with source_raw.begin() as conn:
                conn.execute(text(f"UPDATE old_tasks SET {column} = {odd} WHERE {key} IN ({keys})"))
        # Integer keys as rows inside one database only (a page in text order merges digit counts).
        apart = backend == "postgresql" and not one_file
        assert (RowCopy.between(old, new) is None) == (layout.integer_key and apart)
        result = copy_tasks(old, new, batch_size=64)
        slow = copy_tasks(RecordsOnly(old), RecordsOnly(through_records), batch_size=64)
        assert (ROWS, ROWS) == (result.copied, result.total)
        assert (0, ROWS) == (slow.fast, slow.records)
        expected_slow = ROWS if RowCopy.between(old, new) is None else len(ODD) * (odd is not None)
        assert (ROWS - expected_slow, expected_slow) == (result.fast, result.records)
        assert everything(old) == everything(new)
        assert stored_rows(raw, through_records.table) == stored_rows(raw, new.table)


@pytest.mark.parametrize("backend", ["sqlite", pytest.param("postgresql", marks=PG)])
def test_a_bad_row_stops_the_copy_alone_and_its_batch_writes_nothing(
    request: pytest.FixtureRequest, tmp_path: Path, backend: str
) -> None:
    """A status the map does not know: the batches before it are copied as rows, the bad
    row's batch writes nothing, and the DataError names it; fixed, the next run copies the
    rest, only that row through its record."""
    layout = layout_named("current_timestamp")
    with source_and_targets(backend, request, tmp_path, layout, one_file=False) as (
        old,
        new,
        _,
        source_raw,
        _,
    ):
        with source_raw.begin() as conn:
            conn.execute(text("UPDATE old_tasks SET status = 'zombie' WHERE key = 'task-000000100'"))
        with pytest.raises(DataError, match=r"key 'task-000000100'.*'zombie'"):
            copy_tasks(old, new, batch_size=64)
        assert 64 == len(everything(new))
        with source_raw.begin() as conn:
            odd = odd_time(layout, backend)
            fixed = f"status = 'completed', created_at = {odd}"
            conn.execute(text(f"UPDATE old_tasks SET {fixed} WHERE key = 'task-000000100'"))
        result = copy_tasks(old, new, batch_size=64, after="task-000000063")
        assert (ROWS - 64 - 1, 1) == (result.fast, result.records)
        assert everything(old) == everything(new)


@pytest.mark.parametrize("backend", ["sqlite", pytest.param("postgresql", marks=PG)])
def test_a_checkpoint_is_saved_only_after_a_durable_commit(
    request: pytest.FixtureRequest, tmp_path: Path, backend: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Row copies that do not wait for the disk get no checkpoint; the last batch is copied
    once more, durably, before the run's one checkpoint; with a checkpoint in the target's
    own log, or a durable commit each time, every batch gets one."""
    layout = layout_named("default")
    with source_and_targets(backend, request, tmp_path, layout, one_file=False) as (old, new, _, _, raw):
        if backend == "sqlite":
            with raw.connect() as conn:
                conn.exec_driver_sql("PRAGMA journal_mode = WAL")
        saved: list[tuple[str, int]] = []

        def checkpoint(cursor: str, copied: int) -> None:
            saved.append((cursor, copied))

        monkeypatch.setattr(backfill, "DURABLE_EVERY_SECONDS", 3600.0)
        result = copy_tasks(old, new, batch_size=40, checkpoint=checkpoint)
        assert [(key_of(layout, ROWS - 1), ROWS)] == saved
        assert (ROWS, ROWS) == (result.fast, result.total)
        saved.clear()
        copy_tasks(old, new, batch_size=40, checkpoint=checkpoint, checkpoint_in_same_log=True)
        assert [40, 80, 120, 150] == [copied for _, copied in saved]
        saved.clear()
        monkeypatch.setattr(backfill, "DURABLE_EVERY_SECONDS", 0.0)
        copy_tasks(old, new, batch_size=40, checkpoint=checkpoint)
        assert [40, 80, 120, 150] == [copied for _, copied in saved]
        assert everything(old) == everything(new)


@PG
def test_make_durable_flushes_the_log_past_commits_that_did_not_wait(
    request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    """The end of a backfill: commits made without waiting for the disk are on it once
    `make_durable` returns, though the call has no rows to write (PostgreSQL: the log is
    flushed past the last such commit; SQLite's fsync of the WAL file cannot be seen short
    of a power cut)."""
    with database("postgresql", request, tmp_path) as url:
        create_task_table(url, "tasks")
        raw = make_engine(url, create=True)
        try:
            with SqlTaskStore(url, "tasks", name="new") as store:
                with store.connect(durable=False) as conn:
                    conn.exec_driver_sql("SELECT txid_current()")
                with raw.connect() as conn:
                    written = conn.execute(text("SELECT pg_current_wal_insert_lsn()::text")).scalar()
                store.make_durable()
                with raw.connect() as conn:
                    flushed = conn.execute(
                        text("SELECT pg_current_wal_flush_lsn() >= CAST(:lsn AS pg_lsn)"), {"lsn": written}
                    ).scalar()
                assert flushed is True
        finally:
            raw.dispose()
