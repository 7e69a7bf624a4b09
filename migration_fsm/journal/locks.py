"""Who holds what: lease holder names and the PostgreSQL advisory lock on a migration.

The lock is transaction-scoped (`pg_try_advisory_xact_lock`), held by one transaction that
stays open, idle, for the whole command and ends with it (or with its connection). A
session lock would not survive a connection pooler in transaction pooling (PgBouncer):
taken on one server connection and released on another, it stayed held on a connection
that other clients then reuse. A transaction keeps its server connection from its first
statement to its end in every pool mode, so the lock, the connection it lives on and the
operator's name (`application_name`, set local to the transaction) come and go together.
The transaction takes no row lock and no snapshot between statements and writes nothing.
"""

from __future__ import annotations

import os
import socket
import time
import zlib
from typing import Any, Final

from sqlalchemy import Connection, text

from ..exceptions import LeaseHeld

LOCK_CLASS: Final = 0x6D66736D  # "mfsm"


def lease_holder_name(actor: str) -> str:
    """How a lease names its holder: the actor, its host and its process."""
    return f"{actor} [{socket.gethostname()}:{os.getpid()}]"


def lock_params(name: str) -> dict[str, int]:
    """The two keys of migration `name`'s advisory lock."""
    return {"c": LOCK_CLASS, "k": zlib.crc32(name.encode("utf-8")) & 0x7FFFFFFF}


def try_lock(holder: str, params: dict[str, int]) -> tuple[str, dict[str, Any]]:
    """The try-lock of `acquire` for psycopg (`pgpath.lock_and_read`): its SQL and values."""
    sql = "SELECT pg_try_advisory_xact_lock(%(c)s, %(k)s), set_config('application_name', %(n)s, true)"
    return sql, {**params, "n": f"migration-fsm {holder}"[:63]}


def acquire(conn: Connection, name: str, holder: str, params: dict[str, int], *, steal: bool) -> None:
    """Take the transaction-scoped advisory lock `params` in the transaction open on `conn`
    (held until that transaction ends), or raise `LeaseHeld` naming who has it; with `steal`,
    terminate the holder's server session first (which ends its transaction and its lock)."""
    # The application name, local to the transaction, lets a refused operator see who holds it.
    try_lock = text("SELECT pg_try_advisory_xact_lock(:c, :k), set_config('application_name', :n, true)")
    values = {**params, "n": f"migration-fsm {holder}"[:63]}
    if conn.execute(try_lock, values).scalar():
        return
    who_sql = text(
        "SELECT a.pid, a.application_name FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid"
        " WHERE l.locktype = 'advisory' AND l.granted AND l.database = ("
        "   SELECT oid FROM pg_database WHERE datname = current_database())"
        " AND l.classid = :c AND l.objid = :k AND l.objsubid = 2"
    )
    row = conn.execute(who_sql, params).first()
    who = str(row[1]).removeprefix("migration-fsm ") if row and row[1] else "another operator"
    if steal and row is not None:
        conn.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": row[0]})
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if conn.execute(try_lock, values).scalar():
                return
            time.sleep(0.05)
        raise LeaseHeld(
            f"migration '{name}': could not end the session of {who} that holds the PostgreSQL"
            " advisory lock: ask a database administrator to terminate it",
            holder=who,
        )
    raise LeaseHeld(
        f"migration '{name}' is being changed by {who} right now"
        " (PostgreSQL advisory lock held): wait for that command to finish, or if it hangs,"
        " run `migration-fsm resume --steal`",
        holder=who,
    )


def release(conn: Connection) -> None:
    """End the lock's transaction on `conn`: the lock and the application name go with it."""
    if conn.in_transaction():
        conn.rollback()
    else:  # in AUTOCOMMIT, the transaction `pgpath.lock_and_read` began: the driver ends it
        driver = conn.connection.driver_connection
        assert driver is not None
        driver.rollback()
