"""`SqlTaskStore`: a `TaskStore` over a table that already exists, in any SQLAlchemy database.

The table is reflected once, when the store is built, and used as it is: a column mapping
names the column of each `TaskRecord` field, a status mapping translates the stored status
vocabulary, and every column the store does not map keeps its database default on insert
and its value on update. Payload and metadata may be JSON columns or text columns holding
JSON; timestamps may be timezone-aware, naive (read as UTC) or ISO 8601 text.

Upserts are portable: within one transaction the batch's existing keys are selected, those
rows are updated and the rest inserted, so the key column only needs to be unique through
some index (primary key, plain or partial unique index). Two writers inserting the same new
key race on that index; the loser's transaction is rolled back and retried once, and the
retry finds the row and updates it.

`scan` returns keys in Python `str` order on every database: SQLite compares with `BINARY`
(UTF-8 bytes, which is code point order); on PostgreSQL the key column's collation is
probed once and, unless it already sorts by code point, scans compare and sort with
`COLLATE "C"` (fast only with an index on `(key COLLATE "C")`; a warning says so).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from operator import itemgetter, lt
from typing import TYPE_CHECKING, Any, Final, NoReturn

from sqlalchemy import (
    JSON,
    Boolean,
    Column,
    Connection,
    DateTime,
    Engine,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    and_,
    bindparam,
    case,
    cast,
    delete,
    false,
    func,
    insert,
    inspect,
    literal,
    literal_column,
    or_,
    select,
    text,
    type_coerce,
    update,
)
from sqlalchemy import exc as sa_exc
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.sql.sqltypes import NullType

from migration_fsm.exceptions import ConfigError, DatabaseUnavailable, DataError, MigrationFSMError
from migration_fsm.journal.db import make_engine, safe_url, scrub
from migration_fsm.log import get_logger
from migration_fsm.tasks.identity import IdentityRow, checksum_of
from migration_fsm.tasks.records import TaskRecord, TaskStatus, TaskStore, is_behind, to_utc

if TYPE_CHECKING:
    from sqlalchemy.engine.interfaces import Dialect
    from sqlalchemy.sql.dml import UpdateBase
    from sqlalchemy.sql.elements import ColumnElement
    from sqlalchemy.sql.selectable import Select

#: Every `TaskRecord` field, key first.
FIELDS: Final = ("key", "type", "payload", "status", "attempts", "created_at", "updated_at", "metadata")
#: Fields a table may lack when they are not mapped explicitly (read as their defaults, not written).
OPTIONAL_FIELDS: Final = ("attempts", "metadata")
#: Keys per `IN (...)` when looking up which keys of a batch exist (below every database's limit).
KEY_LOOKUP_CHUNK: Final = 500
#: Strings whose order separates code-point order from every linguistic collation.
_COLLATION_PROBE: Final = (
    "a", "B", "Z", "z", "A", "_", "-", ".", " ", "0", "9", "a b", "a-b", "a_b", "ab", "aB",
    "Ab", "e", "é", "f", "E", "É", "ß", "ss", "z\u00e9", "\u00e9z", "日本", "😀", "~", "a0",
)  # fmt: skip
#: `canonical_json` (same bytes), built once: JSON is the bulk of encoding a record.
_canonical_json: Final = json.JSONEncoder(
    sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
).encode
_CODE_POINT_COLLATIONS: Final = ("C", "POSIX", "ucs_basic")
_first: Final = itemgetter(0)
_last: Final = itemgetter(-1)
_status_of: Final = itemgetter(4)  # of an identity row
#: The shape of the timestamp text the writers write (length, separators by position):
#: `2024-05-17 12:30:45.123456` in a SQLite DATETIME, `2024-05-17T12:30:45.123456Z` in text.
_TIME_TEXT_SHAPES: Final = {
    "sqlite_datetime": (26, {4: "-", 7: "-", 10: " ", 13: ":", 16: ":", 19: "."}),
    "iso_text": (27, {4: "-", 7: "-", 10: "T", 13: ":", 16: ":", 19: ".", 26: "Z"}),
}
#: How a column holds its field (`_Field.kind`): JSON as text, or PostgreSQL's JSON types; a
#: timestamp as SQLite DATETIME text (`2024-05-17 12:30:45.123456`, naive UTC), as ISO text
#: (`2024-05-17T12:30:45.123456Z`), or as a timestamp with or without a time zone.
_KIND_TEXT: Final = "text"
_KIND_JSON_TEXT: Final = "json_text"
_KIND_JSON: Final = "json"
_KIND_JSONB: Final = "jsonb"
_KIND_SQLITE_DATETIME: Final = "sqlite_datetime"
_KIND_ISO_TEXT: Final = "iso_text"
_KIND_TIMESTAMPTZ: Final = "timestamptz"
_KIND_TIMESTAMP: Final = "timestamp"

Reader = Callable[[Any, str], Any]
Writer = Callable[[TaskRecord], Any]
_Access = tuple["ColumnElement[Any]", "ColumnElement[Any]", Reader, Writer, str]


@dataclass(frozen=True, slots=True)
class _Field:
    """How one `TaskRecord` field is read from and written to its column."""

    name: str
    param: str
    column: Column[Any]
    select: ColumnElement[Any]
    bind: ColumnElement[Any]
    read: Reader
    write: Writer
    kind: str  # how the column holds the field (one of the `_KIND_*` names), for the raw copy


@dataclass(frozen=True, slots=True)
class _DriverStatement:
    """A statement compiled once, for the driver's executemany: `positions` orders a row's
    field values for a positional paramstyle; otherwise `names` keys them."""

    sql: str
    positions: tuple[int, ...] | None
    names: tuple[str, ...] = ()

    def params(self, rows: Sequence[tuple[Any, ...]]) -> Sequence[Any]:
        if self.positions is None:
            names = self.names
            return [dict(zip(names, row, strict=True)) for row in rows]
        positions = self.positions
        if positions == tuple(range(len(positions))):
            return rows  # already in the statement's order
        return [tuple([row[i] for i in positions]) for row in rows]


@dataclass(frozen=True, slots=True)
class _Query:
    """A SELECT compiled once, run through the driver: its own literals are kept, and the
    values named at run time are added to them."""

    sql: str
    positions: tuple[str, ...] | None  # bind names in order, for a positional paramstyle
    fixed: Mapping[str, Any]

    @classmethod
    def compile(cls, stmt: ColumnElement[Any] | Select[Any], dialect: Dialect) -> _Query:
        compiled = stmt.compile(dialect=dialect)
        positions = tuple(compiled.positiontup or ()) if compiled.positional else None
        return cls(str(compiled), positions, dict(compiled.params))

    def params(self, **values: Any) -> tuple[Any, ...] | dict[str, Any]:
        merged = {**self.fixed, **values}
        if self.positions is None:
            return merged
        return tuple([merged[name] for name in self.positions])


#: Keys per `IN (...)` list in `get_many` (well under every driver's parameter limit).
_GET_MANY_CHUNK: Final = 500


class SqlTaskStore:
    """A `TaskStore` over an existing table, through a column mapping and a status mapping.

    `columns` maps a `TaskRecord` field to its column (default: the column of the same
    name; `attempts` and `metadata` may be absent, then they read as 0 and {} and are not
    written). `status_map` maps a stored value to a `TaskStatus` value; several stored values
    may map to one status and writes use the first (default: the stored values are the
    `TaskStatus` values). A table or mapped column that does not exist is a `ConfigError`
    (exit 2); a row the store cannot read, or a record it cannot write, is a `DataError`
    (exit 1) naming the store, the column and the key. `engine` shares an engine the caller
    owns; otherwise the store makes one and `close()` disposes of it.
    """

    def __init__(
        self,
        url: str,
        table: str,
        *,
        name: str = "sql",
        columns: Mapping[str, str] | None = None,
        status_map: Mapping[str, str] | None = None,
        schema: str | None = None,
        engine: Engine | None = None,
    ) -> None:
        self.name = name
        self.url = url
        self.safe_url = safe_url(url)
        self.table_name = table if schema is None else f"{schema}.{table}"
        self._owns_engine = engine is None
        if engine is None:
            try:
                engine = make_engine(url, wal=False)
            except DatabaseUnavailable as exc:  # a missing SQLite file: the table cannot exist
                raise ConfigError(
                    f"store '{name}': database {self.safe_url} does not exist, so table '{table}' does not"
                ) from exc
            except ConfigError as exc:
                raise ConfigError(f"store '{name}': {exc}") from exc
        self.engine = engine
        try:
            self._setup(table, schema, dict(columns or {}), dict(status_map or {}))
        except BaseException:
            self.close()
            raise

    # -- construction -----------------------------------------------------------------

    def _setup(
        self, table: str, schema: str | None, columns: dict[str, str], status_map: dict[str, str]
    ) -> None:
        self._dialect = self.engine.dialect.name
        for field in columns:
            if field not in FIELDS:
                raise ConfigError(
                    f"store '{self.name}': columns.{field}: '{field}' is not a task field"
                    f" ({', '.join(FIELDS)})"
                )
        with self._connect(readonly=True) as conn:
            try:
                self.table = Table(table, MetaData(), schema=schema, autoload_with=conn)
            except sa_exc.NoSuchTableError as exc:
                raise ConfigError(
                    f"store '{self.name}': table '{self.table_name}' does not exist in {self.safe_url}"
                ) from exc
            self._read_status, self._write_status = self._status_maps(
                columns.get("status", "status"), status_map
            )
            self._fields = self._map_fields(columns)
            key = self._fields[0].column
            self._key_column = key
            self._status_column = next(f.column for f in self._fields if f.name == "status")
            self._key_order = self._ordering_key(conn, key)
            key_range_indexed, self._key_unique = self._key_indexes(conn, key)

        self._by_name = {field.name: field for field in self._fields}
        self._dbapi_error: type[Exception] = self.engine.dialect.loaded_dbapi.Error
        self._select = select(*(field.select for field in self._fields))
        self._insert = self._driver_statement(
            insert(self.table).values({f.column: f.bind for f in self._fields})
        )
        self._update = self._driver_statement(
            update(self.table)
            .where(key == self._fields[0].bind)
            .values({f.column: f.bind for f in self._fields[1:]})
        )
        dialect = self.engine.dialect
        # Whether any key of a batch exists, in one probe of the key index (exact: the
        # batch's keys lie between its first and last in code point order).
        self._key_range = (
            _Query.compile(
                select(key)
                .where(self._key_order >= _bind_text("mfsm_low"), self._key_order <= _bind_text("mfsm_high"))
                .limit(1),
                dialect,
            )
            if key_range_indexed
            else None
        )
        self._identity_queries = {
            after: _Query.compile(self._identity_select(after), dialect) for after in (False, True)
        }
        # SQLite: a write that writes nothing, to take the write lock of this database alone.
        self._write_lock_sql = str(delete(self.table).where(false()).compile(dialect=dialect))
        self._forward: dict[TaskStatus | None, _DriverStatement] = {}  # `put`'s and `put_forward`'s
        self._copy_sql: str | None = None
        if self._dialect == "postgresql" and dialect.driver == "psycopg":
            preparer = dialect.identifier_preparer
            names = ", ".join(preparer.quote(field.column.name) for field in self._fields)
            self._copy_sql = f"COPY {preparer.format_table(self.table)} ({names}) FROM STDIN"

    def _key_indexes(self, conn: Connection, key: Column[Any]) -> tuple[bool, bool]:
        """(whether a range of `_key_order` can be read from an index rather than the whole
        table, whether on SQLite a whole unique index is on the key alone, so that
        `ON CONFLICT (key)` names it)."""
        if self._dialect == "postgresql":  # the column's own collation is code point order, or not
            return self._key_order is key, self._pg_key_unique(conn, key)
        if self._dialect != "sqlite":
            return False, False
        preparer = self.engine.dialect.identifier_preparer
        schema = f"{preparer.quote_identifier(self.table.schema)}." if self.table.schema else ""
        table = preparer.quote_identifier(self.table.name)
        ranged = unique = False
        for index in conn.exec_driver_sql(f"PRAGMA {schema}index_list({table})").mappings().all():
            if index["partial"]:
                continue
            name = preparer.quote_identifier(index["name"])
            info = conn.exec_driver_sql(f"PRAGMA {schema}index_xinfo({name})").mappings().all()
            columns = [row for row in info if row["key"]]
            if columns and columns[0]["name"] == key.name and columns[0]["coll"] == "BINARY":
                ranged = True
                unique = unique or (bool(index["unique"]) and len(columns) == 1)
        return ranged, unique

    def _pg_key_unique(self, conn: Connection, key: Column[Any]) -> bool:
        """Whether a whole unique constraint or index is on the key alone (`ON CONFLICT (key)`)."""
        inspector = inspect(conn)
        table, schema = self.table.name, self.table.schema
        if inspector.get_pk_constraint(table, schema=schema).get("constrained_columns") == [key.name]:
            return True
        if any(
            c["column_names"] == [key.name] for c in inspector.get_unique_constraints(table, schema=schema)
        ):
            return True
        return any(
            index["unique"]
            and index["column_names"] == [key.name]
            and not index.get("dialect_options", {}).get("postgresql_where")
            for index in inspector.get_indexes(table, schema=schema)
        )

    def _identity_select(self, with_after: bool) -> Select[Any]:
        """key, type, payload (text), created_at, status (a TaskStatus value, NULL when the
        status map does not map it), attempts: the identity row, read without decoding."""
        fields = self._by_name
        payload = fields["payload"]
        status = fields["status"].column
        attempts = fields.get("attempts")
        stmt = (
            select(
                self._key_column,
                fields["type"].column,
                _json_text(payload),
                fields["created_at"].column,
                case({stored: str(value) for stored, value in self._read_status.items()}, value=status),
                func.coalesce(attempts.column, 0) if attempts is not None else literal(0, Integer()),
            )
            .order_by(self._key_order)
            .limit(bindparam("mfsm_limit", type_=Integer()))
        )
        return stmt.where(self._key_order > _bind_text("mfsm_after")) if with_after else stmt

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
                    f"store '{self.name}': status_map.{stored_text}: '{status_text}' is not one of"
                    f" {', '.join(TaskStatus)}"
                ) from exc
            stored: Any = stored_text
            if numeric:
                try:
                    stored = int(stored_text)
                except ValueError as exc:
                    raise ConfigError(
                        f"store '{self.name}': status_map.{stored_text}: column '{column_name}' holds"
                        " integers, so every stored status must be one"
                    ) from exc
            read[stored] = status
            write.setdefault(status, stored)
        return read, write

    def _map_fields(self, columns: dict[str, str]) -> list[_Field]:
        fields: list[_Field] = []
        used: dict[str, str] = {}
        for field in FIELDS:
            column_name = columns.get(field, field)
            if column_name not in self.table.c:
                if field in OPTIONAL_FIELDS and field not in columns:
                    continue
                how = f"columns.{field}" if field in columns else f"the default for field '{field}'"
                raise ConfigError(
                    f"store '{self.name}': table '{self.table_name}' has no column '{column_name}'"
                    f" ({how}; columns: {', '.join(self.table.c.keys())})"
                )
            if column_name in used:
                raise ConfigError(
                    f"store '{self.name}': columns.{field}: column '{column_name}' is already mapped to"
                    f" field '{used[column_name]}'"
                )
            used[column_name] = field
            fields.append(self._field(field, self.table.c[column_name]))
        return fields

    def _field(self, field: str, column: Column[Any]) -> _Field:
        """How `field` is read from and written to `column`, by the column's type."""
        kind = column.type
        problem = (
            f"store '{self.name}': column '{column.name}' (field '{field}') has type {kind!r},"
            " which cannot hold"
        )
        param = f"mfsm_v_{field}"
        if field in ("payload", "metadata"):
            access = self._json_access(field, column, param)
        elif field in ("created_at", "updated_at"):
            access = self._time_access(field, column, param)
        else:
            access = self._plain_access(field, column, param)
        if access is None:
            wanted = {
                "payload": "JSON (use a JSON or text column)",
                "metadata": "JSON (use a JSON or text column)",
                "created_at": "a timestamp (use a timestamp or text column)",
                "updated_at": "a timestamp (use a timestamp or text column)",
                "attempts": "a count (use an integer column)",
                "status": "a status (use a text or integer column)",
            }.get(field, "text (use a text column)")
            raise ConfigError(f"{problem} {wanted}")
        selected, bind, read, write, how = access
        return _Field(field, param, column, selected, bind, read, write, how)

    def _json_access(self, field: str, column: Column[Any], param: str) -> _Access | None:
        kind, read, write = column.type, self._json_reader(field, column), _json_writer(field)
        if isinstance(kind, JSON):
            if self._dialect == "sqlite":  # JSON is text there: read it raw, so a bad value names its key
                text_bind = bindparam(param, type_=String())
                return type_coerce(column, String()), text_bind, read, write, _KIND_JSON_TEXT
            how = _KIND_JSONB if isinstance(kind, JSONB) else _KIND_JSON
            return column, cast(bindparam(param, type_=String()), kind), read, write, how
        if isinstance(kind, String | NullType):
            return column, _bind(param, column), read, write, _KIND_JSON_TEXT
        return None

    def _time_access(self, field: str, column: Column[Any], param: str) -> _Access | None:
        kind, read = column.type, self._time_reader(column)
        if isinstance(kind, DateTime):
            if (
                self._dialect == "sqlite"
            ):  # DATETIME is text there: write SQLAlchemy's format, parse it ourselves
                write = _time_writer(field, _sqlite_datetime)
                text_bind = bindparam(param, type_=String())
                return type_coerce(column, String()), text_bind, read, write, _KIND_SQLITE_DATETIME
            if kind.timezone:
                return column, _bind(param, column), read, _time_writer(field, to_utc), _KIND_TIMESTAMPTZ
            write = _time_writer(field, lambda v: to_utc(v).replace(tzinfo=None))
            return column, _bind(param, column), read, write, _KIND_TIMESTAMP
        if isinstance(kind, String | NullType):
            return column, _bind(param, column), read, _time_writer(field, _utc_text), _KIND_ISO_TEXT
        return None

    def _plain_access(self, field: str, column: Column[Any], param: str) -> _Access | None:
        kind = column.type
        read: Reader
        write: Writer
        if field == "attempts":
            if not isinstance(kind, Integer | NullType):
                return None
            read, write = self._attempts_reader(column), _attempts_writer
        elif field == "status":
            if not isinstance(kind, String | Integer | NullType):
                return None
            read, write = self._status_reader(column), self._status_writer(column)
        elif not isinstance(kind, String | NullType):
            return None
        elif field == "key":
            read, write = _identity, _key_writer
        else:
            read, write = self._text_reader(column), _type_writer
        return column, _bind(param, column), read, write, _KIND_TEXT

    def _ordering_key(self, conn: Connection, key: Column[Any]) -> ColumnElement[Any]:
        """The key expression that compares and sorts in Python `str` (code point) order."""
        if self._dialect == "sqlite":
            return key.collate("BINARY")
        if self._dialect != "postgresql":
            return key  # `scan` checks every page's order and says so if this is wrong
        if self._pg_collation_is_code_point(conn, key):
            return key
        get_logger(store=self.name).warning(
            "task_store_collation",
            table=self.table_name,
            column=key.name,
            detail=f'scans compare with COLLATE "C"; for speed add an index on ({key.name} COLLATE "C")',
        )
        return key.collate("C")

    def _pg_collation_is_code_point(self, conn: Connection, key: Column[Any]) -> bool:
        preparer = self.engine.dialect.identifier_preparer
        found = conn.execute(
            text(
                "SELECT c.collname, n.nspname FROM pg_attribute a"
                " JOIN pg_collation c ON c.oid = a.attcollation"
                " JOIN pg_namespace n ON n.oid = c.collnamespace"
                " WHERE a.attrelid = CAST(:rel AS regclass) AND a.attname = :col"
            ),
            {"rel": preparer.format_table(self.table), "col": key.name},
        ).one_or_none()
        if found is None:
            return False
        collation, namespace = found
        if collation in _CODE_POINT_COLLATIONS:
            return True
        probe = list(_COLLATION_PROBE)
        try:
            with conn.begin_nested():
                ordered = conn.execute(
                    text(  # the collation's names come from the catalog, quoted
                        "SELECT v FROM unnest(CAST(:probe AS text[])) AS v ORDER BY v COLLATE"  # noqa: S608
                        f" {preparer.quote_identifier(namespace)}.{preparer.quote_identifier(collation)}"
                    ),
                    {"probe": probe},
                ).scalars()
                return sorted(probe) == list(ordered)
        except sa_exc.DBAPIError:  # e.g. a database encoding that cannot hold the probe
            return False

    # -- readers and writers ----------------------------------------------------------

    def _duplicate(self, key: str) -> DataError:
        return DataError(
            f"store '{self.name}': key {key!r} appears more than once in column '{self._key_column.name}'"
        )

    def _bad(self, key: str, column: Column[Any], what: str) -> DataError:
        return DataError(f"store '{self.name}': key {key!r}: column '{column.name}' {what}")

    def _text_reader(self, column: Column[Any]) -> Reader:
        def read(value: Any, key: str) -> str:
            if not isinstance(value, str):
                raise self._bad(key, column, f"holds {value!r}, not text")
            return value

        return read

    def _status_reader(self, column: Column[Any]) -> Reader:
        statuses = self._read_status

        def read(value: Any, key: str) -> TaskStatus:
            try:
                return statuses[value]
            except (KeyError, TypeError):
                raise self._bad(
                    key, column, f"holds status {value!r}, which the status map does not map"
                    f" (mapped: {', '.join(str(v) for v in statuses)})"
                ) from None  # fmt: skip

        return read

    def _status_writer(self, column: Column[Any]) -> Writer:
        statuses = self._write_status

        def write(record: TaskRecord) -> Any:
            try:
                return statuses[record.status]
            except KeyError:
                raise ConfigError(
                    f"store '{self.name}': key {record.key!r}: no stored value for status"
                    f" '{record.status}' in the status map of column '{column.name}'"
                ) from None

        return write

    def _attempts_reader(self, column: Column[Any]) -> Reader:
        def read(value: Any, key: str) -> int:
            if value is None:
                return 0
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise self._bad(key, column, f"holds {value!r}, not a count of attempts")
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
                    raise self._bad(key, column, f"is not JSON ({exc}): {_clip(value)}") from None
            if not isinstance(value, dict):
                raise self._bad(key, column, f"holds {_clip(value)}, not a JSON object")
            return value

        return read

    def _time_reader(self, column: Column[Any]) -> Reader:
        def read(value: Any, key: str) -> datetime:
            if isinstance(value, str):
                try:
                    value = datetime.fromisoformat(value)
                except ValueError:
                    raise self._bad(key, column, f"holds {value!r}, not an ISO 8601 timestamp") from None
            if not isinstance(value, datetime):
                raise self._bad(key, column, f"holds {value!r}, not a timestamp")
            return value  # TaskRecord makes it UTC (a naive one is UTC already)

        return read

    def _decode(self, row: Sequence[Any]) -> TaskRecord:
        key = row[0]
        if not isinstance(key, str) or not key:
            raise DataError(
                f"store '{self.name}': column '{self._key_column.name}' holds an empty key ({key!r});"
                " every task needs one"
            )
        values = {field.name: field.read(value, key) for field, value in zip(self._fields, row, strict=True)}
        return TaskRecord(**values)

    def _keys_in_order(self, after: str | None, rows: Sequence[Sequence[Any]]) -> bool:
        """Whether the rows' keys (the first column) are non-empty text, all above `after` and
        strictly ascending: the check `scan` makes, at C speed for a page that passes it."""
        keys = list(map(_first, rows))
        return (
            {str} == set(map(type, keys))
            and keys[0] != ""
            and (after is None or after < keys[0])
            and all(map(lt, keys, keys[1:]))
        )

    def _explain_page(self, after: str | None, limit: int) -> NoReturn:
        """Raise the `DataError` that `scan` raises for this page (it names the key and column)."""
        self.scan(after, limit)
        raise DataError(
            f"store '{self.name}': the tasks after {after!r} changed while they were read; run it again"
        )

    def _encode(self, record: TaskRecord) -> tuple[Any, ...]:
        """The record's column values, in field order, ready for the driver."""
        if not isinstance(record.key, str) or not record.key:
            raise DataError(
                f"store '{self.name}': column '{self._key_column.name}': a task with an empty key"
                f" ({record.key!r}) cannot be written"
            )
        try:
            return tuple([field.write(record) for field in self._fields])
        except (TypeError, ValueError):
            for field in self._fields:  # find the field, for the message
                try:
                    field.write(record)
                except (TypeError, ValueError) as exc:
                    raise self._bad(record.key, field.column, f"cannot hold the {field.name}: {exc}") from exc
            raise

    def _driver_statement(self, stmt: UpdateBase) -> _DriverStatement:
        compiled = stmt.compile(dialect=self.engine.dialect)
        if compiled.positional:
            index = {field.param: i for i, field in enumerate(self._fields)}
            return _DriverStatement(str(compiled), tuple(index[name] for name in compiled.positiontup or ()))
        return _DriverStatement(str(compiled), None, tuple(field.param for field in self._fields))

    # -- plumbing ---------------------------------------------------------------------

    @contextmanager
    def _connect(
        self, *, readonly: bool = False, attach: str | None = None, commit: bool = True
    ) -> Iterator[Connection]:
        """One transaction; database errors other than integrity errors become ours. With
        `attach` (SQLite), that database file is attached as `mfsm_source` for the
        transaction, which then begins deferred (`BEGIN IMMEDIATE` would write-lock the
        attached database too; deferred, it is locked as by any reader). Without `commit`
        (a read of one statement) the transaction is rolled back: nothing to make durable."""
        try:
            with self.engine.connect() as conn:
                if readonly or attach is not None:
                    conn.execution_options(mfsm_readonly=True)  # a plain (deferred) BEGIN
                if not commit:
                    yield conn  # begins on first use; closing the connection rolls it back
                elif attach is None:
                    with conn.begin():
                        yield conn
                else:
                    with self._attached(conn, attach), conn.begin():
                        # This database's write lock now, as BEGIN IMMEDIATE takes it: taken
                        # later, after reading, it could meet another writer's and fail at once.
                        conn.exec_driver_sql(self._write_lock_sql)
                        yield conn
        except sa_exc.IntegrityError:
            raise
        except (sa_exc.OperationalError, sa_exc.InterfaceError) as exc:
            raise DatabaseUnavailable(
                f"store '{self.name}': database {self.safe_url} is unavailable: {self._scrub(exc)}"
            ) from exc
        except sa_exc.StatementError as exc:  # DBAPIError's other kinds, and bind errors
            raise DataError(
                f"store '{self.name}': table '{self.table_name}' in {self.safe_url} refused the"
                f" statement: {self._scrub(exc)}"
            ) from exc

    def _fetch(self, query: _Query, **values: Any) -> list[Any]:
        """The rows of `query` as the driver returns them: tuples, no result processing."""
        with self._connect(readonly=True, commit=False) as conn:
            result = conn.exec_driver_sql(query.sql, query.params(**values))
            try:
                return list(result.cursor.fetchall())
            except self._dbapi_error as exc:
                raise self._wrap(query.sql, exc) from exc
            finally:
                result.close()

    @contextmanager
    def _attached(self, conn: Connection, path: str) -> Iterator[None]:
        """SQLite: the database file at `path` attached as `mfsm_source` to `conn`, outside any
        transaction (SQLAlchemy would begin one first); a connection that cannot detach it
        again is discarded, so that no other use of the pool finds it attached."""
        driver = conn.connection.driver_connection
        assert driver is not None
        attach = f"ATTACH DATABASE ? AS {_ATTACHED}"
        try:
            driver.execute(attach, (path,))
        except self._dbapi_error as exc:
            raise self._wrap(attach, exc) from exc
        try:
            yield
        finally:
            try:
                driver.execute(f"DETACH DATABASE {_ATTACHED}")
            except self._dbapi_error:
                conn.invalidate()

    def _wrap(self, statement: str, exc: Exception) -> sa_exc.StatementError:
        """A driver error raised outside SQLAlchemy, as SQLAlchemy's own (so `_connect` and the
        upsert's retry treat it as they treat any other)."""
        dialect = self.engine.dialect
        return sa_exc.DBAPIError.instance(statement, None, exc, self._dbapi_error, dialect=dialect)

    def _scrub(self, exc: sa_exc.StatementError) -> str:
        return scrub(str(exc.orig if exc.orig is not None else exc), self.url)

    def close(self) -> None:
        """Dispose of the engine, when the store made it."""
        if self._owns_engine:
            self.engine.dispose()

    def __enter__(self) -> SqlTaskStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"SqlTaskStore(name={self.name!r}, url={self.safe_url!r}, table={self.table_name!r})"

    # -- the TaskStore protocol -------------------------------------------------------

    def scan(self, after: str | None, limit: int) -> Sequence[TaskRecord]:
        """Up to `limit` records with key > `after`, ascending in Python `str` order."""
        if limit <= 0:
            return []
        order = self._key_order
        stmt = self._select.order_by(order).limit(limit + 1)
        if after is not None:
            stmt = stmt.where(order > after)
        with self._connect(readonly=True) as conn:
            rows = conn.execute(stmt).all()
        previous = after
        for row in rows:  # one row past the page, so a duplicate of its last key shows
            key = row[0]
            if previous is not None and isinstance(key, str) and not previous < key:
                column = self._key_column.name
                if previous == key:
                    raise self._duplicate(key)
                raise DataError(
                    f"store '{self.name}': the database returned key {key!r} after {previous!r}:"
                    f" column '{column}' does not sort in code point order"
                )
            previous = key
        return [self._decode(row) for row in rows[:limit]]

    def get(self, key: str) -> TaskRecord | None:
        """The record with this key, or None."""
        with self._connect(readonly=True) as conn:
            rows = conn.execute(self._select.where(self._key_column == key).limit(2)).all()
        if len(rows) > 1:
            raise self._duplicate(key)
        return self._decode(rows[0]) if rows else None

    def get_many(self, keys: Sequence[str]) -> dict[str, TaskRecord]:
        """The records with these keys (absent keys are left out), in a few round trips:
        validation re-reads its differences through this (`identity.BulkGet`)."""
        wanted = sorted(set(keys))
        found: dict[str, TaskRecord] = {}
        column = self._key_column
        with self._connect(readonly=True) as conn:
            for start in range(0, len(wanted), _GET_MANY_CHUNK):
                chunk = wanted[start : start + _GET_MANY_CHUNK]
                for row in conn.execute(self._select.where(column.in_(chunk))).all():
                    record = self._decode(row)
                    if record.key in found:
                        raise self._duplicate(record.key)
                    found[record.key] = record
        return found

    def put(self, record: TaskRecord) -> None:
        """Insert or replace the record with this key (idempotent)."""
        one_statement = self._forward_statement(None)
        if one_statement is None:
            self.put_many([record])
        else:
            self._put_one(one_statement, record)

    def put_many(self, records: Sequence[TaskRecord]) -> int:
        """Insert or replace each record by key in one transaction (all or nothing); the
        last record of a key wins. Returns how many records were given."""
        if not records:
            return 0
        encoded = {record.key: self._encode(record) for record in records}
        keys = sorted(encoded)  # one lock order for every writer
        self._write(keys, [encoded[key] for key in keys])
        return len(records)

    def put_forward(self, record: TaskRecord) -> bool:
        """Insert or replace the record, unless the stored task of this key is further along
        (`records.is_behind`: pending over running or finished, running over finished), in
        one transaction that locks the key's row. Returns whether it wrote.

        `DualWriter` writes the second side this way: a mirror write that arrives late (after
        `transfer_state` or `reverse_sync` copied a finished task across, or after a worker
        there picked it up) must not hand the task back to a worker as pending."""
        one_statement = self._forward_statement(record.status)
        if one_statement is not None:
            return self._put_one(one_statement, record) == 1
        encoded = [self._encode(record)]
        key_column, status = self._key_column, self._by_name["status"]
        stored_status = select(status.select).where(key_column == record.key).limit(2)
        if self._dialect == "postgresql":
            stored_status = stored_status.with_for_update()  # SQLite: BEGIN IMMEDIATE locked it all
        for attempt in (1, 2):
            try:
                with self._connect() as conn:
                    stored = conn.execute(stored_status).scalars().all()
                    if len(stored) > 1:
                        raise self._duplicate(record.key)
                    if not stored:
                        conn.exec_driver_sql(self._insert.sql, self._insert.params(encoded))
                        return True
                    if is_behind(record.status, status.read(stored[0], record.key)):
                        return False
                    conn.exec_driver_sql(self._update.sql, self._update.params(encoded))
                    return True
            except sa_exc.IntegrityError as exc:
                if attempt == 1:
                    continue  # another writer inserted this key first: read it again
                raise self._refused(record.key, exc) from exc
        raise AssertionError("unreachable")  # pragma: no cover

    def _put_one(self, statement: _DriverStatement, record: TaskRecord) -> int:
        """Run one of `_forward_statement`'s statements for `record`: the rows written, 0 or 1."""
        params = statement.params([self._encode(record)])[0]
        try:
            with self._connect() as conn:
                return int(conn.exec_driver_sql(statement.sql, params).rowcount)
        except sa_exc.IntegrityError as exc:  # not the key (ON CONFLICT takes that): a constraint
            raise self._refused(record.key, exc) from exc

    def _refused(self, key: str, exc: sa_exc.IntegrityError) -> DataError:
        return DataError(
            f"store '{self.name}': table '{self.table_name}' refused task {key!r}, nothing was written:"
            f" {self._scrub(exc)}"
        )

    def _forward_statement(self, status: TaskStatus | None) -> _DriverStatement | None:
        """`put_forward` of a task in `status` as one statement, `INSERT ... ON CONFLICT (key)
        DO UPDATE ... WHERE` the stored status is not one further along (written into the
        statement from the status map); with None, `put`'s (no WHERE). None when no unique
        index names the key alone."""
        if not self._key_unique:
            return None
        cached = self._forward.get(status)
        if cached is None:
            insert_one = (pg_insert if self._dialect == "postgresql" else sqlite_insert)(self.table)
            insert_one = insert_one.values({f.column: f.bind for f in self._fields})
            column = self._status_column
            quote = column.type.literal_processor(self.engine.dialect)
            ahead = sorted(
                (
                    stored
                    for stored, mapped in self._read_status.items()
                    if status is not None and is_behind(status, mapped)
                ),
                key=str,
            )
            where = (
                column.not_in([literal_column(quote(v) if quote is not None else str(int(v))) for v in ahead])
                if ahead
                else None
            )
            upsert = insert_one.on_conflict_do_update(
                index_elements=[self._key_column],
                set_={f.column.name: insert_one.excluded[f.column.name] for f in self._fields[1:]},
                where=where,
            )
            cached = self._forward[status] = self._driver_statement(upsert)
        return cached

    def put_rows(self, keys: list[str], rows: list[tuple[Any, ...]]) -> int:
        """Insert or replace rows already in this table's form (`RowCopy` makes them), in one
        transaction; `keys` ascending and unique, `rows` in the same order. Inserts go through
        COPY on PostgreSQL. Returns how many rows were given."""
        if rows:
            self._write(keys, rows, bulk=True)
        return len(rows)

    def _write(self, keys: list[str], rows: list[tuple[Any, ...]], *, bulk: bool = False) -> None:
        for attempt in (1, 2):
            try:
                self._upsert(keys, rows, bulk=bulk)
            except sa_exc.IntegrityError as exc:
                if attempt == 1:
                    continue  # most likely another writer inserted one of these keys first
                raise DataError(
                    f"store '{self.name}': table '{self.table_name}' refused a batch of {len(keys)} tasks"
                    f" ({keys[0]!r} .. {keys[-1]!r}), nothing was written: {self._scrub(exc)}"
                ) from exc
            break

    def _upsert(self, keys: list[str], rows: list[tuple[Any, ...]], *, bulk: bool) -> None:
        with self._connect() as conn:
            existing = self._existing(conn, keys)
            if existing:
                updates = [row for key, row in zip(keys, rows, strict=True) if key in existing]
                inserts = [row for key, row in zip(keys, rows, strict=True) if key not in existing]
            else:
                updates, inserts = [], rows
            # Values are converted already: the driver's executemany, without per-row processing.
            if updates:
                conn.exec_driver_sql(self._update.sql, self._update.params(updates))
            if inserts and bulk and self._copy_sql is not None:
                self._copy(conn, self._copy_sql, inserts)
            elif inserts:
                conn.exec_driver_sql(self._insert.sql, self._insert.params(inserts))

    def _existing(self, conn: Connection, keys: list[str]) -> set[str]:
        """Which of these keys (ascending) the table holds."""
        if self._key_range is not None:
            probe = self._key_range.params(mfsm_low=keys[0], mfsm_high=keys[-1])
            if conn.exec_driver_sql(self._key_range.sql, probe).first() is None:
                return set()  # the common case of a backfill: none of them
        key_column = self._key_column
        existing: set[str] = set()
        for start in range(0, len(keys), KEY_LOOKUP_CHUNK):
            chunk = keys[start : start + KEY_LOOKUP_CHUNK]
            existing.update(conn.execute(select(key_column).where(key_column.in_(chunk))).scalars())
        return existing

    def _copy(self, conn: Connection, sql: str, rows: list[tuple[Any, ...]]) -> None:
        driver = conn.connection.driver_connection
        assert driver is not None
        try:
            with driver.cursor() as cursor, cursor.copy(sql) as copy:
                for row in rows:
                    copy.write_row(row)
        except self._dbapi_error as exc:
            raise self._wrap(sql, exc) from exc

    def _copy_inside(self, copy: RowCopy, after: str | None, limit: int) -> tuple[int, str | None] | None:
        """`RowCopy.copy_batch` inside the database: check the batch, then one INSERT ... SELECT,
        in one transaction of this (the target) store, the source attached on SQLite."""
        inserts = copy._inserts
        assert inserts is not None
        read, insert = copy._queries[after is not None], inserts[after is not None]
        for attempt in (1, 2):
            try:
                if copy.in_one_statement:
                    return self._check_and_copy(copy, read, after, limit)
                with self._connect(attach=copy._attach) as conn:
                    found = conn.exec_driver_sql(
                        read.sql, read.params(mfsm_after=after, mfsm_limit=limit + 1)
                    )
                    page = copy.checked(after, limit, list(found.cursor.fetchall()))
                    if not page:
                        return None if page is None else (0, None)
                    last = page[-1][0]
                    written = conn.exec_driver_sql(
                        insert.sql, insert.params(mfsm_after=after, mfsm_last=last)
                    )
                    if written.rowcount != len(page):  # rows changed in between: undone, records it is
                        raise _PageChanged
                    return len(page), last
            except _PageChanged:
                return None
            except sa_exc.IntegrityError as exc:
                if attempt == 1:
                    continue  # most likely another writer inserted one of these keys first
                raise DataError(
                    f"store '{self.name}': table '{self.table_name}' refused a batch of tasks after"
                    f" {after!r}, nothing was written: {self._scrub(exc)}"
                ) from exc
        raise AssertionError("unreachable")  # pragma: no cover

    def _check_and_copy(
        self, copy: RowCopy, statement: _Query, after: str | None, limit: int
    ) -> tuple[int, str | None] | None:
        """PostgreSQL's one statement (`_check_and_copy`, module level): a batch it did not
        write in full is undone and left to the record path."""
        try:
            with self._connect() as conn:
                params = statement.params(mfsm_after=after, mfsm_limit=limit + 1, mfsm_batch=limit)
                rows = list(conn.exec_driver_sql(statement.sql, params).cursor.fetchall())
                page = copy.checked(after, limit, rows)
                if page is None or (page and page[0][1] != len(page)):
                    raise _PageChanged  # undo whatever it wrote: the record path explains or converts
                return len(page), page[-1][0] if page else None
        except _PageChanged:
            return None

    def scan_identities(self, after: str | None, limit: int) -> Sequence[IdentityRow]:
        """Up to `limit` identity rows (`identity.py`) with key > `after`, ascending in Python
        `str` order, read without decoding: JSON stays text, timestamps stay as stored."""
        if limit <= 0:
            return []
        query = self._identity_queries[after is not None]
        rows = self._fetch(query, mfsm_after=after, mfsm_limit=limit + 1)  # + 1: see `scan`
        if rows and not self._keys_in_order(after, rows):
            self._explain_page(after, limit)
        page = rows[:limit]
        if None in map(_status_of, page):
            self._explain_page(after, limit)  # a status the map does not map
        return page

    def identity_checksum(self, row: IdentityRow) -> str:
        """`TaskRecord.checksum()` of the record `row` decodes to (a `DataError` naming the
        key and column when it cannot be decoded)."""
        key, fields = row[0], self._by_name
        type_ = fields["type"].read(row[1], key)
        payload = fields["payload"].read(row[2], key)
        created_at = fields["created_at"].read(row[3], key)
        return checksum_of(key, type_, payload, created_at)

    def count(self) -> int:
        """How many tasks the table holds (one `count(*)`; `count_by_status` also checks every
        stored status, which reads the whole table)."""
        with self._connect(readonly=True) as conn:
            return int(conn.execute(select(func.count()).select_from(self.table)).scalar_one())

    def count_by_status(self) -> Mapping[TaskStatus, int]:
        """How many records are in each status (every status present, zero included)."""
        status = self._status_column
        with self._connect(readonly=True) as conn:
            groups = conn.execute(select(status, func.count()).group_by(status)).all()
            counts = dict.fromkeys(TaskStatus, 0)
            for stored, count in groups:
                mapped = self._read_status.get(stored)
                if mapped is None:
                    sample = conn.execute(
                        select(self._key_column).where(status == stored).limit(1)
                        if stored is not None
                        else select(self._key_column).where(status.is_(None)).limit(1)
                    ).scalar()
                    raise DataError(
                        f"store '{self.name}': key {sample!r}: column '{status.name}' holds status"
                        f" {stored!r} ({count} tasks), which the status map does not map"
                        f" (mapped: {', '.join(str(v) for v in self._read_status)})"
                    )
                counts[mapped] += count
        return counts


