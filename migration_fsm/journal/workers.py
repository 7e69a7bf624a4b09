"""`mfsm_workers`: the workers of each side, their heartbeats and acknowledgements.

A `WorkerGate` (client layer) registers its worker, heartbeats, and acknowledges each routing
version it has applied, each time with one upsert (`Workers.heartbeat`). The built-in step
`pause_consumers` and `status` read the workers of a side (`Workers.side`): a worker is
**live** when its last heartbeat is at most `worker_ttl_seconds` old, else **gone** (named);
a live worker has **acknowledged** a version when its `seen_version` is at least that
version. A worker that closes its gate deletes its row (`Workers.deregister`).

This module imports SQLAlchemy only (no Alembic, no CLI), so the light client can use it.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from sqlalchemy import case, delete, select
from sqlalchemy.dialects import postgresql, sqlite

from .db import make_engine, utcnow
from .schema import workers_table

if TYPE_CHECKING:
    from sqlalchemy import Engine

SIDES = ("old", "new")


def upsert(engine_or_dialect: Any, table: Any) -> Any:
    """`INSERT` with `ON CONFLICT` for the dialect (SQLite or PostgreSQL) of an engine or a
    connection, of a dialect, or named."""
    name = getattr(getattr(engine_or_dialect, "dialect", engine_or_dialect), "name", engine_or_dialect)
    if name == "postgresql":
        return postgresql.insert(table)
    if name == "sqlite":
        return sqlite.insert(table)
    raise ValueError(f"the workers' table and the ledger support SQLite and PostgreSQL, not {name}")


def default_worker_id() -> str:
    """`host:pid:random`: unique per process, readable in `status`."""
    return f"{socket.gethostname()}:{os.getpid()}:{os.urandom(3).hex()}"


@dataclass(frozen=True, slots=True)
class WorkerRecord:
    """One row of `mfsm_workers`."""

    migration: str
    side: str
    worker_id: str
    host: str
    pid: int
    seen_version: int
    heartbeat_at: datetime
    defers_finishes: bool = False


@dataclass(frozen=True, slots=True)
class SideWorkers:
    """The workers of one side, judged at `now` against `version` and the ttl."""

    side: str
    version: int
    live: list[WorkerRecord] = field(default_factory=list)
    gone: list[WorkerRecord] = field(default_factory=list)

    @property
    def acknowledged(self) -> list[WorkerRecord]:
        """The live workers that have applied `version` (or a later one)."""
        return [w for w in self.live if w.seen_version >= self.version]

    @property
    def waiting(self) -> list[WorkerRecord]:
        """The live workers that have not acknowledged `version` yet."""
        return [w for w in self.live if w.seen_version < self.version]

    @property
    def all_acknowledged(self) -> bool:
        return not self.waiting

    def as_json(self) -> dict[str, Any]:
        return {
            "live": len(self.live),
            "acknowledged": len(self.acknowledged),
            "gone": len(self.gone),
            "gone_ids": [w.worker_id for w in self.gone],
            "waiting_ids": [w.worker_id for w in self.waiting],
        }


class Workers:
    """Reads and writes `mfsm_workers` in the migration database. Thread-safe."""

    def __init__(self, engine: Engine, *, ttl_seconds: float = 30.0) -> None:
        if ttl_seconds <= 0:
            raise ValueError("ttl_seconds must be positive")
        self.engine = engine
        self.ttl_seconds = ttl_seconds
        self._owns_engine = False

    @classmethod
    def from_url(cls, url: str, *, ttl_seconds: float = 30.0) -> Workers:
        workers = cls(make_engine(url), ttl_seconds=ttl_seconds)
        workers._owns_engine = True
        return workers

    def close(self) -> None:
        """Dispose of the engine `from_url` created (one it was given is left alone)."""
        if self._owns_engine:
            self.engine.dispose()

    # -- writes (one statement each) ------------------------------------------------------

    def heartbeat(
        self,
        migration: str,
        side: str,
        worker_id: str,
        *,
        seen_version: int = 0,
        host: str | None = None,
        pid: int | None = None,
        defers_finishes: bool = False,
        exact: bool = False,
    ) -> None:
        """Register the worker, renew its heartbeat and acknowledge `seen_version`, in one
        upsert. The acknowledged version only moves forward, unless `exact`: a gate writes
        the version it applied, which is lower after the migration database was restored
        (else a stale, higher `seen_version` would count as acknowledging the next versions,
        a pause among them, before the worker applied them). Host and pid are those of the
        registration. `defers_finishes`: the worker batches its finishes (see
        `may_take_over`); once set for a worker it stays set."""
        _check_side(side)
        c = workers_table.c
        stmt = upsert(self.engine, workers_table).values(
            migration=migration,
            side=side,
            worker_id=worker_id,
            host=host or socket.gethostname(),
            pid=os.getpid() if pid is None else pid,
            seen_version=seen_version,
            heartbeat_at=utcnow(),
            defers_finishes=defers_finishes,
        )
        stmt = stmt.on_conflict_do_update(
            index_elements=[c.migration, c.side, c.worker_id],
            set_={
                "heartbeat_at": stmt.excluded.heartbeat_at,
                "defers_finishes": c.defers_finishes | stmt.excluded.defers_finishes,
                "seen_version": stmt.excluded.seen_version
                if exact
                else case(
                    (stmt.excluded.seen_version > c.seen_version, stmt.excluded.seen_version),
                    else_=c.seen_version,
                ),
            },
        )
        with self.engine.begin() as conn:
            conn.execute(stmt)

    #: Registering is the first heartbeat; acknowledging is a heartbeat with the version.
    register = heartbeat

    def acknowledge(self, migration: str, side: str, worker_id: str, version: int) -> None:
        """Record that the worker has applied routing `version` (a heartbeat too)."""
        self.heartbeat(migration, side, worker_id, seen_version=version)

    def deregister(self, migration: str, side: str, worker_id: str) -> None:
        """Remove the worker (its gate closed): it is neither live nor gone any more."""
        c = workers_table.c
        with self.engine.begin() as conn:
            conn.execute(
                delete(workers_table).where(
                    c.migration == migration, c.side == side, c.worker_id == worker_id
                )
            )

    # -- reads ------------------------------------------------------------------------

    def records(self, migration: str, side: str | None = None) -> list[WorkerRecord]:
        c = workers_table.c
        query = select(workers_table).where(c.migration == migration)
        if side is not None:
            query = query.where(c.side == side)
        with self.engine.connect() as conn:
            rows = conn.execute(query.order_by(c.side, c.worker_id)).mappings().all()
        return [WorkerRecord(**dict(row)) for row in rows]

    def side(self, migration: str, side: str, version: int, *, now: datetime | None = None) -> SideWorkers:
        """The workers of `side`: live (acknowledged `version` or not) and gone."""
        _check_side(side)
        return self._judge(side, version, self.records(migration, side), now)

    def sides(self, migration: str, version: int, *, now: datetime | None = None) -> dict[str, SideWorkers]:
        """Both sides at once (one query), as `status` shows them."""
        records = self.records(migration)
        return {s: self._judge(s, version, [r for r in records if r.side == s], now) for s in SIDES}

    def is_gone(self, migration: str, side: str, worker_id: str, *, now: datetime | None = None) -> bool:
        """Whether that worker's heartbeat is older than the ttl, or it has no row (never
        registered, or deregistered): its running claims may be taken over."""
        c = workers_table.c
        with self.engine.connect() as conn:
            beat = conn.execute(
                select(c.heartbeat_at).where(
                    c.migration == migration, c.side == side, c.worker_id == worker_id
                )
            ).scalar()
        return beat is None or beat < (now or utcnow()) - timedelta(seconds=self.ttl_seconds)

    def may_take_over(
        self, migration: str, side: str, worker_id: str, *, now: datetime | None = None
    ) -> bool:
        """Whether a running claim of that worker may be taken over: it is gone (as `is_gone`)
        and did not defer its finishes. A worker that batched its finishes and vanished may
        have lost the finish of a task that succeeded, so its claim looks running when the task
        ran: taking it over would run the task twice. Such a claim stays refused until the
        task's own side says it did not finish (the drain's hand-over, `Ledger.hand_over`). A
        worker with no row (deregistered after flushing, or never registered) may be taken over."""
        c = workers_table.c
        with self.engine.connect() as conn:
            row = conn.execute(
                select(c.heartbeat_at, c.defers_finishes).where(
                    c.migration == migration, c.side == side, c.worker_id == worker_id
                )
            ).first()
        if row is None:
            return True
        gone = row.heartbeat_at < (now or utcnow()) - timedelta(seconds=self.ttl_seconds)
        return gone and not row.defers_finishes

    def _judge(
        self, side: str, version: int, records: list[WorkerRecord], now: datetime | None
    ) -> SideWorkers:
        cutoff = (now or utcnow()) - timedelta(seconds=self.ttl_seconds)
        judged = SideWorkers(side, version)
        for record in records:
            (judged.live if record.heartbeat_at >= cutoff else judged.gone).append(record)
        return judged


def _check_side(side: str) -> None:
    if side not in SIDES:
        raise ValueError(f"side must be 'old' or 'new', not {side!r}")
