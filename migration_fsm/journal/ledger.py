"""The execution ledger (DESIGN.md section 10): which worker of which side runs or ran each
task, so that no task runs twice across the two queues.

Tables (revision 0004), in the migration database or in the ledger's own (`ledger_url`,
created by the same revisions: `db upgrade` upgrades both):

- `mfsm_execution_claims`: the **live claim** of each key, one row per (migration, key),
  across both sides: the side and worker holding it, its attempt and its `state`
  (`running`, `succeeded`, `failed`, `handed_over`). Its primary key is the unique
  constraint that decides every claim.
- `mfsm_executions`: every execution as it really went, one row per (migration, key,
  attempt): side, worker, started_at, finished_at, outcome (`running`, `succeeded`,
  `failed`, `handed_over`). Nothing here is unique across attempts, so an execution that
  finishes after it was handed over is still recorded truthfully, and `executed_twice`
  (keys with more than one succeeded execution) can be counted, not just assumed to be 0.
- `mfsm_execution_refusals`: refused executions, counted per (migration, side).

Why a claims table rather than a partial unique index on live outcomes of
`mfsm_executions`: both work on SQLite and PostgreSQL, but the rules are more than
"one live row per key": a failed attempt may be retried by its own side only, a handed-over
key belongs to the receiving side, a late finish must not break the constraint. With one
claim row per key, every rule is the `WHERE` of a single `INSERT ... ON CONFLICT (migration,
key) DO UPDATE ... WHERE <the rule> RETURNING attempt`: the row lock of the conflict decides
(on PostgreSQL a concurrent claimer waits and re-evaluates the rule against the committed
row; on SQLite `BEGIN IMMEDIATE` serialises writers), and nothing reads and then writes. A
partial index would need a `NOT EXISTS` read for the side rules, which under READ COMMITTED
lets a claim slip in after a concurrent finish.

`claim` is that one statement (plus the history row, in the same transaction). Only when it
does not win does the ledger read the claim to say why, and then either takes over the
running claim of a gone worker (a compare-and-set on the worker and attempt it saw, like a
lease; goneness comes from `mfsm_workers` through `Workers`) or counts the refusal.
`finish` may be batched (`finish_many`); `claim` may not. A worker that batches its finishes
says so in `mfsm_workers` (`defers_finishes`), and its running claims are never taken over
when it is gone: a finish `succeeded` it had not flushed is lost with it, and the claim would
look running for a task that ran (`Workers.may_take_over`).

**The hot path on PostgreSQL** (`claim`, `finish`, `finish_many`) does not go through
SQLAlchemy: with the psycopg 3 driver each call takes a raw connection in autocommit from a stack of idle
ones (`_PgConnections`: as many as calls ran at once) and sends the statements as plain SQL,
one round trip and one commit each (docs/PERFORMANCE.md measured SQLAlchemy's per-call
`connect` / `execution_options` / compile as most of the client's CPU per task). The rules are
the same statements as before. A connection that raised anything is closed and replaced, never
reused, and every driver error surfaces as `DatabaseUnavailable`, like `_transaction`. psycopg
prepares a statement it has run 5 times on a connection (its default; the engine's connections
prepare nothing, see `make_engine`): planning the data-modifying CTEs is most of the server's
CPU per task. PgBouncer in transaction pooling breaks those prepared statements: behind it,
use `Ledger(prepared_statements=False)` (`prepare_threshold=None`); a ledger that meets a
missing or taken prepared statement turns them off itself and runs the call again
(`_PgConnections.run`). The rare paths (take-over, refusal counting, hand-over, reads) and
SQLite use SQLAlchemy.

This module imports SQLAlchemy only (no Alembic, no CLI), so `WorkerGate` can use it; psycopg
is imported by a PostgreSQL ledger only (its engine has imported it already).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import threading
import weakref
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final, TypeVar

from sqlalchemy import and_, bindparam, func, select, text, update
from sqlalchemy.exc import DBAPIError

from ..exceptions import DatabaseUnavailable
from .db import PG_CONNECTION_BOUNDS, UTCDateTime, make_engine, safe_url, scrub, utcnow
from .schema import execution_claims_table, execution_refusals_table, executions_table
from .workers import SIDES, upsert

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Iterator
    from datetime import datetime

    import psycopg
    from sqlalchemy import ColumnElement, Connection, Engine

    from .workers import Workers

#: Outcomes of an execution (and states of a claim).
RUNNING: Final = "running"
SUCCEEDED: Final = "succeeded"
FAILED: Final = "failed"
HANDED_OVER: Final = "handed_over"
OUTCOMES: Final = (RUNNING, SUCCEEDED, FAILED, HANDED_OVER)


def _compact(sql: str) -> str:
    """One line (fewer bytes per round trip; the statements hold no string with two spaces)."""
    return " ".join(sql.split())


#: The claim on PostgreSQL: the upsert under the claims' primary key and, when it wins, the
#: history row, in one statement (a data-modifying CTE). Plain SQL for psycopg (`%(name)s`).
_PG_CLAIM: Final = _compact("""
WITH won AS (
    INSERT INTO mfsm_execution_claims AS c (migration, key, side, worker_id, attempt, state, started_at)
    VALUES (%(m)s, %(k)s, %(side)s, %(w)s, 1, 'running', %(now)s)
    ON CONFLICT (migration, key) DO UPDATE
        SET side = excluded.side, worker_id = excluded.worker_id, attempt = c.attempt + 1,
            state = 'running', started_at = excluded.started_at
        WHERE c.state IN ('failed', 'handed_over') AND c.side = excluded.side
    RETURNING c.attempt
)
INSERT INTO mfsm_executions (migration, key, attempt, side, worker_id, started_at, outcome)
SELECT %(m)s, %(k)s, won.attempt, %(side)s, %(w)s, %(now)s, 'running' FROM won
RETURNING attempt
""")

#: A finish on PostgreSQL, in one statement: the history row as it went, and the claim when
#: it is still ours (a success also closes a hand-over nobody has claimed yet). Its row count
#: (the claims updated) says whether the claim was still ours.
_PG_FINISH: Final = _compact("""
WITH done AS (
    UPDATE mfsm_executions SET outcome = %(o)s, finished_at = %(now)s
    WHERE migration = %(m)s AND key = %(k)s AND attempt = %(a)s AND finished_at IS NULL
)
UPDATE mfsm_execution_claims SET state = %(o)s, side = %(side)s, worker_id = %(w)s
WHERE migration = %(m)s AND key = %(k)s AND attempt = %(a)s
  AND (state = 'running' OR (%(closes)s AND state = 'handed_over'))
