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


REDIS_URL = "redis://127.0.0.1:6379"
_CLAIM = "mfsm:test:claim"


@contextmanager
def private_redis_db() -> Iterator[str]:
    """The URL of a Redis database number of our own (1 to 15): one that was empty, claimed
    with a key of ours; its keys (all ours) are deleted afterwards. Never a flush of the server."""
    import redis

    token = uuid.uuid4().hex
    for number in range(1, 16):
        client = redis.Redis.from_url(f"{REDIS_URL}/{number}")
        if client.set(_CLAIM, token, nx=True, ex=3600) and client.dbsize() == 1:
            break
        if client.get(_CLAIM) == token.encode():
            client.delete(_CLAIM)
        client.close()
    else:
        raise RuntimeError("no empty Redis database number from 1 to 15 is free")
    try:
        yield f"{REDIS_URL}/{number}"
    finally:
        for key in client.scan_iter(count=1000):
            if key != _CLAIM.encode():
                client.delete(key)
        client.delete(_CLAIM)
        client.close()
