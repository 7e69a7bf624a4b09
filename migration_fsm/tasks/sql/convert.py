"""Timestamps converted inside the database, for `RowCopy`: a source column's time in the form
a target column holds it, with an SQL condition that holds exactly for the rows the record
path would read and write the same way (`TableMapping`'s readers and writers).

A row whose time fails the condition is not converted here: it goes the record path alone,
which converts it (another UTC offset, say) or names it in a `DataError`. Nothing here
raises for a bad value on SQLite; on PostgreSQL a cast is reached only by text of the shape
the condition admits, and a value it still refuses (a 30th of February) fails the statement,
whose batch then goes the record path as a whole.

SQLite: every time becomes the naive UTC text `YYYY-MM-DD HH:MM:SS.ffffff` first (what its
DATETIME columns hold), checked by a round trip through `strftime`, then takes the target's
form. PostgreSQL: every time becomes a `timestamptz` first.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Final

from sqlalchemy import (
    BigInteger,
    Boolean,
    DateTime,
    Integer,
    String,
    and_,
    case,
    cast,
    func,
    literal,
    or_,
    text,
)
from sqlalchemy import type_coerce as coerce

from migration_fsm.tasks.sql.columns import ColumnKind

if TYPE_CHECKING:
    from sqlalchemy.sql.elements import ColumnElement

#: Seconds since 1970 of 0001-01-01 and of 10000-01-01 (datetime's range, and Python's).
FIRST_SECOND: Final = -62_135_596_800
END_SECOND: Final = 253_402_300_800
#: PostgreSQL: ISO 8601 text `datetime.fromisoformat` reads and the casts take alike (a
#: 24-hour clock, seconds below 60, 1 to 6 digits of fraction, Z or an offset or none).
_PG_ISO: Final = (
    r"^\d{4}-(0[1-9]|1[0-2])-(0[1-9]|[12]\d|3[01])[ T]([01]\d|2[0-3]):[0-5]\d:[0-5]\d(\.\d{1,6})?"
    r"(Z|[+-]([01]\d|2[0-3]):[0-5]\d)?$"
)
_PG_ZONED: Final = r"(Z|[+-]\d\d:\d\d)$"

_Converted = tuple["ColumnElement[Any]", "ColumnElement[bool]"]
_TEXT_KINDS: Final = (ColumnKind.SQLITE_DATETIME, ColumnKind.ISO_TEXT)


def convert_time(
    dialect: str, source: ColumnKind, target: ColumnKind, column: ColumnElement[Any]
) -> _Converted | None:
    """(the value of `column`, of kind `source`, in the form of `target`; the condition for a
    row whose value the record path writes the same), or None when no conversion is known."""
    if dialect == "sqlite":
        normal = _sqlite_normal(source, column)
        return None if normal is None else _sqlite_as(target, *normal)
    if dialect == "postgresql":
        zoned = _pg_zoned(source, column)
        return None if zoned is None else _pg_as(target, *zoned)
    return None


# -- SQLite -----------------------------------------------------------------------------------


def _concat(*parts: Any) -> ColumnElement[Any]:
    joined: ColumnElement[Any] = coerce(parts[0], String())
    for part in parts[1:]:
        joined = joined.concat(part)
    return joined


def _sqlite_normal(kind: ColumnKind, column: ColumnElement[Any]) -> _Converted | None:
    """`YYYY-MM-DD HH:MM:SS.ffffff` (naive UTC) of the column's value, and its condition."""
    unit = kind.epoch
    if unit is not None:
        ms = kind is ColumnKind.EPOCH_MS
        scale = 1000 if ms else 1
        # From 1970 on: SQLite's integer division and remainder truncate toward zero.
        valid = and_(func.typeof(column) == "integer", column >= 0, column < END_SECOND * scale)
        seconds = func.strftime("%Y-%m-%d %H:%M:%S", column / 1000 if ms else column, "unixepoch")
        fraction = _concat(func.printf("%03d", column % 1000), "000") if ms else literal("000000")
        return _concat(seconds, ".", fraction), valid
    if kind not in _TEXT_KINDS:
        return None
    value = coerce(column, String())
    suffix = case((value.op("GLOB")("*Z"), 1), (value.op("GLOB")("*+00:00"), 6), else_=0)
    body = func.substr(value, 1, func.length(value) - suffix)
    size = func.length(body)
    base = func.replace(func.substr(body, 1, 19), "T", " ")
    digits = func.substr(body, 21)
    valid = and_(
        func.typeof(column) == "text",
        func.substr(body, 11, 1).in_([literal(" "), literal("T")]),
        or_(
            size == 19,
            and_(size.between(21, 26), func.substr(body, 20, 1) == ".", ~digits.op("GLOB")("*[^0-9]*")),
        ),
        func.strftime("%Y-%m-%d %H:%M:%S", base) == base,  # a real date and time, this exact text
        func.substr(base, 1, 4) != "0000",
    )
    return _concat(base, ".", func.substr(_concat(digits, "000000"), 1, 6)), valid


