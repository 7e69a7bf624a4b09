"""The statements a `SqlTaskStore` runs, built from its `TableMapping` and compiled once.

Writes and the hot reads go to the driver directly (`DriverStatement`, `Query`): values are
converted by the mapping's writers already, so no per-row processing is left to SQLAlchemy.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sqlalchemy import (
    Integer,
    Text,
    bindparam,
    cast,
    delete,
    false,
    insert,
    literal,
    literal_column,
    select,
    update,
)
from sqlalchemy.sql.sqltypes import NullType

from migration_fsm.tasks.records import TaskStatus, is_behind
from migration_fsm.tasks.sql.columns import bind_text
from migration_fsm.tasks.sql.dialects import insert_for
from migration_fsm.tasks.sql.identity_sql import identity_columns

if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence

    from sqlalchemy.engine.interfaces import Dialect
    from sqlalchemy.sql.dml import UpdateBase
    from sqlalchemy.sql.elements import ColumnElement
    from sqlalchemy.sql.selectable import Select

    from migration_fsm.tasks.sql.mapping import MappedField, TableMapping


@dataclass(frozen=True, slots=True)
class DriverStatement:
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
class Query:
    """A SELECT compiled once, run through the driver: its own literals are kept, and the
    values named at run time are added to them."""

    sql: str
    positions: tuple[str, ...] | None  # bind names in order, for a positional paramstyle
    fixed: Mapping[str, Any]

    @classmethod
    def compile(cls, stmt: ColumnElement[Any] | Select[Any] | UpdateBase, dialect: Dialect) -> Query:
        compiled = stmt.compile(dialect=dialect)
        positions = tuple(compiled.positiontup or ()) if compiled.positional else None
        return cls(str(compiled), positions, dict(compiled.params))

    def params(self, **values: Any) -> tuple[Any, ...] | dict[str, Any]:
        merged = {**self.fixed, **values}
        if self.positions is None:
            return merged
        return tuple([merged[name] for name in self.positions])


def json_text(field: MappedField) -> ColumnElement[Any]:
    """The field's JSON as text (PostgreSQL's JSON types are cast; text stays as it is)."""
    if field.kind.native_json:
        return cast(field.column, Text())
    return field.column


class Statements:
    """The compiled statements of one mapped table: the record SELECT, the driver's INSERT and
    UPDATE, the key-range probe, the identity-row reads, and `put`/`put_forward`'s upserts."""

    def __init__(self, mapping: TableMapping, dialect: Dialect) -> None:
        self.mapping = mapping
        self.dialect = dialect
        fields, table, key = mapping.fields, mapping.table, mapping.key_column
        #: The constant columns' values, as SQL literals (written on insert only).
        self.constants: dict[Any, ColumnElement[Any]] = {
            column: constant_literal(column, value, dialect) for column, value in mapping.constants.items()
        }
        #: Every mapped column, in field order (a `TaskRecord` per row, through `mapping.decode`).
        self.select: Select[Any] = select(*(field.select for field in fields))
        self.insert = self.driver_statement(
            insert(table).values({**{f.column: f.bind for f in fields}, **self.constants})
        )
        self.update = self.driver_statement(
            update(table).where(key == fields[0].bind).values({f.column: f.bind for f in fields[1:]})
        )
        #: `set_progress`: the progress columns (status, attempts, updated_at; those the table
        #: has, and updated_at only when it has a column of its own) of one row, nothing else.
        self.progress_fields: tuple[MappedField, ...] = tuple(
            f for f in fields if f.name in ("status", "attempts", "updated_at")
        )
        self.progress: Query = Query.compile(
            update(table)
            .where(key == fields[0].bind)
            .values({f.column: f.bind for f in self.progress_fields}),
            dialect,
        )
        self._progress_if: dict[TaskStatus, Query | None] = {}
        order = mapping.key_order
        # Whether any key of a batch exists, in one probe of the key index (exact: the
        # batch's keys lie between its first and last in code point order).
        self.key_range: Query | None = (
            Query.compile(
                select(key).where(order >= bind_text("mfsm_low"), order <= bind_text("mfsm_high")).limit(1),
                dialect,
            )
            if mapping.key_range_indexed
            else None
        )
        #: The identity row's columns (integer keys: read by ranges, `SqlTaskStore.scan_identities`).
        self.identity_select: Select[Any] = self._identity_columns()
        self.identity = {
            after: Query.compile(self._identity_select(after), dialect) for after in (False, True)
        }
        #: SQLite: a write that writes nothing, to take the write lock of this database alone.
        self.write_lock_sql = str(delete(table).where(false()).compile(dialect=dialect))
        #: PostgreSQL through psycopg: COPY into the mapped columns, for bulk inserts.
        self.copy_sql: str | None = None
        if mapping.dialect == "postgresql" and dialect.driver == "psycopg" and not self.constants:
            preparer = dialect.identifier_preparer
            names = ", ".join(preparer.quote(field.column.name) for field in fields)
            self.copy_sql = f"COPY {preparer.format_table(table)} ({names}) FROM STDIN"
        self._forward: dict[TaskStatus | None, DriverStatement] = {}

    def progress_if(self, expected: TaskStatus) -> Query | None:
        """`progress` that updates the row only while its stored status reads as `expected`
        (any stored value the status map reads so); None when no stored value does."""
        if expected not in self._progress_if:
            mapping = self.mapping
            values = [value for value, status in mapping.read_status.items() if status is expected]
            query = None
            if values:
                column = mapping.by_name["status"].column
                query = Query.compile(
                    update(mapping.table)
                    .where(
                        mapping.key_column == mapping.fields[0].bind, column.in_([literal(v) for v in values])
                    )
                    .values({f.column: f.bind for f in self.progress_fields}),
                    self.dialect,
                )
            self._progress_if[expected] = query
        return self._progress_if[expected]

    def driver_statement(self, stmt: UpdateBase) -> DriverStatement:
        """`stmt` (whose binds are the fields' params) compiled for the driver's executemany."""
        fields = self.mapping.fields
        compiled = stmt.compile(dialect=self.dialect)
        if compiled.positional:
            index = {field.param: i for i, field in enumerate(fields)}
            return DriverStatement(str(compiled), tuple(index[name] for name in compiled.positiontup or ()))
        return DriverStatement(str(compiled), None, tuple(field.param for field in fields))

    def forward(self, status: TaskStatus | None) -> DriverStatement | None:
        """`put_forward` of a task in `status` as one statement, `INSERT ... ON CONFLICT (key)
        DO UPDATE ... WHERE` the stored status is not one further along (written into the
        statement from the status map); with None, `put`'s (no WHERE). None when no unique
        index names the key alone."""
        mapping = self.mapping
        if not mapping.key_unique:
            return None
        cached = self._forward.get(status)
        if cached is None:
            fields = mapping.fields
            insert_one = insert_for(mapping.dialect)(mapping.table)
            insert_one = insert_one.values({**{f.column: f.bind for f in fields}, **self.constants})
            column = mapping.status_column
            quote = column.type.literal_processor(self.dialect)
            ahead = sorted(
                (
                    stored
                    for stored, mapped in mapping.read_status.items()
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
                index_elements=[mapping.key_column],
                set_={f.column.name: insert_one.excluded[f.column.name] for f in fields[1:]},
                where=where,
            )
            cached = self._forward[status] = self.driver_statement(upsert)
        return cached

    def _identity_columns(self) -> Select[Any]:
        """The identity row (`identity_sql.identity_columns`), read without decoding."""
        return select(*identity_columns(self.mapping, self.mapping.table, self.dialect))

    def _identity_select(self, with_after: bool) -> Select[Any]:
        """The identity rows in key order, `mfsm_limit` of them (after `mfsm_after`)."""
        mapping = self.mapping
        stmt = self.identity_select.order_by(mapping.key_order).limit(
            bindparam("mfsm_limit", type_=Integer())
        )
        return stmt.where(mapping.key_order > bind_text("mfsm_after")) if with_after else stmt


def constant_literal(column: Any, value: Any, dialect: Dialect) -> ColumnElement[Any]:
    """`value` as an SQL literal of the column's type, rendered by the dialect (quoted and
    escaped), so the statements' parameters stay the fields' own."""
    kind = column.type if not isinstance(column.type, NullType) else None
    rendered = literal(value, kind).compile(dialect=dialect, compile_kwargs={"literal_binds": True})
    return literal_column(str(rendered), type_=kind)
