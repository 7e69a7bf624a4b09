"""`RowCopy`: tasks copied between two `SqlTaskStore` tables as rows, never as records.

It works from the two stores' public surface only: each one's `TableMapping` (columns,
kinds, status maps, key order and indexes), `connect` and `fetch`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    and_,
    bindparam,
    case,
    cast,
    func,
    insert,
    literal,
    null,
    or_,
    select,
    union_all,
)
from sqlalchemy import exc as sa_exc
from sqlalchemy.sql import visitors
from sqlalchemy.sql.elements import Label
from sqlalchemy.sql.schema import Column
from sqlalchemy.sql.sqltypes import NullType

from migration_fsm.exceptions import DataError, MigrationFSMError
from migration_fsm.tasks.sql.columns import (
    MAX_KEY_DIGITS,
    ColumnKind,
    bind_text,
    first_of,
    integer_key,
    integer_ranges,
    keys_in_order,
    outside_ranges,
)
from migration_fsm.tasks.sql.convert import SHARED, convert_time
from migration_fsm.tasks.sql.dialects import ATTACHED, insert_for, sqlite_file
from migration_fsm.tasks.sql.statements import Query
from migration_fsm.tasks.sql.store import SqlTaskStore

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping

    from sqlalchemy.engine import Connection
    from sqlalchemy.engine.interfaces import Dialect
    from sqlalchemy.sql.elements import ColumnElement
    from sqlalchemy.sql.selectable import Select

    from migration_fsm.tasks.records import TaskStore
    from migration_fsm.tasks.sql.mapping import MappedField, TableMapping

_Plan = tuple["ColumnElement[Any]", "ColumnElement[bool] | None"]
#: A page's number of rows (one more than its batch), bound at run time.
_LIMIT: Final = bindparam("mfsm_limit", type_=Integer())


class _PageChanged(Exception):
    """Rows of a batch changed between its check and its INSERT ... SELECT."""


@dataclass(frozen=True, slots=True)
class CopiedBatch:
    """One batch of a row copy: how many rows went as rows (`fast`), how many (each failing a
    check on its own) went the record path (`records`), and the batch's last key (None when
    there was none)."""

    fast: int
    records: int
    last: str | None
    #: Whether its commit was durable (then so is every commit before it on that database).
    durable: bool = True

    @property
    def count(self) -> int:
        return self.fast + self.records


class RowCopy:
    """Copies tasks from one `SqlTaskStore`'s table into another's as rows, never decoding
    them into records: the source database reads each field in the form the target column
    takes (a status through both status maps, a timestamp converted, a default for a field
    the source lacks) and checks, row by row in SQL, that the value is one the record path
    would write the same way.

    JSON is copied as the source holds it (checked to be a JSON object, not re-encoded): the
    target decodes it to the same records, and the same text on both sides is what lets
    `validate` compare rows without decoding them. A row that fails a check goes the record
    path alone (read as a record from the source, converted, or the `DataError` naming it
    raised before anything of its batch is written); the rest of its batch stays rows. A
    batch whose keys are not in order, or that changed under the copy, goes the record path
    as a whole (`copy_batch` returns None).

    Built only between two tables of one kind of database. Between two SQLite files (or two
    tables of one), the target's connection attaches the source and the batch is one
    `INSERT ... SELECT ... ON CONFLICT DO UPDATE`: the rows never reach Python at all. It
    begins deferred, so the source is locked no more than by any reader. Inside one
    PostgreSQL database one statement reads, checks and writes a batch. Otherwise the rows
    pass through Python and `SqlTaskStore.put_rows`."""

    def __init__(
        self,
        source: SqlTaskStore,
        target: SqlTaskStore,
        queries: dict[bool, Query],
        *,
        inserts: dict[bool, Query] | None = None,
        attach: str | None = None,
    ) -> None:
        self.source, self.target = source, target
        self._queries = queries
        self._width = len(target.mapping.fields)
        #: INSERT ... SELECT inside the database; None: rows pass through Python.
        self.inserts = inserts
        #: The source's file to attach (SQLite), when it is not the target's.
        self.attach = attach
        #: Inside SQLite: the keys of a range's rows that fail a check.
        self.failed: dict[bool, Query] = {}
        #: Inside SQLite from an integer key: how many rows the batch's ranges hold, and their
        #: last key in text order (`_inside_by_ranges`); None otherwise.
        self.ranges: Query | None = None
        #: Inside one PostgreSQL database from an integer key: each digit count's range's end
        #: (`integer_ends`), read before the one statement; None otherwise.
        self.ends: Query | None = None

    @classmethod
    def between(cls, source: TaskStore, target: TaskStore) -> RowCopy | None:
        """The copy from `source` to `target`, or None when they are not two SQL stores of one
        kind of database, or some field cannot be copied as it is stored."""
        # Not a capability probe: a row copy is made of both tables' mappings and statements.
        if not (isinstance(source, SqlTaskStore) and isinstance(target, SqlTaskStore)):
            return None
        mine, theirs = source.mapping, target.mapping
        if mine.dialect != theirs.dialect or mine.dialect not in ("sqlite", "postgresql"):
            return None
        inside = _inside_source(source, target)
        if not _keys_copy(mine, theirs, inside=inside is not None):
            return None
        table = mine.table if inside is None else inside[0]
        plans = [
            _copy_field(mine, theirs, field, table, inside=inside is not None) for field in theirs.fields
        ]
        if any(plan is None for plan in plans):
            return None
        values = [plan[0] for plan in plans if plan is not None]
        if mine.integer_key and not theirs.integer_key:
            values[0] = cast(values[0], Text())  # the decimal text, as `str` writes it
        conditions = [plan[1] for plan in plans if plan is not None and plan[1] is not None]
        if "run_at" in mine.by_name and not theirs.keeps_run_at:
            # A scheduled time the target cannot hold: that row goes the record path, which refuses it.
            conditions.append(table.c[mine.by_name["run_at"].column.name].is_(None))
        valid = and_(*conditions)
        if inside is None:
            copy = cls._through_python(source, target, table, values, valid)
        elif mine.dialect == "postgresql":
            copy = cls._in_one_statement(source, target, table, values, valid)
        elif mine.integer_key:
            copy = cls._inside_by_ranges(source, target, inside, values, valid)
        else:
            copy = cls._inside_sqlite(source, target, inside, values, valid)
        try:  # a database without these functions (an old SQLite without JSON): the record path
            copy.probe()
        except MigrationFSMError:
            return None
        return copy

    @classmethod
    def _through_python(
        cls,
        source: SqlTaskStore,
        target: SqlTaskStore,
        table: Table,
        values: list[Any],
        valid: ColumnElement[bool],
    ) -> RowCopy:
        """Two databases: the source reads each page's rows in the target's form and a verdict
        per row; the rows pass through Python (`SqlTaskStore.put_rows`)."""
        queries = {}
        for with_after in (False, True):
            order = source.mapping.key_order
            after = order > bind_text("mfsm_after") if with_after else None
            [*read_values, ok], order, after = computed_once(table, [*values, valid], order, after, _LIMIT)
            read = select(*read_values, ok.label("mfsm_ok")).order_by(order).limit(_LIMIT)
            read = read if after is None else read.where(after)
            queries[with_after] = Query.compile(read, source.engine.dialect)
        return cls(source, target, queries)

    @classmethod
    def _in_one_statement(
        cls,
        source: SqlTaskStore,
        target: SqlTaskStore,
        table: Table,
        values: list[Any],
        valid: ColumnElement[bool],
    ) -> RowCopy:
        """Inside one PostgreSQL database. One statement, so one snapshot: it reads the page,
        checks it, inserts the rows that pass, and returns the keys, how many it wrote and each
        row's verdict. From an integer key the page is a batch of `_inside_by_ranges` (every
        key whose text lies between the batch's start and its end, the first in text order of
        each digit count's `limit`-th key: `integer_ends`, read first), in text order."""
        mine, theirs = source.mapping, target.mapping
        native = _native_values(mine, theirs, table, values)
        constants, dialect = target.statements.constants, target.engine.dialect
        key = table.c[mine.key_column.name]
        order, where = mine.key_order, None
        if mine.integer_key:
            order, where = cast(key, Text()).collate("C"), or_(*digit_ranges(key))
        single = {
            with_after: Query.compile(
                _check_and_copy(
                    theirs, table, native, valid, order, with_after, constants=constants, where=where
                ),
                dialect,
            )
            for with_after in (False, True)
        }
        copy = cls(source, target, single, inserts=single)
        if mine.integer_key:
            copy.ends = Query.compile(integer_ends(key), dialect)
        return copy

    @classmethod
    def _inside_sqlite(
        cls,
        source: SqlTaskStore,
        target: SqlTaskStore,
        inside: tuple[Table, str | None],
        values: list[Any],
        valid: ColumnElement[bool],
    ) -> RowCopy:
        """Inside SQLite only keys reach Python: the page's keys (from the index alone), then
        one INSERT ... SELECT of the rows of that range that pass the checks (evaluated once),
        and only when it wrote fewer, the keys of those that did not."""
        table, attach = inside
        order = table.c[source.mapping.key_column.name].collate("BINARY")
        after = order > bind_text("mfsm_after")
        constants, dialect, theirs = target.statements.constants, target.engine.dialect, target.mapping
        keys = select(values[0]).order_by(order).limit(_LIMIT)
        rows = select(*values).where(order <= bind_text("mfsm_last"), valid).order_by(order)
        failed = select(values[0]).where(order <= bind_text("mfsm_last"), valid.is_not(True))
        inserts = {
            False: Query.compile(_upsert_from(theirs, rows, constants), dialect),
            True: Query.compile(_upsert_from(theirs, rows.where(after), constants), dialect),
        }
        copy = cls(source, target, _both(keys, after, dialect), inserts=inserts, attach=attach)
        copy.failed = _both(failed.order_by(order), after, dialect)
        return copy

    @classmethod
    def _inside_by_ranges(
        cls,
        source: SqlTaskStore,
        target: SqlTaskStore,
        inside: tuple[Table, str | None],
        values: list[Any],
        valid: ColumnElement[bool],
    ) -> RowCopy:
        """Inside SQLite, from an integer key: a batch is every key whose text lies in (the
        batch's start, its end], which is one range of the key index per digit count
        (`columns.integer_ranges`). Its end is the first in text order of each digit count's
        `limit`-th key after the start (`integer_ends`): no range gives more than `limit` keys
        and the one that gave the end exactly `limit`. Only those ends reach Python; the count,
        the INSERT ... SELECT and the failed rows' keys each read the ranges from the index."""
        table, attach = inside
        key = table.c[source.mapping.key_column.name]
        dialect, constants = target.engine.dialect, target.statements.constants
        # A key SQLite holds as a real or text in an integer column is no key the ranges
        # convert: that row fails, and its batch goes the record path (`_copy_ranges`).
        valid = and_(valid, func.typeof(key) == "integer")

        def over_ranges(part: Callable[[ColumnElement[bool]], Select[Any]]) -> Any:
            return union_all(*(part(in_range) for in_range in digit_ranges(key))).subquery()

        # One OR of the ranges: SQLite reads each from the key index (MULTI-INDEX OR).
        in_ranges = or_(*digit_ranges(key))
        insert_rows = _upsert_from(target.mapping, select(*values).where(in_ranges, valid), constants)
        counted = over_ranges(lambda in_range: select(key).where(in_range))
        failed = over_ranges(lambda in_range: select(values[0]).where(in_range, valid.is_not(True)))
        ends = Query.compile(integer_ends(key), dialect)
        copy = cls(source, target, {False: ends, True: ends}, attach=attach)
        insert_query, failed_query = (
            Query.compile(insert_rows, dialect),
            Query.compile(select(*failed.c), dialect),
        )
        copy.inserts = {False: insert_query, True: insert_query}
        copy.failed = {False: failed_query, True: failed_query}
        as_text = cast(counted.c[0], Text()).collate("BINARY")
        count_and_last: list[ColumnElement[Any]] = [func.count(), func.max(as_text)]
        copy.ranges = Query.compile(select(*count_and_last).select_from(counted), dialect)
        return copy

    @property
    def in_one_statement(self) -> bool:
        """PostgreSQL inside one database: one statement reads, checks and writes a batch."""
        return self.inserts is self._queries

    def probe(self) -> None:
        """Run the copy's statements so that they match nothing: a `MigrationFSMError` when
        the databases cannot run them."""
        if self.inserts is None:
            self.source.fetch(self._queries[False], mfsm_limit=0)
            return
        with self.target.connect(attach=self.attach) as conn:
            read, insert = self._queries[False], self.inserts[True]
            if self.ranges is not None:  # ranges that are empty
                empty = {"mfsm_offset": 0, "mfsm_first": 0}
                for digits in range(1, MAX_KEY_DIGITS + 1):
                    empty[f"mfsm_low{digits}"], empty[f"mfsm_high{digits}"] = 1, 0
                for query in (read, insert, self.ranges, self.failed[False]):
                    conn.exec_driver_sql(query.sql, query.params(**empty)).close()
                return
            if self.in_one_statement:  # a page of none
                conn.exec_driver_sql(read.sql, read.params(mfsm_limit=0, mfsm_batch=0)).close()
                return
            conn.exec_driver_sql(read.sql, read.params(**self._batch_params(None, 0))).close()
            conn.exec_driver_sql(insert.sql, insert.params(**self._batch_params(None, 0))).close()

    def copy_batch(self, after: str | None, limit: int, *, durable: bool = True) -> CopiedBatch | None:
        """Copy up to `limit` tasks with keys > `after`: the rows that pass every check as
        rows, each other one as its record (a `DataError` naming it, and nothing of the
        batch written, when the record path refuses it). None when the batch must go the
        record path as a whole (nothing was written then). Without `durable` the batch's
        commit may be lost to a power cut (`SqlTaskStore.connect`): the caller saves no
        checkpoint past it until a later durable commit."""
        try:
            if self.inserts is None:
                return self._copy_through_python(after, limit, durable)
            if self.ranges is not None:
                return self._copy_ranges(after, limit, durable)
            if self.in_one_statement:
                return self._check_and_copy(after, limit, durable)
            return self._copy_inside(self.inserts, after, limit, durable)
        except _PageChanged:
            return None

    def _records_of(self, keys: list[str]) -> tuple[list[str], list[tuple[Any, ...]]]:
        """The rows that failed a check, through the record path: read from the source as
        records and encoded for the target (keys and rows, ascending; a key gone since is
        left out). Raises the record path's `DataError` for a row it cannot read or write."""
        if not keys:
            return [], []
        records = self.source.get_many(keys)
        found = [key for key in keys if key in records]
        encode = self.target.mapping.encode
        return found, [encode(records[key]) for key in found]

    def _copy_through_python(self, after: str | None, limit: int, durable: bool) -> CopiedBatch:
        page = self.checked(after, limit, self._read(after, limit))
        width = self._width
        good = [row for row in page if row[-1]]
        slow_keys, slow_rows = self._records_of([row[0] for row in page if not row[-1]])
        keys, rows = [row[0] for row in good], [row[:width] for row in good]
        if slow_keys:  # one batch, in key order
            merged = sorted(zip(keys + slow_keys, rows + slow_rows, strict=True), key=first_of)
            keys, rows = [key for key, _ in merged], [row for _, row in merged]
        self.target.put_rows(keys, rows, durable=durable)
        return CopiedBatch(len(good), len(slow_keys), page[-1][0] if page else None, durable)

    def _read(self, after: str | None, limit: int) -> list[Any]:
        try:
            return self.source.fetch(self._queries[after is not None], mfsm_after=after, mfsm_limit=limit + 1)
        except MigrationFSMError as exc:  # a value a cast refused (PostgreSQL): records explain it
            raise _PageChanged from exc

    def _copy_inside(
        self, inserts: dict[bool, Query], after: str | None, limit: int, durable: bool
    ) -> CopiedBatch:
        """`copy_batch` inside SQLite, in one transaction of the target store with the source
        attached: the page's keys, one INSERT ... SELECT of its rows that pass the checks, and
        when some did not, their keys; those rows' records are read before it commits (a
        `DataError` undoes the batch) and written after, in a second transaction."""
        target = self.target
        read, insert = self._queries[after is not None], inserts[after is not None]
        for attempt in (1, 2):
            try:
                with target.connect(attach=self.attach, durable=durable) as conn:
                    found = conn.exec_driver_sql(
                        read.sql, read.params(**self._batch_params(after, limit + 1))
                    )
                    page = self.checked(after, limit, list(found.cursor.fetchall()))
                    if not page:
                        return CopiedBatch(0, 0, None, durable)
                    last = page[-1][0]
                    params = self._batch_params(after, limit + 1, last)
                    fast = conn.exec_driver_sql(insert.sql, insert.params(**params)).rowcount
                    slow: tuple[list[str], list[tuple[Any, ...]]] = ([], [])
                    if fast != len(page):
                        failed = self.failed[after is not None]
                        keys = [row[0] for row in conn.exec_driver_sql(failed.sql, failed.params(**params))]
                        if fast + len(keys) != len(page):  # rows changed in between: undone, records it is
                            raise _PageChanged
                        slow = self._records_of(keys)
                target.put_rows(*slow)  # durable: and so every commit before it
                return CopiedBatch(fast, len(slow[0]), last, durable or bool(slow[0]))
            except sa_exc.IntegrityError as exc:
                if attempt == 1:
                    continue  # most likely another writer inserted one of these keys first
                raise target.refused_batch(f"a batch of tasks after {after!r}", exc) from exc
            except DataError as exc:
                if _cast_refused(exc):
                    raise _PageChanged from exc
                raise
        raise AssertionError("unreachable")  # pragma: no cover

    def _copy_ranges(self, after: str | None, limit: int, durable: bool) -> CopiedBatch:
        """`copy_batch` inside SQLite from an integer key (`_inside_by_ranges`), in one
        transaction of the target store with the source attached, so every statement reads one
        snapshot of the source: the batch's end, its count and last key, one INSERT ... SELECT
        of its rows that pass the checks, and when some did not, their keys; those rows'
        records are read before it commits (a `DataError` undoes the batch), written after."""
        assert self.inserts is not None
        assert self.ranges is not None
        target, ends, insert, ranges = self.target, self._queries[False], self.inserts[False], self.ranges
        for attempt in (1, 2):
            try:
                with target.connect(attach=self.attach, durable=durable) as conn:
                    found = conn.exec_driver_sql(ends.sql, ends.params(**self._range_params(after, limit)))
                    numbers = [row[0] for row in found]
                    if not all(type(number) is int and number >= 0 for number in numbers):
                        raise _PageChanged  # a key in no range: the record path refuses it
                    end = min(map(str, numbers)) if numbers else None
                    params = self._range_params(after, limit, end)
                    count, last = conn.exec_driver_sql(ranges.sql, ranges.params(**params)).one()
                    if not count:
                        return CopiedBatch(0, 0, None, durable)
                    fast = conn.exec_driver_sql(insert.sql, insert.params(**params)).rowcount
                    slow: tuple[list[str], list[tuple[Any, ...]]] = ([], [])
                    if fast != count:
                        failed = self.failed[False]
                        keys = [row[0] for row in conn.exec_driver_sql(failed.sql, failed.params(**params))]
                        if fast + len(keys) != count or not all(
                            integer_key(str(key)) is not None for key in keys
                        ):
                            raise _PageChanged  # a key that is no integer: the record path explains it
                        slow = self._records_of([str(key) for key in keys])
                target.put_rows(*slow)  # durable: and so every commit before it
                return CopiedBatch(fast, len(slow[0]), last, durable or bool(slow[0]))
            except sa_exc.IntegrityError as exc:
                if attempt == 1:
                    continue  # most likely another writer inserted one of these keys first
                raise target.refused_batch(f"a batch of tasks after {after!r}", exc) from exc
        raise AssertionError("unreachable")  # pragma: no cover

    def _range_ends(self, conn: Connection, ends: Query, after: str | None, limit: int) -> dict[str, Any]:
        """The ranges of the batch after `after` (`integer_ends` read through `conn`): each
        digit count's `mfsm_low<digits>` and `mfsm_high<digits>`. `_PageChanged` for a key in
        no range, which the record path refuses."""
        found = conn.exec_driver_sql(ends.sql, ends.params(**self._range_params(after, limit)))
        numbers = [row[0] for row in found]
        if not all(type(number) is int and number >= 0 for number in numbers):
            raise _PageChanged
        end = min(map(str, numbers)) if numbers else None
        bounds = self._range_params(after, limit, end)
        return {name: value for name, value in bounds.items() if name.startswith(("mfsm_low", "mfsm_high"))}

    def _range_params(self, after: str | None, limit: int, end: str | None = None) -> dict[str, Any]:
        """The parameters of `_inside_by_ranges`'s statements: each digit count's range of keys
        whose text is above `after` (and up to `end`), the offset of a range's `limit`-th key,
        and whether this is the first batch (which also looks for a negative key)."""
        params: dict[str, Any] = {"mfsm_offset": max(limit - 1, 0), "mfsm_first": int(after is None)}
        ranges = {len(str(high)): (low, high) for low, high in integer_ranges(after, end)}
        for digits in range(1, MAX_KEY_DIGITS + 1):
            params[f"mfsm_low{digits}"], params[f"mfsm_high{digits}"] = ranges.get(digits, (1, 0))
        return params

    @staticmethod
    def _batch_params(after: str | None, limit: int, last: str | None = None) -> dict[str, Any]:
        """Inside SQLite from text keys: the page's parameters (the next `limit` keys after
        `after`), and the INSERT ... SELECT's, for the batch ending at `last`."""
        return {"mfsm_after": after, "mfsm_limit": limit, "mfsm_last": last or ""}

    def _check_and_copy(self, after: str | None, limit: int, durable: bool) -> CopiedBatch:
        """PostgreSQL's one statement (`_check_and_copy`, module level); the failed rows'
        records read (a `DataError` undoes the batch) before it commits, written after."""
        statement = self._queries[after is not None]
        try:
            with self.target.connect(durable=durable) as conn:
                if self.ends is None:
                    params = statement.params(mfsm_after=after, mfsm_limit=limit + 1, mfsm_batch=limit)
                else:  # every row of the ranges: no more than `limit` from each
                    ranges = self._range_ends(conn, self.ends, after, limit)
                    limit = limit * MAX_KEY_DIGITS + 1
                    params = statement.params(mfsm_after=after, mfsm_limit=limit, mfsm_batch=limit, **ranges)
                rows = list(conn.exec_driver_sql(statement.sql, params).cursor.fetchall())
                page = self.checked(after, limit, rows)
                fast = sum(1 for row in page if row[-1])
                if page and page[0][1] != fast:
                    raise _PageChanged  # undo whatever it wrote: the record path explains or converts
                slow = self._records_of([row[0] for row in page if not row[-1]])
        except DataError as exc:
            if _cast_refused(exc):
                raise _PageChanged from exc
            raise
        self.target.put_rows(*slow)  # durable: and so every commit before it
        return CopiedBatch(fast, len(slow[0]), page[-1][0] if page else None, durable or bool(slow[0]))

    def checked(self, after: str | None, limit: int, rows: list[Any]) -> list[Any]:
        """The first `limit` of `rows` (read with one more row, so that a key repeated just
        past the page shows); `_PageChanged` when the keys are not text, ascending, above
        `after`."""
        if not rows:
            return rows
        if not keys_in_order(after, rows):
            raise _PageChanged
        return rows[:limit]


