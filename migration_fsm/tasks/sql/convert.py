"""Timestamps converted inside the database, for `RowCopy`: a source column's time in the form
a target column holds it, with an SQL condition that holds exactly for the rows the record
path would read and write the same way (`TableMapping`'s readers and writers).

A row whose time fails the condition is not converted here: it goes the record path alone,
which converts it (another UTC offset, say) or names it in a `DataError`. Nothing here
raises for a bad value on SQLite; on PostgreSQL a cast is reached only by text of the shape
the condition admits, and a value it still refuses (a 30th of February) fails the statement,
whose batch then goes the record path as a whole.

SQLite: every time becomes the naive UTC text `YYYY-MM-DD HH:MM:SS.ffffff` first (what its
DATETIME columns hold), its form recognised by GLOB patterns and its date checked by `date()`,
then takes the target's form. PostgreSQL: every time becomes a `timestamptz` first.
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
#: PostgreSQL: ISO 8601 text's shapes (every digit 0) that `datetime.fromisoformat` and the
#: casts read alike: a T or a space between date and clock, 0 to 6 digits of fraction; no zone
#: (naive, UTC), or Z, +00:00 or -00:00 (zoned).
_PG_NAIVE: Final = tuple(
    f"0000-00-00{between}00:00:00" + ("." + "0" * digits if digits else "")
    for digits in range(7)
    for between in ("T", " ")
)
_PG_ZONED: Final = tuple(form + suffix for form in _PG_NAIVE for suffix in ("Z", "+00:00", "-00:00"))
#: The prefix of an expression's label that a statement computes once per row (`shared`).
SHARED: Final = "mfsm_shared_"
_Converted = tuple["ColumnElement[Any]", "ColumnElement[bool]"]
#: SQLite: `YYYY-MM-DD HH:MM:SS` (or with T) as a GLOB pattern.
_BASE: Final = "[0-9][0-9][0-9][0-9]-[0-9][0-9]-[0-9][0-9][ T][0-9][0-9]:[0-9][0-9]:[0-9][0-9]"
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
        # datetime() is strftime('%Y-%m-%d %H:%M:%S') at half its cost (SQLite 3.40: 0.31 and
        # 0.64 microseconds a value); the fraction's six digits are those of 1,000,000 plus it
        # (printf() and a concatenation cost as much as both together).
        seconds = func.datetime(column / 1000 if ms else column, "unixepoch")
        fraction = func.substr(1_000_000 + column % 1000 * 1000, 2) if ms else literal("000000")
        return _concat(seconds, ".", fraction), valid
    if kind not in _TEXT_KINDS:
        return None
    value = coerce(column, String())
    # Each accepted form (no fraction, or 3 or 6 digits of it; no zone, Z or +00:00) has a
    # length of its own: one GLOB for the form of the value's length (a GLOB costs about as
    # much as the rest of the check together), and the value converted by that length's
    # expression, which the condition guarantees. Other forms go the record path.
    length = func.length(value)
    shapes: dict[int, ColumnElement[bool]] = {}
    normals: dict[int, ColumnElement[Any]] = {}
    for digits, pad in ((6, ""), (0, ".000000"), (3, "000")):
        core = 19 + (1 + digits if digits else 0)
        for suffix in ("", "Z", "+00:00"):
            pattern = _BASE + ("." + "[0-9]" * digits if digits else "") + suffix
            shapes[core + len(suffix)] = value.op("GLOB", return_type=Boolean())(pattern)
            # The GLOB admits a T only between the date and the clock.
            whole = func.replace(value if not suffix else func.substr(value, 1, core), "T", " ")
            normals[core + len(suffix)] = _concat(whole, pad) if pad else whole
    shape = case(shapes, value=length)
    normal = case(normals, value=length)
    # The digits are digits (GLOB): the date must be one (date() with a modifier moves 02-30
    # to 03-02; without one it returns 02-30 as it is, so the modifier is needed), the
    # time of a 24-hour clock, the year not 0 (which Python has not).
    day, month, day_of_month = func.substr(value, 1, 10), func.substr(value, 6, 2), func.substr(value, 9, 2)
    valid = and_(
        shape,
        month.between("01", "12"),
        day_of_month >= "01",
        or_(day_of_month <= "28", func.date(day, "+0 days") == day),  # only for the last days of a month
        func.substr(value, 12, 2) < "24",
        func.substr(value, 15, 2) < "60",
        func.substr(value, 18, 2) < "60",
        func.substr(value, 1, 4) != "0000",
    )
    return normal, valid


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


def shared(expression: ColumnElement[Any], column: ColumnElement[Any]) -> ColumnElement[Any]:
    """`expression` (of `column`) marked as one a statement may compute once per row and use in
    several places (`rowcopy.computed_once`): labelled with the `SHARED` prefix and the
    column's name. Where no statement does so, it renders as the expression itself, each time."""
    return expression.label(SHARED + str(getattr(column, "name", "value")))


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
        # The text's shape with every digit a 0 (a regex costs ten times as much): one of the
        # shapes `datetime.fromisoformat` and the casts read alike; a 24-hour clock, seconds
        # below 60 (the casts take 24:00 and :60). A month 13 or a 30th of February still
        # passes here and fails the cast, and the statement: records explain it. The shape is
        # `shared`: a statement that can computes it once a row, not once for its check and
        # once for its value. The shape is most of what the conversion costs: in PostgreSQL 15,
        # 0.9 microseconds a value by nine replace() (a translate() of the nine digits took
        # 1.6, of the digits, T and + 2.3; a regex 2.7; the cast itself 0.4).
        value = coerce(column, String())
        zeroed: ColumnElement[Any] = value
        for digit in "123456789":  # nine replace() cost about half of one translate()
            zeroed = func.replace(zeroed, digit, "0", type_=String())
        shape = shared(zeroed, column)
        two = [func.substr(value, start, 2).collate("C") for start in (12, 15, 18)]
        valid = and_(
            shape.in_([literal(form) for form in (*_PG_NAIVE, *_PG_ZONED)]),
            two[0] < "24",
            two[1] < "60",
            two[2] < "60",
        )
        # Only text of a shape above reaches a cast (each IN of nine forms or more is one hash
        # lookup); a clock the condition refuses that a cast still takes (24:00) gives a value
        # no row that passes is written with.
        naive = func.timezone("UTC", cast(value, DateTime()), type_=zoned_type)
        zoned = cast(value, zoned_type)
        moment = case(
            (shape.in_([literal(form) for form in _PG_ZONED]), zoned),
            (shape.in_([literal(form) for form in _PG_NAIVE]), naive),
        )
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
