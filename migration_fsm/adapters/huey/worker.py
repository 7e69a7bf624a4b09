"""A Huey consumer gated by a `WorkerGate` (DESIGN.md section 10): one line in the module that
defines the Huey application, no patch of Huey.

```python
huey = SqliteHuey("app", filename="huey.db")
gate_consumer(huey, MIGRATION_DB_URL, side="old")     # only consumers build a gate
```

`gate_consumer` registers Huey startup and shutdown hooks, so the gate (a `PhaseClient` and a
`WorkerGate`, one per consumer process, shared by its worker threads) exists only in a
consumer (`huey_consumer`, thread workers); a producer that imports the module builds none.

**Inside the dequeue.** The storage's `dequeue` is wrapped: the gate's `may_consume()`, Huey's
dequeue (which deletes the message) and the registry's `running` mark run under one
`gate.dequeuing()` hold, so once the gate acknowledges a pause every task this consumer took is
`running` in the registry, where the drain sees it. Until the gate exists, and while the side
may not consume, the consumer takes nothing.

**Around each execution.** A pre-execute hook claims the task's key (its Huey id) in the
execution ledger; a post-execute hook finishes the claim and records the outcome in the
registry: completed; failed; or pending again, with one more attempt, when Huey will retry it.
When the ledger refuses, the task does not run (Huey's `CancelExecution`):

- it succeeded elsewhere: completed in the registry;
- it was handed over to the other side: cancelled in the registry;
- anything else (it runs elsewhere right now, it failed there, the ledger cannot be reached):
  after `backoff_seconds` the very message is enqueued again and the registry says pending.

A revoked or expired task (Huey skips it) is cancelled in the registry, unless the registry
already has it finished (a task retired or handed over by the migration is revoked on purpose).
Huey's process workers (`-k process`) are not supported: the gate's threads do not survive a
fork; use thread workers (the default).
"""

from __future__ import annotations

import contextlib
import threading
import time
from typing import TYPE_CHECKING, Any, Final

from migration_fsm.log import get_logger
from migration_fsm.tasks.records import TaskStatus

from .store import REGISTRY, HueyTaskStore

if TYPE_CHECKING:
    from collections.abc import Mapping

    from huey import Huey

    from migration_fsm.client import WorkerGate

_RAN_ELSEWHERE: Final = "succeeded"
_HANDED_OVER: Final = "handed_over"
_LIVE: Final = (TaskStatus.PENDING, TaskStatus.RUNNING)


