"""Column kinds and value conversions of the `sql` store: how a column holds its field
(`ColumnKind`), the writers of single fields, integer keys and their ranges in text order,
bind parameters, and the check of a page's key order."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from operator import itemgetter, lt
from typing import TYPE_CHECKING, Any, Final

from sqlalchemy import Boolean, Column, Float, Integer, Numeric, String, bindparam, or_
from sqlalchemy.sql.sqltypes import NullType

from migration_fsm.tasks.records import TaskRecord, to_utc

if TYPE_CHECKING:
    from sqlalchemy.sql.elements import ColumnElement

#: The largest integer key (BIGINT), and its number of digits.
MAX_INTEGER_KEY: Final = 2**63 - 1
MAX_KEY_DIGITS: Final = len(str(MAX_INTEGER_KEY))
#: `canonical_json` (same bytes), built once: JSON is the bulk of encoding a record.
canonical_json_fast: Final = json.JSONEncoder(
    sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
).encode
first_of: Final = itemgetter(0)


class ColumnKind(StrEnum):
    """How a column holds its field: text; JSON as text, or PostgreSQL's JSON types; a
    timestamp as SQLite DATETIME text (`2024-05-17 12:30:45.123456`, naive UTC), as ISO text
    (`2024-05-17T12:30:45.123456Z`), as a timestamp with or without a time zone, or as an
    integer count of seconds or milliseconds since 1970-01-01 UTC."""

    TEXT = "text"
    JSON_TEXT = "json_text"
    JSON = "json"
    JSONB = "jsonb"
    SQLITE_DATETIME = "sqlite_datetime"
    ISO_TEXT = "iso_text"
    TIMESTAMPTZ = "timestamptz"
    TIMESTAMP = "timestamp"
    EPOCH_SECONDS = "epoch_seconds"
    EPOCH_MS = "epoch_ms"

    @property
    def native_json(self) -> bool:
        """Whether the column is one of PostgreSQL's JSON types (not text holding JSON)."""
        return self in (ColumnKind.JSON, ColumnKind.JSONB)

    @property
    def holds_json(self) -> bool:
        """Whether the column holds JSON, as text or natively."""
        return self is ColumnKind.JSON_TEXT or self.native_json

    @property
    def zoned(self) -> bool:
        """Whether the column is a database timestamp type (with or without a time zone)."""
        return self in (ColumnKind.TIMESTAMPTZ, ColumnKind.TIMESTAMP)

    @property
    def epoch(self) -> timedelta | None:
        """For an integer count since 1970: the unit it counts; None for every other kind."""
        return _EPOCH_UNITS.get(self)

    @property
    def text_shape(self) -> tuple[int, dict[int, str]] | None:
        """For timestamps held as text: the shape the writers write (length, separators by
        position); None for every other kind."""
        return _TIME_TEXT_SHAPES.get(self)


#: `2024-05-17 12:30:45.123456` in a SQLite DATETIME, `2024-05-17T12:30:45.123456Z` in text.
_TIME_TEXT_SHAPES: Final = {
    ColumnKind.SQLITE_DATETIME: (26, {4: "-", 7: "-", 10: " ", 13: ":", 16: ":", 19: "."}),
    ColumnKind.ISO_TEXT: (27, {4: "-", 7: "-", 10: "T", 13: ":", 16: ":", 19: ".", 26: "Z"}),
}


#: The `epoch_units` config values, and the kinds they make of an integer time column.
EPOCH_KINDS: Final = {"s": ColumnKind.EPOCH_SECONDS, "ms": ColumnKind.EPOCH_MS}
_EPOCH_UNITS: Final = {
    ColumnKind.EPOCH_SECONDS: timedelta(seconds=1),
    ColumnKind.EPOCH_MS: timedelta(milliseconds=1),
}
EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)

Reader = Callable[[Any, str], Any]
Writer = Callable[[TaskRecord], Any]


def keys_in_order(after: str | None, rows: Sequence[Sequence[Any]]) -> bool:
    """Whether the rows' keys (the first column) are non-empty text, all above `after` and
    strictly ascending: the check `scan` makes, at C speed for a page that passes it."""
    keys = list(map(first_of, rows))
    return (
        {str} == set(map(type, keys))
        and keys[0] != ""
        and (after is None or after < keys[0])
        and all(map(lt, keys, keys[1:]))
    )


def bind_text(name: str) -> ColumnElement[Any]:
    """A text bind parameter."""
    return bindparam(name, type_=String())


def bind(param: str, column: Column[Any]) -> ColumnElement[Any]:
    """A bind parameter of the column's own type (text when the database did not say)."""
    return bindparam(param, type_=String() if isinstance(column.type, NullType) else column.type)


def identity_reader(value: Any, key: str) -> Any:  # noqa: ARG001  a Reader; key names the row in errors
    return value


def key_writer(record: TaskRecord) -> str:
    return record.key


def type_writer(record: TaskRecord) -> str:
    return record.type


def attempts_writer(record: TaskRecord) -> int:
    return record.attempts