class _PageChanged(Exception):
    """Rows of a batch changed between its check and its INSERT ... SELECT."""


_Check = Callable[[list[Any]], bool]
_Plan = tuple["ColumnElement[Any]", "ColumnElement[bool] | None", "_Check | None"]
#: The name the source database is attached under, for a copy inside SQLite.
_ATTACHED: Final = "mfsm_source"


class RowCopy:
    """Copies tasks from one `SqlTaskStore`'s table into another's as rows, never decoding
    them into records: the source database reads each field in the form the target column
    takes (a status through both status maps, a default for a field the source lacks) and
    checks, row by row, that the value is one the record path would write the same way;
    Python checks what SQL cannot check cheaply (that a timestamp exists).

    JSON is copied as the source holds it (checked to be a JSON object, not re-encoded): the
    target decodes it to the same records, and the same text on both sides is what lets
    `validate` compare rows without decoding them. A batch with any row that fails a check
    is left to the record path (`copy` returns None), which converts it or raises the
    `DataError` naming the row.

    Built only between two tables of one kind of database. Between two SQLite files (or two
    tables of one), the target's connection attaches the source and the batch is one
    `INSERT ... SELECT ... ON CONFLICT DO UPDATE`: the rows never reach Python at all. It
    begins deferred, so the source is locked no more than by any reader. Otherwise the rows
    pass through Python and `SqlTaskStore.put_rows`."""

    def __init__(
        self,
        source: SqlTaskStore,
        target: SqlTaskStore,
        queries: dict[bool, _Query],
        checks: list[tuple[int, _Check]],
        *,
        inserts: dict[bool, _Query] | None = None,
        attach: str | None = None,
    ) -> None:
        self.source, self.target = source, target
        self._queries = queries
        self._checks = checks
        self._width = len(target._fields)
        self._inserts = inserts  # INSERT ... SELECT inside SQLite; None: rows pass through Python
        self._attach = attach  # the source's file to attach, when it is not the target's

    @classmethod
    def between(cls, source: TaskStore, target: TaskStore) -> RowCopy | None:
        """The copy from `source` to `target`, or None when they are not two SQL stores of one
        kind of database, or some field cannot be copied as it is stored."""
        if not (isinstance(source, SqlTaskStore) and isinstance(target, SqlTaskStore)):
            return None
        if source._dialect != target._dialect or source._dialect not in ("sqlite", "postgresql"):
            return None
        inside = _inside_source(source, target)
        table = source.table if inside is None else inside[0]
        plans = [_copy_field(source, target, field, table) for field in target._fields]
        if any(plan is None for plan in plans):
            return None
        values = [plan[0] for plan in plans if plan is not None]
        valid = and_(*(plan[1] for plan in plans if plan is not None and plan[1] is not None))
        ok = valid.label("mfsm_ok")
        checks = [(i, plan[2]) for i, plan in enumerate(plans) if plan is not None and plan[2] is not None]
        if inside is not None and source._dialect == "postgresql" and checks:
            inside = None  # the rows' Python checks would not see what the INSERT reads
        order = source._key_order
        if inside is not None and source._dialect == "sqlite":
            order = table.c[source._key_column.name].collate("BINARY")
        limit = bindparam("mfsm_limit", type_=Integer())
        after = order > _bind_text("mfsm_after")
        if inside is None:
            read = select(*values, ok).order_by(order).limit(limit)
            copy = cls(source, target, _both(read, after, source.engine.dialect), checks)
        elif source._dialect == "postgresql":
            # One statement, so one snapshot: it reads the page, checks it, inserts it when
            # every row passed, and returns the keys, how many it wrote and each row's verdict.
            native = _native_values(source, target, table, values)
            dialect = target.engine.dialect
            single = {
                with_after: _Query.compile(_check_and_copy(target, native, valid, order, with_after), dialect)
                for with_after in (False, True)
            }
            copy = cls(source, target, single, [], inserts=single)
        else:
            # Inside SQLite only the checks reach Python: the key, the checked columns, ok.
            read = select(values[0], *(values[i] for i, _ in checks), ok).order_by(order).limit(limit)
            checks = [(1 + n, check) for n, (_, check) in enumerate(checks)]
            rows = select(*values).where(order <= _bind_text("mfsm_last")).order_by(order)
            dialect = target.engine.dialect
            inserts = {
                False: _Query.compile(_upsert_from(target, rows), dialect),
                True: _Query.compile(_upsert_from(target, rows.where(after)), dialect),
            }
            queries = _both(read, after, dialect)
            copy = cls(source, target, queries, checks, inserts=inserts, attach=inside[1])
        try:  # a database without these functions (an old SQLite without JSON): the record path
            copy.probe()
        except MigrationFSMError:
            return None
        return copy

    @property
    def in_one_statement(self) -> bool:
        """PostgreSQL inside one database: one statement reads, checks and writes a batch."""
        return self._inserts is self._queries

    def probe(self) -> None:
        """Run the copy's statements so that they match nothing: a `MigrationFSMError` when
        the databases cannot run them."""
        if self._inserts is None:
            self.source._fetch(self._queries[False], mfsm_limit=0)
            return
        with self.target._connect(attach=self._attach) as conn:
            read, insert = self._queries[False], self._inserts[True]
            if self.in_one_statement:  # a page of none
                conn.exec_driver_sql(read.sql, read.params(mfsm_limit=0, mfsm_batch=0)).close()
                return
            conn.exec_driver_sql(read.sql, read.params(mfsm_limit=0)).close()
            conn.exec_driver_sql(insert.sql, insert.params(mfsm_after="b", mfsm_last="a")).close()

    def copy_batch(self, after: str | None, limit: int) -> tuple[int, str | None] | None:
        """Copy up to `limit` tasks with keys > `after`, as one transaction on the target:
        (how many, the last key or None when there was none), or None when some row needs
        the record path (nothing was written then)."""
        if self._inserts is None:
            found = self.page(after, limit)
            if found is None:
                return None
            keys, rows = found
            self.target.put_rows(keys, rows)
            return len(keys), keys[-1] if keys else None
        return self.target._copy_inside(self, after, limit)

    def page(self, after: str | None, limit: int) -> tuple[list[str], list[tuple[Any, ...]]] | None:
        """Up to `limit` rows with key > `after` in the target's form (keys, rows), or None
        when some row needs the record path."""
        rows = self.source._fetch(self._queries[after is not None], mfsm_after=after, mfsm_limit=limit + 1)
        page = self.checked(after, limit, rows)
        if page is None:
            return None
        width = self._width
        return list(map(_first, page)), [row[:width] for row in page]

    def checked(self, after: str | None, limit: int, rows: list[Any]) -> list[Any] | None:
        """The first `limit` of `rows` (read with one more row, so that a key repeated just
        past the page shows), or None when any fails a check."""
        if not rows:
            return rows
        if not self.source._keys_in_order(after, rows):
            return None
        page = rows[:limit]
        if not all(map(_last, page)):
            return None
        for index, check in self._checks:
            if not check(list(map(itemgetter(index), page))):
                return None
        return page


