"""A row copy converts a text timestamp in SQL only when the record path would write the
same: every form below, as SQLite's DATETIME text and as ISO text on SQLite and PostgreSQL,
leaves the row the record path leaves or fails with the record path's error, and the forms
the SQL admits are copied as rows (`paths.fast`), the others alone through their records."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, Text, cast, select, text

from migration_fsm.exceptions import DataError
from migration_fsm.journal import make_engine
from migration_fsm.tasks.sql import RowCopy
from migration_fsm.tasks.sql.layouts import layout_named
from migration_fsm.tools.backfill import copy_tasks
from tests.unit.test_backfill_layouts import source_and_targets
from tests.unit.test_fast_paths import RecordsOnly
from tests.unit.test_task_stores import PG

#: Text times in the forms the SQL converts: a space or a T, no fraction or 3 or 6 digits of
#: it, no zone, Z or +00:00; the last days of months, a leap day, midnight and 23:59:59.
CONVERTED = [
    f"{day}{sep}{clock}{fraction}{zone}"
    for day, clock in (
        ("2026-01-31", "00:00:00"),
        ("2024-02-29", "23:59:59"),
        ("2026-04-30", "12:34:56"),
        ("0001-01-01", "00:00:00"),
        ("9999-12-31", "23:59:59"),
    )
    for sep in (" ", "T")
    for fraction in ("", ".123", ".123456")
    for zone in ("", "Z", "+00:00")
]
#: Text the SQL leaves to the record path: other offsets, other fraction lengths, dates and
#: clocks that are no dates or clocks, the year 0, spaces, a lower-case z, other separators.
LEFT_TO_RECORDS = [
    "2026-03-01T12:00:00.5+0200",
    "2026-03-01T12:00:00+02:00",
    "2026-03-01 12:00:00-00:00",
    "2026-03-01 12:00:00.1",
    "2026-03-01 12:00:00.12345",
    "2026-03-01 12:00:00.1234567",
    "2026-03-01 12:00:00.12Z",
    "2026-02-29 12:00:00",
    "2026-02-30 12:00:00.000000",
    "2026-04-31T00:00:00Z",
    "2026-13-01 00:00:00",
    "2026-00-10 00:00:00",
    "2026-01-00 00:00:00",
    "2026-01-32 00:00:00",
    "2026-01-01 24:00:00",
    "2026-01-01 23:60:00",
    "2026-01-01 23:59:60",
    "0000-01-01 00:00:00",
    " 2026-01-01 00:00:00",
    "2026-01-01 00:00:00 ",
    "2026-01-01 00:00:00z",
    "2026-01-01_00:00:00",
    "2026/01/01 00:00:00",
    "2026-01-01",
    "2026-1-01 00:00:00.000",
    "２０２６-01-01 00:00:00",
    "",
]


def outcome(copy: Any, raw: Engine, table: str) -> tuple[str, Any]:
    """What a copy left: ("rows", the target's rows as text), or ("error", its message)."""
    with raw.begin() as conn:
        conn.execute(text(f"DELETE FROM {table}"))
    try:
        result = copy()
    except DataError as exc:
        return "error", str(exc).replace("store 'records'", "store 'new'")
    with raw.connect() as conn:
        rows = conn.execute(select(cast(text("created_at"), Text), text("*")).select_from(text(table)))
        return "rows", ([tuple(row) for row in rows], result.records)


@pytest.mark.parametrize(
    ("backend", "layout_name"),
    [("sqlite", "default"), ("sqlite", "iso_z"), pytest.param("postgresql", "iso_z", marks=PG)],
)
def test_a_text_time_is_converted_in_sql_only_where_the_record_path_writes_the_same(
    request: pytest.FixtureRequest, tmp_path: Path, backend: str, layout_name: str
) -> None:
    one_database = backend == "postgresql"  # one statement copies inside one PostgreSQL database
    places = source_and_targets(
        backend, request, tmp_path, layout_named(layout_name), one_file=one_database, rows=1
    )
    with places as (old, new, records, _, raw):
        assert RowCopy.between(old, new) is not None
        source = make_engine(old.url)
        for value in CONVERTED + LEFT_TO_RECORDS:
            with source.begin() as conn:
                conn.execute(text("UPDATE old_tasks SET created_at = :v"), {"v": value})
            fast = outcome(lambda: copy_tasks(old, new, batch_size=10), raw, "new_tasks")
            slow = outcome(lambda: copy_tasks(old, RecordsOnly(records), batch_size=10), raw, "record_tasks")
            if fast[0] == "rows" and slow[0] == "rows":
                (fast_rows, through_records), (slow_rows, _) = fast[1], slow[1]
                assert fast_rows == slow_rows, value
                if value in CONVERTED:
                    assert through_records == 0, value
                elif backend == "sqlite":  # PostgreSQL converts more forms (any fraction, -00:00)
                    assert through_records == 1, value
            else:
                assert fast == slow, value
                assert value not in CONVERTED, value
        source.dispose()


#: Epoch times (in the layout's unit) the SQL converts: 1970, fractions of a second at both
#: ends, a leap day, the last second Python has (9999-12-31 23:59:59).
EPOCH_CONVERTED = {
    "epoch_s": [0, 1, 59, 951_782_400, 1_767_225_600, 253_402_300_799],
    "epoch_ms": [0, 1, 999, 1000, 951_782_400_001, 1_767_225_600_123, 253_402_300_799_999],
}
#: ... and what SQLite's SQL leaves to the record path: before 1970 (PostgreSQL's converts
#: it), past year 9999, a real, text that is no number (SQLite keeps both in an INTEGER column).
EPOCH_LEFT_TO_RECORDS = {
    "epoch_s": [-1, 253_402_300_800, 1.5, "soon"],
    "epoch_ms": [-1, 253_402_300_800_000, 1.5, "soon"],
}


@pytest.mark.parametrize("layout_name", ["epoch_s", "epoch_ms"])
@pytest.mark.parametrize("backend", ["sqlite", pytest.param("postgresql", marks=PG)])
def test_an_epoch_time_is_converted_in_sql_only_where_the_record_path_writes_the_same(
    request: pytest.FixtureRequest, tmp_path: Path, backend: str, layout_name: str
) -> None:
    one_database = backend == "postgresql"
    places = source_and_targets(
        backend, request, tmp_path, layout_named(layout_name), one_file=one_database, rows=1
    )
    values = EPOCH_CONVERTED[layout_name] + EPOCH_LEFT_TO_RECORDS[layout_name]
    if backend == "postgresql":  # a BIGINT column holds integers only
        values = [v for v in values if type(v) is int]
    with places as (old, new, records, _, raw):
        assert RowCopy.between(old, new) is not None
        source = make_engine(old.url)
        for value in values:
            with source.begin() as conn:
                conn.execute(text("UPDATE old_tasks SET created_at = :v"), {"v": value})
            fast = outcome(lambda: copy_tasks(old, new, batch_size=10), raw, "new_tasks")
            slow = outcome(lambda: copy_tasks(old, RecordsOnly(records), batch_size=10), raw, "record_tasks")
            if fast[0] == "rows" and slow[0] == "rows":
                (fast_rows, through_records), (slow_rows, _) = fast[1], slow[1]
                assert fast_rows == slow_rows, value
                if value in EPOCH_CONVERTED[layout_name]:
                    assert through_records == 0, value
                elif backend == "sqlite":
                    assert through_records == 1, value
            else:
                assert fast == slow, value
                assert value not in EPOCH_CONVERTED[layout_name], value
        source.dispose()


def test_a_text_time_s_shape_is_computed_once_a_row_in_one_statement() -> None:
    """PostgreSQL: the shape of a text time (nine replace() of its digits, most of what its
    conversion costs) serves the row's check and its value; one statement reads it once, from
    the page's subquery, and the page's order and bounds move into that subquery."""
    from sqlalchemy import Column, Integer, MetaData, String, Table, bindparam
    from sqlalchemy.dialects import postgresql

    from migration_fsm.tasks.sql.columns import ColumnKind
    from migration_fsm.tasks.sql.convert import convert_time
    from migration_fsm.tasks.sql.rowcopy import computed_once

    table = Table("tasks", MetaData(), Column("key", String), Column("made", String), Column("n", Integer))
    converted = convert_time("postgresql", ColumnKind.ISO_TEXT, ColumnKind.TIMESTAMPTZ, table.c.made)
    assert converted is not None
    value, valid = converted
    after = table.c.key > bindparam("after")

    dialect = postgresql.dialect()  # type: ignore[no-untyped-call]

    def sql(*expressions: Any) -> str:
        return str(select(*expressions).compile(dialect=dialect))

    # Inline: three times (the check, and which cast the value takes: zoned or naive).
    assert sql(value, valid).count("replace(") == 27
    [value_once, valid_once], order, left = computed_once(
        table, [value, valid], table.c.key, after, bindparam("limit")
    )
    assert left is None
    once = sql(value_once, valid_once)
    assert once.count("replace(") == 9, once
    assert once.count("mfsm_source.mfsm_shared_made IN") == 3, once
    source = "WHERE tasks.key > %(after)s::VARCHAR ORDER BY tasks.key \n LIMIT %(limit)s) AS mfsm_source"
    assert once.endswith(source), once
    assert str(order.compile(dialect=dialect)) == "mfsm_source.key"
    plain = [table.c.n, table.c.key.is_not(None)]
    assert computed_once(table, plain, table.c.key, after, None) == (plain, table.c.key, after)
