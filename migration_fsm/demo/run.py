"""The end-to-end demo: an old task manager and a new queue under live traffic, moved by the
same code paths as the CLI, with an injected crash, a rollback and a re-advance.

It proves what the project promises by counting: every task the producer scheduled runs
exactly once, on one side or the other, across every phase change.
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
from typing import TYPE_CHECKING, Any

from .. import commands
from ..client import DualWriter, FallbackReader, PhaseClient
from ..config import Settings, StepSpec, StoreConfig
from ..data.factory import build_store
from ..data.reconcile import open_entries
from ..data.records import TaskRecord, TaskStatus
from ..fsm import PHASES, Phase
from . import hooks
from .systems import NEW_STORE, OLD_STORE, Ledger, NewQueue, OldTaskManager, WorkerPool

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

MIGRATION = "demo"
HOOKS = "migration_fsm.demo.hooks"


def demo_settings(directory: Path) -> Settings:
    """The demo's configuration: two SQL stores over its own tables, the default guards,
    and operator hooks around the built-in drain and sync steps."""
    old = StoreConfig(**{**OLD_STORE, "url": f"sqlite:///{directory / 'old.db'}"})
    new = StoreConfig(**{**NEW_STORE, "url": f"sqlite:///{directory / 'new.db'}"})
    return Settings(
        database_url=f"sqlite:///{directory / 'control.db'}",
        actor="demo-operator",
        lease_seconds=5,
        heartbeat_seconds=1,
        drain_timeout_seconds=30,
        drain_policy="fail",
        backfill_batch_size=500,
        stores={"old": old, "new": new},
        steps={
            "dual_write->cutover": [
                StepSpec(do=f"{HOOKS}:stop_old_workers", undo=f"{HOOKS}:start_old_workers"),
                "drain_old",
                "transfer_state",
                f"{HOOKS}:start_new_workers",
            ],
            "cutover->cleanup": [f"{HOOKS}:crash_once"],
            "cleanup->cutover": ["reverse_sync"],
            "cutover->dual_write": [
                StepSpec(do=f"{HOOKS}:stop_new_workers", undo=f"{HOOKS}:start_new_workers"),
                "drain_new",
                "reverse_sync",
                f"{HOOKS}:start_old_workers",
            ],
        },
    )


@dataclass
class Report:
    """What the demo measured; `as_json` is the `demo --json` object."""

    scheduled: int = 0
    executed: int = 0
    executions: int = 0
    lost: int = 0
    duplicated: int = 0
    executions_by_side: dict[str, int] = field(default_factory=dict)
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

    def as_json(self) -> dict[str, Any]:
        return {
            "scheduled": self.scheduled,
            "executed": self.executed,
            "lost": self.lost,
            "duplicated": self.duplicated,
            "executions": self.executions,
            "executions_by_side": self.executions_by_side,
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
    ledger = Ledger(directory / "ledger.db")
    old_system, new_system = OldTaskManager(directory / "old.db"), NewQueue(directory / "new.db")
    client = PhaseClient(settings.database_url, migration=MIGRATION, ttl=0.05)
    old_store = build_store(settings.stores["old"], "old")
    new_store = build_store(settings.stores["new"], "new")
    old_pool = WorkerPool(old_system, ledger, lambda: client.routing().consume_from == "old", workers=workers)
    new_pool = WorkerPool(new_system, ledger, lambda: client.routing().consume_from == "new", workers=workers)
    hooks.RUNTIME.update(old=old_pool, new=new_pool, crash_pending=True)
    writer = DualWriter(client, old_store, new_store)
    reader = FallbackReader(client, old_store, new_store, shadow_sample=0.05)
    try:
        yield {
            "settings": settings,
            "ledger": ledger,
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
        writer.close()
        client.close()
        for store in (old_store, new_store):
            getattr(store, "close", lambda: None)()
        ledger.close()
        hooks.RUNTIME.clear()


def run_demo(  # noqa: PLR0915 - the story reads best as one script, top to bottom
    *,
    tasks: int = 2000,
    rate: float = 100.0,
    workers: int = 2,
    soak: float = 1.5,
    directory: Path | None = None,
    say: Callable[[str], None] = lambda message: print(message, file=sys.stderr),
    view: Callable[[dict[str, Any]], None] | None = None,
) -> Report:
    """Run the whole story and return the report (see `Report`)."""
    if directory is None:
        with tempfile.TemporaryDirectory(prefix="migration-fsm-demo-") as tmp:
            return run_demo(
                tasks=tasks, rate=rate, workers=workers, soak=soak, directory=Path(tmp), say=say, view=view
            )
    started = time.monotonic()
    report = Report()
    with _demo_world(directory, workers) as world:
        settings: Settings = world["settings"]
        client: PhaseClient = world["client"]
        producer = Producer(world["writer"], world["reader"], rate, tasks)
        phase_started: dict[str, Any] = {"phase": Phase.PREPARATION.value, "at": time.monotonic()}

        def note_phase() -> None:
            phase = commands.status(settings, MIGRATION).state.phase.value
            if phase != phase_started["phase"]:
                now = time.monotonic()
                previous = phase_started["phase"]
                report.phases[previous] = report.phases.get(previous, 0.0) + now - phase_started["at"]
                phase_started.update(phase=phase, at=now)
            while client.snapshot().phase.value != phase:  # let the backends see it
                time.sleep(0.01)

        def soak_for(seconds: float) -> None:
            deadline = time.monotonic() + seconds
            while time.monotonic() < deadline:
                if view is not None:
                    view(_live_state(world, producer))
                time.sleep(0.25)

        def step(message: str, action: Callable[[], object]) -> None:
            say(f"demo: {message}")
            action()
            report.transitions += 1
            note_phase()

        def check(label: str) -> None:
            done = commands.reconcile(settings, MIGRATION)
            validation = commands.validate(settings, MIGRATION)
            report.validations.append(validation.ok)
            say(
                f"demo: {label}: reconcile replayed {done.replayed}; validate ok={validation.ok}"
                f" missing={validation.missing} mismatched={validation.mismatched}"
                f" status_differs={validation.status_differs} extra={validation.extra}"
            )

        world["old_pool"].start()
        world["new_pool"].start()
        producer.start()
        say(f"demo: producing {tasks} tasks at {rate:.0f}/s through DualWriter; old workers consume")
        soak_for(soak)
        step("advance: preparation -> dual_write", lambda: commands.advance(settings, MIGRATION))
        soak_for(soak)
        result = commands.backfill(settings, MIGRATION)
        say(f"demo: backfill copied {result.copied} tasks old -> new ({result.rows_per_second:,.0f}/s)")
        check("before cutover")
        step(
            "advance: dual_write -> cutover (stop old workers, drain_old, transfer_state)",
            lambda: commands.advance(settings, MIGRATION),
        )
        for percent in (10, 50, 100):
            soak_for(soak / 2)
            step(f"ramp {percent}%", functools.partial(commands.ramp, settings, MIGRATION, percent))
        soak_for(soak / 2)
        check("before cleanup")
        say("demo: advance: cutover -> cleanup, with a crash injected inside its step")
        try:
            commands.advance(settings, MIGRATION)
        except hooks.SimulatedCrash as crash:
            say(f"demo: crashed: {crash}; a second operator runs `resume --steal`")
            second = settings.model_copy(update={"actor": "demo-operator-2"})
            step("resume --steal", lambda: commands.resume(second, MIGRATION, steal=True))
            report.crash_resumed = True
        soak_for(soak)
        step(
            "rollback: cleanup -> cutover (reverse_sync)",
            lambda: commands.rollback(settings, MIGRATION, reason="demo: error rate up in cleanup"),
        )
        step(
            "rollback: cutover -> dual_write (stop new workers, drain_new, reverse_sync, old workers back)",
            lambda: commands.rollback(settings, MIGRATION, reason="demo: back to dual writes"),
        )
        report.rollbacks = 2
        soak_for(soak)
        check("before the second cutover")
        step("advance: dual_write -> cutover", lambda: commands.advance(settings, MIGRATION))
        step("ramp 100%", lambda: commands.ramp(settings, MIGRATION, 100))
        soak_for(soak / 2)
        check("before the second cleanup")
        step("advance: cutover -> cleanup", lambda: commands.advance(settings, MIGRATION))
        soak_for(soak)
        producer.stop()
        commands.reconcile(settings, MIGRATION)
        step("advance: cleanup -> complete", lambda: commands.advance(settings, MIGRATION))
        _wait_until_executed(world, producer, timeout=max(30.0, tasks / 50))
        now = time.monotonic()
        report.phases[phase_started["phase"]] = (
            report.phases.get(phase_started["phase"], 0.0) + now - phase_started["at"]
        )
        report.journal_verified = commands.verify(settings, MIGRATION).rows > 0
        _fill(report, world, producer)
    report.phases = {p.value: report.phases.get(p.value, 0.0) for p in PHASES}
    report.seconds = time.monotonic() - started
    return report


def _wait_until_executed(world: dict[str, Any], producer: Producer, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    wanted = set(producer.scheduled)
    while time.monotonic() < deadline:
        if wanted <= set(world["ledger"].executions()):
            return
        time.sleep(0.1)


def _fill(report: Report, world: dict[str, Any], producer: Producer) -> None:
    executions = world["ledger"].executions()
    scheduled = set(producer.scheduled)
    report.scheduled = len(scheduled)
    report.executed = len(scheduled & set(executions))
    report.executions = sum(executions.values())
    report.lost = len(scheduled - set(executions))
    report.duplicated = sum(1 for count in executions.values() if count > 1)
    report.executions_by_side = world["ledger"].by_side()
    reader_counters = world["reader"].counters()
    report.reads = reader_counters["reads"]
    report.fallback_reads = reader_counters["fallbacks"]
    report.shadow_mismatches = reader_counters["shadow_mismatches"]
    report.repair_entries = world["writer"].counters()["repair_entries"]
    report.repair_entries += open_entries_safe(world)


def open_entries_safe(world: dict[str, Any]) -> int:
    """Repair entries still open at the end (should be 0)."""
    from ..store import Store

    with Store.open(world["settings"].database_url) as store:
        return open_entries(store, MIGRATION)


def _live_state(world: dict[str, Any], producer: Producer) -> dict[str, Any]:
    snap = world["client"].snapshot()
    return {
        "phase": snap.phase.value,
        "percent": snap.percent,
        "routing": snap.routing.as_dict(),
        "scheduled": len(producer.scheduled),
        "executed": sum(world["ledger"].by_side().values()),
        "by_side": world["ledger"].by_side(),
        "old": dict(world["old_store"].count_by_status()),
        "new": dict(world["new_store"].count_by_status()),
        "fallbacks": world["reader"].counters()["fallbacks"],
    }
