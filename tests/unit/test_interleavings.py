"""Operator commands, data tools, dual writes and worker executions interleaved at random, on
SQLite and PostgreSQL, with the default edges: after every step no task is lost, none has run
twice, and `validate` says what an oracle reading both tables says.

The workers are simulated in this process, one step at a time, as `WorkerGate` integrates a
real one: a worker of a side takes a task only while its side consumes and is not paused
(`may_consume`), claims it in the real execution ledger (`executing`), runs it (the oracle
counts the execution) and completes it; or it dies after its claim, before the task's effect
(the next drain hands the task over). The producer writes through the real `DualWriter`
(second writes may fail into the repair log) and re-sends tasks it already sent.

`make test` runs a small number of examples; `CI=1` (and `bench/`) runs more."""

from __future__ import annotations

import contextlib
import itertools
import os
from collections import Counter
from datetime import UTC, datetime
from typing import Any, Final, cast

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import Phase as HypothesisPhase
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule, run_state_machine_as_test
from structlog.testing import capture_logs

from migration_fsm import commands
from migration_fsm.client import DualWriter, PhaseClient
from migration_fsm.client.repair import RepairLog
from migration_fsm.config import Settings
from migration_fsm.exceptions import MigrationFSMError
from migration_fsm.fsm import Phase, Routing, routing_for
from migration_fsm.journal import Journal
from migration_fsm.journal.ledger import SUCCEEDED, Ledger
from migration_fsm.tasks.records import TaskRecord, TaskStatus
from migration_fsm.tasks.sql import SqlTaskStore
from migration_fsm.tools.validate import validate, validate_migration
from tests.support.datatools import create_task_table, everything

AT: Final = datetime(2026, 12, 1, 9, 0, tzinfo=UTC)
RUNNABLE: Final = (TaskStatus.PENDING, TaskStatus.RUNNING)
SIDES: Final = ("old", "new")
#: Examples per database: SQLite, PostgreSQL (each command opens and checks its database, which
#: costs more on a server).
EXAMPLES: Final = (
    {"sqlite": 100, "postgresql": 40} if os.environ.get("CI") else {"sqlite": 8, "postgresql": 3}
)
_numbers = itertools.count()


class JournalRouting:
    """The routing a backend sees, read from the journal on every call (a PhaseClient with no
    cache: in this sequential test there is no staleness to model)."""

    def __init__(self, journal: Journal, migration: str) -> None:
        self.journal, self.migration, self.url = journal, migration, journal.url

    def routing(self, key: str | None = None) -> Routing:
        state = self.journal.get(self.migration)
        return routing_for(state.phase, state.percent, key)


class Flaky(SqlTaskStore):
    """A task store whose next write can be made to fail (the second write of a dual write)."""

    fail_next = False

    def put_forward(self, record: TaskRecord) -> bool:
        if self.fail_next:
            self.fail_next = False
            raise ConnectionError(f"{self.name} dropped the connection")
        return super().put_forward(record)


#: How far the examples of this run got, and what they did on the way (checked at the end, so
#: that the test cannot pass by never leaving `preparation`).
REACHED: Counter[str] = Counter()


