"""A model of workers on both sides, each a real `WorkerGate` (background threads off, driven
one call at a time) over a real `Ledger` and `Workers` on SQLite, with one in-memory queue per
side, under arbitrary interleavings of: producing a task (dual-written to both queues),
dequeuing it (inside `gate.dequeuing()`, asking `may_consume()`), executing it
(`gate.executing(key)`), a worker crashing (before its task's effect, or after its gate
finished it: a batching gate then loses the finish it had not flushed), the queue handing a
crashed worker's task out again, a pause of the giving side published through the journal
(`Lease.pause` of a claimed transition), acknowledgements (`gate.refresh()`), the drain's
timeout with hand-over (`Ledger.hand_over`, then the task re-queued on the receiving side),
and the commit.

Executions are counted from the tasks' own side effect (`effects`), never from the ledger.
Invariant: no key executes twice; and, run to quiescence at the end of every example (an
operator resolving the claims of crashed batching workers from the task's own side, as
docs/WORKERS.md says), every key produced executed exactly once.

Not modelled: a crash inside the `with gate.executing(key)` block after the task's effect
(before the gate writes the finish): no ledger can tell that apart from a crash before the
effect; docs/WORKERS.md says how a task closes that window (its effect and its
acknowledgement in one transaction, or an idempotent effect).
"""

from __future__ import annotations

import shutil
import tempfile
from collections import Counter
from dataclasses import replace
from datetime import timedelta
from pathlib import Path
from typing import Final

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)
from sqlalchemy import select

from migration_fsm.client import PhaseClient, WorkerGate
from migration_fsm.fsm import Phase, Trigger
from migration_fsm.journal import Journal, Lease, make_engine, utcnow, workers_table
from migration_fsm.journal.ledger import RUNNING, Ledger
from migration_fsm.journal.schema import execution_claims_table
from migration_fsm.journal.workers import Workers
from tests.unit.test_lease import _intent

M: Final = "default"
SLOTS: Final = {"o0": "old", "o1": "old", "n0": "new", "n1": "new"}
#: The second worker of each side batches its finishes (flushed by size 2, refresh, flush).
BATCHING: Final = frozenset({"o1", "n1"})
TTL: Final = 3600.0  # no live gate goes silent during an example; a crash ages its heartbeat

_TEMPLATE: list[Path] = []


def _template() -> Path:
    """One upgraded SQLite file per test process, copied for each example (upgrading is slow)."""
    if not _TEMPLATE:
        path = Path(tempfile.mkdtemp(prefix="mfsm-gate-model-")) / "template.db"
        url = f"sqlite:///{path}"
        journal = Journal(url, engine=make_engine(url, create=True))
        journal.upgrade()
        journal.create(M, "model")
        journal.close()
        _TEMPLATE.append(path)
    return _TEMPLATE[0]


def _other(side: str) -> str:
    return "new" if side == "old" else "old"


