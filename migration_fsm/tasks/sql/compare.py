"""`IdentityJoin`: both sides' identity rows compared inside the database, a page at a time.

When the old and the new table are reachable from one connection (two SQLite files, the
new one attached to the old one's connection; two tables of one SQLite file; two tables of
one PostgreSQL database, in any schemas), validation does not need to read every row into
Python: per page of keys, the database joins the two tables by key and returns only the
pairs whose identity rows (`identity_sql`, canonical forms) are not equal, the keys on one
side only, and both sides' counts by stored status. Equal rows never leave the database.

A page is a range of keys (after, high]: `high` is the smaller of the two sides' `limit`-th
key after `after`, so a page holds at most `limit` rows of each side; the last page is
open-ended. The page's statements run in one read transaction (SQLite: deferred, both files
seen at one moment; PostgreSQL: repeatable read), so its counts and its differences agree.
"""

from __future__ import annotations

from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final, NoReturn

from sqlalchemy import (
    BigInteger,
    Integer,
    MetaData,
    String,
    Table,
    and_,
    bindparam,
    case,
    exists,
    func,
    literal,
    not_,
    null,
    or_,
    select,
    text,
    type_coerce,
    union_all,
)
from sqlalchemy import exc as sa_exc

from migration_fsm.exceptions import DatabaseUnavailable, DataError
from migration_fsm.tasks.records import TaskStatus
from migration_fsm.tasks.sql.columns import ColumnKind, bind_text
from migration_fsm.tasks.sql.dialects import ATTACHED, attached, sqlite_file
from migration_fsm.tasks.sql.identity_sql import identity_columns
from migration_fsm.tasks.sql.statements import Query
from migration_fsm.tasks.sql.store import KEY_LOOKUP_CHUNK, SqlTaskStore

if TYPE_CHECKING:
    from collections.abc import Iterator

    from sqlalchemy import Connection
    from sqlalchemy.sql.elements import ColumnElement

    from migration_fsm.tasks.identity import IdentityRow
    from migration_fsm.tasks.records import TaskStore
    from migration_fsm.tasks.sql.mapping import TableMapping

#: Columns of an identity row (`identity.IdentityRow`).
_WIDTH: Final = 7
_OLD: Final = "o"
_NEW: Final = "n"


@dataclass(slots=True)
class JoinedPage:
    """One range of keys: each side's tasks by status, and the pairs the database did not find
    equal, (old row or None, new row or None), in key order."""

    old_counts: dict[TaskStatus, int] = field(default_factory=dict)
    new_counts: dict[TaskStatus, int] = field(default_factory=dict)
    pairs: list[tuple[IdentityRow | None, IdentityRow | None]] = field(default_factory=list)

    @property
    def old_count(self) -> int:
        return sum(self.old_counts.values())

    @property
    def new_count(self) -> int:
        return sum(self.new_counts.values())


class _Side:
    """One table as the joining connection sees it: its identity columns, key order, range."""

    def __init__(self, store: SqlTaskStore, table: Table, alias: str) -> None:
        self.store = store
        mapping = store.mapping
        self.table = table.alias(alias)
        self.columns = identity_columns(mapping, self.table, store.engine.dialect, f"{alias}_")
        key = self.table.c[mapping.key_column.name]
        self.key = key
        self.integer = mapping.integer_key
        self.order: ColumnElement[Any] = key
        if mapping.dialect == "sqlite" and not self.integer:
            self.order = key.collate("BINARY")
        if mapping.dialect == "postgresql" and mapping.key_order is not mapping.key_column:
            self.order = key.collate("C")
        self.status = self.table.c[mapping.status_column.name]

    def stored(self, name: str) -> ColumnElement[Any]:
        """The column of field `name` as stored."""
        return self.table.c[self.store.mapping.by_name[name].column.name]

    def in_range(self, after: bool, high: bool) -> ColumnElement[bool]:
        def bound(name: str) -> ColumnElement[Any]:
            return bindparam(name, type_=BigInteger()) if self.integer else bind_text(name)

        parts = []
        if after:
            parts.append(self.order > bound("mfsm_after"))
        elif self.integer:
            parts.append(self.order >= 0)  # a negative key: refused by the first page (`page`)
        if high:
            parts.append(self.order <= bound("mfsm_high"))
        return and_(*parts) if parts else literal(True)