def _sqlite_as(kind: ColumnKind, normal: ColumnElement[Any], valid: ColumnElement[bool]) -> _Converted | None:
    if kind is ColumnKind.SQLITE_DATETIME:
        return normal, valid
    if kind is ColumnKind.ISO_TEXT:
        return _concat(func.substr(normal, 1, 10), "T", func.substr(normal, 12), "Z"), valid
    if kind.epoch is not None:
        seconds = cast(func.strftime("%s", func.substr(normal, 1, 19)), Integer())
        if kind is ColumnKind.EPOCH_MS:
            return seconds * 1000 + cast(func.substr(normal, 21, 3), Integer()), valid
        return seconds, valid
    return None


# -- PostgreSQL -------------------------------------------------------------------------------


def _pg_zoned(kind: ColumnKind, column: ColumnElement[Any]) -> _Converted | None:
    """The column's value as a `timestamptz`, and its condition (casts only under it)."""
    zoned_type = DateTime(timezone=True)
    if kind is ColumnKind.TIMESTAMPTZ:
        return column, column.is_not(None)
    if kind is ColumnKind.TIMESTAMP:  # naive is UTC
        return func.timezone("UTC", column, type_=zoned_type), column.is_not(None)
    unit = kind.epoch
    if unit is not None:
        ms = kind is ColumnKind.EPOCH_MS
        scale = 1000 if ms else 1
        valid = and_(column >= FIRST_SECOND * scale, column < END_SECOND * scale)
        if ms:
            whole = func.to_timestamp(func.div(column, 1000), type_=zoned_type)
            moment = whole + func.mod(column, 1000) * text("interval '1 millisecond'")
        else:
            moment = func.to_timestamp(column, type_=zoned_type)
        return case((valid, moment)), valid
    if kind is ColumnKind.ISO_TEXT:
        value = coerce(column, String())
        valid = value.op("~", return_type=Boolean())(_PG_ISO)
        zoned = value.op("~", return_type=Boolean())(_PG_ZONED)
        naive = func.timezone("UTC", cast(value, DateTime()), type_=zoned_type)
        moment = case((and_(valid, zoned), cast(value, zoned_type)), (valid, naive))
        return moment, valid
    return None


def _pg_as(kind: ColumnKind, moment: ColumnElement[Any], valid: ColumnElement[bool]) -> _Converted | None:
    utc = func.timezone("UTC", moment, type_=DateTime())
    if kind is ColumnKind.TIMESTAMPTZ:
        return moment, valid
    if kind is ColumnKind.TIMESTAMP:
        return utc, valid
    if kind is ColumnKind.ISO_TEXT:
        return func.to_char(utc, 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"', type_=String()), valid
    if kind.epoch is not None:
        seconds = func.extract("epoch", moment)
        scaled = seconds * 1000 if kind is ColumnKind.EPOCH_MS else seconds
        return cast(func.floor(scaled), BigInteger()), valid
    return None
