"""`WorkerGate`: what a worker of either queue runs so that no task is lost or run twice
(DESIGN.md section 10).

```python
gate = WorkerGate(client, side="old")          # registers in mfsm_workers
while running:
    with gate.dequeuing():                      # shared side of the gate's lock
        task = queue.dequeue() if gate.may_consume() else None   # inside the dequeue
    if task is None:
        continue
    with gate.executing(task.key) as run:       # a claim in the execution ledger
        if run.allowed:
            do_the_task(task)
```

**Acknowledged hand-over.** A background thread follows the `PhaseClient`'s snapshot (from
memory) and applies each new routing version under the exclusive side of a shared/exclusive
lock; every dequeue holds the shared side (`dequeuing()`). So a new version is applied only
after every dequeue that began under an earlier one has finished, and only then is it
acknowledged in `mfsm_workers` (`seen_version`). `pause_consumers` waits for those
acknowledgements: once every live worker of the paused side has acknowledged the pause,
every task that side took is visible as running to the drain, and no worker of that side
takes another.

**Why `may_consume()` must be called inside the worker's own dequeue** (inside
`dequeuing()`, and inside the queue's dequeue transaction when it has one): a check made
before the dequeue leaves a window. The worker checks (allowed), the pause is published,
applied and acknowledged (nothing was being dequeued under the lock), the drain counts zero
running tasks, and then the worker dequeues and runs a task the receiving side will run
too. With the check and the dequeue under one shared hold, the acknowledgement waits for the
dequeue, and the task it took is committed as running before the drain looks. Keep the
dequeue short (a non-blocking poll or a short timeout): it delays the acknowledgement.
Never call `refresh()` from inside `dequeuing()` (it would wait for itself).

**Execution ledger.** `executing(key)` claims the key in the ledger (`journal/ledger.py`)
before the task runs: `run.allowed` is False when the task ran or runs elsewhere, and then
the worker must not run it (the task stays where it is; `run.reason` says why). On a normal
exit the execution is finished `succeeded`, on an exception `failed` (and the exception is
re-raised). When the ledger cannot be reached the task is not started (`run.allowed` False,
`run.reason == "ledger_unavailable"`: leave it queued and back off); one warning is logged
per outage. A finish that cannot be written (whatever stopped the write) is kept and retried
by the background thread.

**Batched finishes (opt-in: `finish_batch_seconds`).** DESIGN.md allows finishes to be
batched, never claims. By default every finish is written when the task ends, so a task
costs two commits (claim, finish). With `finish_batch_seconds` set, finishes are kept in
memory and written together (`Ledger.finish_many`, one transaction) by a flusher thread
every `finish_batch_seconds`, or as soon as `finish_batch_size` are waiting, and on
`close()`: a task costs about one commit. The trade-off is what a crash loses: the finishes
not flushed yet. Their claims then look `running` on a worker that is gone, and the ordinary
rule (a running claim of a gone worker may be taken over) would run again a task that in
fact succeeded. So a batching gate registers with `defers_finishes` in `mfsm_workers`, and
the ledger never takes over a running claim of a gone worker that deferred its finishes
(`Workers.may_take_over`): such a key is refused (reason `running`, counted) until the
task's own side says it did not finish, i.e. the drain at the next transition finds it
still running and hands it over (`Ledger.hand_over`), or an operator does so after
checking. Batching trades the automatic recovery of a crashed worker's in-flight tasks for
throughput; it never trades a second execution. A gate that had to keep a finish for a retry
(the ledger was unreachable) marks itself the same way, for the same reason. `close()`
deregisters only once every finish is written.

This module is part of the light client: it imports SQLAlchemy through the journal's
`workers` and `ledger` modules, never click, rich or alembic. `executing` blocks: from
asyncio code, run the task's claim and finish in a thread (`asyncio.to_thread`).
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

from sqlalchemy.exc import SQLAlchemyError

from ..exceptions import DatabaseUnavailable
from ..journal.ledger import FAILED, SUCCEEDED, Claim, Ledger
from ..journal.workers import SIDES, Workers, default_worker_id
from . import metrics
from ._log import first_line, log

if TYPE_CHECKING:
    from collections.abc import Iterator
    from types import TracebackType

    from .phase import PhaseClient, Snapshot

_UNREACHABLE = (DatabaseUnavailable, SQLAlchemyError, OSError)


@dataclass(slots=True)
class Run:
    """One execution as `executing(key)` decided it.

    `allowed`: run the task. `reason`: `claimed` or `taken_over` when allowed; else
    `succeeded`, `running`, `failed` or `handed_over` (the ledger's claim that stands in the
    way), `ledger_unavailable`, or `not_registered` (the gate could not register yet).
    `outcome`: how the execution was finished (`succeeded` or `failed`), once it is."""

    key: str
    allowed: bool
    reason: str
    claim: Claim | None = None
    outcome: str | None = None


class _SharedExclusive:
    """A shared/exclusive lock that prefers the exclusive side: once an apply waits, new
    dequeues wait for it, so a new version is never starved by a busy worker."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._shared = 0
        self._exclusive = False
        self._waiting = 0

    @contextmanager
    def shared(self) -> Iterator[None]:
        with self._cond:
            while self._exclusive or self._waiting:
                self._cond.wait()
            self._shared += 1
        try:
            yield
        finally:
            with self._cond:
                self._shared -= 1
                if not self._shared:
                    self._cond.notify_all()

    @contextmanager
    def exclusive(self) -> Iterator[None]:
        with self._cond:
            self._waiting += 1
            try:
                while self._exclusive or self._shared:
                    self._cond.wait()
            finally:
                self._waiting -= 1
            self._exclusive = True
        try:
            yield
        finally:
            with self._cond:
                self._exclusive = False
                self._cond.notify_all()


