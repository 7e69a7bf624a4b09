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

from sqlalchemy import Integer, String, Text, case, func, literal, literal_column, null, type_coerce

from migration_fsm.tasks.sql.columns import ColumnKind

if TYPE_CHECKING:
    from sqlalchemy import FromClause
    from sqlalchemy.engine.interfaces import Dialect
    from sqlalchemy.sql.elements import ColumnElement

    from migration_fsm.tasks.sql.mapping import MappedField, TableMapping

_DATE: Final = "[0-9][0-9][0-9][0-9]-[0-9][0-9]-[0-9][0-9]"
_TIME: Final = "[0-9][0-9]:[0-9][0-9]:[0-9][0-9]"

#: SQLite, a timestamp held as text. `{c}` is the column; `{z}` the value without a UTC
#: suffix, for the rarer forms. The common forms come first: LIKE checks their shape, and
#: GLOB that a fraction is digits (else `.1+0000Z` would become `.1+0000`, which parses).
#: The date and time digits need no check: a value that is not a timestamp stays one that
#: is not, as the separator between date and time may be any character to Python.
_D: Final = "____-__-___"  # the date and its separator
_T: Final = "__:__:__"
_F: Final = "substr({c}, 21, 6) GLOB '[0-9][0-9][0-9][0-9][0-9][0-9]'"
_SQLITE_TEXT: Final = (
    "CASE WHEN length({c}) = 26 AND substr({c}, 11, 1) = ' ' THEN {c}"
    f" WHEN length({{c}}) = 19 AND {{c}} LIKE '{_D}{_T}'"
    " THEN substr({c}, 1, 10) || ' ' || substr({c}, 12) || '.000000'"
    f" WHEN length({{c}}) = 27 AND {{c}} LIKE '{_D}{_T}.______Z' AND substr({{c}}, 27) = 'Z' AND {_F}"
    " THEN substr({c}, 1, 10) || ' ' || substr({c}, 12, 15)"
    f" WHEN length({{c}}) = 32 AND {{c}} LIKE '{_D}{_T}.______+00:00' AND {_F}"
    " THEN substr({c}, 1, 10) || ' ' || substr({c}, 12, 15)"
    f" WHEN length({{c}}) = 26 AND {{c}} LIKE '{_D}{_T}.______' AND {_F}"
    " THEN substr({c}, 1, 10) || ' ' || substr({c}, 12)"
    f" WHEN {{z}} GLOB '{_DATE}[ T]{_TIME}'"
    " THEN substr({z}, 1, 10) || ' ' || substr({z}, 12) || '.000000'"
    f" WHEN {{z}} GLOB '{_DATE}[ T]{_TIME}.[0-9]*' AND length({{z}}) BETWEEN 21 AND 26"
    " AND substr({z}, 21) NOT GLOB '*[^0-9]*'"
    " THEN substr({z}, 1, 10) || ' ' || substr({z} || '00000', 12, 15)"
    " ELSE {c} END"
)
_SQLITE_UNZONED: Final = (
    "CASE WHEN substr({c}, -1) = 'Z' THEN substr({c}, 1, length({c}) - 1)"
    " WHEN substr({c}, -6) = '+00:00' THEN substr({c}, 1, length({c}) - 6) ELSE {c} END"
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


#: The seconds since 1970 that Python's datetime (years 1 to 9999) holds.
_FIRST_SECOND: Final = -62_135_596_800
_LAST_SECOND: Final = 253_402_300_799
_FORMAT: Final = "'YYYY-MM-DD HH24:MI:SS'"


def _epoch(ref: str, kind: ColumnKind, dialect: str, otherwise: str) -> str:
    """An integer count of seconds or milliseconds since 1970 as canonical text (floored, as
    the store reads it), within Python's years; `otherwise` outside them."""
    ms = kind is ColumnKind.EPOCH_MS
    scale = 1000 if ms else 1
    low, high = _FIRST_SECOND * scale, _LAST_SECOND * scale + scale - 1
    if dialect == "sqlite":
        valid = f"typeof({ref}) = 'integer' AND {ref} BETWEEN {low} AND {high}"
        if not ms:
            text = f"strftime('%Y-%m-%d %H:%M:%S', {ref}, 'unixepoch') || '.000000'"
        else:
            part = f"((({ref}) % 1000 + 1000) % 1000)"
            whole = f"strftime('%Y-%m-%d %H:%M:%S', ({ref} - {part}) / 1000, 'unixepoch')"
            text = f"{whole} || '.' || printf('%03d', {part}) || '000'"
        return f"CASE WHEN {valid} THEN {text} ELSE {otherwise} END"
    valid = f"{ref} BETWEEN {low} AND {high}"
    if not ms:
        text = f"to_char(to_timestamp({ref}) AT TIME ZONE 'UTC', {_FORMAT}) || '.000000'"
    else:
        part = f"mod(mod({ref}, 1000) + 1000, 1000)"
        whole = f"to_char(to_timestamp(({ref} - {part}) / 1000) AT TIME ZONE 'UTC', {_FORMAT})"
        text = f"{whole} || '.' || lpad(CAST({part} AS TEXT), 3, '0') || '000'"
    return f"CASE WHEN {valid} THEN {text} ELSE {otherwise} END"


def canonical_time(field: MappedField, column: ColumnElement[Any], dialect: Dialect) -> ColumnElement[Any]:
    """`column` (holding `field`, a timestamp) read as canonical text where the kind allows;
    see the module docstring."""
    ref = str(column.compile(dialect=dialect))
    kind = field.kind
    if dialect.name == "sqlite" and kind in (ColumnKind.SQLITE_DATETIME, ColumnKind.ISO_TEXT):
        unzoned = "(" + _SQLITE_UNZONED.format(c=ref) + ")"
        return literal_column("(" + _SQLITE_TEXT.format(c=ref, z=unzoned) + ")", String())
    if kind.epoch is not None:
        otherwise = "NULL" if field.name == "created_at" else ref
        if dialect.name == "postgresql" and field.name != "created_at":
            otherwise = f"CAST({ref} AS TEXT)"
        return literal_column("(" + _epoch(ref, kind, dialect.name, otherwise) + ")", String())
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


def identity_columns(
    mapping: TableMapping, table: FromClause, dialect: Dialect, label: str = "mfsm_"
) -> list[ColumnElement[Any]]:
    """key, type (through the type map; NULL for a name it does not map), payload (JSON text
    as stored; PostgreSQL's JSON types as their text), created_at (canonical text, see the
    module docstring; NULL when a PostgreSQL timestamp is out of Python's range), status (a
    TaskStatus value, NULL when the status map does not map it), attempts (0 for none),
    run_at (canonical text, NULL without a column): the identity row of `mapping`'s table as
    `table` (that table, or a copy of it seen from another database) holds it, each column
    labelled `label` + its name."""
    fields = mapping.by_name

    def column(name: str) -> ColumnElement[Any]:
        return table.c[fields[name].column.name]

    type_ = column("type")
    if mapping.read_type is not None:
        names = {stored: literal(value, String()) for stored, value in mapping.read_type.items()}
        type_ = case(names, value=type_)
    payload = column("payload")
    # JSON types as their text; text as it is (SQLAlchemy would decode a SQLite JSON column)
    payload = payload.cast(Text()) if fields["payload"].kind.native_json else type_coerce(payload, String())
    statuses = {stored: str(value) for stored, value in mapping.read_status.items()}
    status = case(statuses, value=column("status"))
    attempts = func.coalesce(column("attempts"), 0) if "attempts" in fields else literal(0, Integer())
    run_at = canonical_time(fields["run_at"], column("run_at"), dialect) if "run_at" in fields else null()
    values = [
        table.c[mapping.key_column.name],
        type_,
        payload,
        canonical_time(fields["created_at"], column("created_at"), dialect),
        status,
        attempts,
        run_at,
    ]
    fields_in_order = ("key", "type", "payload", "created_at", "status", "attempts", "run_at")
    return [value.label(f"{label}{name}") for value, name in zip(values, fields_in_order, strict=True)]
