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
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any, Final

from sqlalchemy import (
    JSON,
    Column,
    Connection,
    DateTime,
    Engine,
    Integer,
    MetaData,
    String,
    Table,
    bindparam,
    cast,
    func,
    insert,
    select,
    text,
    type_coerce,
    update,
)
from sqlalchemy import exc as sa_exc
from sqlalchemy.sql.sqltypes import NullType

from migration_fsm.data.records import TaskRecord, TaskStatus, to_utc
from migration_fsm.exceptions import ConfigError, DatabaseUnavailable, DataError
from migration_fsm.log import get_logger
from migration_fsm.store import _scrub, make_engine, safe_url

if TYPE_CHECKING:
    from sqlalchemy.sql.dml import UpdateBase
    from sqlalchemy.sql.elements import ColumnElement

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

Reader = Callable[[Any, str], Any]
Writer = Callable[[TaskRecord], Any]
_Access = tuple["ColumnElement[Any]", "ColumnElement[Any]", Reader, Writer]


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


@dataclass(frozen=True, slots=True)
class _DriverStatement:
    """A statement compiled once, for the driver's executemany: `positions` orders a row's
    field values for a positional paramstyle; otherwise `names` keys them."""

    sql: str
    positions: tuple[int, ...] | None
    names: tuple[str, ...] = ()

    def params(self, rows: list[tuple[Any, ...]]) -> list[Any]:
        if self.positions is None:
            names = self.names
            return [dict(zip(names, row, strict=True)) for row in rows]
        positions = self.positions
        return [tuple([row[i] for i in positions]) for row in rows]


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

        self._select = select(*(field.select for field in self._fields))
        self._insert = self._driver_statement(
            insert(self.table).values({f.column: f.bind for f in self._fields})
        )
        self._update = self._driver_statement(
            update(self.table)
            .where(key == self._fields[0].bind)
            .values({f.column: f.bind for f in self._fields[1:]})
        )

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
        selected, bind, read, write = access
        return _Field(field, param, column, selected, bind, read, write)

    def _json_access(self, field: str, column: Column[Any], param: str) -> _Access | None:
        kind, read, write = column.type, self._json_reader(field, column), _json_writer(field)
        if isinstance(kind, JSON):
            if self._dialect == "sqlite":  # JSON is text there: read it raw, so a bad value names its key
                return type_coerce(column, String()), bindparam(param, type_=String()), read, write
            return column, cast(bindparam(param, type_=String()), kind), read, write
        if isinstance(kind, String | NullType):
            return column, _bind(param, column), read, write
        return None

    def _time_access(self, field: str, column: Column[Any], param: str) -> _Access | None:
        kind, read = column.type, self._time_reader(column)
        if isinstance(kind, DateTime):
            if (
                self._dialect == "sqlite"
            ):  # DATETIME is text there: write SQLAlchemy's format, parse it ourselves
                write = _time_writer(field, _sqlite_datetime)
                return type_coerce(column, String()), bindparam(param, type_=String()), read, write
            if kind.timezone:
                return column, _bind(param, column), read, _time_writer(field, to_utc)
            write = _time_writer(field, lambda v: to_utc(v).replace(tzinfo=None))
            return column, _bind(param, column), read, write
        if isinstance(kind, String | NullType):
            return column, _bind(param, column), read, _time_writer(field, _utc_text)
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
        return column, _bind(param, column), read, write

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
    def _connect(self, *, readonly: bool = False) -> Iterator[Connection]:
        """One transaction; database errors other than integrity errors become ours."""
        try:
            with self.engine.connect() as conn:
                if readonly:
                    conn.execution_options(mfsm_readonly=True)
                with conn.begin():
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

    def _scrub(self, exc: sa_exc.StatementError) -> str:
        return _scrub(str(exc.orig if exc.orig is not None else exc), self.url)

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
                    raise DataError(
                        f"store '{self.name}': key {key!r} appears more than once in column '{column}'"
                    )
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
            raise DataError(
                f"store '{self.name}': key {key!r} appears more than once in column '{self._key_column.name}'"
            )
        return self._decode(rows[0]) if rows else None

    def put(self, record: TaskRecord) -> None:
        """Insert or replace the record with this key (idempotent)."""
        self.put_many([record])

    def put_many(self, records: Sequence[TaskRecord]) -> int:
        """Insert or replace each record by key in one transaction (all or nothing); the
        last record of a key wins. Returns how many records were given."""
        if not records:
            return 0
        rows = {record.key: self._encode(record) for record in records}
        keys = sorted(rows)  # one lock order for every writer
        for attempt in (1, 2):
            try:
                self._upsert(keys, rows)
            except sa_exc.IntegrityError as exc:
                if attempt == 1:
                    continue  # most likely another writer inserted one of these keys first
                raise DataError(
                    f"store '{self.name}': table '{self.table_name}' refused a batch of {len(keys)} tasks"
                    f" ({keys[0]!r} .. {keys[-1]!r}), nothing was written: {self._scrub(exc)}"
                ) from exc
            break
        return len(records)

    def _upsert(self, keys: list[str], rows: dict[str, tuple[Any, ...]]) -> None:
        key_column = self._key_column
        with self._connect() as conn:
            existing: set[str] = set()
            for start in range(0, len(keys), KEY_LOOKUP_CHUNK):
                chunk = keys[start : start + KEY_LOOKUP_CHUNK]
                existing.update(conn.execute(select(key_column).where(key_column.in_(chunk))).scalars())
            updates = [rows[key] for key in keys if key in existing]
            inserts = [rows[key] for key in keys if key not in existing]
            # Values are converted already: the driver's executemany, without per-row processing.
            if updates:
                conn.exec_driver_sql(self._update.sql, self._update.params(updates))
            if inserts:
                conn.exec_driver_sql(self._insert.sql, self._insert.params(inserts))

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
