"""`TableMapping`: how the fields of a `TaskRecord` live in the columns of an existing table.

A column mapping names the column of each field (default: the column of the field's name;
`attempts`, `metadata` and `run_at` may be absent; `created_at` and `updated_at` may share
one column), a status mapping translates the stored status vocabulary, a type mapping the
stored task names, constants fill columns the record does not carry, and each column's type
decides its `ColumnKind`: how the field is held there, hence how it is read, written and
copied as a raw value. An integer key column holds keys that are the decimal text of a
non-negative integer; an integer time column counts seconds or milliseconds since 1970
(`epoch_units` says which).

(A little over 500 lines: the mapping's construction and its readers and writers are one
vocabulary; split, each half would reach into the other's privates.)
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any, Final

from sqlalchemy import (
    JSON,
    Boolean,
    Column,
    DateTime,
    Integer,
    String,
    bindparam,
    cast,
    type_coerce,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.sql.sqltypes import NullType

from migration_fsm.exceptions import ConfigError, DataError
from migration_fsm.tasks.records import TaskRecord, TaskStatus, to_utc
from migration_fsm.tasks.sql.columns import (
    EPOCH_KINDS,
    MAX_INTEGER_KEY,
    ColumnKind,
    Reader,
    Writer,
    attempts_writer,
    bind,
    clip,
    epoch_time,
    epoch_writer,
    fits,
    identity_reader,
    integer_key,
    json_writer,
    key_writer,
    sqlite_datetime,
    time_writer,
    type_writer,
    utc_text_fast,
)

if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence

    from sqlalchemy import Table
    from sqlalchemy.sql.elements import ColumnElement

#: Every `TaskRecord` field, key first.
FIELDS: Final = (
    "key", "type", "payload", "status", "attempts", "created_at", "updated_at", "metadata", "run_at",
)  # fmt: skip
#: Fields a table may lack when they are not mapped explicitly (read as their defaults; not
#: written, except that a `run_at` the table cannot hold is refused, never dropped).
OPTIONAL_FIELDS: Final = ("attempts", "metadata", "run_at")
#: Fields that may be mapped to the column of another field (`updated_at` to `created_at`'s).
SHARED_TIME: Final = ("created_at", "updated_at")


_Access = tuple["ColumnElement[Any]", "ColumnElement[Any]", Reader, Writer, ColumnKind]


@dataclass(frozen=True, slots=True)
class MappedField:
    """How one `TaskRecord` field is read from and written to its column."""

    name: str
    param: str
    column: Column[Any]
    select: ColumnElement[Any]
    bind: ColumnElement[Any]
    read: Reader
    write: Writer
    kind: ColumnKind  # how the column holds the field, for the raw copy


class TableMapping:
    """The fields of `TaskRecord` mapped onto `table`'s columns, for a store named `store`.

    `columns`, `status_map`, `type_map`, `constants` and `epoch_units` are the store's config keys
    (`SqlTaskStore` documents them);
    a field or column that does not fit is a `ConfigError` naming the store and the key.
    `dialect` is the database's dialect name. `key_order` (the key as it sorts in code
    point order), `key_range_indexed` (a range of `key_order` is read from an index) and
    `key_unique` (a unique index on the key alone, for `ON CONFLICT (key)`) are what the
    database says about the key column; `dialects.probe_key` finds them out."""

    def __init__(
        self,
        store: str,
        table: Table,
        *,
        dialect: str,
        columns: Mapping[str, str] | None = None,
        status_map: Mapping[str, str] | None = None,
        type_map: Mapping[str, str] | None = None,
        constants: Mapping[str, Any] | None = None,
        table_name: str | None = None,
        epoch_units: Mapping[str, str] | None = None,
    ) -> None:
        self.store = store
        self.table = table
        self.table_name = table_name or table.name
        self.dialect = dialect
        columns = dict(columns or {})
        #: time field -> "s" or "ms": the unit an integer column of that field counts.
        self.epoch_units = dict(epoch_units or {})
        for field, unit in self.epoch_units.items():
            if field not in ("created_at", "updated_at", "run_at") or unit not in EPOCH_KINDS:
                raise ConfigError(
                    f"store '{store}': epoch_units.{field} = {unit!r}: name a time field (created_at,"
                    ' updated_at, run_at) and "s" or "ms" (seconds or milliseconds since 1970)'
                )
        for field in columns:
            if field not in FIELDS:
                raise ConfigError(
                    f"store '{store}': columns.{field}: '{field}' is not a task field ({', '.join(FIELDS)})"
                )
        self.read_status, self.write_status = self._status_maps(
            columns.get("status", "status"), dict(status_map or {})
        )
        #: stored task name -> record type, and back (the first stored name of a type); both
        #: None without a type map (the stored name is the type).
        self.read_type: dict[str, str] | None = None
        self.write_type: dict[str, str] | None = None
        if type_map:
            self.read_type, self.write_type = dict(type_map), {}
            for stored, type_ in type_map.items():
                self.write_type.setdefault(type_, stored)
        #: Whether `updated_at` is read from `created_at`'s column (and never written).
        self.shared_time = False
        self.fields: list[MappedField] = self._map_fields(columns)
        self.by_name: dict[str, MappedField] = {field.name: field for field in self.fields}
        self.key_column: Column[Any] = self.fields[0].column
        self.status_column: Column[Any] = self.by_name["status"].column
        #: Whether the key column holds integers (keys are their decimal text).
        self.integer_key = isinstance(self.key_column.type, Integer)
        #: Whether the table can hold a scheduled time.
        self.keeps_run_at = "run_at" in self.by_name
        #: Columns no field maps, written with a constant value on insert.
        self.constants: dict[Column[Any], Any] = self._constants(dict(constants or {}))
        self.key_order: ColumnElement[Any] = (
            self.key_column.collate("BINARY")
            if dialect == "sqlite" and not self.integer_key
            else self.key_column
        )
        self.key_range_indexed = False
        self.key_unique = False
        #: Whether the key is unique through any index on it alone, partial ones included
        #: (`SqlTaskStore` refuses a table where it is not: writers would duplicate keys).
        self.key_unique_anyhow = False

    # -- construction -----------------------------------------------------------------

    def _status_maps(
        self, column_name: str, status_map: dict[str, str]
    ) -> tuple[dict[Any, TaskStatus], dict[TaskStatus, Any]]:
        numeric = column_name in self.table.c and isinstance(self.table.c[column_name].type, Integer)
        pairs = status_map.items() if status_map else ((s.value, s.value) for s in TaskStatus)
        read: dict[Any, TaskStatus] = {}
        write: dict[TaskStatus, Any] = {}
        for stored_text, status_text in pairs:
            try:
                status = TaskStatus(status_text)
            except ValueError as exc:
                raise ConfigError(
                    f"store '{self.store}': status_map.{stored_text}: '{status_text}' is not one of"
                    f" {', '.join(TaskStatus)}"
                ) from exc
            stored: Any = stored_text
            if numeric:
                try:
                    stored = int(stored_text)
                except ValueError as exc:
                    raise ConfigError(
                        f"store '{self.store}': status_map.{stored_text}: column '{column_name}' holds"
                        " integers, so every stored status must be one"
                    ) from exc
            read[stored] = status
            write.setdefault(status, stored)
        return read, write

    def _map_fields(self, columns: dict[str, str]) -> list[MappedField]:
        fields: list[MappedField] = []
        used: dict[str, str] = {}
        for field in FIELDS:
            column_name = columns.get(field, field)
            if column_name not in self.table.c:
                if field in OPTIONAL_FIELDS and field not in columns:
                    continue
                how = f"columns.{field}" if field in columns else f"the default for field '{field}'"
                raise ConfigError(
                    f"store '{self.store}': table '{self.table_name}' has no column '{column_name}'"
                    f" ({how}; columns: {', '.join(self.table.c.keys())})"
                )
            if column_name in used and (used[column_name], field) == SHARED_TIME:
                self.shared_time = True  # one column for both: it holds created_at
                continue
            if column_name in used:
                raise ConfigError(
                    f"store '{self.store}': columns.{field}: column '{column_name}' is already mapped to"
                    f" field '{used[column_name]}' (only created_at and updated_at may share a column)"
                )
            used[column_name] = field
            fields.append(self._field(field, self.table.c[column_name]))
        return fields

    def _field(self, field: str, column: Column[Any]) -> MappedField:
        """How `field` is read from and written to `column`, by the column's type."""
        problem = (
            f"store '{self.store}': column '{column.name}' (field '{field}') has type {column.type!r},"
            " which cannot hold"
        )
        param = f"mfsm_v_{field}"
        if field in ("payload", "metadata"):
            access = self._json_access(field, column, param)
        elif field in ("created_at", "updated_at", "run_at"):
            access = self._time_access(field, column, param)
        else:
            access = self._plain_access(field, column, param)
        if access is None:
            wanted = {
                "payload": "JSON (use a JSON or text column)",
                "metadata": "JSON (use a JSON or text column)",
                "created_at": "a timestamp (use a timestamp or text column)",
                "updated_at": "a timestamp (use a timestamp or text column)",
                "run_at": "a timestamp (use a timestamp or text column)",
                "attempts": "a count (use an integer column)",
                "status": "a status (use a text or integer column)",
                "key": "a key (use a text or integer column)",
            }.get(field, "text (use a text column)")
            raise ConfigError(f"{problem} {wanted}")
        selected, bound, read, write, kind = access
        return MappedField(field, param, column, selected, bound, read, write, kind)

    def _json_access(self, field: str, column: Column[Any], param: str) -> _Access | None:
        kind, read, write = column.type, self._json_reader(field, column), json_writer(field)
        if isinstance(kind, JSON):
            if self.dialect == "sqlite":  # JSON is text there: read it raw, so a bad value names its key
                text_bind = bindparam(param, type_=String())
                return type_coerce(column, String()), text_bind, read, write, ColumnKind.JSON_TEXT
            how = ColumnKind.JSONB if isinstance(kind, JSONB) else ColumnKind.JSON
            return column, cast(bindparam(param, type_=String()), kind), read, write, how
        if isinstance(kind, String | NullType):
            return column, bind(param, column), read, write, ColumnKind.JSON_TEXT
        return None

    def _time_access(self, field: str, column: Column[Any], param: str) -> _Access | None:
        kind, read = column.type, self._time_reader(column, nullable=field == "run_at")
        unit = self.epoch_units.get(field)
        if isinstance(kind, Integer) and not isinstance(kind, Boolean):
            if unit is None:
                raise ConfigError(
                    f"store '{self.store}': column '{column.name}' (field '{field}') holds integers: say"
                    f' what they count with epoch_units.{field} = "s" (seconds since 1970) or "ms"'
                    " (milliseconds)"
                )
            how = EPOCH_KINDS[unit]
            read = self._epoch_reader(column, how, nullable=field == "run_at")
            return column, bind(param, column), read, epoch_writer(field, how.epoch), how  # type: ignore[arg-type]
        if unit is not None:
            raise ConfigError(
                f"store '{self.store}': epoch_units.{field}: column '{column.name}' has type"
                f" {column.type!r}, not an integer type; remove the key"
            )
        if isinstance(kind, DateTime):
            if (
                self.dialect == "sqlite"
            ):  # DATETIME is text there: write SQLAlchemy's format, parse it ourselves
                write = time_writer(field, sqlite_datetime)
                text_bind = bindparam(param, type_=String())
                return type_coerce(column, String()), text_bind, read, write, ColumnKind.SQLITE_DATETIME
            if kind.timezone:
                return column, bind(param, column), read, time_writer(field, to_utc), ColumnKind.TIMESTAMPTZ
            write = time_writer(field, lambda v: to_utc(v).replace(tzinfo=None))
            return column, bind(param, column), read, write, ColumnKind.TIMESTAMP
        if isinstance(kind, String | NullType):
            return column, bind(param, column), read, time_writer(field, utc_text_fast), ColumnKind.ISO_TEXT
        return None

    def _plain_access(self, field: str, column: Column[Any], param: str) -> _Access | None:
        kind = column.type
        read: Reader
        write: Writer
        if field == "attempts":
            if not isinstance(kind, Integer | NullType):
                return None
            read, write = self._attempts_reader(column), attempts_writer
        elif field == "status":
            if not isinstance(kind, String | Integer | NullType):
                return None
            read, write = self._status_reader(column), self._status_writer(column)
        elif field == "key" and isinstance(kind, Integer) and not isinstance(kind, Boolean):
            read, write = identity_reader, self._integer_key_writer(column)
        elif not isinstance(kind, String | NullType):
            return None
        elif field == "key":
            read, write = identity_reader, key_writer
        elif self.read_type is not None:
            read, write = self._type_reader(column), self._type_writer(column)
        else:
            read, write = self._text_reader(column), type_writer
        return column, bind(param, column), read, write, ColumnKind.TEXT

    def _constants(self, constants: dict[str, Any]) -> dict[Column[Any], Any]:
        """The constant columns, checked: each exists, no field maps it, its value fits it."""
        mapped = {field.column.name: field.name for field in self.fields}
        checked: dict[Column[Any], Any] = {}
        for name, value in constants.items():
            where = f"store '{self.store}': constants.{name}:"
            if name not in self.table.c:
                raise ConfigError(
                    f"{where} table '{self.table_name}' has no column '{name}'"
                    f" (columns: {', '.join(self.table.c.keys())})"
                )
            if name in mapped:
                raise ConfigError(
                    f"{where} column '{name}' holds the field '{mapped[name]}'; a constant is for a"
                    " column the record does not carry"
                )
            column = self.table.c[name]
            if not fits(column, value):
                raise ConfigError(f"{where} {value!r} does not fit column '{name}' of type {column.type!r}")
            checked[column] = value
        return checked

    # -- readers and writers ----------------------------------------------------------

    def duplicate(self, key: str) -> DataError:
        """The error for a key that appears in more than one row."""
        return DataError(
            f"store '{self.store}': key {key!r} appears more than once in column '{self.key_column.name}'"
        )

    def bad(self, key: str, column: Column[Any], what: str) -> DataError:
        """The error for a value of `column` in the row of `key` that does not fit its field."""
        return DataError(f"store '{self.store}': key {key!r}: column '{column.name}' {what}")

    def _text_reader(self, column: Column[Any]) -> Reader:
        def read(value: Any, key: str) -> str:
            if not isinstance(value, str):
                raise self.bad(key, column, f"holds {value!r}, not text")
            return value

        return read

    def _status_reader(self, column: Column[Any]) -> Reader:
        statuses = self.read_status

        def read(value: Any, key: str) -> TaskStatus:
            try:
                return statuses[value]
            except (KeyError, TypeError):
                raise self.bad(
                    key, column, f"holds status {value!r}, which the status map does not map"
                    f" (mapped: {', '.join(str(v) for v in statuses)})"
                ) from None  # fmt: skip

        return read

    def _status_writer(self, column: Column[Any]) -> Writer:
        statuses = self.write_status

        def write(record: TaskRecord) -> Any:
            try:
                return statuses[record.status]
            except KeyError:
                raise ConfigError(
                    f"store '{self.store}': key {record.key!r}: no stored value for status"
                    f" '{record.status}' in the status map of column '{column.name}'"
                ) from None

        return write

    def _attempts_reader(self, column: Column[Any]) -> Reader:
        def read(value: Any, key: str) -> int:
            if value is None:
                return 0
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise self.bad(key, column, f"holds {value!r}, not a count of attempts")
            return value

        return read

    def _json_reader(self, field: str, column: Column[Any]) -> Reader:
        nullable = field == "metadata"

        def read(value: Any, key: str) -> dict[str, Any]:
            if value is None and nullable:
                return {}
            if isinstance(value, str | bytes):
                try:
                    value = json.loads(value)
                except ValueError as exc:
                    raise self.bad(key, column, f"is not JSON ({exc}): {clip(value)}") from None
            if not isinstance(value, dict):
                raise self.bad(key, column, f"holds {clip(value)}, not a JSON object")
            return value

        return read

    def _type_reader(self, column: Column[Any]) -> Reader:
        names = self.read_type or {}

        def read(value: Any, key: str) -> str:
            try:
                return names[value]
            except (KeyError, TypeError):
                raise self.bad(
                    key, column, f"holds task name {value!r}, which the type map does not map"
                    f" (mapped: {', '.join(names)})"
                ) from None  # fmt: skip

        return read

    def _type_writer(self, column: Column[Any]) -> Writer:
        names = self.write_type or {}

        def write(record: TaskRecord) -> str:
            try:
                return names[record.type]
            except KeyError:
                raise DataError(
                    f"store '{self.store}': key {record.key!r}: type {record.type!r} has no stored task"
                    f" name in the type map of column '{column.name}' (mapped types:"
                    f" {', '.join(names)}); refused rather than guessed, so no other task runs"
                ) from None

        return write

    def _integer_key_writer(self, column: Column[Any]) -> Writer:
        def write(record: TaskRecord) -> Any:
            return self.key_value(record.key, column)

        return write

    def key_value(self, key: str, column: Column[Any] | None = None) -> Any:
        """`key` as the key column holds it: itself, or for an integer key column the integer
        it is the decimal text of (a `DataError` naming the key otherwise)."""
        if not self.integer_key:
            return key
        number = integer_key(key)
        if number is None:
            name = (column if column is not None else self.key_column).name
            raise DataError(
                f"store '{self.store}': key {key!r}: column '{name}' holds integers, and the key is not"
                f" the decimal text of one from 0 to {MAX_INTEGER_KEY} (no sign, no leading zeros)"
            )
        return number

    def key_text(self, value: Any) -> str:
        """The key of a stored key value: text as it is; an integer as its decimal text (a
        `DataError` for a negative one, which would not scan in order)."""
        if type(value) is int:
            if value < 0:
                raise DataError(
                    f"store '{self.store}': column '{self.key_column.name}' holds the negative key"
                    f" {value}; integer keys must be 0 or more"
                )
            return str(value)
        if value is None or value == "":
            raise DataError(
                f"store '{self.store}': column '{self.key_column.name}' holds an empty key ({value!r});"
                " every task needs one"
            )
        if self.integer_key or not isinstance(value, str):
            raise DataError(
                f"store '{self.store}': column '{self.key_column.name}' holds the key {value!r}, which is"
                f" no {'integer of 0 or more' if self.integer_key else 'text'}: fix or remove that row"
            )
        return value

    def _epoch_reader(self, column: Column[Any], kind: ColumnKind, *, nullable: bool = False) -> Reader:
        unit, what = kind.epoch, kind.value.removeprefix("epoch_").replace("ms", "milliseconds")
        assert unit is not None

        def read(value: Any, key: str) -> datetime | None:
            if value is None and nullable:
                return None
            found = epoch_time(value, unit)
            if found is None:
                raise self.bad(key, column, f"holds {value!r}, not a count of {what} since 1970")
            return found

        return read

    def _time_reader(self, column: Column[Any], *, nullable: bool = False) -> Reader:
        def read(value: Any, key: str) -> datetime | None:
            if value is None and nullable:
                return None
            if isinstance(value, str):
                try:
                    value = datetime.fromisoformat(value)
                except ValueError:
                    raise self.bad(key, column, f"holds {value!r}, not an ISO 8601 timestamp") from None
            if not isinstance(value, datetime):
                raise self.bad(key, column, f"holds {value!r}, not a timestamp")
            return value  # TaskRecord makes it UTC (a naive one is UTC already)

        return read

    def decode(self, row: Sequence[Any]) -> TaskRecord:
        """The record of a row of the mapped columns, in field order (a `DataError` naming the
        key and the column when a value does not fit)."""
        key = self.key_text(row[0])
        values = {field.name: field.read(value, key) for field, value in zip(self.fields, row, strict=True)}
        values["key"] = key
        if self.shared_time:
            values["updated_at"] = values["created_at"]
        return TaskRecord(**values)

    def encode(self, record: TaskRecord) -> tuple[Any, ...]:
        """The record's column values, in field order, ready for the driver."""
        if not isinstance(record.key, str) or not record.key:
            raise DataError(
                f"store '{self.store}': column '{self.key_column.name}': a task with an empty key"
                f" ({record.key!r}) cannot be written"
            )
        if record.run_at is not None and not self.keeps_run_at:
            raise DataError(
                f"store '{self.store}': key {record.key!r}: table '{self.table_name}' has no run_at"
                f" column, so the task's scheduled time ({record.run_at.isoformat()}) cannot be kept;"
                " refused rather than dropped, since the task would run early (add a column, or map"
                " one with columns.run_at)"
            )
        try:
            return tuple([field.write(record) for field in self.fields])
        except (TypeError, ValueError):
            for field in self.fields:  # find the field, for the message
                try:
                    field.write(record)
                except (TypeError, ValueError) as exc:
                    raise self.bad(record.key, field.column, f"cannot hold the {field.name}: {exc}") from exc
            raise