class IdentityJoin:
    """The comparison of two `SqlTaskStore` tables inside one database; see the module
    docstring. Built by `between`, which says None when the tables are not reachable from one
    connection or their keys cannot be paged by an index."""

    def __init__(self, old: SqlTaskStore, new: SqlTaskStore, new_table: Table, attach: str | None) -> None:
        self.old, self.new = old, new
        self.attach = attach
        self._a = _Side(old, old.mapping.table, _OLD)
        self._b = _Side(new, new_table, _NEW)
        self._queries: dict[tuple[str, bool, bool], Query] = {}

    @classmethod
    def between(cls, old: TaskStore, new: TaskStore) -> IdentityJoin | None:
        """The join of `old` and `new`, or None (then validation reads both sides' rows)."""
        # Not a capability probe: the join is made of both tables' mappings.
        if not (isinstance(old, SqlTaskStore) and isinstance(new, SqlTaskStore)):
            return None
        a, b = old.mapping, new.mapping
        if a.dialect != b.dialect or a.integer_key != b.integer_key:  # keys of two kinds: not joined
            return None
        # Each page reads a range of an index of the key (integer keys: their unique index).
        if not all(m.key_unique if m.integer_key else m.key_range_indexed for m in (a, b)):
            return None
        try:
            found = _reachable(old, new)
            join = None if found is None else cls(old, new, *found)
            if join is not None:
                join.page(None, 0)  # its statements run here (an old SQLite may lack a function)
        except (DatabaseUnavailable, DataError):
            return None
        return join

    # -- statements ---------------------------------------------------------------------

    def _query(self, what: str, after: bool, high: bool) -> Query:
        cached = self._queries.get((what, after, high))
        if cached is None:
            build = {
                "bound": self._bound,
                "scan": self._scan,
                "new_count": self._new_count,
                "only_new": self._only_new,
            }[what]
            stmt = build(after, high)
            cached = self._queries[what, after, high] = Query.compile(stmt, self.old.engine.dialect)
        return cached

    def _bound(self, after: bool, high: bool) -> Any:  # noqa: ARG002  one signature for the three
        """Each side's `mfsm_skip`-th key after `mfsm_after` (a row per side, when it has one)."""
        parts = []
        for tag, side in ((_OLD, self._a), (_NEW, self._b)):
            key = side.key
            parts.append(
                select(literal(tag).label("side"), key.label("bound"))
                .where(side.in_range(after, high=False))
                .order_by(side.order)
                .limit(1)
                .offset(bindparam("mfsm_skip", type_=Integer()))
                .subquery()
                .select()
            )
        return union_all(*parts)

    def _new_count(self, after: bool, high: bool) -> Any:
        """How many rows the new side holds in the range (its key index alone)."""
        return select(func.count()).select_from(self._b.table).where(self._b.in_range(after, high))

    def _scan(self, after: bool, high: bool) -> Any:
        """Each old row of the range: its stored status, and its key when the new side has no
        row of that key or one whose identity row is not equal (else NULL)."""
        a, b = self._a, self._b
        sqlite = self.old.mapping.dialect == "sqlite"

        def same(x: ColumnElement[Any], y: ColumnElement[Any], *, text_value: bool) -> ColumnElement[bool]:
            if sqlite and text_value:
                x = type_coerce(x, String()).collate("BINARY")
                y = type_coerce(y, String()).collate("BINARY")
            return x.is_not_distinct_from(y)

        # Per field (type .. run_at): the canonical values are equal; first, where both tables
        # read a stored value alike, the stored values themselves (cheaper: most rows stop there).
        checks = []
        for i, name in enumerate(("type", "payload", "created_at", "status", "attempts", "run_at"), start=1):
            text_value = name != "attempts"
            check = same(a.columns[i], b.columns[i], text_value=text_value)
            if _read_alike(self.old.mapping, self.new.mapping, name):
                raw = same(a.stored(name), b.stored(name), text_value=text_value)
                check = or_(raw, check)
            checks.append(check)
        readable = [a.stored("created_at").is_not(None)]  # unreadable rows: decoded, never equal here
        if self.old.mapping.read_type is not None:
            readable.append(a.columns[1].is_not(None))
        if not sqlite:
            readable.append(a.columns[3].is_not(None))  # a timestamp out of Python's range
        equal = and_(*checks, *readable)
        on = a.key == b.key
        differs = or_(b.key.is_(None), not_(equal))
        return (
            select(a.status, case((differs, a.key), else_=null()))
            .select_from(a.table.outerjoin(b.table, on))
            .where(a.in_range(after, high))
        )

    def _only_new(self, after: bool, high: bool) -> Any:
        """The keys of the range on the new side only (run when the counts say there are some)."""
        a, b = self._a, self._b
        return select(*b.columns).where(b.in_range(after, high)).where(~exists().where(a.key == b.key))

    # -- reading ------------------------------------------------------------------------

    @contextmanager
    def _transaction(self) -> Iterator[Connection]:
        old = self.old
        try:
            with old.engine.connect() as conn:
                if old.mapping.dialect == "sqlite":
                    conn.execution_options(mfsm_readonly=True)  # a plain (deferred) BEGIN
                else:
                    conn.execution_options(isolation_level="REPEATABLE READ")
                if self.attach is None:
                    with conn.begin():
                        yield conn
                else:
                    with attached(conn, self.attach, old.dbapi_error, old.wrap), conn.begin():
                        yield conn
        except (sa_exc.OperationalError, sa_exc.InterfaceError) as exc:
            raise DatabaseUnavailable(
                f"store '{old.name}': database {old.safe_url} is unavailable: {old.scrub(exc)}"
            ) from exc
        except sa_exc.StatementError as exc:
            raise DataError(
                f"stores '{old.name}' and '{self.new.name}': the database refused to compare"
                f" them: {old.scrub(exc)}"
            ) from exc

    def page(self, after: Any, limit: int) -> tuple[JoinedPage, Any]:
        """The page of keys after `after` holding at most `limit` rows of each side, and its
        last key as stored (None when it was the last page). Integer keys are paged in their
        own order, not as text: the validation's samples are kept in key order anyway."""
        has_after = after is not None
        values: dict[str, Any] = {"mfsm_after": after, "mfsm_skip": max(limit - 1, 0)}
        found = JoinedPage()
        with self._transaction() as conn:
            bound = self._query("bound", has_after, False)
            bounds = [row[1] for row in conn.exec_driver_sql(bound.sql, bound.params(**values))]
            if limit <= 0:
                return found, None
            if after is None and self._a.integer:
                self._refuse_negative(conn)
            high = min(bounds) if bounds else None  # no bound: both sides end within the page
            values["mfsm_high"] = high
            has_high = high is not None
            scan = self._query("scan", has_after, has_high)
            seen = Counter(conn.exec_driver_sql(scan.sql, scan.params(**values)).cursor.fetchall())
            new_count = self._query("new_count", has_after, has_high)
            new_total = conn.exec_driver_sql(new_count.sql, new_count.params(**values)).scalar_one()
            equal: Counter[Any] = Counter()
            stored: Counter[Any] = Counter()
            differing = []
            for (status, key), n in seen.items():
                stored[status] += n
                if key is None:
                    equal[status] += n
                else:
                    differing.append(key)
            olds, news = self._rows(conn, self._a, differing), self._rows(conn, self._b, differing)
            found.pairs = [(olds[str(key)], news.get(str(key))) for key in differing]
            if new_total > sum(stored.values()) - (len(differing) - len(news)):  # keys on new only
                only_new = self._query("only_new", has_after, has_high)
                extra = conn.exec_driver_sql(only_new.sql, only_new.params(**values))
                found.pairs += [(None, (str(row[0]), *row[1:])) for row in extra]
        found.pairs.sort(key=lambda pair: (pair[0] or pair[1])[0])  # type: ignore[index]
        read = self.old.mapping.read_status
        found.old_counts = self._mapped(self.old, stored, read, after, limit)
        # Equal rows are in one status on both sides; the rest say their own.
        found.new_counts = self._mapped(self.old, equal, read, after, limit)
        for _, new_row in found.pairs:
            if new_row is not None:
                mapped = new_row[4] or self._unmapped(self.new, after, limit)
                status = TaskStatus(mapped)
                found.new_counts[status] = found.new_counts.get(status, 0) + 1
        return found, high

    def _refuse_negative(self, conn: Connection) -> None:
        """Integer keys: a negative one is refused, as the stores' scans refuse it."""
        for side in (self._a, self._b):
            if conn.execute(select(side.key).where(side.key < 0).limit(1)).first() is not None:
                side.store.scan_identities(None, 1)  # raises, naming the key
                raise DataError(
                    f"store '{side.store.name}': a negative key appeared while it was read; run it again"
                )

    @staticmethod
    def _rows(conn: Connection, side: _Side, keys: list[str]) -> dict[str, IdentityRow]:
        """The identity rows of these keys on one side, by key."""
        rows: dict[str, IdentityRow] = {}
        for start in range(0, len(keys), KEY_LOOKUP_CHUNK):
            chunk = keys[start : start + KEY_LOOKUP_CHUNK]
            for row in conn.execute(select(*side.columns).where(side.key.in_(chunk))):
                rows[str(row[0])] = (str(row[0]), *row[1:])  # an integer key as its text
        return rows

    def _mapped(
        self,
        store: SqlTaskStore,
        stored: Counter[Any],
        read: dict[Any, TaskStatus],
        after: str | None,
        limit: int,
    ) -> dict[TaskStatus, int]:
        """Counts by stored status as counts by `TaskStatus` (an unmapped one: `_unmapped`)."""
        counts: dict[TaskStatus, int] = {}
        for value, n in stored.items():
            status = read.get(value) or self._unmapped(store, after, limit)
            counts[status] = counts.get(status, 0) + n
        return counts

    @staticmethod
    def _unmapped(store: SqlTaskStore, after: str | None, limit: int) -> NoReturn:
        """Raise the `DataError` the store's scan raises for a stored status its map does not map."""
        store.scan(after, limit)  # raises, naming the key and the column
        raise DataError(
            f"store '{store.name}': the tasks after {after!r} changed while they were read; run it again"
        )