def _native_values(
    source: SqlTaskStore, target: SqlTaskStore, table: Table, values: list[ColumnElement[Any]]
) -> list[ColumnElement[Any]]:
    """PostgreSQL: `values` with JSON kept as JSON (not text) on its way into a JSON column."""
    native = []
    for value, field in zip(values, target._fields, strict=True):
        mine = source._by_name.get(field.name)
        if field.kind not in (_KIND_JSON, _KIND_JSONB):
            native.append(value)
        elif mine is not None and mine.kind in (_KIND_JSON, _KIND_JSONB):
            column = table.c[mine.column.name]
            same = column if mine.kind == field.kind else cast(column, field.column.type)
            empty = cast(literal("{}", String()), field.column.type)
            native.append(func.coalesce(same, empty) if field.name == "metadata" else same)
        else:
            native.append(cast(value, field.column.type))
    return native


def _check_and_copy(
    target: SqlTaskStore,
    values: list[ColumnElement[Any]],
    valid: ColumnElement[bool],
    order: ColumnElement[Any],
    with_after: bool,
) -> Select[Any]:
    """PostgreSQL, one statement: the page (`mfsm_limit` rows, one past the batch), inserted
    when every row of the batch (`mfsm_batch` rows) passes the checks; it returns each row's
    key, how many rows were written, and its verdict."""
    labeled = [value.label(f"mfsm_v{i}") for i, value in enumerate(values)]
    numbered = func.row_number().over(order_by=order).label("mfsm_n")
    read = select(*labeled, valid.label("mfsm_ok"), numbered).order_by(order)
    read = read.limit(bindparam("mfsm_limit", type_=Integer()))
    page = (read.where(order > _bind_text("mfsm_after")) if with_after else read).cte("mfsm_page")
    in_batch = page.c.mfsm_n <= bindparam("mfsm_batch", type_=Integer())
    every_row_ok = select(func.bool_and(page.c.mfsm_ok)).where(in_batch).scalar_subquery()
    batch = select(*(page.c[f"mfsm_v{i}"] for i in range(len(values)))).where(in_batch, every_row_ok)
    columns = [field.column for field in target._fields]
    writes = [_upsert_from(target, batch)]
    if target._key_range is not None:
        # A plain INSERT when the target holds no key of the batch's range (a fresh copy,
        # or keys that grow): ON CONFLICT costs a speculative insertion per row.
        last = (
            select(page.c.mfsm_v0).where(in_batch).order_by(page.c.mfsm_n.desc()).limit(1).scalar_subquery()
        )
        key = target._key_order
        taken = select(literal(1)).select_from(target.table).where(key <= last)
        if with_after:
            taken = taken.where(key > _bind_text("mfsm_after"))
        none_taken = ~taken.exists()
        writes = [
            insert(target.table).from_select(columns, batch.where(none_taken)),
            _upsert_from(target, batch.where(~none_taken)),
        ]
    written = [w.returning(literal(1)).cte(f"mfsm_written_{i}") for i, w in enumerate(writes)]
    count = sum(
        (select(func.count()).select_from(w).scalar_subquery() for w in written[1:]),
        select(func.count()).select_from(written[0]).scalar_subquery(),
    )
    return select(page.c.mfsm_v0, count.label("mfsm_count"), page.c.mfsm_ok).order_by(page.c.mfsm_n)


