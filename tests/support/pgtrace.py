"""Count what the ledger's hot path, or a journal's engine, sends to PostgreSQL: libpq's
protocol trace of its connections, read back as statements, round trips and commits."""

from __future__ import annotations

import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from psycopg.pq import Trace
from sqlalchemy import event

if TYPE_CHECKING:
    from collections.abc import Iterator

    import psycopg
    from sqlalchemy import Engine

    from migration_fsm.journal.ledger import Ledger


@dataclass
class PgTrace:
    """Frontend messages seen: `statements` (first word of each statement executed),
    `round_trips` (a Sync or a simple Query each waits for the server once; not so in
    pipeline mode, where a Sync does not wait)."""

    lines: list[str] = field(default_factory=list)

    @property
    def messages(self) -> list[tuple[str, str]]:
        found = []
        for line in self.lines:
            parts = line.split("\t")
            if len(parts) >= 4 and parts[0] == "F":
                found.append((parts[2], parts[3]))
            elif len(parts) == 3 and parts[0] == "F":
                found.append((parts[2], ""))
        return found

    @property
    def statements(self) -> list[str]:
        """The first word of each statement executed (a prepared one is parsed once, then
        bound by its name: each Execute counts)."""
        parsed: dict[str, str] = {}
        bound, words = "", []
        for message, body in self.messages:
            quoted = body.split('"')
            if message == "Parse":
                parsed[quoted[1]] = quoted[3].split()[0].upper()
            elif message == "Bind":
                bound = parsed.get(quoted[3], "?")
            elif message == "Execute":
                words.append(bound)
            elif message == "Query":
                words.append(quoted[1].split()[0].upper())
        return words

    @property
    def round_trips(self) -> int:
        return sum(1 for message, _ in self.messages if message in ("Sync", "Query"))

    @property
    def completed(self) -> list[str]:
        """The first word of the tag of each statement the server completed (`CommandComplete`:
        `SELECT`, `UPDATE`, `BEGIN`, `COMMIT`, ...), however the client sent them (several
        statements in one simple Query each complete)."""
        words = []
        for line in self.lines:
            parts = line.split("\t")
            if len(parts) >= 4 and parts[0] == "B" and parts[2] == "CommandComplete":
                words.append(parts[3].strip().strip('"').split()[0].upper())
        return words

    @property
    def waits(self) -> int:
        """Round trips as the server ends them: each `ReadyForQuery` ends one wait of the client
        (one per simple Query, one per Sync), in every mode."""
        return sum(1 for line in self.lines if line.split("\t")[2:3] == ["ReadyForQuery"])


def next_connection(ledger: Ledger) -> psycopg.Connection[Any]:
    """The raw connection the ledger's next call on this thread takes (the top of its idle
    stack; opened now if there is none)."""
    assert ledger._pg is not None
    conn = ledger._pg._take()
    ledger._pg._give(conn)
    return conn


@contextmanager
def engine_trace(engine: Engine) -> Iterator[PgTrace]:
    """Trace every connection `engine` (psycopg 3) uses during the block: its pool is emptied
    first, so each is opened, and traced, inside the block."""
    trace = PgTrace()
    engine.dispose()
    with tempfile.TemporaryFile("w+") as f:

        def _trace(dbapi_connection: Any, record: Any) -> None:
            dbapi_connection.pgconn.trace(f.fileno())
            dbapi_connection.pgconn.set_trace_flags(Trace.SUPPRESS_TIMESTAMPS | Trace.REGRESS_MODE)

        event.listen(engine, "connect", _trace)
        try:
            yield trace
        finally:
            event.remove(engine, "connect", _trace)
            engine.dispose()  # closes the traced connections: nothing writes to `f` any more
            f.seek(0)
            trace.lines = f.read().splitlines()


@contextmanager
def pg_trace(ledger: Ledger) -> Iterator[PgTrace]:
    """Trace the hot-path connection the ledger's next calls take, for the block (one thread)."""
    conn = next_connection(ledger)
    trace = PgTrace()
    with tempfile.TemporaryFile("w+") as f:
        conn.pgconn.trace(f.fileno())
        conn.pgconn.set_trace_flags(Trace.SUPPRESS_TIMESTAMPS | Trace.REGRESS_MODE)
        try:
            yield trace
        finally:
            conn.pgconn.untrace()
            f.seek(0)
            trace.lines = f.read().splitlines()