def _native_values(
    source: TableMapping, target: TableMapping, table: Table, values: list[ColumnElement[Any]]
) -> list[ColumnElement[Any]]:
    """PostgreSQL: `values` with JSON kept as JSON (not text) on its way into a JSON column."""
    native = []
    for value, field in zip(values, target.fields, strict=True):
        mine = source.by_name.get(field.name)
        if not field.kind.native_json:
            native.append(value)
        elif mine is not None and mine.kind.native_json:
            column = table.c[mine.column.name]
            same = column if mine.kind == field.kind else cast(column, field.column.type)
            empty = cast(literal("{}", String()), field.column.type)
            native.append(func.coalesce(same, empty) if field.name == "metadata" else same)
        else:
            native.append(cast(value, field.column.type))
    return native


def _check_and_copy(  # noqa: PLR0917 -- the target, the source and what is read of it
    target: TableMapping,
    table: Table,
    values: list[ColumnElement[Any]],
    valid: ColumnElement[bool],
    order: ColumnElement[Any],
    with_after: bool,
    *,
    constants: Mapping[Any, ColumnElement[Any]],
    where: ColumnElement[bool] | None = None,
) -> Select[Any]:
    """PostgreSQL, one statement: the page (`mfsm_limit` rows, one past the batch), inserted
    of the batch (`mfsm_batch` rows) that pass the checks; it returns each row's key, how many
    rows were written, and its verdict. `where`: the source rows of the page, in place of
    those after `mfsm_after` (which still bounds the target's keys of the batch)."""
    limit = bindparam("mfsm_limit", type_=Integer())
    after = order > bind_text("mfsm_after") if with_after else None
    after = after if where is None else where
    [*values, valid], order, after = computed_once(table, [*values, valid], order, after, limit)
    labeled = [value.label(f"mfsm_v{i}") for i, value in enumerate(values)]
    numbered = func.row_number().over(order_by=order).label("mfsm_n")
    read = select(*labeled, valid.label("mfsm_ok"), numbered).order_by(order).limit(limit)
    page = (read if after is None else read.where(after)).cte("mfsm_page")
    in_batch = page.c.mfsm_n <= bindparam("mfsm_batch", type_=Integer())
    batch = select(*(page.c[f"mfsm_v{i}"] for i in range(len(values)))).where(in_batch, page.c.mfsm_ok)
    columns = [field.column for field in target.fields]
    writes = [_upsert_from(target, batch, constants)]
    if target.key_range_indexed:
        # A plain INSERT when the target holds no key of the batch's range (a fresh copy,
        # or keys that grow): ON CONFLICT costs a speculative insertion per row.
        last = (
            select(page.c.mfsm_v0).where(in_batch).order_by(page.c.mfsm_n.desc()).limit(1).scalar_subquery()
        )
        key = target.key_order
        taken = select(literal(1)).select_from(target.table).where(key <= last)
        if with_after:
            taken = taken.where(key > bind_text("mfsm_after"))
        none_taken = ~taken.exists()
        writes = [
            insert(target.table).from_select(
                [*columns, *constants], batch.where(none_taken).add_columns(*constants.values())
            ),
            _upsert_from(target, batch.where(~none_taken), constants),
        ]
    written = [w.returning(literal(1)).cte(f"mfsm_written_{i}") for i, w in enumerate(writes)]
    count = sum(
        (select(func.count()).select_from(w).scalar_subquery() for w in written[1:]),
        select(func.count()).select_from(written[0]).scalar_subquery(),
    )
    return select(page.c.mfsm_v0, count.label("mfsm_count"), page.c.mfsm_ok).order_by(page.c.mfsm_n)


