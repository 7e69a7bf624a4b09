"""The end-to-end demo: an old task manager and a new queue under live traffic, moved by the
same code paths as the CLI, with an injected crash, a rollback and a re-advance.

It proves what the project promises by counting: every task the producer scheduled runs
exactly once, on one side or the other, across every phase change. The workers of both sides
are gated (`WorkerGate`, `migration_fsm.demo.worker`), and one old worker dies holding a task
(`die_holding_a_task`), which the first cutover hands over to the new side.
"""

from __future__ import annotations

import functools
import random
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from .. import commands
from ..client import DualWriter, FallbackReader, PhaseClient, WorkerGate
from ..config import Settings, StoreConfig
from ..fsm import PHASES, Phase
from ..journal.ledger import Ledger
from ..tasks.capabilities import Closeable
from ..tasks.factory import build_store
from ..tasks.records import TaskRecord, TaskStatus
from ..tools.reconcile import open_entries
from . import hooks
from .systems import NEW_STORE, OLD_STORE, ExecutionLog, NewQueue, OldTaskManager
from .worker import WorkerPool

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

MIGRATION = "demo"
HOOKS = "migration_fsm.demo.hooks"
#: The operators' `worker_ttl_seconds` in the load run (`walk_settings`' default), which the
#: gates use too.
WORKER_TTL_SECONDS: Final = 10.0
#: The demo's: short, so that the worker that dies early is gone by the first cutover.
DEMO_WORKER_TTL_SECONDS: Final = 5.0
#: The demo's drain timeout: the first cutover's `drain_old` waits it out, then hands the
#: dead worker's task over.
DEMO_DRAIN_TIMEOUT_SECONDS: Final = 3.0
#: The demo's old worker that dies holding a task.
DEAD_WORKER: Final = "demo-old-dead"


def walk_settings(
    control_url: str,
    old_url: str,
    new_url: str,
    *,
    actor: str = "demo-operator",
    worker_ttl_seconds: float = WORKER_TTL_SECONDS,
    drain_timeout_seconds: float = 15,
) -> Settings:
    """The walk's configuration over any databases: two SQL stores over the demo systems'
    tables, and the default edges of DESIGN.md section 10 (`pause_consumers`, the drains,
    `transfer_state`, `reverse_sync`, `retire_old`; the default guards), but for
    `cutover -> cleanup`, which lists its default step and then the injected crash (an edge
    listed here gets exactly its list; its default guards still apply).

    The workers of both sides run a `WorkerGate` (`migration_fsm.demo.worker`), so the pause
    is acknowledged in well under a second: `pause_timeout_seconds` is short. A worker silent
    for `worker_ttl_seconds` counts as gone (its claims may be taken over). A task still
    running at `drain_timeout_seconds` is handed over to the receiving side (`requeue`, the
    default policy), unless it runs on a live worker."""
    old = StoreConfig(**{**OLD_STORE, "url": old_url})
    new = StoreConfig(**{**NEW_STORE, "url": new_url})
    return Settings(
        database_url=control_url,
        actor=actor,
        lease_seconds=5,
        heartbeat_seconds=1,
        worker_ttl_seconds=worker_ttl_seconds,
        pause_timeout_seconds=30,
        drain_timeout_seconds=drain_timeout_seconds,
        drain_policy="requeue",
        backfill_batch_size=500,
        stores={"old": old, "new": new},
        steps={"cutover->cleanup": ["retire_old", f"{HOOKS}:crash_once"]},
    )


def demo_settings(directory: Path) -> Settings:
    """The demo's configuration (`walk_settings`) on SQLite files in `directory`; a short
    worker TTL and drain timeout, since the first cutover waits out both for the dead worker
    (`die_holding_a_task`)."""
    return walk_settings(
        f"sqlite:///{directory / 'control.db'}",
        f"sqlite:///{directory / 'old.db'}",
        f"sqlite:///{directory / 'new.db'}",
        worker_ttl_seconds=DEMO_WORKER_TTL_SECONDS,
        drain_timeout_seconds=DEMO_DRAIN_TIMEOUT_SECONDS,
    )


