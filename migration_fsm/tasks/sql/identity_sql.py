"""The identity row's columns in SQL, each in one canonical form whatever the column holds.

Validation compares identity rows on their raw values and decodes only rows whose values
differ (`tasks/identity.py`). Two tables that hold a field in different forms would make
every row differ: a timestamp as SQLite DATETIME text (`2026-11-29 10:00:00.000000`), as
`CURRENT_TIMESTAMP` text (`2026-11-29 10:00:00`), as ISO text with a zone
(`2026-11-29T10:00:00Z`), or as a PostgreSQL `timestamp` / `timestamptz`. So the database
reads every timestamp as **canonical text**, naive UTC with six digits of fraction
(`2026-11-29 10:00:00.000000`), and every stored task name through the type map; equal
values then give equal raw values on both sides of any pair of layouts.

Each conversion only ever rewrites a value into another spelling of the same instant (a
separator, a UTC suffix dropped, zeros added to the fraction), and only when the whole value
has a timestamp's shape; anything else is read as it is stored, and so can only differ, never
agree by mistake: such a row is settled by decoding it (`SqlTaskStore.identity_checksum`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Final

from sqlalchemy import Integer, String, Text, case, func, literal, literal_column, null

from migration_fsm.tasks.sql.columns import ColumnKind

if TYPE_CHECKING:
    from sqlalchemy import Table
    from sqlalchemy.engine.interfaces import Dialect
    from sqlalchemy.sql.elements import ColumnElement

    from migration_fsm.tasks.sql.mapping import MappedField, TableMapping

_DATE: Final = "[0-9][0-9][0-9][0-9]-[0-9][0-9]-[0-9][0-9]"
_TIME: Final = "[0-9][0-9]:[0-9][0-9]:[0-9][0-9]"

#: SQLite, a timestamp held as text. `{c}` is the column; `{z}` the value without a UTC suffix.
_SQLITE_TEXT: Final = (
    "CASE WHEN length({c}) = 26 AND substr({c}, 11, 1) = ' ' THEN {c}"
    f" WHEN {{z}} GLOB '{_DATE}[ T]{_TIME}'"
    " THEN substr({z}, 1, 10) || ' ' || substr({z}, 12) || '.000000'"
    f" WHEN {{z}} GLOB '{_DATE}[ T]{_TIME}.[0-9]*' AND length({{z}}) BETWEEN 21 AND 26"
    " AND substr({z}, 21) NOT GLOB '*[^0-9]*'"
    " THEN substr({z}, 1, 10) || ' ' || substr({z} || '00000', 12, 15)"
    " ELSE {c} END"
)
_SQLITE_UNZONED: Final = (
    "CASE WHEN {c} GLOB '*Z' THEN substr({c}, 1, length({c}) - 1)"
    " WHEN {c} GLOB '*+00:00' THEN substr({c}, 1, length({c}) - 6) ELSE {c} END"
)
#: PostgreSQL, a timestamp held as text.
_PG_TEXT: Final = (
    "CASE WHEN length({c}) = 26 AND substr({c}, 11, 1) = ' ' THEN {c}"
    r" WHEN {c} ~ '^\d{{4}}-\d\d-\d\d[ T]\d\d:\d\d:\d\d(Z|\+00:00)?$'"
    " THEN substr({c}, 1, 10) || ' ' || substr({c}, 12, 8) || '.000000'"
    r" WHEN {c} ~ '^\d{{4}}-\d\d-\d\d[ T]\d\d:\d\d:\d\d\.\d{{1,6}}(Z|\+00:00)?$'"
    " THEN substr({c}, 1, 10) || ' ' || substr(rpad(substring({c} from '^[^Z+]*'), 26, '0'), 12, 15)"
    " ELSE {c} END"
)
#: PostgreSQL, a timestamp type: to_char within the years Python can hold; else NULL for a
#: required field (validation then decodes the row, which says what is wrong), the stored
#: text for run_at.
_PG_NATIVE: Final = (
    "CASE WHEN {c} BETWEEN '0001-01-01 00:00:00{zone}' AND '9999-12-31 23:59:59.999999{zone}'"
    " THEN to_char({utc}, 'YYYY-MM-DD HH24:MI:SS.US') ELSE {otherwise} END"
)


def canonical_time(field: MappedField, column: ColumnElement[Any], dialect: Dialect) -> ColumnElement[Any]:
    """`column` (holding `field`, a timestamp) read as canonical text where the kind allows;
    see the module docstring."""
    ref = str(column.compile(dialect=dialect))
    kind = field.kind
    if dialect.name == "sqlite" and kind in (ColumnKind.SQLITE_DATETIME, ColumnKind.ISO_TEXT):
        unzoned = "(" + _SQLITE_UNZONED.format(c=ref) + ")"
        return literal_column("(" + _SQLITE_TEXT.format(c=ref, z=unzoned) + ")", String())
    if dialect.name == "postgresql" and kind is ColumnKind.ISO_TEXT:
        return literal_column("(" + _PG_TEXT.format(c=ref) + ")", String())
    if dialect.name == "postgresql" and kind.zoned:
        zoned = kind is ColumnKind.TIMESTAMPTZ
        sql = _PG_NATIVE.format(
            c=ref,
            zone="+00" if zoned else "",
            utc=f"({ref} AT TIME ZONE 'UTC')" if zoned else ref,
            otherwise="NULL" if field.name == "created_at" else f"CAST({ref} AS TEXT)",
        )
        return literal_column("(" + sql + ")", String())
    return column


def identity_columns(mapping: TableMapping, table: Table, dialect: Dialect) -> list[ColumnElement[Any]]:
    """key, type (through the type map; NULL for a name it does not map), payload (JSON text
    as stored; PostgreSQL's JSON types as their text), created_at (canonical text, see the
    module docstring; NULL when a PostgreSQL timestamp is out of Python's range), status (a
    TaskStatus value, NULL when the status map does not map it), attempts (0 for none),
    run_at (canonical text, NULL without a column): the identity row of `mapping`'s table as
    `table` (that table, or a copy of it seen from another database) holds it."""
    fields = mapping.by_name

    def column(name: str) -> ColumnElement[Any]:
        return table.c[fields[name].column.name]

    type_ = column("type")
    if mapping.read_type is not None:
        names = {stored: literal(value, String()) for stored, value in mapping.read_type.items()}
        type_ = case(names, value=type_)
    payload = column("payload")
    if fields["payload"].kind.native_json:
        payload = payload.cast(Text())
    statuses = {stored: str(value) for stored, value in mapping.read_status.items()}
    status = case(statuses, value=column("status"))
    attempts = func.coalesce(column("attempts"), 0) if "attempts" in fields else literal(0, Integer())
    run_at = canonical_time(fields["run_at"], column("run_at"), dialect) if "run_at" in fields else null()
    return [
        table.c[mapping.key_column.name],
        type_,
        payload,
        canonical_time(fields["created_at"], column("created_at"), dialect),
        status,
        attempts,
        run_at,
    ]
