"""What SQLite and PostgreSQL do differently for a `SqlTaskStore`: how keys sort, which
indexes the key has, attaching a second SQLite file, PostgreSQL's COPY, and the upsert.

`scan` returns keys in Python `str` order on every database: SQLite compares with `BINARY`
(UTF-8 bytes, which is code point order); on PostgreSQL the key column's collation is
probed once and, unless it already sorts by code point, scans compare and sort with
`COLLATE "C"` (fast only with an index on `(key COLLATE "C")`; a warning says so).
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Final

from sqlalchemy import exc as sa_exc
from sqlalchemy import inspect, text
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert

from migration_fsm.log import get_logger

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

    from sqlalchemy import Column, Connection, Engine
    from sqlalchemy.engine.interfaces import Dialect

    from migration_fsm.tasks.sql.mapping import TableMapping

#: Strings whose order separates code-point order from every linguistic collation.
_COLLATION_PROBE: Final = (
    "a", "B", "Z", "z", "A", "_", "-", ".", " ", "0", "9", "a b", "a-b", "a_b", "ab", "aB",
    "Ab", "e", "é", "f", "E", "É", "ß", "ss", "z\u00e9", "\u00e9z", "日本", "😀", "~", "a0",
)  # fmt: skip
_CODE_POINT_COLLATIONS: Final = ("C", "POSIX", "ucs_basic")
#: The name the source database is attached under, for a copy inside SQLite.
ATTACHED: Final = "mfsm_source"


def insert_for(dialect: str) -> Callable[..., Any]:
    """The dialect's `insert`, which has `on_conflict_do_update` (PostgreSQL's or SQLite's)."""
    return pg_insert if dialect == "postgresql" else sqlite_insert


def probe_key(conn: Connection, mapping: TableMapping, dialect: Dialect) -> None:
    """Ask the database how the mapping's key column sorts and which indexes it has; set
    `mapping.key_order`, `key_range_indexed`, `key_unique` and `key_unique_anyhow` from the
    answers."""
    key = mapping.key_column
    if mapping.integer_key:  # scanned by ranges of the index, in text order (`integer_ranges`)
        mapping.key_order = key
        if mapping.dialect == "postgresql":
            mapping.key_unique = _pg_key_unique(conn, mapping, key)
        elif mapping.dialect == "sqlite":
            mapping.key_unique = _sqlite_key_indexes(conn, mapping, dialect, key)[1] or _sqlite_rowid(
                conn, mapping, dialect, key
            )
    else:
        mapping.key_order = _ordering_key(conn, mapping, dialect, key)
        if mapping.dialect == "postgresql":  # the column's own collation is code point order, or not
            mapping.key_range_indexed = mapping.key_order is key
            mapping.key_unique = _pg_key_unique(conn, mapping, key)
        elif mapping.dialect == "sqlite":
            mapping.key_range_indexed, mapping.key_unique = _sqlite_key_indexes(conn, mapping, dialect, key)
    mapping.key_unique_anyhow = mapping.key_unique or _key_in_a_partial_unique_index(
        conn, mapping, dialect, key
    )


def _key_in_a_partial_unique_index(
    conn: Connection, mapping: TableMapping, dialect: Dialect, key: Column[Any]
) -> bool:
    """Whether a partial unique index is on the key alone (upserts then take the two-statement
    path; keys must be unique among the rows its predicate covers)."""
    if mapping.dialect == "postgresql":
        indexes = inspect(conn).get_indexes(mapping.table.name, schema=mapping.table.schema)
        return any(index["unique"] and index["column_names"] == [key.name] for index in indexes)
    if mapping.dialect != "sqlite":
        return True  # no way to ask here: the store's writes are the check
    preparer = dialect.identifier_preparer
    table = mapping.table
    schema = f"{preparer.quote_identifier(table.schema)}." if table.schema else ""
    name = preparer.quote_identifier(table.name)
    for index in conn.exec_driver_sql(f"PRAGMA {schema}index_list({name})").mappings().all():
        if index["unique"] and index["partial"]:
            info = (
                conn.exec_driver_sql(f"PRAGMA {schema}index_info({preparer.quote_identifier(index['name'])})")
                .mappings()
                .all()
            )
            if [row["name"] for row in info] == [key.name]:
                return True
    return False


def _sqlite_key_indexes(
    conn: Connection, mapping: TableMapping, dialect: Dialect, key: Column[Any]
) -> tuple[bool, bool]:
    """(whether a range of the key in BINARY order can be read from an index rather than
    the whole table, whether a whole unique index is on the key alone, so that
    `ON CONFLICT (key)` names it)."""
    preparer = dialect.identifier_preparer
    table = mapping.table
    schema = f"{preparer.quote_identifier(table.schema)}." if table.schema else ""
    name = preparer.quote_identifier(table.name)
    ranged = unique = False
    for index in conn.exec_driver_sql(f"PRAGMA {schema}index_list({name})").mappings().all():
        if index["partial"]:
            continue
        index_name = preparer.quote_identifier(index["name"])
        info = conn.exec_driver_sql(f"PRAGMA {schema}index_xinfo({index_name})").mappings().all()
        columns = [row for row in info if row["key"]]
        if columns and columns[0]["name"] == key.name and columns[0]["coll"] == "BINARY":
            ranged = True
            unique = unique or (bool(index["unique"]) and len(columns) == 1)
    return ranged, unique


