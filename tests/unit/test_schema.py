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
from migration_fsm.journal.revisions import head_revisions

EXPECTED_INDEXES = {
    ("mfsm_repair_log", "ix_mfsm_repair_log_open", ("migration", "status", "id")),
    ("mfsm_validation_runs", "ix_mfsm_validation_runs_latest", ("migration", "id")),
}


def _differences(url: str) -> list[Any]:
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            diff: list[Any] = compare_metadata(MigrationContext.configure(conn), metadata)
    finally:
        engine.dispose()
    return diff


def test_metadata_matches_the_alembic_head(alembic_upgraded_url: str) -> None:
    """`compare_metadata` between the database Alembic upgraded and `metadata` returns no
    difference."""
    assert [] == _differences(alembic_upgraded_url)


def test_the_head_the_tests_get_is_the_alembic_head(upgraded_url: str) -> None:
    """The head every other test starts from (a copy of one upgrade, `upgraded_url`) is what
    Alembic makes: no difference from `metadata`, and at the head revision."""
    assert [] == _differences(upgraded_url)
    with Journal.open(upgraded_url) as journal:
        assert head_revisions() == journal.current_revisions()


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