class Interleavings(RuleBasedStateMachine):
    """The state machine; a subclass sets `url` (each example: its own migration and tables)."""

    url: str

    @initialize(forward=st.integers(0, 3), tasks=st.integers(0, 4))
    def start(self, forward: int, tasks: int) -> None:
        """A fresh migration, with `tasks` tasks sent and then `forward` runbook steps taken
        (each example starts in preparation, dual_write, cutover or cleanup)."""
        self._set_up()
        if tasks:
            self.produce(tasks, fail_second=False)
        for _ in range(forward):
            self.go_forward_by_the_runbook()

    def _set_up(self) -> None:
        n = next(_numbers)
        self.migration = f"m{n}"
        old_table, new_table = f"old_{n}", f"new_{n}"
        create_task_table(self.url, old_table)
        create_task_table(self.url, new_table)
        self.settings = Settings.model_validate(
            {
                "database_url": self.url,
                "actor": "operator",
                "stores": {
                    "old": {"kind": "sql", "url": self.url, "table": old_table},
                    "new": {"kind": "sql", "url": self.url, "table": new_table},
                },
                "drain_timeout_seconds": 0,  # whatever runs at a drain is handed over
                "pause_timeout_seconds": 5,
                "backfill_batch_size": 7,
            }
        )
        commands.init(self.settings, self.migration)
        self.journal = Journal.open(self.url)
        self.stores = {
            "old": Flaky(self.url, old_table, name="old"),
            "new": Flaky(self.url, new_table, name="new"),
        }
        client = cast("PhaseClient", JournalRouting(self.journal, self.migration))
        self.writer = DualWriter(
            client, self.stores["old"], self.stores["new"], repair=RepairLog(self.url, self.migration)
        )
        self.ledger = Ledger(self.url)
        self.executions: Counter[str] = Counter()
        self.produced: list[str] = []
        self.workers = itertools.count()

    def teardown(self) -> None:
        if not hasattr(self, "journal"):
            return
        self.writer.close()
        self.ledger.close()
        for store in self.stores.values():
            store.close()
        self.journal.close()

    # -- the backend ---------------------------------------------------------------------

    def _record(self, key: str) -> TaskRecord:
        return TaskRecord(
            key=key,
            type="send",
            payload={"to": key},
            status=TaskStatus.PENDING,
            created_at=AT,
            updated_at=AT,
        )

    @rule(count=st.integers(1, 4), fail_second=st.booleans())
    def produce(self, count: int, fail_second: bool) -> None:
        """`count` new tasks; with `fail_second`, the first one's second write fails."""
        for i in range(count):
            key = f"t{len(self.produced):04d}"
            route = JournalRouting(self.journal, self.migration).routing(key)
            second = "new" if route.authoritative == "old" else "old"
            self.stores[second].fail_next = fail_second and i == 0
            self.writer.write(self._record(key))
            self.stores[second].fail_next = False
            self.produced.append(key)

    @rule(which=st.integers(0, 10_000))
    def resend(self, which: int) -> None:
        """An at-least-once producer sends a task again, as first sent."""
        if self.produced:
            self.writer.write(self._record(self.produced[which % len(self.produced)]))

    @rule(side=st.sampled_from(SIDES), tasks=st.integers(1, 3), dies=st.booleans())
    def work(self, side: str, tasks: int, dies: bool) -> None:
        """Workers of `side` take up to `tasks` tasks, one after the other; with `dies`, the
        worker of the last one dies holding it."""
        for i in range(tasks):
            self._work_one(side, dies=dies and i == tasks - 1)

    def _work_one(self, side: str, *, dies: bool) -> None:
        state = self.journal.get(self.migration)
        route = routing_for(state.phase, state.percent)
        if route.consume_from != side or state.paused_side == side:
            return  # may_consume() is False: the dequeue takes nothing
        store = self.stores[side]
        task = next((r for r in everything(store) if r.status is TaskStatus.PENDING), None)
        if task is None:
            return
        now = datetime.now(UTC)
        store.set_progress(task.key, TaskStatus.RUNNING, task.attempts + 1, now)
        run = self.ledger.claim(self.migration, task.key, side, f"{side}-worker-{next(self.workers)}")
        if not run.allowed:
            REACHED[f"claim refused: {run.reason}"] += 1
            done_elsewhere = run.reason in (SUCCEEDED, "handed_over")
            status = TaskStatus.COMPLETED if done_elsewhere else TaskStatus.PENDING
            store.set_progress(task.key, status, task.attempts, now)  # not run here
            return
        if dies:
            REACHED["worker died"] += 1
            return  # the worker died before the task's effect: running, claimed, never finished
        REACHED["task ran"] += 1
        self.executions[task.key] += 1  # the task's effect
        store.set_progress(task.key, TaskStatus.COMPLETED, task.attempts + 1, datetime.now(UTC))
        assert run.claim is not None
        self.ledger.finish(run.claim, SUCCEEDED)

    @rule()
    def a_forgotten_old_worker_after_the_migration(self) -> None:
        """A stock old worker (no gate, no ledger: a forgotten cron host) starts once the
        migration is complete and runs whatever the old side still offers as pending."""
        if self.journal.get(self.migration).phase is not Phase.COMPLETE:
            return
        store = self.stores["old"]
        for task in [r for r in everything(store) if r.status is TaskStatus.PENDING]:
            REACHED["stock old worker ran a task"] += 1
            self.executions[task.key] += 1
            store.set_progress(task.key, TaskStatus.COMPLETED, task.attempts + 1, datetime.now(UTC))

    # -- the operator ----------------------------------------------------------------------

    def _operator(self, action: Any) -> None:
        # A refusal, bad input, a step that stopped: each must leave a consistent state.
        with contextlib.suppress(MigrationFSMError):
            action()
        state = self.journal.get(self.migration)
        REACHED[str(state.phase)] += 1

    @rule()
    def advance(self) -> None:
        self._operator(lambda: commands.advance(self.settings, self.migration))

    @rule()
    def rollback(self) -> None:
        self._operator(lambda: commands.rollback(self.settings, self.migration, reason="it looked bad"))

    @rule(percent=st.sampled_from([10, 50, 100]))
    def ramp(self, percent: int) -> None:
        self._operator(lambda: commands.ramp(self.settings, self.migration, percent))

    @rule()
    def resume_or_abort(self) -> None:
        if self.journal.get(self.migration).in_progress_seq is not None:
            self._operator(lambda: commands.resume(self.settings, self.migration))
        if self.journal.get(self.migration).in_progress_seq is not None:
            self._operator(lambda: commands.abort(self.settings, self.migration, reason="give up"))

    @rule()
    def go_forward_by_the_runbook(self) -> None:
        """reconcile, backfill (in dual_write) or ramp to 100 (in cutover), validate, advance:
        one runbook step."""
        self.reconcile()
        phase = self.journal.get(self.migration).phase
        if phase is Phase.DUAL_WRITE:
            self.backfill()
        elif phase is Phase.CUTOVER:
            self.ramp(100)
        self.record_a_validation()
        self.advance()

    @rule()
    def backfill(self) -> None:
        self._operator(lambda: commands.backfill(self.settings, self.migration))

    @rule()
    def reconcile(self) -> None:
        self._operator(lambda: commands.reconcile(self.settings, self.migration))

    @rule()
    def record_a_validation(self) -> None:
        """`validate` as the operator runs it (the guards read the run it records)."""
        self._operator(lambda: validate_migration(self.journal, self.settings, self.migration, settle=0))

    # -- what must hold after every step -----------------------------------------------------

    @invariant()
    def no_task_runs_twice(self) -> None:
        if not hasattr(self, "journal"):
            return
        assert all(count == 1 for count in self.executions.values()), self.executions
        assert 0 == self.ledger.counts(self.migration).executed_twice

    @invariant()
    def no_task_is_lost(self) -> None:
        """Every task sent either ran, or waits (pending, or running on a worker that may
        have died: the next drain hands it over) on a side that consumes now or later."""
        if not hasattr(self, "journal"):
            return
        copies = {side: {r.key: r for r in everything(store)} for side, store in self.stores.items()}
        phase = self.journal.get(self.migration).phase
        waiting_on = ("new",) if phase is Phase.COMPLETE else SIDES
        for key in self.produced:
            if self.executions[key]:
                continue
            waiting = [s for s in waiting_on if key in copies[s] and copies[s][key].status in RUNNABLE]
            assert waiting, (key, phase, {s: copies[s].get(key) for s in SIDES})

    @invariant()
    def validate_agrees_with_the_tables(self) -> None:
        if not hasattr(self, "journal"):
            return
        old, new = ({r.key: r for r in everything(store)} for store in self.stores.values())
        report = validate(self.stores["old"], self.stores["new"], batch_size=5, settle=0)
        progress = [
            k
            for k in old.keys() & new.keys()
            if (old[k].status, old[k].attempts) != (new[k].status, new[k].attempts)
        ]
        identity = [k for k in old.keys() & new.keys() if old[k].checksum() != new[k].checksum()]
        assert (len(old.keys() - new.keys()), len(new.keys() - old.keys()), len(identity)) == (
            report.missing,
            report.extra,
            report.mismatched,
        )
        assert len(progress) - len(identity) <= report.status_differs <= len(progress)
        assert report.ok is (not (old.keys() - new.keys()) and not identity)


@pytest.mark.timeout(3600 if os.environ.get("CI") else 300)  # CI=1: the long run (100/40 examples)
def test_interleavings_lose_nothing_and_run_nothing_twice(upgraded_url: str) -> None:
    class OnThisDatabase(Interleavings):
        url = upgraded_url

    REACHED.clear()
    with capture_logs():
        run_state_machine_as_test(
            OnThisDatabase,
            settings=settings(
                max_examples=EXAMPLES["postgresql" if upgraded_url.startswith("postgresql") else "sqlite"],
                stateful_step_count=30,
                deadline=None,
                # Derandomized in `make test`: the same examples every run, which reach every
                # phase (asserted below); CI=1 explores new ones each run.
                derandomize=not os.environ.get("CI"),
                # No "explain" phase: it traces every line (slow with a database under it).
                phases=[
                    HypothesisPhase.explicit,
                    HypothesisPhase.reuse,
                    HypothesisPhase.generate,
                    HypothesisPhase.shrink,
                ],
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
            ),
        )
    print("reached:", dict(REACHED))  # what the run did, shown with -s
    assert REACHED["cutover"], REACHED  # the run went past dual_write ...
    assert REACHED["cleanup"], REACHED  # ... and past the cutover