def die_holding_a_task(client: PhaseClient, system: OldTaskManager, settings: Settings) -> str:
    """An old worker (`DEAD_WORKER`, gated like the others) takes a task, claims it in the
    execution ledger, and dies before running it: its heartbeat stops, the task stays running
    on the old side. `worker_ttl_seconds` later it counts as gone: the first cutover's
    `pause_consumers` names it instead of waiting for it, and `drain_old`, once its timeout
    is up, hands the task over to the new side (`requeue`), whose workers run it once.
    Returns the task's key."""
    gate = WorkerGate(
        client, "old", DEAD_WORKER, worker_ttl_seconds=settings.worker_ttl_seconds, background=False
    )
    conn = system.database.connect()
    try:
        deadline = time.monotonic() + 30
        while True:  # the live old workers take most tasks first: try until one is ours
            with gate.dequeuing():
                key = system.claim(conn, DEAD_WORKER) if gate.may_consume() else None
            if key is not None:
                break
            if time.monotonic() > deadline:
                raise RuntimeError("demo: the dead worker found no task to take in 30 s")
            time.sleep(0.005)
        if not gate.ledger.claim(MIGRATION, key, "old", DEAD_WORKER).allowed:
            raise RuntimeError(f"demo: the execution ledger refused {key} to a fresh worker")
    finally:
        conn.close()
        # It dies: no finish, no deregistration, no heartbeat (its connections just go away).
        gate.ledger.close()
        gate.workers.close()
    return key


@dataclass
class Report:
    """What the demo measured; `as_json` is the `demo --json` object.

    `lost` and `duplicated` come from the tasks' own side effects (the `ExecutionLog`: a
    scheduled task that never ran, a task that ran more than once). `executed_twice` (must be
    0) and `refused_executions` come from the migration's execution ledger: keys that
    succeeded more than once, and claims the ledger refused (a worker took a task that ran or
    runs elsewhere, and did not run it: a refusal is the ledger doing its job, not an
    error). `ledger` is `Ledger.counts` as a whole, `workers` each side's pool (threads,
    tasks run, refusals by reason, its gate's counters), `pauses` each `pause_consumers`
    step of the journal (the side paused, how many live workers acknowledged, which were gone).
    """

    scheduled: int = 0
    executed: int = 0
    executions: int = 0
    lost: int = 0
    duplicated: int = 0
    executed_twice: int = 0
    refused_executions: int = 0
    ledger: dict[str, Any] = field(default_factory=dict)
    executions_by_side: dict[str, int] = field(default_factory=dict)
    workers: dict[str, Any] = field(default_factory=dict)
    pauses: list[dict[str, Any]] = field(default_factory=list)
    fallback_reads: int = 0
    reads: int = 0
    shadow_mismatches: int = 0
    repair_entries: int = 0
    transitions: int = 0
    crash_resumed: bool = False
    rollbacks: int = 0
    validations: list[bool] = field(default_factory=list)
    phases: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0
    journal_verified: bool = False
    #: `demo --watch`: the rollback `watch` took by itself (seq, edge, actor, reason, value).
    watch_rollback: dict[str, Any] | None = None

    def as_json(self) -> dict[str, Any]:
        return {
            "scheduled": self.scheduled,
            "executed": self.executed,
            "lost": self.lost,
            "duplicated": self.duplicated,
            "executed_twice": self.executed_twice,
            "refused_executions": self.refused_executions,
            "executions": self.executions,
            "executions_by_side": self.executions_by_side,
            "ledger": self.ledger,
            "workers": self.workers,
            "pauses": self.pauses,
            "fallback_reads": self.fallback_reads,
            "reads": self.reads,
            "shadow_mismatches": self.shadow_mismatches,
            "repair_entries": self.repair_entries,
            "transitions": self.transitions,
            "rollbacks": self.rollbacks,
            "crash_resumed": self.crash_resumed,
            "validations_ok": all(self.validations) and bool(self.validations),
            "journal_verified": self.journal_verified,
            "phases": {phase: round(seconds, 2) for phase, seconds in self.phases.items()},
            "seconds": round(self.seconds, 2),
            **({} if self.watch_rollback is None else {"watch_rollback": self.watch_rollback}),
        }


class Producer:
    """Schedules tasks through `DualWriter` at a steady rate, and reads some back through
    `FallbackReader`, until stopped or `limit` tasks are scheduled."""

    def __init__(self, writer: DualWriter, reader: FallbackReader, rate: float, limit: int) -> None:
        self.writer = writer
        self.reader = reader
        self.rate = rate
        self.limit = limit
        self.scheduled: list[str] = []
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="demo-producer", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    def _run(self) -> None:
        rng = random.Random(42)
        started = time.monotonic()
        kinds = ("send_email", "resize_image", "charge_card", "sync_crm")
        for i in range(self.limit):
            if self._stop.is_set():
                return
            now = datetime.now(UTC)
            key = f"task-{i:06d}"
            record = TaskRecord(
                key=key,
                type=kinds[i % len(kinds)],
                payload={"n": i, "note": "x" * rng.randrange(10, 60)},
                status=TaskStatus.PENDING,
                created_at=now,
                updated_at=now,
            )
            try:
                self.writer.write(record)
                self.scheduled.append(key)
            except Exception as exc:  # noqa: BLE001 - counted: an unscheduled task is not lost
                self.errors.append(f"{key}: {exc}")
            if self.scheduled and i % 3 == 0:
                self.reader.get(self.scheduled[rng.randrange(len(self.scheduled))])
            delay = started + (i + 1) / self.rate - time.monotonic()
            if delay > 0:
                self._stop.wait(delay)


