"""`validate` reports exactly what the record path reports on every layout of the matrix, on
SQLite and PostgreSQL, with differences in some rows; and it takes its fast paths there: rows
compared inside the database or on raw values, only the rows that need it decoded."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, text

from migration_fsm.exceptions import DataError
from migration_fsm.journal import make_engine
from migration_fsm.tasks.records import TaskStatus
from migration_fsm.tasks.sql import ColumnKind, SqlTaskStore
from migration_fsm.tasks.sql.compare import IdentityJoin
from migration_fsm.tasks.sql.layouts import Layout, layout_named, layouts_for
from migration_fsm.testing import changed
from migration_fsm.tools.validate import validate
from tests.support.datatools import everything
from tests.unit.test_fast_paths import RecordsOnly
from tests.unit.test_task_stores import PG, database

ROWS = 120
#: The differences made on the new side: (missing, extra, mismatched, status_differs).
DIFFERENCES = (2, 2, 3, 2)


def pairs(backend: str) -> list[Any]:
    """(backend, old layout, new layout): every layout into the default one, and a few into
    themselves (text times, integer times, JSONB)."""
    marks = [PG] if backend == "postgresql" else []
    names = [layout.name for layout in layouts_for(backend)]
    into_self = [n for n in ("current_timestamp", "epoch_ms", "pg_jsonb", "integer_key") if n in names]
    found = [(name, "default") for name in names] + [(name, name) for name in into_self]
    return [pytest.param(backend, a, b, id=f"{backend}-{a}-to-{b}", marks=marks) for a, b in found]


@contextmanager
def layout_table(  # noqa: PLR0917 -- the fixtures, then what to make
    backend: str, request: pytest.FixtureRequest, tmp_path: Path, layout: Layout, name: str, rows: int
) -> Iterator[tuple[SqlTaskStore, Engine]]:
    """A store `name` over a fresh table of `layout` holding rows 0 to `rows` - 1, and raw access."""
    with database(backend, request, tmp_path) as url:
        raw = make_engine(url, create=True)
        with raw.begin() as conn:
            layout.create(conn, "tasks")
            layout.fill(conn, "tasks", rows)
        try:
            with SqlTaskStore(url, "tasks", name=name, **layout.store_options()) as store:
                yield store, raw
        finally:
            raw.dispose()


def set_raw(store: SqlTaskStore, raw: Engine, key: str, field: str, value: Any) -> None:
    """Store `value` as it is in the column of `field` of task `key` (`None`: delete the row)."""
    mapping = store.mapping
    key_column = mapping.key_column.name
    where = {"k": mapping.key_value(key)}
    with raw.begin() as conn:
        if value is None:
            conn.execute(text(f"DELETE FROM tasks WHERE {key_column} = :k"), where)
            return
        column = mapping.by_name[field].column.name
        cast = (
            f"CAST(:v AS {mapping.by_name[field].kind})" if mapping.by_name[field].kind.native_json else ":v"
        )
        conn.execute(
            text(f"UPDATE tasks SET {column} = {cast} WHERE {key_column} = :k"), {**where, "v": value}
        )


def other_forms(store: SqlTaskStore, raw: Engine, keys: list[str]) -> int:
    """Rewrite a task's payload, and another's created_at, as other text of the same value,
    where the layout holds text; how many rows now hold their identity in another form."""
    done = 0
    payload = store.mapping.by_name["payload"]
    if payload.kind in (ColumnKind.JSON_TEXT, ColumnKind.JSON):
        record = store.get(keys[0])
        assert record is not None
        set_raw(store, raw, keys[0], "payload", json.dumps(dict(reversed(record.payload.items())), indent=1))
        done += 1
    created = store.mapping.by_name["created_at"]
    if created.kind in (ColumnKind.ISO_TEXT, ColumnKind.SQLITE_DATETIME):
        record = store.get(keys[1])
        assert record is not None
        moment = record.created_at.astimezone(timezone(timedelta(hours=2)))
        set_raw(store, raw, keys[1], "created_at", moment.isoformat())  # the same instant at +02:00
        done += 1
    return done


def without_paths(report: dict[str, Any]) -> dict[str, Any]:
    return {name: value for name, value in report.items() if name != "rows_by_path"}


@pytest.mark.parametrize(("backend", "old_name", "new_name"), pairs("sqlite") + pairs("postgresql"))
def test_validate_on_a_layout_pair_reports_what_the_record_path_reports(
    request: pytest.FixtureRequest, tmp_path: Path, backend: str, old_name: str, new_name: str
) -> None:
    """In the database, on raw values in Python and as records: one report (counts, samples,
    kinds of difference); equal rows never decoded, except where the layouts hold a value in
    forms the database cannot compare (JSONB against JSON text)."""
    old_layout, new_layout = layout_named(old_name), layout_named(new_name)
    with (
        layout_table(backend, request, tmp_path, old_layout, "old", ROWS) as (old, _),
        layout_table(backend, request, tmp_path, new_layout, "new", 0) as (new, raw),
    ):
        integer = new.mapping.integer_key
        tasks = everything(old)
        new.put_many(tasks)  # the same tasks, as the new layout holds them
        keys = [task.key for task in tasks]
        first = tasks[10]
        new.put_many(
            [
                changed(tasks[20], payload={"to": "someone else"}),
                changed(tasks[30], type="sms", status=TaskStatus.COMPLETED),
                changed(tasks[40], created_at=tasks[40].created_at + timedelta(seconds=1)),
                changed(tasks[60], status=TaskStatus.FAILED if tasks[60].status != "failed" else "pending"),
                changed(tasks[70], attempts=tasks[70].attempts + 1),
                changed(tasks[90], updated_at=first.updated_at),  # neither identity nor progress
                # On one side only; integer keys whose order as numbers is not their order as text.
                *(
                    changed(first, key=key)
                    for key in (("1000", "999999") if integer else (keys[10] + "a", "zz"))
                ),
            ]
        )
        set_raw(new, raw, keys[11], "key", None)
        set_raw(new, raw, keys[99], "key", None)
        forms = other_forms(new, raw, [keys[50], keys[55]])
        joined = IdentityJoin.between(old, new)
        in_database = validate(old, new, batch_size=3, settle=0).as_json()  # pages of 60 keys
        in_python = validate(old, new, batch_size=32, settle=0, in_database=False).as_json()
        as_records = validate(RecordsOnly(old), RecordsOnly(new), batch_size=32, settle=0).as_json()
    assert without_paths(as_records) == without_paths(in_python) == without_paths(in_database)
    report = in_database
    assert DIFFERENCES == (report["missing"], report["extra"], report["mismatched"], report["status_differs"])
    assert sorted([keys[11], keys[99]]) == report["samples"]["missing"]
    assert {"type", "status"} == set(report["samples"]["mismatched"][1]["fields"])
    assert ROWS + 2 == sum(as_records["rows_by_path"].values())
    assert sum(DIFFERENCES) == as_records["rows_by_path"]["reread"]
    equal = ROWS - 2 - 3 - 2  # the rows of one key and one identity and progress
    decoded = forms
    if "jsonb" in {old_layout.payload, new_layout.payload} and old_layout.payload != new_layout.payload:
        decoded = equal  # JSONB's text is not JSON text's: every row is decoded
    fast = "in_database" if joined is not None else "raw"
    assert (joined is None) == (old_layout.integer_key != new_layout.integer_key)  # keys of two kinds
    expected = {"in_database": 0, "raw": 0, "decoded": decoded, "records": 0, "reread": sum(DIFFERENCES)}
    assert {**expected, fast: equal - decoded} == in_database["rows_by_path"]
    assert {**expected, "raw": equal - decoded} == in_python["rows_by_path"]


@pytest.mark.parametrize("backend", ["sqlite", pytest.param("postgresql", marks=PG)])
def test_the_same_stored_task_name_under_two_type_maps_is_a_mismatch_on_every_path(
    request: pytest.FixtureRequest, tmp_path: Path, backend: str
) -> None:
    """Regression: the fast path compared stored task names, so a name that two type maps read
    as two types was no difference there, and a mismatch on the record path."""
    layout = layout_named("default")
    with (
        layout_table(backend, request, tmp_path, layout, "old", 20) as (first, _),
        layout_table(backend, request, tmp_path, layout, "new", 20) as (second, _),
    ):
        maps = (
            {"email.send": "email", "report.build": "report"},
            {"email.send": "sms", "report.build": "report"},
        )
        with (
            SqlTaskStore(first.url, "tasks", name="old", type_map=maps[0]) as old,
            SqlTaskStore(second.url, "tasks", name="new", type_map=maps[1]) as new,
        ):
            reports = [
                validate(old, new, settle=0).as_json(),
                validate(old, new, settle=0, in_database=False).as_json(),
                validate(RecordsOnly(old), RecordsOnly(new), settle=0).as_json(),
            ]
    assert [15] * 3 == [report["mismatched"] for report in reports]  # i % 4 != 0: email.send
    assert [without_paths(reports[2])] * 3 == [without_paths(report) for report in reports]


@pytest.mark.parametrize("backend", ["sqlite", pytest.param("postgresql", marks=PG)])
def test_a_negative_integer_key_is_refused_by_the_comparison_in_the_database(
    request: pytest.FixtureRequest, tmp_path: Path, backend: str
) -> None:
    """As every scan refuses it: the DataError names the key, whichever path validate takes."""
    layout = layout_named("integer_key")
    with (
        layout_table(backend, request, tmp_path, layout, "old", 30) as (old, raw),
        layout_table(backend, request, tmp_path, layout, "new", 30) as (new, _),
    ):
        with raw.begin() as conn:
            conn.execute(text("UPDATE tasks SET key = -7 WHERE key = 7"))
        assert IdentityJoin.between(old, new) is not None
        for in_database in (True, False):
            with pytest.raises(DataError, match="holds the negative key -7"):
                validate(old, new, settle=0, in_database=in_database)