def _upsert_from(target: SqlTaskStore, rows: Select[Any]) -> Any:
    """`INSERT INTO target SELECT rows ON CONFLICT (key) DO UPDATE` of every mapped column."""
    insert = pg_insert if target._dialect == "postgresql" else sqlite_insert
    insert_rows = insert(target.table).from_select([f.column for f in target._fields], rows)
    return insert_rows.on_conflict_do_update(
        index_elements=[target._key_column],
        set_={f.column.name: insert_rows.excluded[f.column.name] for f in target._fields[1:]},
    )


def _both(stmt: Any, after: ColumnElement[bool], dialect: Dialect) -> dict[bool, _Query]:
    """`stmt` compiled for the first batch (False) and for the batches after a key (True)."""
    return {False: _Query.compile(stmt, dialect), True: _Query.compile(stmt.where(after), dialect)}


def _inside_source(source: SqlTaskStore, target: SqlTaskStore) -> tuple[Table, str | None] | None:
    """When the copy can run inside the database: the source table as the target's connection
    sees it, and (SQLite) the file to attach, None when both tables are in one file; else None.
    It needs `ON CONFLICT (key)`, and on PostgreSQL both tables in one database, one URL."""
    if not target._key_unique:
        return None
    if source._dialect == "postgresql":
        same = source.engine.url.render_as_string(hide_password=False) == target.engine.url.render_as_string(
            hide_password=False
        )
        return (source.table, None) if same else None
    if source._dialect != "sqlite" or source.table.schema or target.table.schema:
        return None
    source_file, target_file = _sqlite_file(source.engine), _sqlite_file(target.engine)
    if source_file is None or target_file is None:
        return None
    if source_file == target_file:
        return source.table, None
    return source.table.to_metadata(MetaData(), schema=_ATTACHED), source_file