@contextmanager
def _demo_world(directory: Path, workers: int) -> Iterator[dict[str, Any]]:
    settings = demo_settings(directory)
    commands.db_upgrade(settings)
    commands.init(settings, MIGRATION)
    log = ExecutionLog(directory / "execution_log.db")
    old_system, new_system = OldTaskManager(directory / "old.db"), NewQueue(directory / "new.db")
    client = PhaseClient(settings.database_url, migration=MIGRATION, ttl=0.05)
    old_store = build_store(settings.stores["old"], "old")
    new_store = build_store(settings.stores["new"], "new")
    # One gate per pool of worker threads, as docs/WORKERS.md says: it alone decides what they take.
    gates = {
        side: WorkerGate(client, side, worker_ttl_seconds=settings.worker_ttl_seconds)
        for side in ("old", "new")
    }
    old_pool = WorkerPool(old_system, log, gates["old"], workers=workers)
    new_pool = WorkerPool(new_system, log, gates["new"], workers=workers)
    hooks.RUNTIME.update(crash_pending=True)
    writer = DualWriter(client, old_store, new_store)
    reader = FallbackReader(client, old_store, new_store, shadow_sample=0.05)
    try:
        yield {
            "settings": settings,
            "old_system": old_system,
            "log": log,
            "client": client,
            "old_pool": old_pool,
            "new_pool": new_pool,
            "writer": writer,
            "reader": reader,
            "old_store": old_store,
            "new_store": new_store,
        }
    finally:
        old_pool.stop()
        new_pool.stop()
        for gate in gates.values():
            gate.close()
        writer.close()
        client.close()
        for store in (old_store, new_store):
            if isinstance(store, Closeable):
                store.close()
        log.close()
        hooks.RUNTIME.clear()


def run_demo(
    *,
    tasks: int = 2000,
    rate: float = 100.0,
    workers: int = 4,
    soak: float = 1.5,
    directory: Path | None = None,
    say: Callable[[str], None] = lambda message: print(message, file=sys.stderr),
    view: Callable[[dict[str, Any]], None] | None = None,
    watch: bool = False,
) -> Report:
    """Run the whole story and return the report (see `Report`). `workers`: threads per side
    (4: a gated task costs two more commits, the execution ledger's claim and finish, and
    with 2 threads per side the workers fell seconds behind 100 tasks per second on SQLite).
    With `watch`, `migration-fsm watch`'s rounds run in a thread on the demo's own error rate
    (`demo.watching`), and an error burst in the first cutover makes it roll back by itself."""
    if directory is None:
        with tempfile.TemporaryDirectory(prefix="migration-fsm-demo-") as tmp:
            return run_demo(
                tasks=tasks,
                rate=rate,
                workers=workers,
                soak=soak,
                directory=Path(tmp),
                say=say,
                view=view,
                watch=watch,
            )
    started = time.monotonic()
    report = Report()
    with _demo_world(directory, workers) as world:
        client: PhaseClient = world["client"]
        producer = Producer(world["writer"], world["reader"], rate, tasks)

        def soak_for(units: float) -> None:
            deadline = time.monotonic() + units * soak
            while time.monotonic() < deadline:
                if view is not None:
                    view(_live_state(world, producer))
                time.sleep(0.25)

        def seen(version: int) -> None:
            while client.snapshot().version < version:  # let the backends see it
                time.sleep(0.01)

        world["old_pool"].start()
        world["new_pool"].start()
        producer.start()
        say(f"demo: producing {tasks} tasks at {rate:.0f}/s through DualWriter; old workers consume")
        dead = die_holding_a_task(client, world["old_system"], world["settings"])
        say(f"demo: an old worker ({DEAD_WORKER}) took {dead} and died; the first cutover hands it over")
        watched = None
        if watch:
            from .watching import WatchedBurst

            watched = WatchedBurst(world["settings"], MIGRATION, world["log"], say)
            watched.start()
        walk = OperatorWalk(world["settings"], MIGRATION, report, soak=soak_for, seen=seen, say=say)
        try:
            walk.run(stop_traffic=producer.stop, burst=None if watched is None else watched.burst)
        finally:
            if watched is not None:
                watched.close()
                report.watch_rollback = watched.rollback
        _wait_until_executed(world, producer, timeout=max(30.0, tasks / 50))
        walk.finish()
        report.journal_verified = commands.verify(world["settings"], MIGRATION).rows > 0
        _fill(report, world, producer)
    report.seconds = time.monotonic() - started
    return report


