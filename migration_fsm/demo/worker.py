"""The demo's workers, gated as a real worker is (docs/WORKERS.md): each pool of worker
threads of one side runs one `WorkerGate`, which alone decides whether the side may take a
task (its routing and the pause `pause_consumers` publishes) and which claims each task in
the execution ledger before it runs.

One worker thread's loop (`WorkerPool._work`):

```python
with gate.dequeuing():                          # the gate's shared hold
    key = system.claim(conn, name) if gate.may_consume() else None
with gate.executing(key) as run:                # the claim in the execution ledger
    if run.allowed:
        log.record(key, side); time.sleep(work_seconds); system.complete(conn, key)
# refused: "succeeded" / "handed_over" -> close this side's copy (done / cancelled);
#          anything else -> put it back in the queue (release) and back off
```

On SQLite the claim's `BEGIN IMMEDIATE .. COMMIT` runs inside the hold, on PostgreSQL the
single `UPDATE .. RETURNING` does: applying (and acknowledging) a new routing version waits
for every dequeue begun under the old one, so once the pause is acknowledged every task the
side took is visible as running to the drain.

The same pool runs alone in a process (a worker of one side, as in production):

    python -m migration_fsm.demo.worker --side old --control URL --system URL --log URL --seconds N

`--control` is the migration database (the gate's `PhaseClient`, the workers' table and,
unless `--ledger` names its own, the execution ledger), `--system` the side's task system
(`runs` or `jobs` table), `--log` the `ExecutionLog`; `sqlite:///PATH` or a PostgreSQL URL.
It works until `--seconds` have passed or SIGTERM/SIGINT, then prints its figures as one JSON
object on stdout. A SIGKILL leaves its claims running on a worker that stops heartbeating:
once `worker_ttl_seconds` have passed they may be taken over.

`--slow-ms M --slow-share S` makes a stable share S of the keys (by a hash of the key, the
same in every process) take M ms instead of `--work-ms`. `--hold-file PATH` is for a test that
kills the worker mid-task (`Hold`): once PATH exists, the next task this worker may run stops
inside `executing()`, claimed in the ledger and before its effect, and PATH.held names it.
`--lease-seconds S` (new side) shortens the new queue's lease: a job that runs longer is
delivered again to another worker while it runs, as a queue's visibility timeout does, and
the execution ledger refuses that second delivery.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import time
import zlib
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from ..client import PhaseClient, WorkerGate
from .systems import (
    ExecutionLog,
    NewQueue,
    OldTaskManager,
    PostgresDatabase,
    SqliteDatabase,
    TaskDatabase,
)

if TYPE_CHECKING:
    from collections.abc import Sequence
    from types import FrameType

#: Refusals after which this side's copy is closed rather than put back: the task ran
#: (`succeeded`), or it belongs to the other side now (`handed_over`).
SETTLED: Final = frozenset({"succeeded", "handed_over"})


class Hold:
    """A test's way to kill a worker exactly *before* a task's effect (docs/WORKERS.md: a crash
    after the effect and before the ledger's finish cannot be told from one before it, and the
    task runs again; no ledger closes that window, so a test that means to prove "none run
    twice" with a SIGKILL must land it before the effect).

    Once the file `arm` exists, the first worker thread allowed to run a task stops inside
    `executing()` (the ledger's claim is `running`) before the task's effect; every other
    thread that reaches that point stops there too, and no thread starts an effect any more.
    Once no thread of the pool is between an effect and its finish, `arm`.held is written
    with the held keys, one a line: the process may now be killed. The held threads wait
    until the pool stops, then run their tasks as usual (an unkilled worker loses nothing).
    """

    def __init__(self, arm: Path) -> None:
        self.arm = arm
        self.marker = arm.with_name(arm.name + ".held")
        self._lock = threading.Condition()
        self._in_effect = 0
        self._held: list[str] = []

    def before_effect(self, key: str, stop: threading.Event) -> None:
        """Called inside `executing()`, claimed, before the effect: hold here when armed."""
        with self._lock:
            if not self._held and not self.arm.exists():
                self._in_effect += 1
                return
            self._held.append(key)
            while self._in_effect:  # the effects begun before the hold reach their finish
                self._lock.wait(0.05)
            tmp = self.marker.with_name(self.marker.name + ".tmp")
            tmp.write_text("\n".join(self._held) + "\n", encoding="utf-8")
            os.replace(tmp, self.marker)
        stop.wait()
        with self._lock:
            self._in_effect += 1

    def after_finish(self) -> None:
        """Called once the task's execution is finished in the ledger."""
        with self._lock:
            self._in_effect -= 1
            self._lock.notify_all()


def stable_share(key: str) -> float:
    """Where `key` falls in [0, 1), the same in every process (crc32, never `hash()`)."""
    return (zlib.crc32(key.encode("utf-8")) % 10_000) / 10_000


class WorkerPool:
    """`workers` threads that dequeue and run tasks of one system through one `WorkerGate`
    (thread-safe: one per pool), gated by the gate alone.

    A worker that finds nothing to take (or may not take anything) looks again after
    `idle_seconds`; one whose task the ledger refused for now (`running`, `failed`,
    `ledger_unavailable`, `not_registered`) puts it back and waits `backoff_seconds`.
    `executed` counts the tasks run, `dequeues` the looks at the queue, `refused` the
    refusals by reason, `errors` the worker threads that died (a dead worker shows in the
    report, not only in stderr).
    """

    def __init__(
        self,
        system: OldTaskManager | NewQueue,
        log: ExecutionLog,
        gate: WorkerGate,
        *,
        workers: int = 2,
        work_seconds: float = 0.01,
        idle_seconds: float = 0.02,
        backoff_seconds: float = 0.1,
        slow_seconds: float = 0.0,
        slow_share: float = 0.0,
        hold: Hold | None = None,
    ) -> None:
        if gate.side != system.side:
            raise ValueError(f"a {gate.side} gate cannot gate the {system.side} system's workers")
        self.system = system
        self.log = log
        self.gate = gate
        self.side = system.side
        self.workers = workers
        self.work_seconds = work_seconds
        self.idle_seconds = idle_seconds
        self.backoff_seconds = backoff_seconds
        self.slow_seconds = slow_seconds
        self.slow_share = slow_share
        self.hold = hold
        self.refused: Counter[str] = Counter()
        self.errors: list[str] = []
        self._executed = 0
        self.dequeues = 0
        self._count_lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._work, args=(f"{system.side}-{i}",), name=f"demo-{system.side}-{i}")
            for i in range(workers)
        ]

    @property
    def executed(self) -> int:
        return self._executed

    def start(self) -> None:
        for thread in self._threads:
            thread.daemon = True
            thread.start()

    def stop(self) -> None:
        """Stop taking tasks; the tasks in progress finish first."""
        self._stop.set()
        for thread in self._threads:
            if thread.is_alive():
                thread.join(timeout=10)

    def figures(self) -> dict[str, Any]:
        """Plain numbers for a report: threads, tasks run, refusals by reason, the gate's counters."""
        gate = self.gate.counters()
        return {
            "threads": self.workers,
            "executed": self.executed,
            "refused": dict(sorted(self.refused.items())),
            "gate": {
                name: int(gate[name]) for name in ("claimed", "refused", "unavailable", "succeeded", "failed")
            },
            "errors": list(self.errors),
        }

    def take(self, conn: Any, name: str) -> str | None:
        """One dequeue: inside the gate's shared hold, and only when the gate says this side
        may consume (see the module's docstring)."""
        with self._count_lock:
            self.dequeues += 1
        with self.gate.dequeuing():
            return self.system.claim(conn, name) if self.gate.may_consume() else None

    def run_one(self, conn: Any, key: str) -> bool:
        """Run the task `key` this worker took, if the execution ledger allows it; whether it ran.

        Refused: a task that ran (`succeeded`) or was handed over to the other side
        (`handed_over`) is closed on this side; any other refusal puts it back in the queue."""
        effect = False
        try:
            with self.gate.executing(key) as run:
                if run.allowed:
                    if self.hold is not None:
                        self.hold.before_effect(key, self._stop)
                        effect = True
                    self.log.record(key, self.side)  # the task's own side effect
                    time.sleep(self.task_seconds(key))
                    self.system.complete(conn, key)
        finally:
            if effect and self.hold is not None:
                self.hold.after_finish()  # the finish is written (or the task failed)
        if run.allowed:
            with self._count_lock:
                self._executed += 1
            return True
        with self._count_lock:
            self.refused[run.reason] += 1
        if run.reason in SETTLED:
            self.system.settle(conn, key, ran=run.reason == "succeeded")
        else:
            self.system.release(conn, key)
            self._stop.wait(self.backoff_seconds)
        return False

    def task_seconds(self, key: str) -> float:
        """What running `key` takes: `slow_seconds` for a stable `slow_share` of the keys."""
        if self.slow_share > 0 and stable_share(key) < self.slow_share:
            return self.slow_seconds
        return self.work_seconds

    def _work(self, name: str) -> None:
        conn = self.system.database.connect()
        try:
            while not self._stop.is_set():
                key = self.take(conn, name)
                if key is None:
                    self._stop.wait(self.idle_seconds)
                    continue
                self.run_one(conn, key)
        except Exception as exc:
            self.errors.append(f"{name}: {exc}")
            raise
        finally:
            conn.close()