class GatedConsumer:
    """The gate's integration into one Huey application (see the module's docstring). Build it
    with `gate_consumer`; `gate` is set by the consumer's startup hook (or by a test)."""

    def __init__(
        self,
        huey: Huey,
        make_gate: Any,
        *,
        backoff_seconds: float = 0.5,
        type_map: Mapping[str, str] | None = None,
    ) -> None:
        from huey import signals
        from huey.exceptions import CancelExecution

        self.huey = huey
        self.make_gate = make_gate
        self.gate: WorkerGate | None = None
        self.backoff_seconds = backoff_seconds
        self.store = HueyTaskStore(huey, type_map=type_map)
        self.registry = self.store.registry
        self.log = get_logger().bind(component="huey-gate", queue=huey.name)
        self._cancel = CancelExecution
        self._gate_lock = threading.Lock()
        self._starts = 0
        self._claims: dict[str, contextlib.AbstractContextManager[Any]] = {}
        self._settled: set[str] = set()
        self._claims_lock = threading.Lock()
        self.counters: dict[str, int] = dict.fromkeys(
            ("dequeue_refused", "taken", "ran", "ran_elsewhere", "handed_over", "put_back"), 0
        )
        storage = huey.storage
        self._dequeue = storage.dequeue
        storage.dequeue = self.dequeue
        self._add_schedule = huey.add_schedule
        huey.add_schedule = self.add_schedule
        huey.on_startup(name="migration_fsm_gate")(self.start)
        huey.on_shutdown(name="migration_fsm_gate")(self.stop)
        huey.pre_execute(name="migration_fsm_claim")(self.pre_execute)
        huey.post_execute(name="migration_fsm_finish")(self.post_execute)
        huey.signal(signals.SIGNAL_REVOKED, signals.SIGNAL_EXPIRED)(self._skipped)

    # -- the consumer's life ------------------------------------------------------------------

    def start(self) -> None:
        """Huey's startup hook, once per worker thread: the first builds the process's gate."""
        with self._gate_lock:
            self._starts += 1
            if self.gate is None:
                self.gate = self.make_gate()

    def stop(self) -> None:
        """Huey's shutdown hook, once per worker thread: the last closes the gate."""
        with self._gate_lock:
            self._starts -= 1
            if self._starts <= 0 and self.gate is not None:
                gate, self.gate = self.gate, None
                gate.close()

    # -- inside the dequeue -------------------------------------------------------------------

    def dequeue(self) -> Any:
        gate = self.gate
        if gate is None:
            return None
        with gate.dequeuing():
            if not gate.may_consume():
                self._count("dequeue_refused")
                return None
            data = self._dequeue()
            if data is not None:
                self._taken(data)
        return data

    def _taken(self, data: Any) -> None:
        """Mark the task running in the registry (registering it first if it is new)."""
        from datetime import UTC, datetime

        message = self.huey.serializer.deserialize(data)
        key = str(message.id)
        if not self.registry.set_status(key, TaskStatus.RUNNING, only_from=(TaskStatus.PENDING,)):
            with self.registry.transaction() as cur:
                cur.execute(
                    f"SELECT 1 FROM {REGISTRY} WHERE queue = ? AND key = ?", (self.registry.queue, key)
                )
                known = cur.fetchone() is not None
            if not known:
                record = self.store.record_of(message, datetime.now(UTC)).model_copy(
                    update={"status": TaskStatus.RUNNING}
                )
                with self.registry.transaction() as cur:
                    self.registry.insert(cur, record, str(message.name))
        self._count("taken")

    def add_schedule(self, task: Any) -> Any:
        """A task taken before its time goes back to the schedule: pending again."""
        result = self._add_schedule(task)
        self.registry.set_status(str(task.id), TaskStatus.PENDING, only_from=(TaskStatus.RUNNING,))
        return result

    # -- around each execution ----------------------------------------------------------------

    def pre_execute(self, task: Any) -> None:
        """Claim the task in the ledger; refused (or anything going wrong), raise Huey's
        `CancelExecution`: Huey runs the task when a hook raises anything else."""
        key = str(task.id)
        try:
            allowed = self._claim(task, key)
        except BaseException as exc:
            self.log.error("claim_failed", key=key, error=str(exc))
            with contextlib.suppress(Exception):
                self._put_back(task)
            raise self._cancel(retry=False) from exc
        if not allowed:
            raise self._cancel(retry=False)

    def _claim(self, task: Any, key: str) -> bool:
        gate = self.gate
        if gate is None:
            raise RuntimeError("no gate in this process: the consumer's startup hook did not run")
        executing = gate.executing(key)
        run = executing.__enter__()
        if run.allowed:
            with self._claims_lock:
                self._claims[key] = executing
            self._count("ran")
            return True
        executing.__exit__(None, None, None)
        if run.reason == _RAN_ELSEWHERE:
            self._settle(key, TaskStatus.COMPLETED, "ran_elsewhere")
        elif run.reason == _HANDED_OVER:
            self._settle(key, TaskStatus.CANCELLED, "handed_over")
        else:
            time.sleep(self.backoff_seconds)
            self._put_back(task)
        return False

    def post_execute(self, task: Any, _value: Any, exception: BaseException | None) -> None:
        key = str(task.id)
        with self._claims_lock:
            executing = self._claims.pop(key, None)
        if executing is None:
            return
        if exception is None:
            executing.__exit__(None, None, None)
            self.registry.set_status(key, TaskStatus.COMPLETED, only_from=_LIVE)
            return
        executing.__exit__(type(exception), exception, exception.__traceback__)
        if task.retries:  # Huey enqueues it again
            self.registry.set_status(key, TaskStatus.PENDING, only_from=_LIVE, attempts_plus=1)
        else:
            self.registry.set_status(key, TaskStatus.FAILED, only_from=_LIVE, attempts_plus=1)

    def _settle(self, key: str, status: TaskStatus, counter: str) -> None:
        self.registry.set_status(key, status, only_from=_LIVE)
        self._count(counter)

    def _put_back(self, task: Any) -> None:
        """The very message again (same id, arguments, eta and retries), pending."""
        self.huey.storage.enqueue(self.huey.serialize_task(task), task.priority)
        self.registry.set_status(str(task.id), TaskStatus.PENDING, only_from=(TaskStatus.RUNNING,))
        self._count("put_back")

    def _skipped(self, _signal: str, task: Any, *_args: Any) -> None:
        """Huey skipped a revoked or expired task."""
        self.registry.set_status(str(task.id), TaskStatus.CANCELLED, only_from=_LIVE)

    def _count(self, name: str) -> None:
        with self._claims_lock:
            self.counters[name] += 1


def gate_consumer(
    huey: Huey,
    control_url: str,
    *,
    side: str = "old",
    migration: str = "default",
    backoff_seconds: float = 0.5,
    type_map: Mapping[str, str] | None = None,
    **gate_options: Any,
) -> GatedConsumer:
    """Gate `huey`'s consumers (see the module's docstring): each consumer process builds a
    `PhaseClient` on `control_url` and a `WorkerGate` for `side` (with `gate_options`) at
    startup, and closes them at shutdown."""
    from migration_fsm.client import PhaseClient, WorkerGate

    def make_gate() -> WorkerGate:
        client = PhaseClient(control_url, migration=migration)
        gate = WorkerGate(client, side, **gate_options)
        closing = gate.close

        def close() -> None:
            closing()
            client.close()

        gate.close = close  # type: ignore[method-assign]
        return gate

    return GatedConsumer(huey, make_gate, backoff_seconds=backoff_seconds, type_map=type_map)