def _sqlite_file(engine: Engine) -> str | None:
    """The absolute path of a SQLite engine's database file (None in memory)."""
    database = engine.url.database
    if not database or database == ":memory:" or database.startswith("file:"):
        return None
    return os.path.abspath(database)


def _copy_field(  # noqa: PLR0911 -- one answer per kind of field
    source: SqlTaskStore, target: SqlTaskStore, field: _Field, table: Table
) -> _Plan | None:
    """How the source reads `field` in the target's form: (the value, an SQL condition that
    holds for a row the record path would copy to the same value, a Python check of the
    page's column for what SQL does not check cheaply), or None when the field must be
    converted in Python. Keys are checked by `RowCopy.checked` (text, not empty, ascending).
    `table` is the source table as the reading connection sees it."""
    sqlite = source._dialect == "sqlite"
    mine = source._by_name.get(field.name)
    if field.name == "attempts":
        if mine is None:
            return literal(0, Integer()), None, None
        column = table.c[mine.column.name]
        valid = column >= 0 if not sqlite else and_(func.typeof(column) == "integer", column >= 0)
        return func.coalesce(column, 0), or_(column.is_(None), valid), None
    if field.name == "metadata" and mine is None:
        return literal("{}", String()), None, None
    if mine is None:  # a required field: every store has it
        return None
    column = table.c[mine.column.name]
    if field.name == "key":
        return column, None, None
    if field.name == "type":
        return column, func.typeof(column) == "text" if sqlite else column.is_not(None), None
    if field.name == "status":
        writes = target._write_status
        stored = {value: writes[status] for value, status in source._read_status.items() if status in writes}
        if not stored:
            return None
        same = all(type(a) is type(b) and a == b for a, b in stored.items())
        value = column if same else case(stored, value=column)
        return value, column.in_([literal(value) for value in stored]), None
    if field.name in ("payload", "metadata"):
        return _copy_json(mine, field, column, sqlite)
    return _copy_time(mine, field, column)


