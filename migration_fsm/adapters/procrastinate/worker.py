"""A Procrastinate worker gated by a `WorkerGate` (DESIGN.md section 10): one line at the
worker's start-up, no patch of Procrastinate.

```python
gate = WorkerGate(PhaseClient(MIGRATION_DB), side="new")
app.run_worker(queues=["default"], **gated(app, gate).worker_options())
```

**Inside the dequeue.** `gated` wraps the app's `JobManager.fetch_job`: the gate's
`may_consume()` and Procrastinate's fetch (the `UPDATE .. RETURNING` that marks a job
`doing`) run under one `gate.dequeuing()` hold, so once the gate acknowledges a pause every
job this worker took is `doing` in the table, where the drain sees it. A side that may not
consume fetches nothing; the worker then waits for Procrastinate's next poll
(`fetch_job_polling_interval`) or notification.

**Around each execution.** A worker middleware (`worker_middleware`, which wraps every job,
sync or async) claims the job's key in the execution ledger before the task runs and
finishes it after. The key is the one the adapter registered for the job
(`mfsm_procrastinate_tasks`), or the reserved key of a job deferred without the adapter; a task
declared with `pass_context=True` finds it in `context.additional_context["migration_key"]`.
When the ledger refuses:

- the task succeeded elsewhere: the job is finished `succeeded` here without running;
- it was handed over to the other side: the job ends `aborted` (read as cancelled);
- anything else (it runs elsewhere right now, it failed on the other side, the ledger cannot
  be reached): the worker waits `backoff_seconds` and puts the job back as `todo`, untouched
  (same scheduled time and attempts), so it runs later on whichever side the ledger allows.

**Settings it needs.** `worker_options()` passes `delete_jobs="never"`: a job Procrastinate
deletes when it finishes takes the task's record with it, and `validate` would then find it
missing. A worker started with another `delete_jobs` runs nothing: each job is put back and
the fix is logged.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import TYPE_CHECKING, Any, Final

from migration_fsm.log import get_logger

from .store import JOB_KEY_PREFIX, REGISTRY

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Iterable

    from procrastinate import App
    from procrastinate.job_context import JobContext
    from procrastinate.jobs import Job, Status
    from procrastinate.worker import Worker

    from migration_fsm.client import WorkerGate

#: Where a task (`pass_context=True`) finds its migration key: `context.additional_context[KEY_CONTEXT]`.
KEY_CONTEXT: Final = "migration_key"
#: Ledger refusals after which the job is finished here rather than put back.
_RAN_ELSEWHERE: Final = "succeeded"
_HANDED_OVER: Final = "handed_over"

_KEY_OF_JOB: Final = f"SELECT key FROM {REGISTRY} WHERE job_id = %(job_id)s"
_PUT_BACK: Final = (
    "UPDATE procrastinate_jobs SET status = 'todo', worker_id = NULL WHERE id = %(job_id)s"
    " AND status = 'doing'"
)


class GatedWorker:
    """The gate's integration into one Procrastinate `App` (see the module's docstring). Build
    it with `gated(app, gate)` before the worker starts; `worker_options()` are the keyword
    arguments to add to `app.run_worker` / `run_worker_async`."""

    def __init__(self, app: App, gate: WorkerGate, *, backoff_seconds: float = 0.5) -> None:
        self.app = app
        self.gate = gate
        self.backoff_seconds = backoff_seconds
        self.log = get_logger().bind(component="procrastinate-gate", side=gate.side)
        manager = app.job_manager
        self._fetch: Callable[..., Awaitable[Job | None]] = manager.fetch_job
        self._finish: Callable[..., Awaitable[None]] = manager.finish_job
        self._put_back: set[int] = set()
        self._warned_delete = False
        #: What this worker did: fetches refused by the gate, jobs fetched, run, finished
        #: without running (ran elsewhere), aborted (handed over), put back.
        self.counters: Counter[str] = Counter()
        manager.fetch_job = self.fetch_job  # type: ignore[method-assign]
        manager.finish_job = self.finish_job  # type: ignore[method-assign]

    def worker_options(self) -> dict[str, Any]:
        """`worker_middleware` with the ledger's claim, and `delete_jobs="never"`."""
        return {"worker_middleware": [self.middleware], "delete_jobs": "never"}

    async def fetch_job(self, queues: Iterable[str] | None, worker_id: int) -> Job | None:
        """Procrastinate's fetch, only while this side may consume, under the gate's hold."""
        with self.gate.dequeuing():
            if not self.gate.may_consume():
                self.counters["fetch_refused"] += 1
                return None
            job = await self._fetch(queues=queues, worker_id=worker_id)
        self.counters["fetched" if job is not None else "fetched_nothing"] += 1
        return job

    async def finish_job(self, job: Job, status: Status, delete_job: bool) -> None:
        """Procrastinate's finish, except for a job the middleware put back."""
        if job.id is not None and job.id in self._put_back:
            self._put_back.discard(job.id)
            await self.app.connector.execute_query_async(query=_PUT_BACK, job_id=job.id)
            return
        await self._finish(job=job, status=status, delete_job=delete_job)

    async def middleware(
        self, call_next: Callable[[], Awaitable[Any]], context: JobContext, worker: Worker
    ) -> Any:
        """Claim the job's key around its execution (a Procrastinate worker middleware)."""
        from procrastinate.exceptions import JobAborted
        from procrastinate.jobs import DeleteJobCondition

        job = context.job
        assert job.id is not None  # a fetched job has its id
        if worker.delete_jobs is not DeleteJobCondition.NEVER:
            if not self._warned_delete:
                self._warned_delete = True
                self.log.error(
                    "worker_refused",
                    reason="run the worker with delete_jobs='never' (GatedWorker.worker_options())",
                )
            return await self._put_job_back(job.id)
        key = await self._key_of(job.id)
        executing = self.gate.executing(key)
        run = await asyncio.to_thread(executing.__enter__)
        if not run.allowed:
            await asyncio.to_thread(executing.__exit__, None, None, None)
            if run.reason == _RAN_ELSEWHERE:
                self.counters["ran_elsewhere"] += 1
                return None  # Procrastinate finishes it `succeeded`; it never ran here
            if run.reason == _HANDED_OVER:
                self.counters["handed_over"] += 1
                raise JobAborted(f"task {key} was handed over to the other side")
            await asyncio.sleep(self.backoff_seconds)
            return await self._put_job_back(job.id)
        self.counters["ran"] += 1
        context.additional_context[KEY_CONTEXT] = key  # the task may read its migration key
        try:
            result = await call_next()
        except BaseException as exc:
            await asyncio.to_thread(executing.__exit__, type(exc), exc, exc.__traceback__)
            raise
        await asyncio.to_thread(executing.__exit__, None, None, None)
        return result

    async def _put_job_back(self, job_id: int) -> None:
        self.counters["put_back"] += 1
        self._put_back.add(job_id)

    async def _key_of(self, job_id: int) -> str:
        """The registered key of the job, or the reserved key of a job deferred without the
        adapter (Procrastinate's connector raises `NoResult` for a query with no row)."""
        from procrastinate.exceptions import NoResult

        try:
            row = await self.app.connector.execute_query_one_async(query=_KEY_OF_JOB, job_id=job_id)
        except NoResult:
            row = None
        if row is not None and row.get("key") is not None:
            return str(row["key"])
        return f"{JOB_KEY_PREFIX}{job_id:020d}"


def gated(app: App, gate: WorkerGate, *, backoff_seconds: float = 0.5) -> GatedWorker:
    """Gate `app`'s workers in this process with `gate` (see the module's docstring)."""
    return GatedWorker(app, gate, backoff_seconds=backoff_seconds)