def computed_once(
    table: Table,
    expressions: list[ColumnElement[Any]],
    order: ColumnElement[Any],
    after: ColumnElement[bool] | None,
    limit: Any,
) -> tuple[list[ColumnElement[Any]], ColumnElement[Any], ColumnElement[bool] | None]:
    """`expressions` (of `table`'s columns, read in `order` after `after`, `limit` rows) with
    each `convert.shared` expression computed once a row: the page is read by a subquery that
    also computes them (its LIMIT keeps PostgreSQL from merging it into the statement, which
    would copy each expression back into every place that uses it), and the expressions and
    the order are rewritten to read its columns. Returns (the expressions, the order, the
    condition still to apply: None, as the subquery applied `after`). Without any shared
    expression, all as they were."""
    found: dict[str, Label[Any]] = {}
    for expression in expressions:
        for element in visitors.iterate(expression):
            if isinstance(element, Label) and element.name.startswith(SHARED):
                found.setdefault(element.name, element)
    if not found:
        return expressions, order, after
    page = select(*table.c, *found.values()).order_by(order).limit(limit)
    source = (page if after is None else page.where(after)).subquery("mfsm_source")

    def read_from_source(element: visitors.ExternallyTraversible, **_: Any) -> ColumnElement[Any] | None:
        if isinstance(element, Label) and element.name in found:
            return source.c[element.name]
        if isinstance(element, Column) and element.table is table:
            return source.c[element.name]
        return None

    def rewrite(expression: ColumnElement[Any]) -> ColumnElement[Any]:
        return visitors.replacement_traverse(expression, {}, read_from_source)  # type: ignore[no-any-return]

    return [rewrite(expression) for expression in expressions], rewrite(order), None