class OperatorWalk:
    """The operator's part of the story, through `commands` (the code paths of the CLI):
    preparation -> dual_write, backfill, validate, cutover (pause_consumers, drain_old,
    transfer_state), ramp 10 -> 50 -> 100, cleanup with a crash inside its step finished by
    `resume --steal`, rollback cleanup -> cutover -> dual_write, forward again, complete.

    Shared by the demo and the load run (`bench/load.py`). `soak(units)` lets the traffic
    run between steps (`run_demo(soak=...)` seconds per unit; 7.5 units in all); `seen(version)`
    returns once the backends follow that version; `say` narrates, each line starting with
    `label`. `report` collects the transitions, validations and seconds per phase. While a
    command runs, `doing` says which and since when (`time.monotonic()`), for a watchdog.
    """

    #: Units of `soak` the walk spends in all.
    SOAK_UNITS: Final = 7.5

    def __init__(
        self,
        settings: Settings,
        migration: str,
        report: Report,
        *,
        soak: Callable[[float], None],
        seen: Callable[[int], None],
        say: Callable[[str], None],
        label: str = "demo",
    ) -> None:
        self.label = label
        self.settings = settings
        self.migration = migration
        self.report = report
        self.soak = soak
        self.seen = seen
        self.say = say
        self._phase = Phase.PREPARATION.value
        self._phase_at = time.monotonic()
        self.doing: tuple[str, float] | None = None

    def run(self, *, stop_traffic: Callable[[], None], burst: Callable[[], None] | None = None) -> None:
        """Walk every phase; `stop_traffic()` is called before the final `complete`. With
        `burst` (`demo --watch`), called at 50% in the first cutover, returning once `watch`
        has rolled back to dual_write, the walk checks and advances to cutover again."""
        settings, migration, soak, say = self.settings, self.migration, self.soak, self.say
        soak(1)
        self.step("advance: preparation -> dual_write", lambda: commands.advance(settings, migration))
        soak(1)
        with self._doing("backfill"):
            result = commands.backfill(settings, migration)
        speed = f"{result.rows_per_second:,.0f}/s"
        say(f"{self.label}: backfill copied {result.copied} tasks old -> new ({speed})")
        self.check("before cutover")
        self.step(
            "advance: dual_write -> cutover (pause_consumers, drain_old, transfer_state)",
            lambda: commands.advance(settings, migration),
        )
        for percent in (10, 50, 100):
            soak(0.5)
            if percent == 100 and burst is not None:
                burst()
                self.report.transitions += 1
                self._enter(Phase.DUAL_WRITE.value)
                self.check("after the rollback by watch")
                self.step("advance: dual_write -> cutover", lambda: commands.advance(settings, migration))
            self.step(f"ramp {percent}%", functools.partial(commands.ramp, settings, migration, percent))
        soak(0.5)
        self.check("before cleanup")
        say(f"{self.label}: advance: cutover -> cleanup (retire_old), with a crash injected after it")
        try:
            with self._doing("advance: cutover -> cleanup"):
                commands.advance(settings, migration)
        except hooks.SimulatedCrash as crash:
            say(f"{self.label}: crashed: {crash}; a second operator runs `resume --steal`")
            second = settings.model_copy(update={"actor": f"{settings.actor}-2"})
            self.step("resume --steal", lambda: commands.resume(second, migration, steal=True))
            self.report.crash_resumed = True
        soak(1)
        self.step(
            "rollback: cleanup -> cutover (reverse_sync)",
            lambda: commands.rollback(settings, migration, reason=f"{self.label}: error rate up in cleanup"),
        )
        self.step(
            "rollback: cutover -> dual_write (pause_consumers, drain_new, reverse_sync)",
            lambda: commands.rollback(settings, migration, reason=f"{self.label}: back to dual writes"),
        )
        self.report.rollbacks = 2
        soak(1)
        self.check("before the second cutover")
        self.step("advance: dual_write -> cutover", lambda: commands.advance(settings, migration))
        self.step("ramp 100%", lambda: commands.ramp(settings, migration, 100))
        soak(0.5)
        self.check("before the second cleanup")
        self.step("advance: cutover -> cleanup", lambda: commands.advance(settings, migration))
        soak(1)
        stop_traffic()
        with self._doing("reconcile"):
            commands.reconcile(settings, migration)
        self.step("advance: cleanup -> complete", lambda: commands.advance(settings, migration))

    def step(self, message: str, action: Callable[[], object]) -> None:
        """Run one operator command, then wait until the backends follow it."""
        self.say(f"{self.label}: {message}")
        with self._doing(message):
            action()
        self.report.transitions += 1
        state = commands.status(self.settings, self.migration).state
        self._enter(state.phase.value)
        self.seen(state.version)

    def check(self, label: str) -> None:
        """`reconcile` then `validate`, as the runbook says before an advance."""
        with self._doing(f"reconcile {label}"):
            done = commands.reconcile(self.settings, self.migration)
        with self._doing(f"validate {label}"):
            validation = commands.validate(self.settings, self.migration)
        self.report.validations.append(validation.ok)
        self.say(
            f"{self.label}: {label}: reconcile replayed {done.replayed}; validate ok={validation.ok}"
            f" missing={validation.missing} mismatched={validation.mismatched}"
            f" status_differs={validation.status_differs} extra={validation.extra}"
        )

    @contextmanager
    def _doing(self, what: str) -> Iterator[None]:
        self.doing = (what, time.monotonic())
        try:
            yield
        finally:
            self.doing = None

    def finish(self) -> None:
        """Close the time of the last phase; `report.phases` then lists every phase in order."""
        self._enter(None)
        self.report.phases = {p.value: self.report.phases.get(p.value, 0.0) for p in PHASES}

    def _enter(self, phase: str | None) -> None:
        if phase == self._phase:
            return
        now = time.monotonic()
        phases = self.report.phases
        phases[self._phase] = phases.get(self._phase, 0.0) + now - self._phase_at
        if phase is not None:
            self._phase, self._phase_at = phase, now