class GateModel(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.dir = Path(tempfile.mkdtemp(prefix="mfsm-gate-model-"))
        shutil.copy(_template(), self.dir / "m.db")
        self.url = f"sqlite:///{self.dir / 'm.db'}"
        self.journal = Journal.open(self.url)
        self.workers = Workers(self.journal.engine, ttl_seconds=TTL)
        self.ledger = Ledger(self.url, workers=self.workers)
        self.client = PhaseClient(self.url, M, ttl=3600, listen=False)
        self.lease: Lease | None = None
        self.giving: str | None = None
        self._move(Phase.PREPARATION, Phase.DUAL_WRITE, Trigger.ADVANCE)
        self.generation: Counter[str] = Counter()
        self.gates: dict[str, WorkerGate] = {}
        self.dead: list[WorkerGate] = []
        self.dead_ids: dict[str, str] = {}  # crashed worker id -> its side
        for slot in SLOTS:
            self._start(slot)
        #: key -> pending|running|done, in queue order (a dict keeps insertion order)
        self.queues: dict[str, dict[str, str]] = {"old": {}, "new": {}}
        self.holders: dict[str, dict[str, str]] = {"old": {}, "new": {}}  # running key -> worker id
        self.held: dict[str, str] = {}  # slot -> the key it dequeued and has not executed yet
        self.effects: Counter[str] = Counter()
        self.produced = 0

    # -- helpers ------------------------------------------------------------------------

    def _start(self, slot: str) -> None:
        self.generation[slot] += 1
        self.gates[slot] = WorkerGate(
            self.client,
            SLOTS[slot],
            f"{slot}.{self.generation[slot]}",
            background=False,
            worker_ttl_seconds=TTL,
            finish_batch_seconds=3600.0 if slot in BATCHING else None,
            finish_batch_size=2,
        )

    def _move(self, source: Phase, dest: Phase, trigger: Trigger) -> None:
        """Claim a transition; commit it at once when it does not move consumption."""
        intent = replace(_intent(), source=source, dest=dest, trigger=trigger)
        self.lease, _ = self.journal.claim(self.journal.get(M), intent, [], "operator [h:1]", 600)
        if source is Phase.PREPARATION:
            self.lease.commit()
            self.lease = None
            self.client.refresh()

    def _consuming(self) -> str:
        return self.client.snapshot().routing.consume_from

    def _settle(self, slot: str, side: str, key: str, reason: str) -> None:
        """A refused execution: a key that ran (or belongs to the other side) is acked; any
        other refusal leaves the task queued."""
        self.holders[side].pop(key, None)
        del self.queues[side][key]  # a task left queued goes to the back of its queue
        self.queues[side][key] = "done" if reason in {"succeeded", "handed_over"} else "pending"

    # -- rules --------------------------------------------------------------------------

    @initialize(n=st.integers(1, 4))
    def backlog(self, n: int) -> None:
        for _ in range(n):
            self.produce()

    @rule()
    def produce(self) -> None:
        key = f"k{self.produced:03d}"
        self.produced += 1
        for side in ("old", "new"):  # dual_write and cutover write both sides
            self.queues[side][key] = "pending"

    @rule(slot=st.sampled_from(sorted(SLOTS)))
    def dequeue(self, slot: str) -> None:
        if slot in self.held:
            return
        side, gate = SLOTS[slot], self.gates[slot]
        with gate.dequeuing():
            if not gate.may_consume():
                return
            key = next((k for k, s in self.queues[side].items() if s == "pending"), None)  # FIFO
            if key is not None:
                self.queues[side][key] = "running"
                self.holders[side][key] = gate.worker_id
                self.held[slot] = key

    @rule(slot=st.sampled_from(sorted(SLOTS)), crash=st.sampled_from(["no", "no", "before_effect", "after"]))
    def execute(self, slot: str, crash: str) -> None:
        if slot not in self.held:
            return
        key, side, gate = self.held.pop(slot), SLOTS[slot], self.gates[slot]
        execution = gate.executing(key)
        run = execution.__enter__()
        if not run.allowed:
            execution.__exit__(None, None, None)
            self._settle(slot, side, key, run.reason)
            return
        if crash == "before_effect":
            self._crash(slot)  # the claim stays running; the queue still says running
            return
        self.effects[key] += 1  # the task's own side effect, and its ack on its queue
        self.queues[side][key] = "done"
        self.holders[side].pop(key, None)
        execution.__exit__(None, None, None)  # the finish: written, or kept by a batching gate
        if crash == "after":
            self._crash(slot)

    @rule(slot=st.sampled_from(sorted(SLOTS)), crash=st.sampled_from(["no", "before_effect", "after"]))
    def take_and_execute(self, slot: str, crash: str) -> None:
        """`dequeue` then `execute`, in one step (the common case, so examples go further)."""
        self.dequeue(slot)
        self.execute(slot, crash)

    @rule(slot=st.sampled_from(sorted(SLOTS)))
    def crash(self, slot: str) -> None:
        self._crash(slot)

    def _crash(self, slot: str) -> None:
        """The worker's process dies: nothing flushed, nothing deregistered; it is gone."""
        gate = self.gates.pop(slot)
        self.held.pop(slot, None)
        with self.journal.transaction() as conn:
            conn.execute(
                workers_table.update()
                .where(workers_table.c.worker_id == gate.worker_id)
                .values(heartbeat_at=utcnow() - timedelta(seconds=2 * TTL))
            )
        gate.ledger.close()
        gate.workers.close()
        self.dead.append(gate)
        self.dead_ids[gate.worker_id] = gate.side
        self._start(slot)

    @rule()
    def redeliver(self) -> None:
        """The queues hand out again the tasks of crashed workers (a visibility timeout)."""
        for side in ("old", "new"):
            for key, holder in list(self.holders[side].items()):
                if holder in self.dead_ids and self.queues[side].get(key) == "running":
                    del self.queues[side][key]
                    self.queues[side][key] = "pending"
                    del self.holders[side][key]

    @rule(slot=st.sampled_from(sorted(SLOTS)))
    def acknowledge(self, slot: str) -> None:
        self.client.refresh()
        self.gates[slot].refresh()  # applies, acknowledges, heartbeats and flushes

    @rule(slot=st.sampled_from(sorted(BATCHING)))
    def flush(self, slot: str) -> None:
        self.gates[slot].flush()

    @precondition(lambda self: self.lease is None)
    @rule()
    def pause(self) -> None:
        """An edge that moves consumption begins: the giving side is paused (pause_consumers)."""
        phase = self.client.snapshot().phase
        if phase is Phase.DUAL_WRITE:
            self._move(Phase.DUAL_WRITE, Phase.CUTOVER, Trigger.ADVANCE)
        else:
            self._move(Phase.CUTOVER, Phase.DUAL_WRITE, Trigger.ROLLBACK)
        assert self.lease is not None
        self.giving = self._consuming()
        self.lease.pause(self.giving)

    def _all_acknowledged(self) -> bool:
        assert self.giving is not None
        version = self.journal.get(M).version
        return self.workers.side(M, self.giving, version).all_acknowledged

    @precondition(lambda self: self.lease is not None)
    @rule()
    def drain_and_commit(self) -> None:
        """Once every live worker of the giving side acknowledged the pause: the drain times
        out, every task its queue still says is running is handed over and re-queued on the
        receiving side, and the transition commits."""
        if not self._all_acknowledged():
            return
        assert self.giving is not None
        assert self.lease is not None
        giving, receiving = self.giving, _other(self.giving)
        for key, status in list(self.queues[giving].items()):
            if status == "running":
                if self.ledger.hand_over(M, key, giving, receiving):
                    self.queues[receiving][key] = "pending"
                self.queues[giving][key] = "done"
                self.holders[giving].pop(key, None)
        self.lease.commit()
        self.lease, self.giving = None, None
        self.client.refresh()

    @invariant()
    def no_key_executes_twice(self) -> None:
        assert all(n <= 1 for n in self.effects.values()), self.effects.most_common(3)

    # -- quiescence -----------------------------------------------------------------------

    def _resolve_batching_crashes(self) -> None:
        """The operator's part: a running claim of a crashed worker that deferred its finishes
        is never taken over; its side's queue says whether the task finished. Not finished:
        hand it over to the other side and re-queue it there."""
        c = execution_claims_table.c
        with self.ledger.engine.connect() as conn:
            rows = conn.execute(
                select(c.key, c.side, c.worker_id).where(c.migration == M, c.state == RUNNING)
            ).all()
        for key, side, worker_id in rows:
            if worker_id not in self.dead_ids or worker_id.split(".")[0] not in BATCHING:
                continue
            if self.queues[side].get(key) != "done" and self.ledger.hand_over(M, key, side, _other(side)):
                self.queues[_other(side)][key] = "pending"
                self.queues[side][key] = "done"
                self.holders[side].pop(key, None)

    def _work(self) -> None:
        """Every worker of the consuming side takes tasks until a pass takes nothing new."""
        for _ in range(4 * self.produced + 4):
            self.redeliver()
            before = dict(self.queues["old"]), dict(self.queues["new"])
            for slot in sorted(SLOTS):
                self.acknowledge(slot)
                self.dequeue(slot)
                self.execute(slot, "no")
            if (dict(self.queues["old"]), dict(self.queues["new"])) == before:
                return

    def quiesce(self) -> None:
        """Run to quiescence: each side in turn consumes everything it holds (so every
        dual-written copy of a task that ran is offered to the ledger again), with the
        operator's resolution in between."""
        for slot in sorted(SLOTS):
            self.acknowledge(slot)
        if self.lease is not None:
            self.drain_and_commit()
        for _ in range(3):
            self._work()
            self._resolve_batching_crashes()
            self._work()
            self.pause()  # move consumption to the other side
            for slot in sorted(SLOTS):
                self.acknowledge(slot)
            self.drain_and_commit()
        self._work()

    def teardown(self) -> None:
        try:
            self.quiesce()
            missing = [f"k{i:03d}" for i in range(self.produced) if self.effects[f"k{i:03d}"] != 1]
            assert not missing, {k: self.effects[k] for k in missing}
            assert self.ledger.counts(M).executed_twice == 0
        finally:
            for gate in self.gates.values():
                gate.close()
            self.ledger.close()
            self.workers.close()
            self.client.close()
            self.journal.close()
            shutil.rmtree(self.dir, ignore_errors=True)


def test_no_task_lost_or_run_twice_under_any_interleaving() -> None:
    run_state_machine_as_test(
        GateModel,
        settings=settings(
            max_examples=40,
            stateful_step_count=25,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow],
        ),
    )