def _upsert_from(target: TableMapping, rows: Select[Any], constants: Mapping[Any, ColumnElement[Any]]) -> Any:
    """`INSERT INTO target SELECT rows ON CONFLICT (key) DO UPDATE` of every mapped column (the
    constant columns are inserted, not updated)."""
    insert_rows = insert_for(target.dialect)(target.table).from_select(
        [*(f.column for f in target.fields), *constants], rows.add_columns(*constants.values())
    )
    return insert_rows.on_conflict_do_update(
        index_elements=[target.key_column],
        set_={f.column.name: insert_rows.excluded[f.column.name] for f in target.fields[1:]},
    )


def _cast_refused(exc: DataError) -> bool:
    """Whether the database refused a copy's statement (a value a cast could not take, which
    the condition admits: a 30th of February, text that is not JSON): its batch then goes the
    record path, which explains or converts each row."""
    return "refused the statement" in str(exc)


def _keys_copy(source: TableMapping, target: TableMapping, *, inside: bool) -> bool:
    """Whether the keys can be copied as rows: text into text, or an integer key inside one
    database (a page of an integer key in text order is a merge of one range per digit count,
    `_integer_page`; between two databases the record path does it). Text keys into an
    integer column are converted by the record path."""
    if not source.integer_key:
        return not target.integer_key
    return inside