def json_writer(field: str) -> Writer:
    def write(record: TaskRecord) -> str:
        return canonical_json_fast(getattr(record, field))

    return write


def time_writer(field: str, convert: Callable[[datetime], Any]) -> Writer:
    def write(record: TaskRecord) -> Any:
        value = getattr(record, field)
        return None if value is None else convert(value)

    return write


def integer_key(key: str) -> int | None:
    """The integer `key` is the canonical decimal text of (0 to `MAX_INTEGER_KEY`, no sign, no
    leading zero), or None."""
    if not (key.isascii() and key.isdigit()) or (key[0] == "0" and key != "0"):
        return None
    number = int(key)
    return number if number <= MAX_INTEGER_KEY else None


def integer_ranges(after: str | None, end: str | None = None) -> list[tuple[int, int]]:
    """For each number of digits, the range of integers with that many digits whose decimal
    text is above `after` (and not above `end`) in Python `str` order (no bound where None),
    empty ones left out. Digit strings of one length sort as their numbers, so each is one
    range of the key index, and a scan in text order is the merge of these ranges' scans."""
    ranges = []
    for digits in range(1, MAX_KEY_DIGITS + 1):
        first, last = (0 if digits == 1 else 10 ** (digits - 1)), min(10**digits - 1, MAX_INTEGER_KEY)
        low = first if after is None else _first_above(first, last, after)
        high = last if end is None else _first_above(first, last, end) - 1
        if low <= high:
            ranges.append((low, high))
    return ranges


def outside_ranges(key: ColumnElement[Any]) -> ColumnElement[bool]:
    """An integer key column's value that is in no range of `integer_ranges`: a negative one,
    or (SQLite, which keeps what it is given in a column that is no rowid) a real past the
    largest key or text, which sort after every number."""
    return or_(key < 0, key > MAX_INTEGER_KEY)


def _first_above(first: int, last: int, text: str) -> int:
    """The first of the numbers `first` to `last` (of one length) whose text is above `text`;
    `last` + 1 when none is."""
    low, high = first, last + 1
    while low < high:
        middle = (low + high) // 2
        if str(middle) > text:
            high = middle
        else:
            low = middle + 1
    return low


def fits(column: Column[Any], value: Any) -> bool:
    """Whether a constant value fits the column's type, as far as the type says."""
    kind = column.type
    if isinstance(kind, Boolean):
        return isinstance(value, bool)
    if isinstance(value, bool):
        return False
    if isinstance(kind, Integer):
        return isinstance(value, int)
    if isinstance(kind, Float | Numeric):
        return isinstance(value, int | float)
    if isinstance(kind, String):
        return isinstance(value, str) and (kind.length is None or len(value) <= kind.length)
    return isinstance(value, str | int | float)


def sqlite_datetime(value: datetime) -> str:
    """SQLAlchemy's SQLite DATETIME text, naive UTC (`2024-05-17 12:30:45.123456`)."""
    return to_utc(value).replace(tzinfo=None).isoformat(" ", "microseconds")


def utc_text_fast(value: datetime) -> str:
    """`records.utc_text` (same text), faster than strftime."""
    return to_utc(value).replace(tzinfo=None).isoformat("T", "microseconds") + "Z"


def epoch_writer(field: str, unit: timedelta) -> Writer:
    """Writes the field as whole `unit`s since 1970 (a finer part is cut off, toward the past)."""

    def convert(value: datetime) -> int:
        return (to_utc(value) - EPOCH) // unit

    return time_writer(field, convert)


def epoch_time(value: Any, unit: timedelta) -> datetime | None:
    """The UTC time `value` whole `unit`s after 1970, or None when `value` is not an integer
    count in the range of `datetime`."""
    if type(value) is not int:
        return None
    try:
        return EPOCH + value * unit
    except OverflowError:
        return None


def clip(value: Any, width: int = 60) -> str:
    shown = repr(value)
    return shown if len(shown) <= width else shown[: width - 3] + "..."


def time_text_like(existing: str, value: datetime) -> str | None:
    """`value` (UTC) written the way `existing` writes its timestamp in a text column: the same
    date/time separator, digits of fractional seconds and UTC suffix (`Z`, `+00:00` or none),
    so an update keeps a legacy table's format. None when `existing` is not such a UTC
    timestamp (then the column's writer decides)."""
    if len(existing) < 19 or existing[10] not in " T":
        return None
    rest = existing[19:]
    digits = 0
    if rest.startswith("."):
        digits = len(rest) - len(rest[1:].lstrip("0123456789")) - 1
        rest = rest[1 + digits :]
    if rest not in ("", "Z", "+00:00", "+0000") or not 0 <= digits <= 6:
        return None
    try:
        datetime.fromisoformat(existing.replace("Z", "+00:00"))
    except ValueError:
        return None
    utc = to_utc(value).replace(tzinfo=None)
    text = utc.strftime(f"%Y-%m-%d{existing[10]}%H:%M:%S")
    if digits:
        text += "." + f"{utc.microsecond:06d}"[:digits]
    return text + rest
