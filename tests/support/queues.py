"""Real task queues' storage for the adapter tests: a fresh PostgreSQL schema with
Procrastinate's own schema applied (as `procrastinate schema --apply` does)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import psycopg
from sqlalchemy.engine import make_url


def libpq_url(url: str) -> str:
    """`url` (SQLAlchemy form) as a libpq connection string, for psycopg and Procrastinate."""
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


@contextmanager
def procrastinate_schema(database_url: str) -> Iterator[str]:
    """A SQLAlchemy URL of a new schema in `database_url` with Procrastinate's schema applied
    and the adapter's registry created; the schema is dropped afterwards."""
    from procrastinate.schema import SchemaManager

    from migration_fsm.adapters.procrastinate import setup

    schema = f"pq_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(libpq_url(database_url), autocommit=True) as conn:
        conn.execute(f'CREATE SCHEMA "{schema}"')
        conn.execute(f'SET search_path TO "{schema}"')
        conn.execute(SchemaManager.get_schema())
    url = f"{database_url}?options=-csearch_path%3D{schema}"
    setup(url)
    try:
        yield url
    finally:
        with psycopg.connect(libpq_url(database_url), autocommit=True) as conn:
            conn.execute(f'DROP SCHEMA "{schema}" CASCADE')