""")

_PG_READ_CLAIM: Final = (
    "SELECT side, worker_id, attempt, state FROM mfsm_execution_claims"
    " WHERE migration = %(m)s AND key = %(k)s"
)


def _sqlalchemy_text(sql: str) -> Any:
    """The same statement for SQLAlchemy (`:name` parameters), for another PostgreSQL driver."""
    return text(re.sub(r"%\((\w+)\)s", r":\1", sql)).bindparams(bindparam("now", type_=UTCDateTime))


_READ_CLAIM: Final = text(
    "SELECT side, worker_id, attempt, state FROM mfsm_execution_claims WHERE migration = :m AND key = :k"
)


#: SQLSTATEs of a prepared statement that does not exist (26000) or already exists (42P05) on
#: the server connection: what psycopg's prepared statements meet behind PgBouncer in
#: transaction pooling.
_PREPARED_GONE: Final = frozenset({"26000", "42P05"})

_T = TypeVar("_T")

log = logging.getLogger("migration_fsm.ledger")

#: psycopg's default `prepare_threshold`: a statement run that often on a connection is prepared.
_PSYCOPG_PREPARE_THRESHOLD: Final = 5


class _PgConnections:
    """Raw psycopg connections in autocommit for the ledger's hot path on PostgreSQL: a stack of
    idle ones, each taken for one call and given back after it, so a process holds as many as
    it had calls at the same time (not one per thread that ever called; a forked child opens its
    own).

    `cursor()` yields a cursor on an idle connection, or a new one. Whatever escapes the block
    (a driver error, a timeout, an interrupt in the middle of a statement) closes that
    connection instead of giving it back, so it is never reused in an unknown state; driver
    errors surface as `DatabaseUnavailable`. `close()` closes the idle ones."""

    def __init__(self, engine: Engine, url: str, safe: str, *, prepared_statements: bool) -> None:
        cargs, cparams = engine.dialect.create_connect_args(engine.url)
        cparams.pop("context", None)  # SQLAlchemy's adapters: plain psycopg types suffice here
        cparams.setdefault("connect_timeout", 5)  # as make_engine
        for name, value in PG_CONNECTION_BOUNDS.items():  # keepalives, tcp_user_timeout: as make_engine
            cparams.setdefault(name, value)
        self._cargs, self._cparams = cargs, cparams
        import psycopg  # only a PostgreSQL ledger needs the driver (the engine imported it)

        self._psycopg = psycopg
        self._idle_status = psycopg.pq.TransactionStatus.IDLE
        # None: never prepare (PgBouncer in transaction pooling breaks prepared statements);
        # otherwise psycopg's default threshold (5). Turned off for good (`run`) the first time
        # the server says a prepared statement is missing or already taken.
        self._prepare_threshold = _PSYCOPG_PREPARE_THRESHOLD if prepared_statements else None
        self._url, self._safe = url, safe
        self._lock = threading.Lock()
        self._idle: list[psycopg.Connection[Any]] = []
        self._pid = os.getpid()
        # A ledger dropped without close() still closes its idle connections.
        weakref.finalize(self, _close_all, self._idle, self._pid)

    def _take(self) -> psycopg.Connection[Any]:
        with self._lock:
            if self._pid != os.getpid():  # a forked child: the parent's connections are not ours
                self._idle.clear()
                self._pid = os.getpid()
            while self._idle:
                conn = self._idle.pop()
                if not conn.closed:
                    return conn
        return self._psycopg.connect(
            *self._cargs, **self._cparams, autocommit=True, prepare_threshold=self._prepare_threshold
        )

    def _give(self, conn: psycopg.Connection[Any]) -> None:
        if conn.closed or conn.info.transaction_status != self._idle_status:
            _close_quietly(conn)
            return
        with self._lock:
            if self._pid == os.getpid():
                self._idle.append(conn)
                return
        _close_quietly(conn)

    @contextmanager
    def cursor(self) -> Iterator[psycopg.Cursor[Any]]:
        conn = None
        try:
            conn = self._take()
            with conn.cursor() as cur:
                yield cur
        except BaseException as exc:
            if conn is not None:
                _close_quietly(conn)  # never given back: the next call connects afresh
            if isinstance(exc, self._psycopg.Error):
                raise DatabaseUnavailable(
                    f"ledger database {self._safe} is unavailable: {scrub(str(exc), self._url)}"
                ) from exc
            raise
        self._give(conn)

    def run(self, work: Callable[[psycopg.Cursor[Any]], _T]) -> _T:
        """`work(cursor)` on an idle connection. When the server says one of psycopg's prepared
        statements does not exist or already exists, a pooler in transaction pooling
        (PgBouncer) runs our statements on server connections shared with other clients:
        prepared statements are turned off for this ledger (said once in the log) and `work`
        runs once more on a new connection. Nothing ran the first time (the failing statement
        did not execute; a batch's transaction rolled back), so that is no second write."""
        try:
            with self.cursor() as cur:
                return work(cur)
        except DatabaseUnavailable as exc:
            cause = exc.__cause__
            if self._prepare_threshold is None or getattr(cause, "sqlstate", None) not in _PREPARED_GONE:
                raise
            self._prepare_threshold = None
            self.close()
            log.warning(
                "ledger database %s: %s; prepared statements are off for this ledger (behind a"
                " pooler in transaction pooling, pass prepared_statements=False)",
                self._safe,
                str(cause).strip().splitlines()[0],
            )
        with self.cursor() as cur:
            return work(cur)

    def close(self) -> None:
        """Close the idle connections (the ledger connects again if it is used after this)."""
        with self._lock:
            idle = list(self._idle)
            self._idle.clear()
        for conn in idle:
            _close_quietly(conn)


def _close_all(idle: list[psycopg.Connection[Any]], pid: int) -> None:
    if pid == os.getpid():  # never a forked child's copy of the parent's connections
        for conn in idle:
            _close_quietly(conn)


def _close_quietly(conn: psycopg.Connection[Any]) -> None:
    with contextlib.suppress(Exception):  # closing a broken connection must not raise
        conn.close()


@dataclass(frozen=True, slots=True)
class Claim:
    """A claim we hold: attempt `attempt` of `key`, by `worker_id` of `side`."""

    migration: str
    key: str
    side: str
    worker_id: str
    attempt: int


@dataclass(frozen=True, slots=True)
class ClaimResult:
    """What `Ledger.claim` decided.

    `allowed`: run the task (with `claim`). `reason`: when allowed, `claimed` (a new key, a
    retry of a failed attempt or a handed-over key) or `taken_over` (from a gone worker); when
    refused, the state of the claim that stands in the way (`succeeded`, `running`, `failed`
    (on the other side), `handed_over` (to the other side)), with its `holder` (side, worker)."""

    allowed: bool
    reason: str
    claim: Claim | None = None
    holder: tuple[str, str | None] | None = None


@dataclass(frozen=True, slots=True)
class ClaimState:
    """A key's claim as it stands: side, worker (None for a hand-over nobody took yet),
    attempt and state (`running`, `succeeded`, `failed`, `handed_over`)."""

    side: str
    worker_id: str | None
    attempt: int
    state: str


@dataclass(frozen=True, slots=True)
class HandOver:
    """What `Ledger.hand_over` decided; truthy when the key was handed over.

    `reason`: `handed_over`, or why not: `live` (running on a live worker), `succeeded`,
    `running` / `failed` (claimed on the receiving side already), `contended`; `holder`: the
    (side, worker) of the claim that stood in the way (or that was handed over)."""

    handed_over: bool
    reason: str
    holder: tuple[str, str | None] | None = None

    def __bool__(self) -> bool:
        return self.handed_over


@dataclass(frozen=True, slots=True)
class LedgerCounts:
    """The ledger's figures for one migration (`status`, `validate`, `no_double_execution`)."""

    executed_twice: int
    refused_executions: int
    refused_by_side: dict[str, int] = field(default_factory=dict)
    running: int = 0
    handed_over: int = 0
    succeeded: int = 0
    failed: int = 0

    def as_json(self) -> dict[str, Any]:
        return {
            "executed_twice": self.executed_twice,
            "refused_executions": self.refused_executions,
            "refused_by_side": dict(self.refused_by_side),
            "running": self.running,
            "handed_over": self.handed_over,
            "succeeded": self.succeeded,
            "failed": self.failed,
        }


@dataclass(frozen=True, slots=True)
class ExecutionRecord:
    """One row of `mfsm_executions`."""

    migration: str
    key: str
    attempt: int
    side: str
    worker_id: str
    started_at: datetime
    finished_at: datetime | None
    outcome: str


class Ledger:
    """The execution ledger on `url` (the migration database, or `ledger_url`). Thread-safe.

    `workers` (on the migration database) tells which workers are gone; without it a running
    claim is never taken over."""

    def __init__(
        self,
        url: str,
        *,
        engine: Engine | None = None,
        workers: Workers | None = None,
        prepared_statements: bool = True,
    ) -> None:
        self.url = url
        self.safe_url = safe_url(url)
        self._owns_engine = engine is None
        self.engine = engine or make_engine(url)
        self.workers = workers
        # The hot path's raw connections (PostgreSQL with psycopg 3; see the module's docstring).
        self._pg: _PgConnections | None = None
        if self.engine.dialect.name == "postgresql":
            self._pg_claim, self._pg_finish = _sqlalchemy_text(_PG_CLAIM), _sqlalchemy_text(_PG_FINISH)
            if self.engine.dialect.driver == "psycopg":
                self._pg = _PgConnections(
                    self.engine, url, self.safe_url, prepared_statements=prepared_statements
                )
        self._insert = upsert(self.engine, execution_claims_table)
        c = execution_claims_table.c
        claim = self._insert.values(
            migration=bindparam("m"),
            key=bindparam("k"),
            side=bindparam("side"),
            worker_id=bindparam("w"),
            attempt=1,
            state=RUNNING,
            started_at=bindparam("now", type_=UTCDateTime),
        )
        self._claim_stmt = claim.on_conflict_do_update(
            index_elements=[c.migration, c.key],
            set_={
                "side": claim.excluded.side,
                "worker_id": claim.excluded.worker_id,
                "attempt": c.attempt + 1,
                "state": RUNNING,
                "started_at": claim.excluded.started_at,
            },
            # The only rule that lets a key be claimed again: it is this side's to run.
            where=c.state.in_((FAILED, HANDED_OVER)) & (c.side == claim.excluded.side),
        ).returning(c.attempt)

    @classmethod
    def open(cls, url: str, *, workers: Workers | None = None) -> Ledger:
        """A ledger on a database whose schema is at the Alembic head (else `SchemaNotCurrent`)."""
        from .journal import Journal  # alembic is imported lazily there, and only by this path

        ledger = cls(url, workers=workers)
        try:
            Journal(url, engine=ledger.engine).check_schema()
        except BaseException:
            ledger.close()
            raise
        return ledger

    @property
    def dialect(self) -> str:
        return self.engine.dialect.name

    def close(self) -> None:
        """Close the hot path's connections, and dispose of the engine this ledger created (one
        it was given is left alone)."""
        if self._pg is not None:
            self._pg.close()
        if self._owns_engine:
            self.engine.dispose()

    def __enter__(self) -> Ledger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def _transaction(self, *, autocommit: bool = False) -> Iterator[Connection]:
        """One transaction, or (`autocommit`, PostgreSQL) one statement committed by itself."""
        try:
            if autocommit:
                with self.engine.connect() as conn:
                    conn.execution_options(isolation_level="AUTOCOMMIT")
                    yield conn
                return
            with self.engine.begin() as conn:
                yield conn
        except DBAPIError as exc:
            raise DatabaseUnavailable(
                f"ledger database {self.safe_url} is unavailable: {scrub(str(exc.orig or exc), self.url)}"
            ) from exc

    # -- claiming -----------------------------------------------------------------------

    def claim(self, migration: str, key: str, side: str, worker_id: str) -> ClaimResult:
        """Claim the execution of `key` for `worker_id` of `side`.

        Allowed for a new key, for a retry of a failed attempt by the same side, for a key
        handed over to `side`, and (taking it over) for a key running on a gone worker.
        Refused, and counted, when the key succeeded, runs on a live worker, failed on the
        other side or was handed over to the other side."""
        if side not in SIDES:
            raise ValueError(f"side must be 'old' or 'new', not {side!r}")
        now = utcnow()
        params = {"m": migration, "k": key, "side": side, "w": worker_id, "now": now}
        row: Any
        if self._pg is not None:
            # One statement, one round trip, committed on its own (autocommit): the claim and
            # its history row in a data-modifying CTE, on this thread's raw connection.
            def pg_claim(cur: psycopg.Cursor[Any]) -> tuple[bool, Any]:
                won = cur.execute(_PG_CLAIM, params).fetchone()
                if won is not None:
                    return True, won[0]
                # Lost: the claim row says why (it exists: the upsert conflicted with it).
                return False, cur.execute(_PG_READ_CLAIM, params).fetchone()

            claimed, found = self._pg.run(pg_claim)
            if claimed:
                return ClaimResult(True, "claimed", Claim(migration, key, side, worker_id, found))
            assert found is not None
            row = ClaimState(*found)
        elif self.dialect == "postgresql":  # another driver than psycopg: the same statements
            with self._transaction(autocommit=True) as conn:
                attempt = conn.execute(self._pg_claim, params).scalar()
            if attempt is not None:
                return ClaimResult(True, "claimed", Claim(migration, key, side, worker_id, attempt))
            with self._transaction(autocommit=True) as conn:
                row = conn.execute(_READ_CLAIM, params).one()
        else:
            with self._transaction() as conn:
                attempt = conn.execute(self._claim_stmt, params).scalar()
                if attempt is not None:
                    claim = Claim(migration, key, side, worker_id, attempt)
                    self._record_start(conn, claim, now)
                    return ClaimResult(True, "claimed", claim)
                # Lost: the claim row (locked by the write lock we hold) says why.
                row = conn.execute(_READ_CLAIM, params).one()
        if row.state == RUNNING and self._gone(migration, row.side, row.worker_id):
            taken = self._take_over(migration, key, side, worker_id, row)
            if taken is not None:
                return taken
            return self.claim(migration, key, side, worker_id)  # the claim moved under us: decide again
        with self._transaction() as conn:
            self._count_refusal(conn, migration, side)
        return ClaimResult(False, row.state, None, (row.side, row.worker_id))

    def _gone(self, migration: str, side: str, worker_id: str | None) -> bool:
        """Whether the running claim of that worker may be taken over (`Workers.may_take_over`:
        gone, and it did not batch its finishes)."""
        if self.workers is None or worker_id is None:
            return False
        return self.workers.may_take_over(migration, side, worker_id)

    def _absent(self, migration: str, side: str, worker_id: str | None) -> bool:
        """Whether the worker of a running claim is gone (`Workers.is_gone`), for a hand-over:
        unlike a take-over, a hand-over follows what the task's own side says (still running
        at the drain's timeout), so a gone worker that batched its finishes is handed over too."""
        if self.workers is None or worker_id is None:
            return False
        return self.workers.is_gone(migration, side, worker_id)

    def _take_over(
        self, migration: str, key: str, side: str, worker_id: str, seen: Any
    ) -> ClaimResult | None:
        """Compare-and-set the running claim of a gone worker, as we saw it, to us."""
        c = execution_claims_table.c
        now = utcnow()
        with self._transaction() as conn:
            attempt = conn.execute(
                update(execution_claims_table)
                .where(_running_as_seen(migration, key, seen))
                .values(side=side, worker_id=worker_id, attempt=c.attempt + 1, state=RUNNING, started_at=now)
                .returning(c.attempt)
            ).scalar()
            if attempt is None:
                return None
            e = executions_table.c
            conn.execute(
                update(executions_table)
                .where(
                    e.migration == migration, e.key == key, e.attempt == seen.attempt, e.outcome == RUNNING
                )
                .values(outcome=HANDED_OVER)
            )
            claim = Claim(migration, key, side, worker_id, attempt)
            self._record_start(conn, claim, now)
        return ClaimResult(True, "taken_over", claim, (seen.side, seen.worker_id))

    def _record_start(self, conn: Connection, claim: Claim, now: datetime) -> None:
        conn.execute(
            executions_table.insert().values(
                migration=claim.migration,
                key=claim.key,
                attempt=claim.attempt,
                side=claim.side,
                worker_id=claim.worker_id,
                started_at=now,
                outcome=RUNNING,
            )
        )

    def _count_refusal(self, conn: Connection, migration: str, side: str) -> None:
        r = execution_refusals_table.c
        stmt = upsert(self.engine, execution_refusals_table).values(migration=migration, side=side, refused=1)
        conn.execute(
            stmt.on_conflict_do_update(index_elements=[r.migration, r.side], set_={"refused": r.refused + 1})
        )

    # -- finishing ----------------------------------------------------------------------

    def finish(self, claim: Claim, outcome: str) -> bool:
        """Record how `claim`'s execution ended (`succeeded` or `failed`). True when the claim
        was still ours; False when it had been handed over or taken over meanwhile (the
        execution is recorded anyway, as it really went)."""
        return self.finish_many([(claim, outcome)]) == 1

    def finish_many(self, finished: Iterable[tuple[Claim, str]]) -> int:
        """`finish` for a batch, in one transaction; returns how many claims were still ours."""
        items = list(finished)
        for _, outcome in items:
            if outcome not in (SUCCEEDED, FAILED):
                raise ValueError(f"an execution finishes succeeded or failed, not {outcome!r}")
        c, e = execution_claims_table.c, executions_table.c
        now = utcnow()
        if self.dialect == "postgresql":
            # One statement per finish (a data-modifying CTE); a batch in one transaction.
            params = [
                {
                    "m": claim.migration,
                    "k": claim.key,
                    "a": claim.attempt,
                    "side": claim.side,
                    "w": claim.worker_id,
                    "o": outcome,
                    "now": now,
                    "closes": outcome == SUCCEEDED,
                }
                for claim, outcome in items
            ]
            if not params:
                return 0
            if self._pg is not None:

                def finish(cur: psycopg.Cursor[Any]) -> int:
                    if len(params) == 1:  # one round trip, committed by itself
                        return cur.execute(_PG_FINISH, params[0]).rowcount
                    # A batch: one transaction, BEGIN, the statements and COMMIT pipelined.
                    with cur.connection.pipeline(), cur.connection.transaction():
                        cur.executemany(_PG_FINISH, params)
                    return cur.rowcount  # the sum over the batch

                return self._pg.run(finish)
            with self._transaction(autocommit=len(items) == 1) as conn:
                return sum(conn.execute(self._pg_finish, one).rowcount for one in params)
        ours = 0
        with self._transaction() as conn:
            for claim, outcome in items:
                conn.execute(
                    update(executions_table)
                    .where(
                        e.migration == claim.migration,
                        e.key == claim.key,
                        e.attempt == claim.attempt,
                        e.finished_at.is_(None),
                    )
                    .values(outcome=outcome, finished_at=now)
                )
                # A success closes the key even after a hand-over nobody has claimed yet (the
                # receiving side must not run it again); a failure only while still ours.
                states = (RUNNING, HANDED_OVER) if outcome == SUCCEEDED else (RUNNING,)
                ours += conn.execute(
                    update(execution_claims_table)
                    .where(
                        c.migration == claim.migration,
                        c.key == claim.key,
                        c.attempt == claim.attempt,
                        c.state.in_(states),
                    )
                    .values(state=outcome, side=claim.side, worker_id=claim.worker_id)
                ).rowcount
        return ours

    # -- hand-over (the drains' requeue policy) ---------------------------------------------

    def hand_over(self, migration: str, key: str, from_side: str, to_side: str) -> HandOver:
        """Give `key` to `to_side`, which alone may claim it next. Truthy when handed over.

        Handed over (each case decided by one compare-and-set statement on the claim row):
        a key never claimed (a placeholder keeps `from_side` out), a failed claim of
        `from_side`, a key handed over to `from_side` earlier that no worker there claimed
        (a rollback's drain gives it back), a key already handed over to `to_side`
        (idempotent), and a running claim
        of `from_side` whose worker is **gone** (`Workers.is_gone`: its heartbeat is older
        than the ttl, or it has no row), compared-and-set on the worker and attempt seen, like
        a take-over. Refused (falsy, with the `reason`): `live`, a running claim of a live
        worker (it is executing the task right now: re-queuing it would run it twice; without
        `workers` every running claim counts as live); `succeeded`; or the key is claimed on
        `to_side` already (`running`, `failed`): nothing to re-queue."""
        if {from_side, to_side} != set(SIDES):
            raise ValueError(f"a hand-over goes from one side to the other, not {from_side!r} -> {to_side!r}")
        c = execution_claims_table.c
        stmt = self._insert.values(
            migration=migration,
            key=key,
            side=to_side,
            worker_id=None,
            attempt=0,
            state=HANDED_OVER,
            started_at=utcnow(),
        )
        stmt = stmt.on_conflict_do_update(
            index_elements=[c.migration, c.key],
            set_={"side": to_side, "state": HANDED_OVER},
            # A failed claim of the giving side; a hand-over to the giving side that no worker
            # there has claimed (it owns the key, and gives it on); ours already (idempotent).
            where=(c.state.in_((FAILED, HANDED_OVER)) & (c.side == from_side))
            | ((c.state == HANDED_OVER) & (c.side == to_side)),
        ).returning(c.attempt)
        for _ in range(3):  # the claim may move between the statements: decide again
            with self._transaction() as conn:
                if conn.execute(stmt).scalar() is not None:
                    return HandOver(True, HANDED_OVER)
                row = conn.execute(_READ_CLAIM, {"m": migration, "k": key}).one()
            if not (row.state == RUNNING and row.side == from_side):
                return HandOver(False, row.state, (row.side, row.worker_id))
            if not self._absent(migration, row.side, row.worker_id):
                return HandOver(False, "live", (row.side, row.worker_id))
            if self._hand_over_running(migration, key, to_side, row):
                return HandOver(True, HANDED_OVER, (row.side, row.worker_id))
        return HandOver(False, "contended")

    def _hand_over_running(self, migration: str, key: str, to_side: str, seen: Any) -> bool:
        """Compare-and-set the running claim of a gone worker, as we saw it, to handed over."""
        c, e = execution_claims_table.c, executions_table.c
        with self._transaction() as conn:
            attempt = conn.execute(
                update(execution_claims_table)
                .where(_running_as_seen(migration, key, seen))
                .values(side=to_side, state=HANDED_OVER)
                .returning(c.attempt)
            ).scalar()
            if attempt is None:
                return False
            conn.execute(
                update(executions_table)
                .where(e.migration == migration, e.key == key, e.attempt == attempt, e.outcome == RUNNING)
                .values(outcome=HANDED_OVER)
            )
        return True

    # -- reads --------------------------------------------------------------------------

    def claim_of(self, migration: str, key: str) -> ClaimState | None:
        """The claim row of `key` as it stands (None when the key was never claimed)."""
        with self._transaction() as conn:
            row = conn.execute(_READ_CLAIM, {"m": migration, "k": key}).first()
        return None if row is None else ClaimState(row.side, row.worker_id, int(row.attempt), row.state)

    def claims_of(self, migration: str, keys: Iterable[str]) -> dict[str, ClaimState]:
        """The claim rows of these keys as they stand (a key never claimed is left out), in
        one query."""
        c = execution_claims_table.c
        wanted = list(keys)
        if not wanted:
            return {}
        query = select(c.key, c.side, c.worker_id, c.attempt, c.state).where(
            c.migration == migration, c.key.in_(wanted)
        )
        with self._transaction() as conn:
            return {
                row.key: ClaimState(row.side, row.worker_id, int(row.attempt), row.state)
                for row in conn.execute(query)
            }

    def succeeded_keys(
        self, migration: str, side: str, *, after: str | None = None, limit: int = 1000
    ) -> list[str]:
        """Keys whose claim succeeded on `side`, in key order, `limit` at a time after `after`."""
        c = execution_claims_table.c
        query = select(c.key).where(c.migration == migration, c.state == SUCCEEDED, c.side == side)
        if after is not None:
            query = query.where(c.key > after)
        with self._transaction() as conn:
            return list(conn.execute(query.order_by(c.key).limit(limit)).scalars())

    def owned_keys(
        self,
        migration: str,
        side: str,
        states: Iterable[str],
        *,
        after: str | None = None,
        upto: str | None = None,
        limit: int = 1000,
    ) -> list[str]:
        """Keys whose claim is on `side` in one of `states`, in key order, `limit` at a time,
        with `after` < key <= `upto` (either bound optional): for instance the hand-overs to
        `side` no worker there has claimed yet (`states=(HANDED_OVER,)`)."""
        c = execution_claims_table.c
        query = select(c.key).where(c.migration == migration, c.side == side, c.state.in_(tuple(states)))
        if after is not None:
            query = query.where(c.key > after)
        if upto is not None:
            query = query.where(c.key <= upto)
        with self._transaction() as conn:
            return list(conn.execute(query.order_by(c.key).limit(limit)).scalars())

    def executions(self, migration: str, key: str) -> list[ExecutionRecord]:
        """Every execution of `key`, first attempt first."""
        e = executions_table.c
        with self._transaction() as conn:
            rows = conn.execute(
                select(executions_table).where(e.migration == migration, e.key == key).order_by(e.attempt)
            ).mappings()
            return [ExecutionRecord(**dict(row)) for row in rows]

    def counts(self, migration: str) -> LedgerCounts:
        """executed_twice, refused_executions (per side too), running, handed_over, ..."""
        c, e, r = execution_claims_table.c, executions_table.c, execution_refusals_table.c
        with self._transaction() as conn:
            twice = (
                select(e.key)
                .where(e.migration == migration, e.outcome == SUCCEEDED)
                .group_by(e.key)
                .having(func.count() > 1)
                .subquery()
            )
            executed_twice = conn.execute(select(func.count()).select_from(twice)).scalar_one()
            refused = {
                row.side: int(row.refused)
                for row in conn.execute(select(r.side, r.refused).where(r.migration == migration))
            }
            by_state = select(c.state, func.count().label("n")).where(c.migration == migration)
            states = {row.state: int(row.n) for row in conn.execute(by_state.group_by(c.state))}
            handed_over = conn.execute(
                select(func.count()).where(e.migration == migration, e.outcome == HANDED_OVER)
            ).scalar_one()
        return LedgerCounts(
            executed_twice=executed_twice,
            refused_executions=sum(refused.values()),
            refused_by_side={side: refused.get(side, 0) for side in SIDES},
            running=states.get(RUNNING, 0),
            handed_over=handed_over,
            succeeded=states.get(SUCCEEDED, 0),
            failed=states.get(FAILED, 0),
        )


def _running_as_seen(migration: str, key: str, seen: Any) -> ColumnElement[bool]:
    """The compare-and-set condition on a running claim: still held by the worker and attempt
    we saw (a take-over and a hand-over of a gone worker's claim both use it)."""
    c = execution_claims_table.c
    return and_(
        c.migration == migration,
        c.key == key,
        c.state == RUNNING,
        c.side == seen.side,
        c.worker_id == seen.worker_id,
        c.attempt == seen.attempt,
    )
