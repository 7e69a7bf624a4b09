"""`SqlTaskStore`: a `TaskStore` over a table that already exists, in any SQLAlchemy database.

The table is reflected once, when the store is built, and used as it is: a `TableMapping`
names the column of each `TaskRecord` field and translates the stored status vocabulary,
and every column the store does not map keeps its database default on insert and its value
on update. Payload and metadata may be JSON columns or text columns holding JSON;
timestamps may be timezone-aware, naive (read as UTC) or ISO 8601 text.

Upserts are portable: within one transaction the batch's existing keys are selected, those
rows are updated and the rest inserted, so the key column only needs to be unique through
some index (primary key, plain or partial unique index). Two writers inserting the same new
key race on that index; the loser's transaction is rolled back and retried once, and the
retry finds the row and updates it.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from functools import cached_property
from operator import itemgetter
from typing import TYPE_CHECKING, Any, Final, NoReturn

from sqlalchemy import BigInteger, Engine, Integer, MetaData, Table, bindparam, false, func, select, union_all
from sqlalchemy import exc as sa_exc

from migration_fsm.exceptions import ConfigError, DatabaseUnavailable, DataError
from migration_fsm.journal import make_engine, safe_url, scrub
from migration_fsm.tasks.identity import IdentityRow, checksum_of
from migration_fsm.tasks.records import TaskRecord, TaskStatus, is_behind

if TYPE_CHECKING:
    from migration_fsm.tasks.records import ProgressUpdate
from migration_fsm.tasks.sql.columns import (
    ColumnKind,
    integer_key,
    integer_ranges,
    keys_in_order,
    outside_ranges,
    time_text_like,
)
from migration_fsm.tasks.sql.dialects import attached, copy_rows, probe_key, sqlite_file
from migration_fsm.tasks.sql.mapping import FIELDS, MappedField, TableMapping
from migration_fsm.tasks.sql.statements import Query, Statements

if TYPE_CHECKING:
    from collections.abc import Iterator, Mapping, Sequence
    from datetime import datetime

    from sqlalchemy import Connection
    from sqlalchemy.sql.selectable import Select

    from migration_fsm.tasks.sql.statements import DriverStatement

#: Keys per `IN (...)` when looking up which keys of a batch exist (below every database's limit).
KEY_LOOKUP_CHUNK: Final = 500
#: Keys per `IN (...)` list in `get_many` (well under every driver's parameter limit).
_GET_MANY_CHUNK: Final = 500
_type_of: Final = itemgetter(1)  # of an identity row
_created_of: Final = itemgetter(3)
_status_of: Final = itemgetter(4)


class SqlTaskStore:
    """A `TaskStore` over an existing table, through a column mapping and a status mapping.

    `columns` maps a `TaskRecord` field to its column (default: the column of the same
    name; `attempts` and `metadata` may be absent, then they read as 0 and {} and are not
    written; `run_at` may be absent, then it reads as None and a record with one is refused
    with a `DataError` rather than written without it; `created_at` and `updated_at` may
    name one column, which holds `created_at`, and `updated_at` then reads as `created_at`).
    The key column may hold text or integers (keys are then their decimal text, and scans are
    still in Python `str` order: see `mapping.integer_ranges`). `status_map` maps a stored
    value to a `TaskStatus` value; several stored values may map to one status and writes use
    the first (default: the stored values are the `TaskStatus` values). `type_map` does the
    same for task names (stored name -> record type); with one, a stored name or a type it
    does not map is a `DataError`, never a guess. `constants` (column -> value) fills columns
    the record does not carry when a task is inserted (updates leave them as they are); each
    must exist, be mapped by no field and fit its column's type. `epoch_units` (time field ->
    "s" or "ms") says what an integer time column counts: seconds or milliseconds since 1970
    UTC (required for such a column; a finer part of a time written there is cut off).
    A table or mapped column that does not exist is a `ConfigError`
    (exit 2); a row the store cannot read, or a record it cannot write, is a `DataError`
    (exit 1) naming the store, the column and the key. `engine` shares an engine the caller
    owns; otherwise the store makes one and `close()` disposes of it.

    `mapping` (the `TableMapping`) and `statements` (its compiled `Statements`) are public,
    for `RowCopy` and for adapters built on this store.
    """

    mapping: TableMapping
    statements: Statements

    def __init__(
        self,
        url: str,
        table: str,
        *,
        name: str = "sql",
        columns: Mapping[str, str] | None = None,
        status_map: Mapping[str, str] | None = None,
        type_map: Mapping[str, str] | None = None,
        constants: Mapping[str, Any] | None = None,
        epoch_units: Mapping[str, str] | None = None,
        schema: str | None = None,
        engine: Engine | None = None,
    ) -> None:
        self.name = name
        self.url = url
        self.safe_url = safe_url(url)
        self.table_name = table if schema is None else f"{schema}.{table}"
        self._owns_engine = engine is None
        self._identity_queries: dict[tuple[int, bool], Query] = {}
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
        self.dbapi_error: type[Exception] = engine.dialect.loaded_dbapi.Error
        try:
            self._setup(
                table,
                schema,
                columns=dict(columns or {}),
                status_map=dict(status_map or {}),
                type_map=dict(type_map or {}),
                constants=dict(constants or {}),
                epoch_units=dict(epoch_units or {}),
            )
        except BaseException:
            self.close()
            raise

    def _setup(
        self,
        table: str,
        schema: str | None,
        *,
        columns: dict[str, str],
        status_map: dict[str, str],
        type_map: dict[str, str],
        constants: dict[str, Any],
        epoch_units: dict[str, str],
    ) -> None:
        for field in columns:
            if field not in FIELDS:
                raise ConfigError(
                    f"store '{self.name}': columns.{field}: '{field}' is not a task field"
                    f" ({', '.join(FIELDS)})"
                )
        dialect = self.engine.dialect
        with self.connect(readonly=True) as conn:
            try:
                self.table = Table(table, MetaData(), schema=schema, autoload_with=conn)
            except sa_exc.NoSuchTableError as exc:
                raise ConfigError(
                    f"store '{self.name}': table '{self.table_name}' does not exist in {self.safe_url}"
                ) from exc
            self.mapping = TableMapping(
                self.name,
                self.table,
                dialect=dialect.name,
                columns=columns,
                status_map=status_map,
                type_map=type_map,
                constants=constants,
                table_name=self.table_name,
                epoch_units=epoch_units,
            )
            probe_key(conn, self.mapping, dialect)
        if not self.mapping.key_unique_anyhow:
            key = self.mapping.key_column.name
            raise ConfigError(
                f"store '{self.name}': table '{self.table_name}' has no unique index on its key column"
                f" '{key}', so concurrent writers would store a task twice: create one (CREATE UNIQUE"
                f" INDEX {self.table.name}_{key}_unique ON {self.table_name} ({key})) or map the key"
                " to a unique column"
            )
        self.statements = Statements(self.mapping, dialect)

    @property
    def dialect(self) -> str:
        """The database's dialect name (`sqlite`, `postgresql`, ...)."""
        return self.mapping.dialect

    # -- plumbing ---------------------------------------------------------------------

    @contextmanager
    def connect(
        self,
        *,
        readonly: bool = False,
        attach: str | None = None,
        commit: bool = True,
        durable: bool = True,
    ) -> Iterator[Connection]:
        """One transaction; database errors other than integrity errors become ours. With
        `attach` (SQLite), that database file is attached as `mfsm_source` for the
        transaction, which then begins deferred (`BEGIN IMMEDIATE` would write-lock the
        attached database too; deferred, it is locked as by any reader). Without `commit`
        (a read of one statement) the transaction is rolled back: nothing to make durable.
        Without `durable` the commit may be lost to a power cut (never torn): on SQLite in WAL
        mode `synchronous=NORMAL` (no fsync; any later durable commit makes it durable too,
        as the WAL is one file written in order), on PostgreSQL `synchronous_commit = off`
        (the same, for its WAL); elsewhere it is durable anyway. `RowCopy` uses it."""
        try:
            with self.engine.connect() as conn, self._lazy_commit(conn, durable or readonly or not commit):
                if readonly or attach is not None:
                    conn.execution_options(mfsm_readonly=True)  # a plain (deferred) BEGIN
                if not commit:
                    yield conn  # begins on first use; closing the connection rolls it back
                elif attach is None:
                    with conn.begin():
                        if not durable and self.dialect == "postgresql":
                            conn.exec_driver_sql("SET LOCAL synchronous_commit = off")
                        yield conn
                else:
                    with attached(conn, attach, self.dbapi_error, self.wrap), conn.begin():
                        # This database's write lock now, as BEGIN IMMEDIATE takes it: taken
                        # later, after reading, it could meet another writer's and fail at once.
                        conn.exec_driver_sql(self.statements.write_lock_sql)
                        yield conn
        except sa_exc.IntegrityError:
            raise
        except (sa_exc.OperationalError, sa_exc.InterfaceError) as exc:
            raise DatabaseUnavailable(
                f"store '{self.name}': database {self.safe_url} is unavailable: {self.scrub(exc)}"
            ) from exc
        except sa_exc.StatementError as exc:  # DBAPIError's other kinds, and bind errors
            raise DataError(
                f"store '{self.name}': table '{self.table_name}' in {self.safe_url} refused the"
                f" statement: {self.scrub(exc)}"
            ) from exc

    @contextmanager
    def _lazy_commit(self, conn: Connection, durable: bool) -> Iterator[None]:
        """SQLite in WAL mode, not `durable`: `synchronous=NORMAL` on this connection for the
        transaction, and back to what it was after (the pool hands the connection on)."""
        if durable or self.dialect != "sqlite" or not self.in_wal_mode:
            yield
            return
        driver = conn.connection.driver_connection
        assert driver is not None
        (was,) = driver.execute("PRAGMA synchronous").fetchone()
        driver.execute("PRAGMA synchronous = NORMAL")
        try:
            yield
        finally:
            driver.execute(f"PRAGMA synchronous = {int(was)}")

    def make_durable(self) -> None:
        """Wait for the disk: every commit made without `durable` before this call is on disk
        when it returns. PostgreSQL: a durable commit of a transaction that wrote to the log
        (a logical message, which no decoder need read: a commit that wrote nothing, even one
        with a transaction id, does not wait), which flushes the log up to it and so past
        every earlier commit; SQLite in WAL mode: an fsync
        of the WAL file, which holds every committed frame in order. A durable commit of the
        rows themselves may write nothing (the rows gone from the source, or all equal), so
        `backfill` ends with this instead."""
        if self.dialect == "postgresql":
            with self.connect() as conn:
                conn.exec_driver_sql("SELECT pg_logical_emit_message(true, 'migration_fsm', 'durable')")
        elif self.in_wal_mode and (path := sqlite_file(self.engine)) is not None:
            try:
                fd = os.open(path + "-wal", os.O_RDONLY)
            except FileNotFoundError:  # no WAL file: every commit is in the database file
                return
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

    @cached_property
    def in_wal_mode(self) -> bool:
        """SQLite: whether the database file is in WAL mode (asked once)."""
        if self.dialect != "sqlite":
            return False
        with self.engine.connect() as conn:
            mode = conn.exec_driver_sql("PRAGMA journal_mode").scalar()
        return str(mode).lower() == "wal"

    def fetch(self, query: Query, **values: Any) -> list[Any]:
        """The rows of `query` as the driver returns them: tuples, no result processing."""
        with self.connect(readonly=True, commit=False) as conn:
            result = conn.exec_driver_sql(query.sql, query.params(**values))
            try:
                return list(result.cursor.fetchall())
            except self.dbapi_error as exc:
                raise self.wrap(query.sql, exc) from exc
            finally:
                result.close()

    def wrap(self, statement: str, exc: Exception) -> sa_exc.StatementError:
        """A driver error raised outside SQLAlchemy, as SQLAlchemy's own (so `connect` and the
        upsert's retry treat it as they treat any other)."""
        dialect = self.engine.dialect
        return sa_exc.DBAPIError.instance(statement, None, exc, self.dbapi_error, dialect=dialect)

    def scrub(self, exc: sa_exc.StatementError) -> str:
        """The database's message for `exc`, without the URL's password."""
        return scrub(str(exc.orig if exc.orig is not None else exc), self.url)

    def refused_batch(self, what: str, exc: sa_exc.IntegrityError) -> DataError:
        """The error for a batch (`what` describes it) that the table refused as a whole."""
        return DataError(
            f"store '{self.name}': table '{self.table_name}' refused {what}, nothing was written:"
            f" {self.scrub(exc)}"
        )

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
        mapping = self.mapping
        order = mapping.key_order
        if mapping.integer_key:
            stmt = self._integer_page(self.statements.select, after, limit + 1)
        else:
            stmt = self.statements.select.order_by(order).limit(limit + 1)
            if after is not None:
                stmt = stmt.where(order > after)
        with self.connect(readonly=True) as conn:
            rows = conn.execute(stmt).all()
        if mapping.integer_key:
            for row in rows:  # a key outside every range (it may sort past the page): refused
                if type(row[0]) is not int or row[0] < 0:
                    mapping.key_text(row[0])
            rows = self._in_text_order(rows, limit + 1)
        previous = after
        for row in rows:  # one row past the page, so a duplicate of its last key shows
            key = mapping.key_text(row[0]) if mapping.integer_key else row[0]
            if previous is not None and isinstance(key, str) and not previous < key:
                column = mapping.key_column.name
                if previous == key:
                    raise mapping.duplicate(key)
                raise DataError(
                    f"store '{self.name}': the database returned key {key!r} after {previous!r}:"
                    f" column '{column}' does not sort in code point order"
                )
            previous = key
        return [mapping.decode(row) for row in rows[:limit]]

    def _integer_page(self, columns: Select[Any], after: str | None, limit: int) -> Select[Any]:
        """An integer key column's next `limit` rows in text order, or a few more: for each
        number of digits, its first `limit` rows above `after` (a range of the key index,
        `mapping.integer_ranges`); `_in_text_order` keeps the first `limit` of them all."""
        key = self.mapping.key_column
        parts = [
            columns.where(key.between(low, high)).order_by(key).limit(limit).subquery().select()
            for low, high in integer_ranges(after)
        ]
        if after is None:
            # The first page shows one key outside every range (a negative one; on SQLite also
            # a real past the largest or text, which sort after every integer), and is refused.
            parts.append(columns.where(outside_ranges(key)).limit(1).subquery().select())
        if not parts:
            return columns.where(false())
        return parts[0] if len(parts) == 1 else union_all(*parts)  # type: ignore[return-value]

    @staticmethod
    def _in_text_order(rows: Sequence[Any], limit: int) -> list[Any]:
        """The first `limit` of `_integer_page`'s rows, in Python `str` order of their keys."""
        return sorted(rows, key=lambda row: str(row[0]))[:limit]

    def _key_values(self, keys: Sequence[str]) -> list[Any]:
        """These keys as the key column holds them; on an integer column, a key that is not
        the text of an integer cannot be there, and is left out."""
        if not self.mapping.integer_key:
            return list(keys)
        numbers = (integer_key(key) for key in keys)
        return [number for number in numbers if number is not None]

    def get(self, key: str) -> TaskRecord | None:
        """The record with this key, or None."""
        mapping = self.mapping
        found = self._key_values([key])
        if not found:
            return None
        with self.connect(readonly=True) as conn:
            rows = conn.execute(self.statements.select.where(mapping.key_column == found[0]).limit(2)).all()
        if len(rows) > 1:
            raise mapping.duplicate(key)
        return mapping.decode(rows[0]) if rows else None

    def get_many(self, keys: Sequence[str]) -> dict[str, TaskRecord]:
        """The records with these keys (absent keys are left out), in a few round trips:
        validation re-reads its differences through this (`capabilities.BulkGet`)."""
        mapping = self.mapping
        wanted = sorted(set(self._key_values(keys)))
        found: dict[str, TaskRecord] = {}
        column = mapping.key_column
        with self.connect(readonly=True) as conn:
            for start in range(0, len(wanted), _GET_MANY_CHUNK):
                chunk = wanted[start : start + _GET_MANY_CHUNK]
                for row in conn.execute(self.statements.select.where(column.in_(chunk))).all():
                    record = mapping.decode(row)
                    if record.key in found:
                        raise mapping.duplicate(record.key)
                    found[record.key] = record
        return found

    def identities_of(self, keys: Sequence[str]) -> dict[str, IdentityRow]:
        """The identity rows of these keys (absent keys are left out), in a few round trips,
        read as `scan_identities` reads them (`capabilities.IdentityGet`)."""
        wanted = sorted(set(self._key_values(keys)))
        found: dict[str, IdentityRow] = {}
        key_column, columns = self.mapping.key_column, self.statements.identity_select
        with self.connect(readonly=True) as conn:
            for start in range(0, len(wanted), _GET_MANY_CHUNK):
                chunk = wanted[start : start + _GET_MANY_CHUNK]
                for row in conn.execute(columns.where(key_column.in_(chunk))):
                    key = str(row[0])
                    if key in found:
                        raise self.mapping.duplicate(key)
                    found[key] = (key, *row[1:])
        return found

    def put(self, record: TaskRecord) -> None:
        """Insert or replace the record with this key (idempotent)."""
        one_statement = self.statements.forward(None)
        if one_statement is None:
            self.put_many([record])
        else:
            self._put_one(one_statement, record)

    def put_many(self, records: Sequence[TaskRecord]) -> int:
        """Insert or replace each record by key in one transaction (all or nothing); the
        last record of a key wins. Returns how many records were given."""
        if not records:
            return 0
        encoded = {record.key: self.mapping.encode(record) for record in records}
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
        one_statement = self.statements.forward(record.status)
        if one_statement is not None:
            return self._put_one(one_statement, record) == 1
        mapping, statements = self.mapping, self.statements
        encoded = [mapping.encode(record)]
        status = mapping.by_name["status"]
        key = mapping.key_value(record.key)
        stored_status = select(status.select).where(mapping.key_column == key).limit(2)
        if mapping.dialect == "postgresql":
            stored_status = stored_status.with_for_update()  # SQLite: BEGIN IMMEDIATE locked it all
        for attempt in (1, 2):
            try:
                with self.connect() as conn:
                    stored = conn.execute(stored_status).scalars().all()
                    if len(stored) > 1:
                        raise mapping.duplicate(record.key)
                    if not stored:
                        conn.exec_driver_sql(statements.insert.sql, statements.insert.params(encoded))
                        return True
                    if is_behind(record.status, status.read(stored[0], record.key)):
                        return False
                    conn.exec_driver_sql(statements.update.sql, statements.update.params(encoded))
                    return True
            except sa_exc.IntegrityError as exc:
                if attempt == 1:
                    continue  # another writer inserted this key first: read it again
                raise self.refused_batch(f"task {record.key!r}", exc) from exc
        raise AssertionError("unreachable")  # pragma: no cover

    def set_progress(self, key: str, status: TaskStatus, attempts: int, updated_at: datetime) -> bool:
        """Update the status, attempts and updated_at columns of the task `key` and nothing else
        (`capabilities.SetProgress`): the payload's text, created_at and every unmapped column
        stay as they are, and the values are written by the mapping's own writers (the status
        map, the timestamp column's format). A table without an attempts column, or whose
        updated_at shares created_at's column, keeps what it cannot hold. False when the table
        has no task `key`. A timestamp held as text is written in the format the row holds
        (`mapping.time_text_like`), so a legacy table's timestamps keep their form."""
        mapping = self.mapping
        if not self._key_values([key]):
            return False
        progress = TaskRecord.model_construct(
            key=key, status=TaskStatus(status), attempts=attempts, updated_at=updated_at
        )
        key_field = mapping.fields[0]
        values = {key_field.param: key_field.write(progress)}
        values.update({f.param: f.write(progress) for f in self.statements.progress_fields})
        query = self.statements.progress
        updated = mapping.by_name.get("updated_at")
        with self.connect() as conn:
            if updated is not None and updated.kind is ColumnKind.ISO_TEXT:
                # A timestamp held as text keeps the row's own format (a legacy table's).
                stored = conn.execute(
                    select(updated.column).where(mapping.key_column == mapping.key_value(key))
                ).scalar()
                shaped = time_text_like(stored, updated_at) if isinstance(stored, str) else None
                if shaped is not None:
                    values[updated.param] = shaped
            return int(conn.exec_driver_sql(query.sql, query.params(**values)).rowcount) > 0

    def set_progress_many(self, updates: Sequence[ProgressUpdate]) -> int:
        """`set_progress` for a batch, in one transaction (`capabilities.SetProgressMany`):
        one executemany per kind of condition, rows in key order (one lock order for every
        writer). Each row keeps its own condition: its key and, with `expected`, its stored
        status (`Statements.progress_if`). Text timestamps keep each row's own format, read in
        one query. Returns how many rows were updated."""
        mapping, statements = self.mapping, self.statements
        wanted = [u for u in updates if self._key_values([u.key])]
        if not wanted:
            return 0
        wanted.sort(key=lambda u: u.key)
        key_field = mapping.fields[0]
        updated = mapping.by_name.get("updated_at")
        text_time = updated is not None and updated.kind is ColumnKind.ISO_TEXT
        groups: dict[TaskStatus | None, list[dict[str, Any]]] = {}
        done = 0
        with self.connect() as conn:
            stored_times: dict[str, Any] = {}
            if text_time and updated is not None:
                keys = self._key_values([u.key for u in wanted])
                rows = conn.execute(
                    select(mapping.key_column, updated.column).where(mapping.key_column.in_(keys))
                )
                stored_times = {str(key): stored for key, stored in rows}
            for one in wanted:
                progress = TaskRecord.model_construct(
                    key=one.key,
                    status=TaskStatus(one.status),
                    attempts=one.attempts,
                    updated_at=one.updated_at,
                )
                values = {key_field.param: key_field.write(progress)}
                values.update({f.param: f.write(progress) for f in statements.progress_fields})
                if text_time and updated is not None:
                    stored = stored_times.get(one.key)
                    shaped = time_text_like(stored, one.updated_at) if isinstance(stored, str) else None
                    if shaped is not None:
                        values[updated.param] = shaped
                groups.setdefault(one.expected, []).append(values)
            for expected, rows_of in groups.items():
                query = statements.progress if expected is None else statements.progress_if(expected)
                if query is None:  # no stored value reads as `expected`: no row can match
                    continue
                result = conn.exec_driver_sql(query.sql, [query.params(**values) for values in rows_of])
                done += max(int(result.rowcount), 0)
        return done

    def _put_one(self, statement: DriverStatement, record: TaskRecord) -> int:
        """Run one of `Statements.forward`'s statements for `record`: the rows written, 0 or 1."""
        params = statement.params([self.mapping.encode(record)])[0]
        try:
            with self.connect() as conn:
                return int(conn.exec_driver_sql(statement.sql, params).rowcount)
        except sa_exc.IntegrityError as exc:  # not the key (ON CONFLICT takes that): a constraint
            raise self.refused_batch(f"task {record.key!r}", exc) from exc

    def put_rows(self, keys: list[str], rows: list[tuple[Any, ...]], *, durable: bool = True) -> int:
        """Insert or replace rows already in this table's form (`RowCopy` makes them), in one
        transaction (`durable`: as `connect` says); `keys` ascending and unique, `rows` in the
        same order. Inserts go through COPY on PostgreSQL. Returns how many rows were given."""
        if rows:
            self._write(keys, rows, bulk=True, durable=durable)
        return len(rows)

    def _write(
        self, keys: list[str], rows: list[tuple[Any, ...]], *, bulk: bool = False, durable: bool = True
    ) -> None:
        for attempt in (1, 2):
            try:
                self._upsert(keys, rows, bulk=bulk, durable=durable)
            except sa_exc.IntegrityError as exc:
                if attempt == 1:
                    continue  # most likely another writer inserted one of these keys first
                raise self.refused_batch(
                    f"a batch of {len(keys)} tasks ({keys[0]!r} .. {keys[-1]!r})", exc
                ) from exc
            break

    def _upsert(
        self, keys: list[str], rows: list[tuple[Any, ...]], *, bulk: bool, durable: bool = True
    ) -> None:
        statements = self.statements
        with self.connect(durable=durable) as conn:
            existing = self._existing(conn, keys)
            if existing:
                updates = [row for key, row in zip(keys, rows, strict=True) if key in existing]
                inserts = [row for key, row in zip(keys, rows, strict=True) if key not in existing]
            else:
                updates, inserts = [], rows
            # Values are converted already: the driver's executemany, without per-row processing.
            if updates:
                conn.exec_driver_sql(statements.update.sql, statements.update.params(updates))
            if inserts and bulk and statements.copy_sql is not None:
                try:
                    copy_rows(conn, statements.copy_sql, inserts)
                except self.dbapi_error as exc:
                    raise self.wrap(statements.copy_sql, exc) from exc
            elif inserts:
                conn.exec_driver_sql(statements.insert.sql, statements.insert.params(inserts))

    def _existing(self, conn: Connection, keys: list[str]) -> set[str]:
        """Which of these keys (ascending) the table holds."""
        key_range = self.statements.key_range
        if key_range is not None:
            probe = key_range.params(mfsm_low=keys[0], mfsm_high=keys[-1])
            if conn.exec_driver_sql(key_range.sql, probe).first() is None:
                return set()  # the common case of a backfill: none of them
        mapping = self.mapping
        key_column = mapping.key_column
        values = [mapping.key_value(key) for key in keys]
        existing: set[str] = set()
        for start in range(0, len(values), KEY_LOOKUP_CHUNK):
            chunk = values[start : start + KEY_LOOKUP_CHUNK]
            found = conn.execute(select(key_column).where(key_column.in_(chunk))).scalars()
            existing.update(map(str, found) if mapping.integer_key else found)
        return existing

    # -- optional capabilities (`tasks.capabilities`) ---------------------------------

    def scan_identities(self, after: str | None, limit: int) -> Sequence[IdentityRow]:
        """Up to `limit` identity rows (`identity.py`) with key > `after`, ascending in Python
        `str` order, read without decoding: JSON stays text, timestamps stay as stored."""
        if limit <= 0:
            return []
        if self.mapping.integer_key:
            ranges = integer_ranges(after)
            values = {"mfsm_limit": limit + 1}
            for i, (low, high) in enumerate(ranges):
                values[f"mfsm_low{i}"], values[f"mfsm_high{i}"] = low, high
            found = self.fetch(self._identity_ranges(len(ranges), negative=after is None), **values)
            rows: list[Any] = [(str(row[0]), *row[1:]) for row in self._in_text_order(found, limit + 1)]
            if any(row[0].startswith("-") for row in rows):
                self._explain_page(after, limit)  # a negative key
        else:
            query = self.statements.identity[after is not None]
            rows = self.fetch(query, mfsm_after=after, mfsm_limit=limit + 1)  # + 1: see `scan`
        if rows and not keys_in_order(after, rows):
            self._explain_page(after, limit)
        page = rows[:limit]
        if None in map(_status_of, page) or None in map(_type_of, page) or None in map(_created_of, page):
            self._explain_page(after, limit)  # a status or name the maps do not map, no created_at
        return page

    def _identity_ranges(self, ranges: int, *, negative: bool) -> Query:
        """`_integer_page` of the identity rows, with its bounds as parameters (`mfsm_lowN`,
        `mfsm_highN`, `mfsm_limit`): compiled once per number of ranges, not once per page."""
        cached = self._identity_queries.get((ranges, negative))
        if cached is None:
            columns, key = self.statements.identity_select, self.mapping.key_column
            limit = bindparam("mfsm_limit", type_=Integer())
            parts = [
                columns.where(
                    key.between(
                        bindparam(f"mfsm_low{i}", type_=BigInteger()),
                        bindparam(f"mfsm_high{i}", type_=BigInteger()),
                    )
                )
                .order_by(key)
                .limit(limit)
                .subquery()
                .select()
                for i in range(ranges)
            ]
            if negative:  # a negative key sorts first: the first page shows it, and is refused
                parts.append(columns.where(key < 0).limit(1).subquery().select())
            stmt: Any = (
                columns.where(false()) if not parts else parts[0] if len(parts) == 1 else union_all(*parts)
            )
            cached = self._identity_queries[ranges, negative] = Query.compile(stmt, self.engine.dialect)
        return cached

    def _explain_page(self, after: str | None, limit: int) -> NoReturn:
        """Raise the `DataError` that `scan` raises for this page (it names the key and column)."""
        self.scan(after, limit)
        raise DataError(
            f"store '{self.name}': the tasks after {after!r} changed while they were read; run it again"
        )

    def identity_checksum(self, row: IdentityRow) -> str:
        """`TaskRecord.checksum()` of the record `row` decodes to (a `DataError` naming the
        key and column when it cannot be decoded)."""
        key, fields = row[0], self.mapping.by_name
        if row[1] is None or row[3] is None:  # an unmapped task name, an unreadable created_at
            record = self.get(key)  # raises the DataError `scan` raises, naming the column
            if record is None:
                raise DataError(f"store '{self.name}': task {key!r} is gone; run it again")
            return record.checksum()
        mapped = self.mapping.read_type is not None  # the name was mapped when it was read
        type_ = row[1] if mapped else fields["type"].read(row[1], key)
        payload = fields["payload"].read(row[2], key)
        created_at = _time_of(fields["created_at"], row[3], key)
        run_at = _time_of(fields["run_at"], row[6], key) if "run_at" in fields else None
        return checksum_of(key, type_, payload, created_at, run_at)

    def count(self) -> int:
        """How many tasks the table holds (one `count(*)`; `count_by_status` also checks every
        stored status, which reads the whole table)."""
        with self.connect(readonly=True) as conn:
            return int(conn.execute(select(func.count()).select_from(self.table)).scalar_one())

    def count_by_status(self) -> Mapping[TaskStatus, int]:
        """How many records are in each status (every status present, zero included)."""
        mapping = self.mapping
        status, key_column = mapping.status_column, mapping.key_column
        with self.connect(readonly=True) as conn:
            groups = conn.execute(select(status, func.count()).group_by(status)).all()
            counts = dict.fromkeys(TaskStatus, 0)
            for stored, count in groups:
                mapped = mapping.read_status.get(stored)
                if mapped is None:
                    sample = conn.execute(
                        select(key_column).where(status == stored).limit(1)
                        if stored is not None
                        else select(key_column).where(status.is_(None)).limit(1)
                    ).scalar()
                    raise DataError(
                        f"store '{self.name}': key {sample!r}: column '{status.name}' holds status"
                        f" {stored!r} ({count} tasks), which the status map does not map"
                        f" (mapped: {', '.join(str(v) for v in mapping.read_status)})"
                    )
                counts[mapped] += count
        return counts


def _time_of(field: MappedField, value: Any, key: str) -> Any:
    """A timestamp of an identity row, decoded: canonical text (`identity_sql`) as it is, for
    `checksum_of` to parse, from a column whose own reader takes integers; else by the reader."""
    if isinstance(value, str) and field.kind.epoch is not None:
        return value
    return field.read(value, key)
