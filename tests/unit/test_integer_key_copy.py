"""A backfill from an integer key column inside one database (two SQLite files, or one
PostgreSQL database) copies rows, not records, and leaves
what the record path leaves: every digit count in text order, resumed from any checkpoint,
and a key the record path refuses refused the same way."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from sqlalchemy import Engine, text

from migration_fsm.exceptions import DataError
from migration_fsm.journal import make_engine
from migration_fsm.tasks.sql import RowCopy, SqlTaskStore
from migration_fsm.tasks.sql.columns import MAX_INTEGER_KEY
from migration_fsm.tasks.sql.layouts import layout_named
from migration_fsm.tools.backfill import copy_tasks
from tests.support.datatools import everything
from tests.unit.test_backfill_layouts import source_and_targets, stored_rows
from tests.unit.test_fast_paths import RecordsOnly
from tests.unit.test_task_stores import PG

LAYOUT = layout_named("integer_key")
#: Keys of every digit count, the ends of each count's range, and the largest key there is.
KEYS = sorted(
    {0, 1, 2, 9, 10, 11, 19, 20, 99, 100, 101, 999, 1000, 4321, 99_999, 100_000, 123_456_789}
    | {10**d for d in range(6, 19)}
    | {10**d - 1 for d in range(6, 19)}
    | {MAX_INTEGER_KEY - 1, MAX_INTEGER_KEY}
    | set(range(300, 340))
)


@contextmanager
def stores(
    request: pytest.FixtureRequest, tmp_path: Path, keys: list[int], backend: str = "sqlite"
) -> Iterator[tuple[SqlTaskStore, SqlTaskStore, SqlTaskStore, Engine]]:
    """old (the integer-key layout, one row per key), new and a table for the record path's
    copy (the default layout): in a second file on SQLite, in the same database on
    PostgreSQL (integer keys are copied as rows inside one database); raw access to old."""
    one_database = backend == "postgresql"
    with source_and_targets(backend, request, tmp_path, LAYOUT, one_file=one_database, rows=0) as places:
        old, new, records, source, _ = places
        with source.begin() as conn:
            for i, key in enumerate(keys):  # a task, under `key` (5,000,000 + i is no key of the tests)
                LAYOUT.fill(conn, "old_tasks", 1, start=5_000_000 + i)
                update = text("UPDATE old_tasks SET key = :key WHERE key = :i")
                conn.execute(update, {"key": key, "i": 5_000_000 + i})
        yield old, new, records, source


@pytest.mark.parametrize("backend", ["sqlite", pytest.param("postgresql", marks=PG)])
@pytest.mark.parametrize("batch_size", [1, 7, 64, 1000])
def test_integer_keys_are_copied_as_rows_in_text_order_from_any_checkpoint(
    request: pytest.FixtureRequest, tmp_path: Path, backend: str, batch_size: int
) -> None:
    with stores(request, tmp_path, KEYS, backend) as (old, new, records, _):
        assert RowCopy.between(old, new) is not None
        checkpoints: list[str] = []
        result = copy_tasks(
            old, new, batch_size=batch_size, checkpoint=lambda key, _: checkpoints.append(key)
        )
        copy_tasks(RecordsOnly(old), RecordsOnly(records), batch_size=batch_size)
        assert (len(KEYS), len(KEYS), 0) == (result.copied, result.fast, result.records)
        assert checkpoints == sorted(checkpoints)
        assert sorted(map(str, KEYS)) == [record.key for record in everything(new)]
        assert everything(old) == everything(new)
        raw = make_engine(new.url)
        assert stored_rows(raw, records.table) == stored_rows(raw, new.table)
        # Resumed after any key, present or not, the copy goes on with the next key in text order.
        for after in [
            "0",
            "1",
            "10",
            "100000",
            "2",
            "3",
            "305",
            "3050",
            "4",
            "999999999999",
            "9223372036854775806",
        ]:
            with raw.begin() as conn:
                conn.execute(text("DELETE FROM new_tasks"))
            resumed = copy_tasks(old, new, batch_size=batch_size, after=after)
            expected = [key for key in sorted(map(str, KEYS)) if key > after]
            assert (len(expected), len(expected)) == (resumed.copied, resumed.fast)
            assert expected == [record.key for record in everything(new)]
        raw.dispose()


@pytest.mark.parametrize("backend", ["sqlite", pytest.param("postgresql", marks=PG)])
def test_a_negative_key_is_refused_as_the_record_path_refuses_it(
    request: pytest.FixtureRequest, tmp_path: Path, backend: str
) -> None:
    with stores(request, tmp_path, [5, 40, 300], backend) as (old, new, records, source):
        with source.begin() as conn:
            conn.execute(text("UPDATE old_tasks SET key = -3 WHERE key = 40"))
        with pytest.raises(DataError) as through_records:
            copy_tasks(RecordsOnly(old), RecordsOnly(records), batch_size=10)
        with pytest.raises(DataError) as as_rows:
            copy_tasks(old, new, batch_size=10)
        assert str(through_records.value) == str(as_rows.value)
        assert [] == everything(new)


@pytest.mark.parametrize("backend", ["sqlite", pytest.param("postgresql", marks=PG)])
def test_a_row_failing_a_check_goes_the_record_path_alone(
    request: pytest.FixtureRequest, tmp_path: Path, backend: str
) -> None:
    """A status outside the map stops the copy naming its key, and its batch writes nothing;
    (SQLite) a DATETIME text in another offset is converted through its record, the rest of
    its batch as rows (PostgreSQL's timestamptz column holds no such thing)."""
    odd = int(backend == "sqlite")
    with stores(request, tmp_path, list(range(1, 30)), backend) as (old, new, records, source):
        if odd:
            with source.begin() as conn:
                conn.execute(
                    text("UPDATE old_tasks SET created_at = '2026-03-01T12:00:00+02:00' WHERE key = 17")
                )
        result = copy_tasks(old, new, batch_size=8)
        copy_tasks(RecordsOnly(old), RecordsOnly(records), batch_size=8)
        assert (29, 29 - odd, odd) == (result.copied, result.fast, result.records)
        raw = make_engine(new.url)
        assert stored_rows(raw, records.table) == stored_rows(raw, new.table)
        with raw.begin() as conn:
            conn.execute(text("DELETE FROM new_tasks"))
        raw.dispose()
        with source.begin() as conn:
            conn.execute(text("UPDATE old_tasks SET status = 'zombie' WHERE key = 21"))
        with pytest.raises(DataError, match=r"'21'.*'zombie'"):
            copy_tasks(old, new, batch_size=8)
        # The batch before 21's was written, 21's wrote nothing. Text order: 1, 10, ..., 17 |
        # 18, 19, 2, 20, 21, ...: a batch is the keys up to the first 8th key of a digit
        # count's range (17, of 10 to 29): 9 keys.
        assert sorted(map(str, range(1, 30)))[:9] == [r.key for r in everything(new)]


@pytest.mark.parametrize("odd_key", ["2.5", "'abc'", "-0.5"])
def test_a_key_sqlite_holds_as_a_real_or_text_is_left_to_the_record_path(
    request: pytest.FixtureRequest, tmp_path: Path, odd_key: str
) -> None:
    """SQLite: a BIGINT key column that is no rowid holds what it is given: a real, or text.
    Such a key is no task's key: the copy stops naming it (before, the record path raised a
    TypeError for a real, and neither path saw text, which sorts after every integer, so that
    row was left behind without a word), and the row copy's outcome is the record path's."""
    with stores(request, tmp_path, [], "sqlite") as (old, new, records, source):
        with source.begin() as conn:
            conn.execute(text("DROP TABLE old_tasks"))
            conn.execute(text(LAYOUT_SQL_BIGINT))
            LAYOUT.fill(conn, "old_tasks", 20, start=1)
            conn.execute(text(f"UPDATE old_tasks SET key = {odd_key} WHERE key = 3"))
        with SqlTaskStore(old.url, "old_tasks", name="old", **LAYOUT.store_options()) as bigint_old:
            assert RowCopy.between(bigint_old, new) is not None
            messages = []
            for target in (new, RecordsOnly(records)):
                with pytest.raises(
                    DataError, match=r"holds the key .*, which is no integer of 0 or more"
                ) as exc:
                    copy_tasks(bigint_old, target, batch_size=8)
                messages.append(str(exc.value))
            assert messages[0] == messages[1]
            raw = make_engine(new.url)
            as_rows, as_records = stored_rows(raw, new.table), stored_rows(raw, records.table)
            raw.dispose()
            shorter = min(len(as_rows), len(as_records))  # the batches before the key's: sizes differ
            assert as_rows[:shorter] == as_records[:shorter]


#: The integer-key layout's table with a BIGINT key: on SQLite no rowid, so it holds any value.
LAYOUT_SQL_BIGINT = (
    "CREATE TABLE old_tasks (key BIGINT NOT NULL PRIMARY KEY, type VARCHAR(100) NOT NULL,"
    " payload JSON NOT NULL, status VARCHAR(20) NOT NULL, attempts INTEGER NOT NULL,"
    " created_at DATETIME NOT NULL, updated_at DATETIME NOT NULL, metadata JSON NOT NULL)"
)
