"""A Celery worker gated by a `WorkerGate` (DESIGN.md section 10): one line in the module that
defines the Celery application, no patch of Celery.

```python
app = Celery("proj", broker=REDIS_URL, backend=REDIS_URL)
gate_worker(app, MIGRATION_DB_URL, side="old")     # only a worker's consumer builds a gate
```

`gate_worker` adds a consumer bootstep (`app.steps["consumer"]`), so the gate (a `PhaseClient`
and a `WorkerGate`, one per worker, in its main process) exists only in `celery worker`; a
producer that imports the module builds none. The prefork pool's children run the tasks; the
gate, the ledger's claims and the registry's marks live in the main process, which hands each
task to the pool and hears how it ended.

**Inside the take.** Every task a Celery worker executes passes through its consumer's
`on_task_request` (at once for a task without an ETA, when the timer fires for one with an ETA,
when a rate limit lets it through), which the step wraps: the gate's `may_consume()`, the
registry's check and its `running` mark run under one `gate.dequeuing()` hold, so once the gate
acknowledges a pause every task this worker took is `running` in the registry, where the drain
sees it. While the side may not consume, a task reaching that point is put back in the queue
(`reject(requeue=True)`) without running, and the step cancels the worker's consumption of the
queues it was started with (Celery's `cancel_task_queue`, undone with `add_task_queue` when the
side consumes again), checked every `poll_seconds` on the worker's own timer (tested with the
prefork pool, whose timer runs in the worker's event loop). A task the migration stopped (the
registry's `stopped`) is acknowledged without running: the refusal persists in Redis, so it
holds for a worker started after the revoke was broadcast.

**Around each execution.** The task's key (its id) is claimed in the execution ledger before
the task goes to the pool, and the claim is finished when the pool reports the end (through a
request class of the adapter's, set on every task: Celery's `Task.Request`): succeeded when the
task's result record says `SUCCESS`, failed otherwise, one more attempt in the registry for a
failure. When the ledger refuses, the task does not run:

- it succeeded elsewhere: acknowledged, completed (and stopped) in the registry;
- it was handed over to the other side: acknowledged, cancelled (and stopped) in the registry;
- anything else (it runs elsewhere right now, it failed there, the ledger cannot be reached):
  pending in the registry, and after `backoff_seconds` (on the worker's timer) put back in the
  queue. So is a task whose take fails (the registry's Redis, the ledger's database): it is put
  back rather than run unchecked.

A prefork child killed mid-task (SIGKILL) comes back: with `task_acks_late` and
`task_reject_on_worker_lost` Celery requeues its message, the claim is finished failed and
the registry says pending, so the next execution may claim it again. Celery's own tasks
(`celery.*`: chord unlocks, backend cleanup) are not gated. The worker refuses to start when
the application's settings are not those `check_setup` asks for, or a task sets `acks_late`
off.
"""

from __future__ import annotations

import json
import threading
from typing import TYPE_CHECKING, Any, Final

from celery import bootsteps

from migration_fsm.exceptions import DataError
from migration_fsm.log import get_logger
from migration_fsm.tasks.records import TaskStatus

from .store import CeleryTaskStore, digest, settings_problems

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping

    from celery import Celery

    from migration_fsm.client import WorkerGate

_RAN_ELSEWHERE: Final = "succeeded"
_HANDED_OVER: Final = "handed_over"


class GatedRequestMixin:
    """What the adapter adds to a task's request class: the claim's finish when the pool
    reports the end of the execution (in the worker's main process)."""

    gated: GatedConsumer
    id: str
    acknowledged: bool

    def on_failure(self, exc_info: Any, send_failed_event: bool = True, return_ok: bool = False) -> Any:
        self.__dict__["mfsm_failing"] = True
        try:
            return super().on_failure(exc_info, send_failed_event, return_ok)  # type: ignore[misc]
        finally:
            self.gated.finished(self, failed=True)

    def acknowledge(self) -> Any:
        result = super().acknowledge()  # type: ignore[misc]
        if not self.__dict__.get("mfsm_failing"):
            self.gated.finished(self, failed=False)
        return result

    def reject(self, requeue: bool = False) -> Any:
        self.__dict__["mfsm_requeued"] = requeue
        return super().reject(requeue)  # type: ignore[misc]