def _copy_json(mine: _Field, field: _Field, column: ColumnElement[Any], sqlite: bool) -> _Plan | None:
    check = None
    valid: ColumnElement[bool]
    if field.kind not in (_KIND_JSON_TEXT, _KIND_JSON, _KIND_JSONB):
        return None
    if mine.kind == _KIND_JSON_TEXT and sqlite:
        # Valid JSON whose first character is `{` is an object (a BLOB's first byte is no `{`).
        valid = and_(func.json_valid(column, type_=Boolean()), func.substr(column, 1, 1) == "{")
    elif mine.kind == _KIND_JSON_TEXT:
        valid, check = column.is_not(None), _json_objects
    elif mine.kind in (_KIND_JSON, _KIND_JSONB):
        type_of = func.jsonb_typeof if mine.kind == _KIND_JSONB else func.json_typeof
        valid = type_of(column) == "object"
    else:
        return None
    value = cast(column, Text()) if mine.kind in (_KIND_JSON, _KIND_JSONB) else column
    if field.name == "metadata":  # no metadata reads as {}
        return func.coalesce(value, "{}"), or_(column.is_(None), valid), check
    return value, valid, check


def _copy_time(mine: _Field, field: _Field, column: ColumnElement[Any]) -> _Plan | None:
    kind = mine.kind
    if kind != field.kind:
        zones = (_KIND_TIMESTAMPTZ, _KIND_TIMESTAMP)
        if kind in zones and field.kind in zones:  # on PostgreSQL; a naive timestamp is UTC
            return func.timezone("UTC", column), column.is_not(None), None
        return None
    if kind in _TIME_TEXT_SHAPES:  # the writer's own text, exactly: copied as it is
        return column, None, _time_texts(*_TIME_TEXT_SHAPES[kind])
    return column, column.is_not(None), None