_TEXT_TIMES: Final = frozenset({ColumnKind.SQLITE_DATETIME, ColumnKind.ISO_TEXT})


def _read_alike(a: TableMapping, b: TableMapping, name: str) -> bool:
    """Whether equal stored values of field `name` read as equal values in both tables (so
    their canonical forms need not be computed): one status map, one type map, timestamps
    held alike (text is read by one parser), never JSON (PostgreSQL's `jsonb =` is not
    equality of JSON text) nor attempts (a table may lack the column)."""
    fa, fb = a.by_name.get(name), b.by_name.get(name)
    if fa is None or fb is None:
        return False
    if name == "type":
        return a.read_type == b.read_type
    if name == "status":
        return a.read_status == b.read_status
    if name in ("created_at", "run_at"):
        return fa.kind is fb.kind or {fa.kind, fb.kind} <= _TEXT_TIMES
    return False


def _reachable(  # noqa: PLR0911 -- one answer per kind of database
    old: SqlTaskStore, new: SqlTaskStore
) -> tuple[Table, str | None] | None:
    """The new table as the old store's connection sees it, and (SQLite) the file to attach,
    None when both tables are in one file; None when no one connection reaches both."""
    table = new.mapping.table
    if old.dialect == "sqlite":
        if table.schema or old.mapping.table.schema:
            return None
        old_file, new_file = sqlite_file(old.engine), sqlite_file(new.engine)
        if old_file is None or new_file is None:
            return None
        if old_file == new_file:
            return table, None
        return table.to_metadata(MetaData(), schema=ATTACHED), new_file
    if old.dialect != "postgresql":
        return None
    a, b = old.engine.url, new.engine.url
    if (a.host, a.port, a.database, a.username) != (b.host, b.port, b.database, b.username):
        return None
    schema = _pg_schema(new)
    if schema is None or _pg_schema(old) is None:
        return None
    return table.to_metadata(MetaData(), schema=schema), None


def _pg_schema(store: SqlTaskStore) -> str | None:
    """The schema of the store's table, as its own connection (its search_path) finds it."""
    name = store.table_name
    with store.connect(readonly=True, commit=False) as conn:
        return conn.execute(
            text(
                "SELECT n.nspname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
                " WHERE c.oid = to_regclass(:name)"
            ),
            {"name": name},
        ).scalar()