class GatedConsumer:
    """The gate's integration into one Celery application (see the module's docstring).
    Built by `gate_worker`; the consumer step calls `start` in the worker's main process."""

    def __init__(
        self,
        app: Celery,
        make_gate: Callable[[], WorkerGate],
        *,
        queue: str = "celery",
        backoff_seconds: float = 0.5,
        poll_seconds: float = 0.05,
        type_map: Mapping[str, str] | None = None,
    ) -> None:
        self.app = app
        self.make_gate = make_gate
        self.queue = queue
        self.backoff_seconds = backoff_seconds
        self.poll_seconds = poll_seconds
        self.type_map = type_map
        self.gate: WorkerGate | None = None
        self.stores: dict[str, CeleryTaskStore] = {}  # a registry per queue
        self.consumer: Any = None
        self.consuming = True
        self.log = get_logger().bind(component="celery-gate", queue=queue)
        self._claims: dict[int, Any] = {}  # by request (two messages of one task are two requests)
        self._lock = threading.Lock()
        self._timer: Any = None
        self._queues: list[str] | None = None
        self._requests: dict[type, type] = {}
        self.counters: dict[str, int] = dict.fromkeys(
            ("put_back", "taken", "ran", "stopped", "ran_elsewhere", "handed_over", "unrevoked"), 0
        )

    # -- the worker's life --------------------------------------------------------------------

    def start(self, consumer: Any) -> None:
        """The consumer step's start (again after a reconnection): build the gate once, wrap the
        consumer's task handling, follow the gate with the worker's timer."""
        problems = settings_problems(self.app)
        late_off = sorted(
            name for name, task in self.app.tasks.items() if self._gated(name) and not task.acks_late
        )
        if late_off:
            problems.append(f"tasks {', '.join(late_off)} set acks_late off")
        if problems:
            raise RuntimeError("the migration gate cannot run this worker: " + "; ".join(problems))
        if self.gate is None:
            self.gate = self.make_gate()
        self.consumer = consumer
        if not getattr(consumer.on_task_request, "mfsm_gated", False):
            original = consumer.on_task_request

            def on_task_request(request: Any) -> Any:
                return self.on_task_request(request, original)

            on_task_request.mfsm_gated = True  # type: ignore[attr-defined]
            consumer.on_task_request = on_task_request
        for name, task in self.app.tasks.items():
            if self._gated(name):
                task.Request = self._request_class(task.Request)
        consumer.update_strategies()  # rebuilt with the gated handler and request classes
        for name, strategy in list(consumer.strategies.items()):
            if self._gated(name):
                consumer.strategies[name] = self._received(strategy)
        selected = consumer.app.amqp.queues.consume_from
        if self._queues is None:  # what this worker was started to consume (`-Q`): all paused together
            self._queues = sorted(selected)
        # After a reconnection the consumer consumes what Celery has selected: the queues this
        # step cancelled stay cancelled until `follow` adds them back.
        self.consuming = any(name in selected for name in self._queues)
        self.follow()
        self._timer = consumer.timer.call_repeatedly(self.poll_seconds, self.follow)

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def shutdown(self) -> None:
        self.stop()
        gate, self.gate = self.gate, None
        if gate is not None:
            gate.close()
            gate.client.close()
        for store in self.stores.values():
            store.close()
        self.stores.clear()

    def store_of(self, delivery_info: Any) -> CeleryTaskStore:
        """The store (the registry) of the queue a message came from (`queue` when it says none)."""
        queue = str((delivery_info or {}).get("routing_key") or self.queue)
        if queue not in self.stores:
            self.stores[queue] = CeleryTaskStore(self.app, queue=queue, type_map=self.type_map)
        return self.stores[queue]

    def _gated(self, name: str) -> bool:
        return not name.startswith("celery.")

    def _request_class(self, base: Any) -> type:
        from celery.utils.imports import symbol_by_name

        cls: type = symbol_by_name(base)
        if issubclass(cls, GatedRequestMixin):
            return cls
        if cls not in self._requests:
            self._requests[cls] = type(f"Gated{cls.__name__}", (GatedRequestMixin, cls), {"gated": self})
        gated: type = self._requests[cls]
        return gated

    def follow(self) -> None:
        """Consume the queue only while the gate says the side may (on the worker's timer)."""
        gate, consumer = self.gate, self.consumer
        if gate is None or consumer is None or consumer.task_consumer is None:
            return
        wanted = gate.may_consume()
        if wanted == self.consuming:
            return
        for name in self._queues or ():
            if wanted:
                consumer.add_task_queue(name)
            else:
                consumer.cancel_task_queue(name)
        self.consuming = wanted

    # -- receiving and taking -----------------------------------------------------------------

    def _received(self, strategy: Callable[..., Any]) -> Callable[..., Any]:
        """Celery's strategy for a task, first forgetting a revoke the adapter broadcast for a
        task the migration has since sent again."""
        from celery.worker import state

        def received(message: Any, body: Any, *args: Any, **kwargs: Any) -> Any:
            key = str((message.headers or {}).get("id", ""))
            if key in state.revoked:
                try:
                    [(fields, _meta)] = self.store_of(message.delivery_info).read([key])
                except Exception as exc:  # noqa: BLE001 - Celery's revoke then stands
                    self.log.warning("registry_unreadable", key=key, error=str(exc))
                    fields = {}
                if fields.get("revoked") == "1" and fields.get("status") == TaskStatus.PENDING.value:
                    state.revoked.discard(key)
                    self._count("unrevoked")
            return strategy(message, body, *args, **kwargs)

        return received

    def on_task_request(self, request: Any, original: Callable[[Any], Any]) -> Any:
        """Take the task (under the gate's hold), claim it, hand it to the pool."""
        if not self._gated(request.name):
            return original(request)
        executing = self._admit(request)
        if executing is None:
            return None
        with self._lock:
            self._claims[id(request)] = executing
        self._count("ran")
        try:
            return original(request)
        except BaseException as exc:
            self._finish(request, exc)
            raise

    def _admit(self, request: Any) -> Any:
        """The entered claim of a task this worker runs now; None when it does not run (put
        back, settled, or acknowledged as stopped)."""
        gate = self.gate
        if gate is None:
            self._put_back(request, later=False)
            return None
        try:
            with gate.dequeuing():
                if not gate.may_consume():
                    self._put_back(request, later=False)
                    return None
                if not self._take(request):
                    self._count("stopped")
                    self._release(request, request.acknowledge)
                    return None
            executing = gate.executing(str(request.id))
            run = executing.__enter__()
        except Exception as exc:  # noqa: BLE001 - a task is put back rather than run unchecked
            self.log.error("take_failed", key=str(request.id), error=str(exc))
            self._put_back(request, later=True)
            return None
        if not run.allowed:
            executing.__exit__(None, None, None)
            self._refused(request, run.reason)
            return None
        return executing

    def _take(self, request: Any) -> bool:
        """Mark the task running in the registry (registering it first if it is new); False
        when the migration stopped it."""
        from datetime import UTC, datetime

        store = self.store_of(request.delivery_info)
        key = str(request.id)
        stopped = False

        def change(fields: dict[str, str], meta: bytes | None) -> dict[str, str] | None:
            nonlocal stopped
            if fields.get("stopped"):
                stopped = True
                return None
            if not fields:
                arguments = (list(request.args or ()), dict(request.kwargs or {}))
                now = datetime.now(UTC)
                record = store.record_of(key, request.name, arguments, request.eta, now, TaskStatus.RUNNING)
                return {**store.fields_of(record), "stopped": "", "sent": "1", "seen": digest(meta)}
            return {"status": TaskStatus.RUNNING.value, "seen": digest(meta)}

        try:
            store.update(key, change, create=True)
        except DataError as exc:  # a message the registry cannot hold: the store refuses it too
            self.log.warning("not_registered", key=key, error=str(exc))
        if not stopped:
            self._count("taken")
        return not stopped

    # -- the end of an execution ------------------------------------------------------------

    def finished(self, request: Any, *, failed: bool) -> None:
        """The pool reported the end of `request`'s execution: finish the claim; record a
        failure (one more attempt; pending again when Celery requeued or retries it)."""
        key = str(request.id)
        with self._lock:
            executing = self._claims.pop(id(request), None)
        if executing is None:
            return
        store = self.store_of(request.delivery_info)
        try:
            [(_fields, meta)] = store.read([key])
            state = json.loads(meta).get("status") if meta is not None else None
        except Exception as exc:  # noqa: BLE001 - the claim is finished all the same
            self.log.warning("result_unreadable", key=key, error=str(exc))
            state = "FAILURE" if failed else None
        # A hard time limit acknowledges before the failure is reported; a child lost after it
        # stored SUCCESS is reported as a failure: the result record tells.
        ok = state == "SUCCESS" or (not failed and state not in ("FAILURE", "RETRY", "REVOKED"))
        if ok:
            executing.__exit__(None, None, None)
        else:
            error = RuntimeError(f"Celery task {key} ended {state or 'without a result'}")
            executing.__exit__(RuntimeError, error, None)
        requeued = bool(request.__dict__.get("mfsm_requeued"))

        def change(fields: dict[str, str], meta: bytes | None) -> dict[str, str] | None:
            new = {} if ok else {"attempts": str(int(fields.get("attempts") or 0) + 1)}
            if fields.get("stopped") or state == "RETRY":  # a retry may run already
                return new or None
            # requeued (a lost child): pending, though Celery's state still says STARTED
            status = TaskStatus.COMPLETED if ok else TaskStatus.PENDING if requeued else TaskStatus.FAILED
            return {**new, "status": status.value, "seen": digest(meta)}

        try:
            store.update(key, change)
        except Exception as exc:  # noqa: BLE001 - never into Celery's own callbacks
            self.log.warning("registry_unwritten", key=key, error=str(exc))

    def _finish(self, request: Any, exc: BaseException) -> None:
        with self._lock:
            executing = self._claims.pop(id(request), None)
        if executing is not None:
            executing.__exit__(type(exc), exc, exc.__traceback__)

    # -- refusals -----------------------------------------------------------------------------

    def _refused(self, request: Any, reason: str) -> None:
        if reason == _RAN_ELSEWHERE:
            self._settle(request, TaskStatus.COMPLETED, "ran_elsewhere")
            self._release(request, request.acknowledge)
        elif reason == _HANDED_OVER:
            self._settle(request, TaskStatus.CANCELLED, "handed_over")
            self._release(request, request.acknowledge)
        else:
            self._put_back(request, later=True)

    def _settle(self, request: Any, status: TaskStatus, counter: str) -> None:

        def change(_fields: dict[str, str], meta: bytes | None) -> dict[str, str] | None:
            return {"status": status.value, "stopped": "1", "seen": digest(meta)}

        self.store_of(request.delivery_info).update(str(request.id), change)
        self._count(counter)

    def _put_back(self, request: Any, *, later: bool) -> None:
        """Back in the queue without running (after `backoff_seconds` when `later`), pending."""
        key = str(request.id)

        def change(fields: dict[str, str], meta: bytes | None) -> dict[str, str] | None:
            if fields.get("status") != TaskStatus.RUNNING.value or fields.get("stopped"):
                return None
            return {"status": TaskStatus.PENDING.value, "seen": digest(meta)}

        def put_back() -> None:
            self._release(request, lambda: request.reject(requeue=True))
            self._count("put_back")

        try:  # pending from now on: it waits, it does not run
            self.store_of(request.delivery_info).update(key, change)
        except Exception as exc:  # noqa: BLE001 - put back all the same
            self.log.warning("registry_unwritten", key=key, error=str(exc))
        if later and self.consumer is not None:
            self.consumer.timer.call_after(self.backoff_seconds, put_back)
        else:
            put_back()

    @staticmethod
    def _release(request: Any, settle: Callable[[], Any]) -> None:
        """Settle a request that does not run (acknowledge or reject its message), and forget it
        in the worker's state (Celery counts it reserved until the pool reports it ready)."""
        from celery.worker import state

        settle()
        state.task_ready(request)

    def _count(self, name: str) -> None:
        with self._lock:
            self.counters[name] += 1