def _time_texts(length: int, separators: dict[int, str]) -> Callable[[list[Any]], bool]:
    """A check that every value is timestamp text of exactly the writer's shape (`length`
    characters, these separators at these positions) that `datetime.fromisoformat` reads,
    so that writing the record would produce the same text."""
    shape = itemgetter(*separators)
    expected = {tuple(separators.values())}

    def check(values: list[Any]) -> bool:
        try:
            return (
                {length} == set(map(len, values))
                and expected == set(map(shape, values))
                and all(map(datetime.fromisoformat, values))
            )
        except (TypeError, ValueError):
            return False

    return check


def _json_objects(values: list[Any]) -> bool:
    """Whether every value is the text of a JSON object the writer can encode again."""
    try:
        return all(type(_STRICT_JSON(value)) is dict for value in values)
    except (TypeError, ValueError):
        return False


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


#: `json.loads` without NaN and Infinity, which the writer cannot encode again.
_STRICT_JSON: Final = json.JSONDecoder(parse_constant=_reject_constant).decode


def _json_text(field: _Field) -> ColumnElement[Any]:
    """The field's JSON as text (PostgreSQL's JSON types are cast; text stays as it is)."""
    if field.kind in (_KIND_JSON, _KIND_JSONB):
        return cast(field.column, Text())
    return field.column