def digit_ranges(key: ColumnElement[Any]) -> list[ColumnElement[bool]]:
    """For each number of digits, `key` in that count's range (`mfsm_low<digits>` to
    `mfsm_high<digits>`, bound at run time; `columns.integer_ranges`)."""
    return [
        key.between(
            bindparam(f"mfsm_low{d}", type_=BigInteger()), bindparam(f"mfsm_high{d}", type_=BigInteger())
        )
        for d in range(1, MAX_KEY_DIGITS + 1)
    ]


def integer_ends(key: ColumnElement[Any]) -> Any:
    """Each digit count's key at offset `mfsm_offset` of its range (the range's `limit`-th key
    after the batch's start), and on the first batch (`mfsm_first`) one negative key, which
    the record path refuses."""
    offset = bindparam("mfsm_offset", type_=Integer())
    parts = [
        select(key.label("mfsm_key"))
        .where(in_range)
        .order_by(key)
        .limit(1)
        .offset(offset)
        .subquery()
        .select()
        for in_range in digit_ranges(key)
    ]
    negative = select(key.label("mfsm_key")).where(
        outside_ranges(key), bindparam("mfsm_first", type_=Integer()) == 1
    )
    return union_all(*parts, negative.limit(1).subquery().select())


def _both(stmt: Any, after: ColumnElement[bool], dialect: Dialect) -> dict[bool, Query]:
    """`stmt` compiled for the first batch (False) and for the batches after a key (True)."""
    return {False: Query.compile(stmt, dialect), True: Query.compile(stmt.where(after), dialect)}


