"""Who holds what: lease holder names and the PostgreSQL session advisory lock on a migration."""

from __future__ import annotations

import os
import socket
import time
import zlib
from typing import Final

from sqlalchemy import Connection, text

from ..exceptions import LeaseHeld

LOCK_CLASS: Final = 0x6D66736D  # "mfsm"


def lease_holder_name(actor: str) -> str:
    """How a lease names its holder: the actor, its host and its process."""
    return f"{actor} [{socket.gethostname()}:{os.getpid()}]"


def lock_params(name: str) -> dict[str, int]:
    """The two keys of migration `name`'s advisory lock."""
    return {"c": LOCK_CLASS, "k": zlib.crc32(name.encode("utf-8")) & 0x7FFFFFFF}


def acquire(conn: Connection, name: str, holder: str, params: dict[str, int], *, steal: bool) -> None:
    """Take the session advisory lock `params` on the AUTOCOMMIT connection `conn`, or raise
    `LeaseHeld` naming who has it; with `steal`, terminate that session first."""
    # The application name lets a refused operator see who holds the lock.
    try_lock = text("SELECT pg_try_advisory_lock(:c, :k), set_config('application_name', :n, false)")
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


def release(conn: Connection, params: dict[str, int]) -> None:
    """Give the advisory lock `params` back and clear the connection's application name."""
    conn.execute(
        text("SELECT pg_advisory_unlock(:c, :k), set_config('application_name', '', false)"),
        params,
    )
