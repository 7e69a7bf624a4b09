"""The default task table: every field in the column of its name, which is what a
`TableMapping` with no `columns` setting expects. The tests and the benchmarks build their
tables from it, and it is a ready layout for a new queue table of your own."""

from __future__ import annotations

from sqlalchemy import JSON, Column, DateTime, Integer, MetaData, String, Table

__all__ = ["default_task_table"]


def default_task_table(metadata: MetaData, name: str = "tasks", *, dialect: str | None = None) -> Table:
    """The default task table `name` in `metadata`: a text key (200 characters, compared in
    code point order on PostgreSQL, as the store scans), JSON payload and metadata,
    timezone-aware timestamps, and a nullable `run_at` for scheduled tasks."""
    key_type = String(200, collation="C") if dialect == "postgresql" else String(200)
    return Table(
        name,
        metadata,
        Column("key", key_type, primary_key=True),
        Column("type", String(100), nullable=False),
        Column("payload", JSON, nullable=False),
        Column("status", String(20), nullable=False),
        Column("attempts", Integer, nullable=False),
        Column("created_at", DateTime(timezone=True), nullable=False),
        Column("updated_at", DateTime(timezone=True), nullable=False),
        Column("metadata", JSON, nullable=False),
        Column("run_at", DateTime(timezone=True), nullable=True),
    )