def _inside_source(source: SqlTaskStore, target: SqlTaskStore) -> tuple[Table, str | None] | None:
    """When the copy can run inside the database: the source table as the target's connection
    sees it, and (SQLite) the file to attach, None when both tables are in one file; else None.
    It needs `ON CONFLICT (key)`, and on PostgreSQL both tables in one database, one URL."""
    if not target.mapping.key_unique:
        return None
    dialect, table = source.dialect, source.mapping.table
    if dialect == "postgresql":
        same = source.engine.url.render_as_string(hide_password=False) == target.engine.url.render_as_string(
            hide_password=False
        )
        return (table, None) if same else None
    if dialect != "sqlite" or table.schema or target.mapping.table.schema:
        return None
    source_file, target_file = sqlite_file(source.engine), sqlite_file(target.engine)
    if source_file is None or target_file is None:
        return None
    if source_file == target_file:
        return table, None
    return table.to_metadata(MetaData(), schema=ATTACHED), source_file


def _copy_field(  # noqa: PLR0911 -- one answer per kind of field
    source: TableMapping, target: TableMapping, field: MappedField, table: Table, *, inside: bool = False
) -> _Plan | None:
    """How the source reads `field` in the target's form: (the value, an SQL condition that
    holds for a row the record path would copy to the same value), or None when the field
    must be converted in Python. Keys are checked by `RowCopy.checked` (text, not empty, ascending).
    `table` is the source table as the reading connection sees it; `inside`: the copy runs
    inside the database, in one statement on PostgreSQL."""
    sqlite = source.dialect == "sqlite"
    mine = source.by_name.get(field.name)
    if field.name == "updated_at" and mine is None and source.shared_time:
        mine = source.by_name["created_at"]  # the one column holds both
    if field.name == "run_at" and mine is None:  # no scheduled time
        return (
            (null() if isinstance(field.column.type, NullType) else cast(null(), field.column.type)),
            None,
        )
    if field.name == "attempts":
        if mine is None:
            return literal(0, Integer()), None
        column = table.c[mine.column.name]
        valid = column >= 0 if not sqlite else and_(func.typeof(column) == "integer", column >= 0)
        return func.coalesce(column, 0), or_(column.is_(None), valid)
    if field.name == "metadata" and mine is None:
        return literal("{}", String()), None
    if mine is None:  # a required field: every store has it
        return None
    column = table.c[mine.column.name]
    if field.name == "key":
        return column, None
    if field.name == "type":
        return _copy_type(source, target, column, sqlite)
    if field.name == "status":
        writes = target.write_status
        stored = {value: writes[status] for value, status in source.read_status.items() if status in writes}
        if not stored:
            return None
        same = all(type(a) is type(b) and a == b for a, b in stored.items())
        value = column if same else case(stored, value=column)
        return value, column.in_([literal(value) for value in stored])
    if field.name in ("payload", "metadata"):
        return _copy_json(mine, field, column, sqlite, inside=inside)
    return _copy_time(mine, field, column, source.dialect, nullable=field.name == "run_at")