def _sqlite_rowid(conn: Connection, mapping: TableMapping, dialect: Dialect, key: Column[Any]) -> bool:
    """Whether the key is the table's INTEGER PRIMARY KEY (the rowid, unique with no index)."""
    preparer = dialect.identifier_preparer
    table = mapping.table
    schema = f"{preparer.quote_identifier(table.schema)}." if table.schema else ""
    info = conn.exec_driver_sql(f"PRAGMA {schema}table_info({preparer.quote_identifier(table.name)})")
    primary = [row for row in info.mappings().all() if row["pk"]]
    return (
        len(primary) == 1 and primary[0]["name"] == key.name and str(primary[0]["type"]).upper() == "INTEGER"
    )


def _pg_key_unique(conn: Connection, mapping: TableMapping, key: Column[Any]) -> bool:
    """Whether a whole unique constraint or index is on the key alone (`ON CONFLICT (key)`)."""
    inspector = inspect(conn)
    table, schema = mapping.table.name, mapping.table.schema
    if inspector.get_pk_constraint(table, schema=schema).get("constrained_columns") == [key.name]:
        return True
    if any(c["column_names"] == [key.name] for c in inspector.get_unique_constraints(table, schema=schema)):
        return True
    return any(
        index["unique"]
        and index["column_names"] == [key.name]
        and not index.get("dialect_options", {}).get("postgresql_where")
        for index in inspector.get_indexes(table, schema=schema)
    )


def _ordering_key(conn: Connection, mapping: TableMapping, dialect: Dialect, key: Column[Any]) -> Any:
    """The key expression that compares and sorts in Python `str` (code point) order."""
    if mapping.dialect == "sqlite":
        return key.collate("BINARY")
    if mapping.dialect != "postgresql":
        return key  # `scan` checks every page's order and says so if this is wrong
    if _pg_collation_is_code_point(conn, mapping, dialect, key):
        return key
    get_logger(store=mapping.store).warning(
        "task_store_collation",
        table=mapping.table_name,
        column=key.name,
        detail=f'scans compare with COLLATE "C"; for speed add an index on ({key.name} COLLATE "C")',
    )
    return key.collate("C")


def _pg_collation_is_code_point(
    conn: Connection, mapping: TableMapping, dialect: Dialect, key: Column[Any]
) -> bool:
    preparer = dialect.identifier_preparer
    found = conn.execute(
        text(
            "SELECT c.collname, n.nspname FROM pg_attribute a"
            " JOIN pg_collation c ON c.oid = a.attcollation"
            " JOIN pg_namespace n ON n.oid = c.collnamespace"
            " WHERE a.attrelid = CAST(:rel AS regclass) AND a.attname = :col"
        ),
        {"rel": preparer.format_table(mapping.table), "col": key.name},
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


def sqlite_file(engine: Engine) -> str | None:
    """The absolute path of a SQLite engine's database file (None in memory)."""
    database = engine.url.database
    if not database or database == ":memory:" or database.startswith("file:"):
        return None
    return os.path.abspath(database)


@contextmanager
def attached(
    conn: Connection, path: str, dbapi_error: type[Exception], wrap: Callable[[str, Exception], Exception]
) -> Iterator[None]:
    """SQLite: the database file at `path` attached as `mfsm_source` to `conn`, outside any
    transaction (SQLAlchemy would begin one first); a connection that cannot detach it
    again is discarded, so that no other use of the pool finds it attached. A driver error
    on attaching is raised as `wrap(statement, error)`."""
    driver = conn.connection.driver_connection
    assert driver is not None
    attach = f"ATTACH DATABASE ? AS {ATTACHED}"
    try:
        driver.execute(attach, (path,))
    except dbapi_error as exc:
        raise wrap(attach, exc) from exc
    try:
        yield
    finally:
        try:
            driver.execute(f"DETACH DATABASE {ATTACHED}")
        except dbapi_error:
            conn.invalidate()


def copy_rows(conn: Connection, sql: str, rows: list[tuple[Any, ...]]) -> None:
    """PostgreSQL through psycopg: `rows` written by `COPY ... FROM STDIN` (`sql`)."""
    driver = conn.connection.driver_connection
    assert driver is not None
    with driver.cursor() as cursor, cursor.copy(sql) as copy:
        for row in rows:
            copy.write_row(row)