def as_task_database(url: str, *, synchronous_commit: bool = True) -> TaskDatabase:
    """`sqlite:///PATH` (a SQLite file) or a PostgreSQL URL, as a task system's database."""
    if url.startswith("sqlite:///"):
        return SqliteDatabase(Path(url.removeprefix("sqlite:///")))
    return PostgresDatabase(url, synchronous_commit=synchronous_commit)


def system_for(side: str, database: TaskDatabase) -> OldTaskManager | NewQueue:
    """The side's task system (creates its table when missing)."""
    if side == "old":
        return OldTaskManager(database)
    if side == "new":
        return NewQueue(database)
    raise ValueError(f"side must be 'old' or 'new', not {side!r}")


def run_worker(
    side: str,
    control_url: str,
    system_url: str,
    log_url: str,
    *,
    migration: str = "demo",
    seconds: float | None = None,
    workers: int = 2,
    work_seconds: float = 0.01,
    slow_seconds: float = 0.0,
    slow_share: float = 0.0,
    hold_file: Path | None = None,
    lease_seconds: float | None = None,
    idle_seconds: float = 0.02,
    worker_ttl_seconds: float = 10.0,
    ledger_url: str | None = None,
    worker_id: str | None = None,
    ttl: float = 0.05,
    stop: threading.Event | None = None,
    ready: threading.Event | None = None,
) -> dict[str, Any]:
    """One worker process's life: a `PhaseClient` and one `WorkerGate` of `side`, a pool of
    `workers` threads, until `seconds` have passed (None: forever) or `stop` is set; then the
    tasks in progress finish, the gate closes (flushes, deregisters) and the figures are
    returned. `ready` is set once the gate is registered and the threads run. `slow_seconds`,
    `slow_share`, `hold_file` and `lease_seconds`: see the module's docstring."""
    stop = stop or threading.Event()
    system = system_for(side, as_task_database(system_url))
    if lease_seconds is not None:
        if not isinstance(system, NewQueue):
            raise ValueError("lease_seconds is the new queue's: only for --side new")
        system.lease_seconds = lease_seconds
    log = ExecutionLog(as_task_database(log_url, synchronous_commit=False))
    started = time.monotonic()
    try:
        with (
            PhaseClient(control_url, migration=migration, ttl=ttl) as client,
            WorkerGate(
                client, side, worker_id, ledger_url=ledger_url, worker_ttl_seconds=worker_ttl_seconds
            ) as gate,
        ):
            pool = WorkerPool(
                system,
                log,
                gate,
                workers=workers,
                work_seconds=work_seconds,
                idle_seconds=idle_seconds,
                slow_seconds=slow_seconds,
                slow_share=slow_share,
                hold=None if hold_file is None else Hold(hold_file),
            )
            pool.start()
            if ready is not None:
                ready.set()
            try:
                stop.wait(seconds)
            finally:
                pool.stop()
            figures = {"side": side, "worker_id": gate.worker_id, **pool.figures()}
    finally:
        log.close()
    figures["seconds"] = round(time.monotonic() - started, 2)
    return figures


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m migration_fsm.demo.worker",
        description="A gated worker process of one side of the demo's task systems.",
    )
    parser.add_argument("--side", choices=("old", "new"), required=True)
    parser.add_argument("--control", required=True, help="the migration database URL")
    parser.add_argument(
        "--system", required=True, help="the side's task system (sqlite:///PATH or PostgreSQL URL)"
    )
    parser.add_argument(
        "--log", required=True, help="the ExecutionLog's database (sqlite:///PATH or PostgreSQL URL)"
    )
    parser.add_argument("--seconds", type=float, default=None, help="work this long (default: until SIGTERM)")
    parser.add_argument("--migration", default="demo")
    parser.add_argument("--workers", type=int, default=2, help="worker threads")
    parser.add_argument("--work-ms", type=float, default=10.0, help="what running one task takes")
    parser.add_argument("--slow-ms", type=float, default=0.0, help="what running a slow task takes")
    parser.add_argument(
        "--slow-share", type=float, default=0.0, help="the share of the keys that are slow (0..1, stable)"
    )
    parser.add_argument(
        "--lease-seconds",
        type=float,
        default=None,
        help="the new queue's lease (default 30 s): a job running longer is delivered again",
    )
    parser.add_argument(
        "--hold-file",
        type=Path,
        default=None,
        help="once this file exists, stop the next task before its effect and write FILE.held (tests)",
    )
    parser.add_argument(
        "--worker-ttl-seconds", type=float, default=10.0, help="the operators' worker_ttl_seconds"
    )
    parser.add_argument("--ledger", default=None, help="the execution ledger's URL (default: --control)")
    parser.add_argument("--worker-id", default=None)
    args = parser.parse_args(argv)
    stop = threading.Event()

    def end(_signum: int, _frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, end)
    signal.signal(signal.SIGINT, end)
    ready = threading.Event()

    def say_ready() -> None:
        ready.wait()
        print(f"worker {args.side}: ready", file=sys.stderr, flush=True)

    threading.Thread(target=say_ready, daemon=True).start()
    figures = run_worker(
        args.side,
        args.control,
        args.system,
        args.log,
        migration=args.migration,
        seconds=args.seconds,
        workers=args.workers,
        work_seconds=args.work_ms / 1000,
        slow_seconds=args.slow_ms / 1000,
        slow_share=args.slow_share,
        hold_file=args.hold_file,
        lease_seconds=args.lease_seconds,
        worker_ttl_seconds=args.worker_ttl_seconds,
        ledger_url=args.ledger,
        worker_id=args.worker_id,
        stop=stop,
        ready=ready,
    )
    print(json.dumps(figures), flush=True)
    return 1 if figures["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