class GateStep(bootsteps.StartStopStep):  # type: ignore[misc]
    """The consumer bootstep `gate_worker` adds (after Celery's `Tasks` step)."""

    requires = ("celery.worker.consumer.tasks:Tasks",)
    gated: GatedConsumer

    def start(self, c: Any) -> None:
        self.gated.start(c)

    def stop(self, _c: Any) -> None:
        self.gated.stop()

    def shutdown(self, _c: Any) -> None:
        self.gated.shutdown()


def gate_worker(
    app: Celery,
    control_url: str,
    *,
    side: str = "old",
    migration: str = "default",
    queue: str = "celery",
    backoff_seconds: float = 0.5,
    type_map: Mapping[str, str] | None = None,
    **gate_options: Any,
) -> GatedConsumer:
    """Gate `app`'s workers (see the module's docstring): each `celery worker` builds, in its
    main process, a `PhaseClient` on `control_url` and a `WorkerGate` for `side` (with
    `gate_options`) when its consumer starts, and closes them when it stops. Each task is
    recorded in the registry of the queue it came from (`queue` when its message names none)."""
    from migration_fsm.client import PhaseClient, WorkerGate

    def make_gate() -> WorkerGate:
        return WorkerGate(PhaseClient(control_url, migration=migration), side, **gate_options)

    gated = GatedConsumer(app, make_gate, queue=queue, backoff_seconds=backoff_seconds, type_map=type_map)
    app.steps["consumer"].add(type("MigrationGate", (GateStep,), {"gated": gated}))
    return gated