def _state(snap: Snapshot) -> tuple[int, str, int, str | None]:
    """What a gate applies from a snapshot (its staleness and read time are not part of it)."""
    return (snap.version, snap.phase, snap.percent, snap.paused)


class WorkerGate:
    """The gate of one worker of `side` ("old" or "new") of `client.migration`. Thread-safe.

    `worker_id` defaults to `host:pid:random`. The workers' table is in the client's
    database; the ledger is there too unless `ledger_url` names its own (the `ledger_url`
    setting). `worker_ttl_seconds` must match the operators' setting (a worker silent for
    longer counts as gone and its running claims may be taken over); the heartbeat runs every
    `heartbeat_seconds` (default a third of it). `poll_seconds`: how often the background
    thread looks at the client's snapshot (a memory read) for a new version to apply.
    `finish_batch_seconds` (default None: every finish written when its task ends) and
    `finish_batch_size`: batched finishes, with the trade-off the module's docstring states.
    With `background=False` a full batch is written by the thread that finished the task, and
    the rest by `refresh()`, `flush()` or `close()`. `ledger_prepared_statements`: False behind
    PgBouncer in transaction pooling (`Ledger(prepared_statements=...)`: by default psycopg
    prepares the ledger's claim and finish on PostgreSQL; behind transaction pooling the first
    prepared statement the server does not have turns that off, with one warning)."""

    def __init__(
        self,
        client: PhaseClient,
        side: str,
        worker_id: str | None = None,
        *,
        ledger_url: str | None = None,
        worker_ttl_seconds: float = 30.0,
        heartbeat_seconds: float | None = None,
        poll_seconds: float = 0.05,
        background: bool = True,
        finish_batch_seconds: float | None = None,
        finish_batch_size: int = 256,
        ledger_prepared_statements: bool = True,
    ) -> None:
        if side not in SIDES:
            raise ValueError(f"side must be 'old' or 'new', not {side!r}")
        if worker_ttl_seconds <= 0 or poll_seconds <= 0:
            raise ValueError("worker_ttl_seconds and poll_seconds must be positive")
        if (finish_batch_seconds is not None and finish_batch_seconds <= 0) or finish_batch_size < 1:
            raise ValueError("finish_batch_seconds must be positive (or None) and finish_batch_size >= 1")
        self.finish_batch_seconds = finish_batch_seconds
        self.finish_batch_size = finish_batch_size
        self._flush_wanted = threading.Event()
        self.client = client
        self.side = side
        self.migration = client.migration
        self.worker_id = worker_id or default_worker_id()
        self.heartbeat_seconds = heartbeat_seconds or worker_ttl_seconds / 3
        self.poll_seconds = poll_seconds
        self.workers = Workers.from_url(client.url, ttl_seconds=worker_ttl_seconds)
        self.ledger = Ledger(
            ledger_url or client.url, workers=self.workers, prepared_statements=ledger_prepared_statements
        )
        self._lock = _SharedExclusive()
        self._apply_lock = threading.Lock()
        self._state_lock = threading.Lock()
        self._applied: Snapshot = client.snapshot()
        self._acked: int | None = None  # the version last written to mfsm_workers (None: not registered)
        self._beat_due = 0.0
        self._pending: list[tuple[Claim, str]] = []
        self._deferred = finish_batch_seconds is not None  # said in mfsm_workers (defers_finishes)
        self._ledger_down = False
        self._counters = {"claimed": 0, "refused": 0, "unavailable": 0, "succeeded": 0, "failed": 0}
        self._stop = threading.Event()
        self._host, self._pid = socket.gethostname(), os.getpid()
        self._thread: threading.Thread | None = None
        self._flusher: threading.Thread | None = None
        self.refresh()  # apply the current version and register, on the caller's thread
        metrics.track(self, "gate", self.migration, side)
        if background:
            self._thread = threading.Thread(
                target=self._run, name=f"migration-fsm-gate-{self.migration}-{side}", daemon=True
            )
            self._thread.start()
            if finish_batch_seconds is not None:
                self._flusher = threading.Thread(
                    target=self._flush_loop,
                    name=f"migration-fsm-gate-flush-{self.migration}-{side}",
                    daemon=True,
                )
                self._flusher.start()

    # -- the hot path -------------------------------------------------------------------

    def may_consume(self) -> bool:
        """Whether this worker may take a task now (from memory): its side consumes per the
        routing it has applied, and no pause of its side is in force. Call it inside
        `dequeuing()`, inside the dequeue (see the module's docstring)."""
        snap = self._applied
        return snap.routing.consume_from == self.side and snap.paused != self.side

    @contextmanager
    def dequeuing(self) -> Iterator[None]:
        """Hold the shared side of the gate's lock around `may_consume()` and the dequeue, so
        that a new version is applied (and acknowledged) only after this dequeue finished."""
        with self._lock.shared():
            yield

    @contextmanager
    def executing(self, key: str) -> Iterator[Run]:
        """Claim `key` in the ledger around the task's execution (see the module's docstring)."""
        run = self._claim(key)
        if not run.allowed:
            yield run
            return
        try:
            yield run
        except BaseException:
            self._finish(run, FAILED)
            raise
        self._finish(run, SUCCEEDED)

    @property
    def applied_version(self) -> int:
        """The routing version this gate has applied (and acknowledges once registered)."""
        return self._applied.version

    @property
    def acknowledged_version(self) -> int | None:
        """The version last written to `mfsm_workers` (None before the registration)."""
        return self._acked

    def counters(self) -> dict[str, float]:
        """Plain numbers for the application's metrics system."""
        with self._state_lock:
            values: dict[str, float] = dict(self._counters)
            values["pending_finishes"] = len(self._pending)
        values["applied_version"] = self._applied.version
        values["may_consume"] = float(self.may_consume())
        return values

    # -- applying and acknowledging ---------------------------------------------------------

    def refresh(self) -> int:
        """Apply the client's current snapshot if it differs (a newer version, or a lower one
        after a restore; waiting for the dequeues in progress), then acknowledge it,
        heartbeat and flush pending finishes (unless a flusher thread writes them, every
        `finish_batch_seconds`). Returns the applied version. The background thread calls it;
        a test or a worker may too (never from inside `dequeuing()`)."""
        with self._apply_lock:
            snap = self.client.snapshot()
            if _state(snap) != _state(self._applied):
                # A newer version, or a lower one: the migration database was restored and the
                # client follows it (its reads are adopted in order), so the gate does too and
                # acknowledges exactly that version (`exact`: `seen_version` may move back).
                with self._lock.exclusive():  # every dequeue begun under the old version has finished
                    self._applied = snap
            version = self._applied.version
            if self._acked != version or self._beat_due <= time.monotonic():
                self._beat(version)
        if self._flusher is None:  # with a flusher thread, finishes wait for their batch
            self._flush()
        return version

    def _beat(self, version: int) -> None:
        deferred = self._deferred
        try:
            self.workers.heartbeat(
                self.migration,
                self.side,
                self.worker_id,
                seen_version=version,
                exact=True,  # what this gate applied, even lower than before (a restore)
                host=self._host,
                pid=self._pid,
                defers_finishes=deferred,
            )
        except _UNREACHABLE as exc:
            if self._beat_due >= 0:  # once per outage
                log.warning(
                    "migration-fsm gate %s cannot heartbeat: %s",
                    self.worker_id,
                    first_line(exc),
                    extra={"migration": self.migration, "side": self.side},
                )
            self._beat_due = -1.0
            return
        self._acked = version
        # A finish that failed during this heartbeat deferred it after we read `_deferred`:
        # then the next refresh writes that at once, not at the next interval.
        self._beat_due = time.monotonic() + self.heartbeat_seconds if deferred == self._deferred else 0.0

    def _run(self) -> None:
        while not self._stop.wait(self.poll_seconds):
            try:
                self.refresh()
            except Exception as exc:  # noqa: BLE001 - the gate's thread must survive anything
                log.warning("migration-fsm gate %s: %s", self.worker_id, first_line(exc))

    # -- the ledger -------------------------------------------------------------------------

    def _claim(self, key: str) -> Run:
        if self._acked is None:
            return self._count(Run(key, False, "not_registered"), "unavailable")
        try:
            result = self.ledger.claim(self.migration, key, self.side, self.worker_id)
        except _UNREACHABLE as exc:
            self._ledger_outage(exc)
            return self._count(Run(key, False, "ledger_unavailable"), "unavailable")
        self._ledger_back()
        if not result.allowed:
            return self._count(Run(key, False, result.reason), "refused")
        return self._count(Run(key, True, result.reason, result.claim), "claimed")

    def _finish(self, run: Run, outcome: str) -> None:
        assert run.claim is not None
        run.outcome = outcome
        self._count(run, outcome)
        if self.finish_batch_seconds is not None:
            with self._state_lock:
                self._pending.append((run.claim, outcome))
                full = len(self._pending) >= self.finish_batch_size
            if full:
                if self._flusher is None:
                    self._flush()  # no background thread: the caller writes the batch
                else:
                    self._flush_wanted.set()
            return
        try:
            self.ledger.finish(run.claim, outcome)
        except BaseException as exc:
            # Kept whatever stopped the write (an interrupt too: a finish dropped leaves its
            # claim running, taken over once this worker deregisters: the task would run again).
            with self._state_lock:
                self._pending.append((run.claim, outcome))  # retried by the background thread
            if not self._deferred:
                # A crash now would lose this finish: from here on, our claims are not taken
                # over automatically (written with the next heartbeat, in the workers' database).
                self._deferred = True
                self._beat_due = 0.0
            if not isinstance(exc, _UNREACHABLE):
                raise
            self._ledger_outage(exc)

    def flush(self) -> bool:
        """Write the finishes kept in memory now; True when none is left waiting."""
        self._flush()
        with self._state_lock:
            return not self._pending

    def _flush(self) -> None:
        with self._state_lock:
            batch, self._pending = self._pending, []
        if not batch:
            return
        try:
            self.ledger.finish_many(batch)
        except BaseException as exc:
            with self._state_lock:
                self._pending[:0] = batch  # kept (as in `_finish`), before those added meanwhile
            if not isinstance(exc, _UNREACHABLE):
                raise
            self._ledger_outage(exc)
            return
        self._ledger_back()

    def _flush_loop(self) -> None:
        assert self.finish_batch_seconds is not None
        while not self._stop.is_set():
            self._flush_wanted.wait(self.finish_batch_seconds)
            self._flush_wanted.clear()
            try:
                self._flush()
            except Exception as exc:  # noqa: BLE001 - the flusher must survive anything
                log.warning("migration-fsm gate %s: %s", self.worker_id, first_line(exc))

    def _count(self, run: Run, counter: str) -> Run:
        with self._state_lock:
            self._counters[counter] += 1
        return run

    def _ledger_outage(self, exc: BaseException) -> None:
        with self._state_lock:
            first, self._ledger_down = not self._ledger_down, True
        if first:
            log.warning(
                "migration-fsm gate %s cannot reach the execution ledger, starting no task: %s",
                self.worker_id,
                first_line(exc),
                extra={"migration": self.migration, "side": self.side},
            )

    def _ledger_back(self) -> None:
        if self._ledger_down:
            with self._state_lock:
                was, self._ledger_down = self._ledger_down, False
            if was:
                log.warning("migration-fsm gate %s reaches the execution ledger again", self.worker_id)

    # -- lifecycle --------------------------------------------------------------------------

    def close(self) -> None:
        """Stop the background threads, flush pending finishes, deregister (idempotent).

        When a finish still cannot be written, the worker is not deregistered: its row (which
        says it deferred finishes) keeps its running claims from being taken over."""
        if self._stop.is_set():
            return
        metrics.untrack(self)
        self._stop.set()
        self._flush_wanted.set()
        for thread in (self._thread, self._flusher):
            if thread is not None and thread is not threading.current_thread():
                thread.join(timeout=5)
        if self.flush():
            with contextlib.suppress(*_UNREACHABLE):
                self.workers.deregister(self.migration, self.side, self.worker_id)
        else:
            # The row must say that this worker deferred a finish before it is left behind: a
            # failed finish says so at the next heartbeat, which this close may come before.
            self._beat(self._applied.version)
            log.warning(
                "migration-fsm gate %s closes with %d finishes not written: its claims stay running",
                self.worker_id,
                len(self._pending),
                extra={"migration": self.migration, "side": self.side},
            )
        self.ledger.close()
        self.workers.close()

    def __enter__(self) -> WorkerGate:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