def _bind_text(name: str) -> ColumnElement[Any]:
    return bindparam(name, type_=String())


def _bind(param: str, column: Column[Any]) -> ColumnElement[Any]:
    """A bind parameter of the column's own type (text when the database did not say)."""
    return bindparam(param, type_=String() if isinstance(column.type, NullType) else column.type)


def _identity(value: Any, key: str) -> Any:
    return value


def _key_writer(record: TaskRecord) -> str:
    return record.key


def _type_writer(record: TaskRecord) -> str:
    return record.type


def _attempts_writer(record: TaskRecord) -> int:
    return record.attempts


def _json_writer(field: str) -> Writer:
    def write(record: TaskRecord) -> str:
        return _canonical_json(getattr(record, field))

    return write


def _time_writer(field: str, convert: Callable[[datetime], Any]) -> Writer:
    def write(record: TaskRecord) -> Any:
        return convert(getattr(record, field))

    return write


def _sqlite_datetime(value: datetime) -> str:
    """SQLAlchemy's SQLite DATETIME text, naive UTC (`2024-05-17 12:30:45.123456`)."""
    return to_utc(value).replace(tzinfo=None).isoformat(" ", "microseconds")


def _utc_text(value: datetime) -> str:
    """`records.utc_text` (same text), faster than strftime."""
    return to_utc(value).replace(tzinfo=None).isoformat("T", "microseconds") + "Z"


def _clip(value: Any, width: int = 60) -> str:
    shown = repr(value)
    return shown if len(shown) <= width else shown[: width - 3] + "..."
