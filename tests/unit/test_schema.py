"""The SQLAlchemy tables and the Alembic head agree, on SQLite and on PostgreSQL.

An autogenerate against a database at the head must find nothing to do: a table, column or
index that exists in a revision but not on the `Table` objects (or the reverse) fails here.
"""

from __future__ import annotations

from typing import Any

from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import Index

from migration_fsm.journal import Journal, make_engine, metadata
from migration_fsm.journal import schema as journal_schema

EXPECTED_INDEXES = {
    ("mfsm_repair_log", "ix_mfsm_repair_log_open", ("migration", "status", "id")),
    ("mfsm_validation_runs", "ix_mfsm_validation_runs_latest", ("migration", "id")),
}


def test_metadata_matches_the_alembic_head(upgraded_url: str) -> None:
    """`compare_metadata` between the upgraded database and `metadata` returns no difference."""
    engine = make_engine(upgraded_url)
    try:
        with engine.connect() as conn:
            diff: list[Any] = compare_metadata(MigrationContext.configure(conn), metadata)
    finally:
        engine.dispose()
    assert [] == diff


def test_every_index_of_the_revisions_is_on_the_tables() -> None:
    """The two indexes the revisions create are declared on the `Table` objects."""
    found = {
        (table.name, index.name, tuple(column.name for column in index.columns))
        for table in metadata.tables.values()
        for index in table.indexes
        if isinstance(index, Index)
    }
    assert EXPECTED_INDEXES <= found


def test_every_table_is_in_the_journal_schema(upgraded_url: str) -> None:
    """Every table the head creates is defined in `journal.schema` (alembic's own aside)."""
    with Journal.open(upgraded_url) as journal, journal.transaction(readonly=True) as conn:
        names = set(conn.dialect.get_table_names(conn)) - {"alembic_version"}
    assert names == set(metadata.tables)
    assert metadata is journal_schema.metadata