def _copy_type(
    source: TableMapping, target: TableMapping, column: ColumnElement[Any], sqlite: bool
) -> _Plan | None:
    """The task name through both type maps (stored name -> type -> the target's stored name)."""
    if source.read_type is None and target.write_type is None:
        return column, func.typeof(column) == "text" if sqlite else column.is_not(None)
    # stored on the source -> the record's type (without a map there, the stored name is it)
    reads = source.read_type if source.read_type is not None else {t: t for t in target.write_type or {}}
    writes = target.write_type
    names = {
        stored: type_ if writes is None else writes[type_]
        for stored, type_ in reads.items()
        if writes is None or type_ in writes
    }
    if not names:
        return None
    same = all(a == b for a, b in names.items())
    value = column if same else case(names, value=column)
    return value, column.in_([literal(name) for name in names])


def _copy_json(
    mine: MappedField, field: MappedField, column: ColumnElement[Any], sqlite: bool, *, inside: bool
) -> _Plan | None:
    valid: ColumnElement[bool]
    if not field.kind.holds_json:
        return None
    if mine.kind is ColumnKind.JSON_TEXT and sqlite:
        # Valid JSON whose first character is `{` is an object (a BLOB's first byte is no `{`).
        valid = and_(func.json_valid(column, type_=Boolean()), func.substr(column, 1, 1) == "{")
    elif mine.kind is ColumnKind.JSON_TEXT and field.kind.native_json and inside:
        # PostgreSQL, into a JSON column inside one database: the value is cast to JSON, and
        # text that is not JSON fails the cast and the statement (its batch goes the record
        # path as a whole, which names the row); JSON whose first character is `{` is an object.
        valid = func.left(column, 1) == "{"
    elif mine.kind is ColumnKind.JSON_TEXT:
        # PostgreSQL: text that is not JSON fails the cast, and the statement, as above.
        valid = func.json_typeof(cast(column, JSON())) == "object"
    elif mine.kind.native_json:
        type_of = func.jsonb_typeof if mine.kind is ColumnKind.JSONB else func.json_typeof
        valid = type_of(column) == "object"
    else:
        return None
    value = cast(column, Text()) if mine.kind.native_json else column
    if field.name == "metadata":  # no metadata reads as {}
        return func.coalesce(value, "{}"), or_(column.is_(None), valid)
    return value, valid


def _copy_time(
    mine: MappedField, field: MappedField, column: ColumnElement[Any], dialect: str, *, nullable: bool = False
) -> _Plan | None:
    """A time in the target's form: as it is between two native columns of one kind (or
    between two zoned ones), else converted in SQL (`convert.convert_time`)."""
    kind = mine.kind
    if kind is field.kind and kind.zoned:
        return column, None if nullable else column.is_not(None)
    if kind.zoned and field.kind.zoned:  # on PostgreSQL; a naive timestamp is UTC
        return func.timezone("UTC", column), None if nullable else column.is_not(None)
    converted = convert_time(dialect, kind, field.kind, column)
    if converted is None:
        return None
    value, valid = converted
    return value, or_(column.is_(None), valid) if nullable else valid