def _wait_until_executed(world: dict[str, Any], producer: Producer, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    wanted = set(producer.scheduled)
    while time.monotonic() < deadline:
        if wanted <= set(world["log"].executions()):
            return
        time.sleep(0.1)


def ledger_figures(report: Report, settings: Settings, migration: str) -> None:
    """Fill `report` with the execution ledger's figures and the journal's pauses."""
    with Ledger.open(settings.ledger_database_url) as ledger:
        counts = ledger.counts(migration)
    report.executed_twice = counts.executed_twice
    report.refused_executions = counts.refused_executions
    report.ledger = counts.as_json()
    report.pauses = [
        {"edge": f"{entry.source}->{entry.dest}", **(step.checkpoint or {})}
        for entry in commands.history(settings, migration)
        for step in entry.steps
        if step.name == "pause_consumers"
    ]


def _fill(report: Report, world: dict[str, Any], producer: Producer) -> None:
    ledger_figures(report, world["settings"], MIGRATION)
    report.workers = {pool.side: pool.figures() for pool in (world["old_pool"], world["new_pool"])}
    executions = world["log"].executions()
    scheduled = set(producer.scheduled)
    report.scheduled = len(scheduled)
    report.executed = len(scheduled & set(executions))
    report.executions = sum(executions.values())
    report.lost = len(scheduled - set(executions))
    report.duplicated = sum(1 for count in executions.values() if count > 1)
    report.executions_by_side = world["log"].by_side()
    reader_counters = world["reader"].counters()
    report.reads = reader_counters["reads"]
    report.fallback_reads = reader_counters["fallbacks"]
    report.shadow_mismatches = reader_counters["shadow_mismatches"]
    report.repair_entries = world["writer"].counters()["repair_entries"]
    report.repair_entries += open_entries_safe(world)


def open_entries_safe(world: dict[str, Any]) -> int:
    """Repair entries still open at the end (should be 0)."""
    from ..journal import Journal

    with Journal.open(world["settings"].database_url) as store:
        return open_entries(store, MIGRATION)


def _live_state(world: dict[str, Any], producer: Producer) -> dict[str, Any]:
    snap = world["client"].snapshot()
    return {
        "phase": snap.phase.value,
        "percent": snap.percent,
        "routing": snap.routing.as_dict(),
        "scheduled": len(producer.scheduled),
        "executed": sum(world["log"].by_side().values()),
        "by_side": world["log"].by_side(),
        "old": dict(world["old_store"].count_by_status()),
        "new": dict(world["new_store"].count_by_status()),
        "fallbacks": world["reader"].counters()["fallbacks"],
    }
