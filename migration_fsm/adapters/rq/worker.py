"""An RQ worker gated by a `WorkerGate` (DESIGN.md section 10): the worker's start-up script
builds it instead of `Worker`, no patch of RQ.

```python
from migration_fsm.adapters.rq.worker import gated_worker

gated_worker(["default"], redis, MIGRATION_DB_URL, side="old").work(with_scheduler=True)
```

`GatedWorker` (RQ's forking `Worker`) and `GatedSimpleWorker` (`SimpleWorker`, no fork) change
two methods:

**`dequeue_job_and_maintain_ttl`, inside the dequeue.** The gate's `may_consume()`, RQ's
non-blocking dequeue and the job's `started` mark run under one `gate.dequeuing()` hold, so once
the gate acknowledges a pause every job this worker took is running to the store, where the
drain sees it. Between empty polls the worker waits `poll_seconds` outside the hold (a blocking
pop inside it would delay the acknowledgement); it heartbeats and runs RQ's maintenance as RQ's
own loop does.

**`execute_job`, around each execution.** The job's key (its id) is claimed in the execution
ledger in the worker process, before RQ forks the work horse, and finished after it: succeeded
when RQ says `finished`, failed otherwise. When the ledger refuses, the job does not run: it
succeeded elsewhere (cancelled in RQ, completed to the migration), it was handed over
(cancelled), or otherwise (it runs elsewhere now, failed there, the ledger is unreachable) it is
enqueued again after `backoff_seconds`.

Jobs are kept after they end (`result_ttl` and `failure_ttl` -1 on each job the worker takes): a
job RQ deletes is a task the migration no longer finds.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any, Final

from rq import SimpleWorker, Worker
from rq.intermediate_queue import IntermediateQueue
from rq.job import JobStatus

from migration_fsm.tasks.records import TaskStatus

from .store import index_key, move

if TYPE_CHECKING:
    from collections.abc import Sequence

    from redis import Redis
    from rq.job import Job
    from rq.queue import Queue

    from migration_fsm.client import WorkerGate

_RAN_ELSEWHERE: Final = "succeeded"
_HANDED_OVER: Final = "handed_over"


class _Gated:
    """The two gated methods, for either RQ worker class."""

    gate: WorkerGate
    backoff_seconds: float = 0.5
    poll_seconds: float = 0.05
    refusals: dict[str, int]

    def dequeue_job_and_maintain_ttl(
        self: Any, timeout: int | None, max_idle_time: int | None = None
    ) -> tuple[Job, Queue] | None:
        idle_since = time.monotonic()
        while True:
            self.heartbeat()
            if self.should_run_maintenance_tasks:
                self.run_maintenance_tasks()
            with self.gate.dequeuing():
                result = None
                if self.gate.may_consume():
                    result = self.queue_class.dequeue_any(
                        self._ordered_queues,
                        None,
                        connection=self.connection,
                        job_class=self.job_class,
                        serializer=self.serializer,
                        death_penalty_class=self.death_penalty_class,
                    )
                if result is not None:
                    job, queue = result
                    job.set_status(JobStatus.STARTED)  # running to the drain, before the acknowledgement
                    self.connection.zadd(index_key(queue.name), {job.id: 0})
            if result is not None:
                self.reorder_queues(reference_queue=queue)
                self.heartbeat()
                return result  # type: ignore[no-any-return]
            idle = time.monotonic() - idle_since
            if (
                timeout is None
                or self._stop_requested
                or (max_idle_time is not None and idle >= max_idle_time)
            ):
                return None
            time.sleep(self.poll_seconds)

    def subscribe(self: Any) -> None:
        """RQ's command channel, listened to with a 1 s poll instead of RQ's 60 s: with redis-py
        8 stopping the listener waits out that poll, so a worker took up to a minute to stop."""
        self.pubsub = self.connection.pubsub()
        self.pubsub.subscribe(**{self.pubsub_channel_name: self.handle_payload})
        self.pubsub_thread = self.pubsub.run_in_thread(
            sleep_time=1, daemon=True, exception_handler=self._pubsub_exception_handler
        )

    def execute_job(self: Any, job: Job, queue: Queue) -> None:
        job.result_ttl = -1
        job.failure_ttl = -1
        executing = self.gate.executing(job.id)
        run = executing.__enter__()
        if not run.allowed:
            executing.__exit__(None, None, None)
            self._refused(job, queue, run.reason)
            return
        try:
            super().execute_job(job, queue)  # type: ignore[misc]
        except BaseException as exc:
            executing.__exit__(type(exc), exc, exc.__traceback__)
            raise
        if job.get_status(refresh=True) == JobStatus.FINISHED:
            executing.__exit__(None, None, None)
        else:
            failed = RuntimeError(f"RQ job {job.id} ended {job.get_status(refresh=False)}")
            executing.__exit__(RuntimeError, failed, None)

    def _refused(self: Any, job: Job, queue: Queue, reason: str) -> None:
        IntermediateQueue(queue.key, connection=self.connection).remove(job.id)
        self.refusals[reason] = self.refusals.get(reason, 0) + 1
        if reason == _RAN_ELSEWHERE:
            move(job, queue, TaskStatus.RUNNING, TaskStatus.COMPLETED)
        elif reason == _HANDED_OVER:
            move(job, queue, TaskStatus.RUNNING, TaskStatus.CANCELLED)
        else:
            time.sleep(self.backoff_seconds)
            queue.enqueue_job(job)


class GatedWorker(_Gated, Worker):
    """RQ's `Worker` (a work horse forked per job), gated."""

    def __init__(self, *args: Any, gate: WorkerGate, backoff_seconds: float = 0.5, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.gate = gate
        self.backoff_seconds = backoff_seconds
        self.refusals = {}


class GatedSimpleWorker(_Gated, SimpleWorker):
    """RQ's `SimpleWorker` (jobs run in the worker's process), gated."""

    def __init__(self, *args: Any, gate: WorkerGate, backoff_seconds: float = 0.5, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.gate = gate
        self.backoff_seconds = backoff_seconds
        self.refusals = {}


def gated_worker(
    queues: Sequence[str],
    connection: Redis,
    control_url: str,
    *,
    side: str = "old",
    migration: str = "default",
    fork: bool = True,
    backoff_seconds: float = 0.5,
    **gate_options: Any,
) -> GatedWorker | GatedSimpleWorker:
    """An RQ worker for `queues` gated by a `WorkerGate` of `side` on the migration database
    `control_url` (see the module's docstring); `fork=False` runs jobs in this process."""
    from migration_fsm.client import PhaseClient, WorkerGate

    client = PhaseClient(control_url, migration=migration)
    gate = WorkerGate(client, side, **gate_options)
    cls = GatedWorker if fork else GatedSimpleWorker
    return cls(list(queues), connection=connection, gate=gate, backoff_seconds=backoff_seconds)
