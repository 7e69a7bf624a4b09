"""A small Celery application for the adapter's tests, with Redis (`MFSM_TEST_CELERY_REDIS`) as
broker and result backend, and the settings the adapter needs.

Its tasks record each execution in the demo's `ExecutionLog` at `MFSM_TEST_LOG` when it is set,
else in the `effects` list of that Redis (the side effect the tests count): `send_email`,
`resize_image` and `charge_card` (the demo producer's types, keyword arguments), `add(a, b)`
(positional arguments), `flaky(key, failures)`, which fails its first `failures` attempts and is
retried by Celery, and `spread(*numbers)`. With `MFSM_TEST_HOLD_FILE` set, a task started while
that file exists writes `<file>.held` (its id and its process id) and waits there, before its
effect, until its process is killed. When `MFSM_TEST_CONTROL` is set, the worker is gated
(`gate_worker`) on that migration database. `celery -A tests.support.celery_app worker` runs it.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from celery import Celery

from migration_fsm.demo.systems import ExecutionLog
from migration_fsm.demo.worker import as_task_database, stable_share

#: Nothing listens on port 1: an application not pointed at a test's own Redis fails, it never
#: writes into a database of someone else's.
REDIS = os.environ.get("MFSM_TEST_CELERY_REDIS", "redis://127.0.0.1:1/0")
app = Celery("mfsm_test", broker=REDIS, backend=REDIS)
app.conf.update(
    task_acks_late=os.environ.get("MFSM_TEST_ACKS_LATE", "1") == "1",  # "0": a setting the gate refuses
    task_reject_on_worker_lost=True,
    task_track_started=True,
    result_expires=None,
    worker_prefetch_multiplier=1,
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=False,
)
WORK_SECONDS = float(os.environ.get("MFSM_TEST_WORK_MS", "10")) / 1000
SLOW_SECONDS = float(os.environ.get("MFSM_TEST_SLOW_MS", "0")) / 1000
SLOW_SHARE = float(os.environ.get("MFSM_TEST_SLOW_SHARE", "0"))
_log: ExecutionLog | None = None

if os.environ.get("MFSM_TEST_CONTROL"):
    from migration_fsm.adapters.celery.worker import gate_worker

    gate_worker(
        app,
        os.environ["MFSM_TEST_CONTROL"],
        side="old",
        migration=os.environ.get("MFSM_TEST_MIGRATION", "default"),
        backoff_seconds=0.05,
        worker_id=os.environ.get("MFSM_TEST_WORKER_ID"),
        worker_ttl_seconds=float(os.environ.get("MFSM_TEST_WORKER_TTL", "10")),
    )


def use_redis(url: str) -> None:
    """Point this process's application (broker and result backend) at `url`, dropping the
    connections and the backend it made for the Redis it used before."""
    import kombu.pools

    app.conf.broker_url = app.conf.result_backend = url
    app._pool = None  # Celery caches its broker connections here,
    app.amqp._producer_pool = None
    kombu.pools.reset()  # type: ignore[no-untyped-call]  # kombu its producers,
    app._local.__dict__.pop("backend", None)  # and Celery its result backend


def effect(key: str) -> None:
    """Record that task `key` ran (after holding, when the hold file says so)."""
    global _log  # noqa: PLW0603 - one log per process, opened on first use
    hold = os.environ.get("MFSM_TEST_HOLD_FILE")
    if hold and Path(hold).exists():
        try:
            Path(hold).unlink()  # the one pool child that removes it holds: never two
        except FileNotFoundError:
            pass
        else:
            Path(hold + ".tmp").write_text(f"{key} {os.getpid()}", encoding="utf-8")
            Path(hold + ".tmp").replace(hold + ".held")  # whole, never read half written
            while True:  # until this process is killed
                time.sleep(1)
    if os.environ.get("MFSM_TEST_LOG"):
        if _log is None:
            _log = ExecutionLog(as_task_database(os.environ["MFSM_TEST_LOG"]))
        _log.record(key, "old")
    else:
        app.backend.client.rpush("effects", key)
    slow = SLOW_SECONDS and stable_share(key) < SLOW_SHARE
    time.sleep(SLOW_SECONDS if slow else WORK_SECONDS)


@app.task(name="send_email", bind=True)
def send_email(self: Any, **_payload: Any) -> None:
    effect(str(self.request.id))


@app.task(name="resize_image", bind=True)
def resize_image(self: Any, **_payload: Any) -> None:
    effect(str(self.request.id))


@app.task(name="charge_card", bind=True)
def charge_card(self: Any, **_payload: Any) -> None:
    effect(str(self.request.id))


@app.task(name="add", bind=True)
def add(self: Any, a: int, b: int) -> int:
    effect(str(self.request.id))
    return a + b


@app.task(name="flaky", bind=True, max_retries=3)
def flaky(self: Any, key: str, failures: int) -> None:
    effect(str(self.request.id))
    if self.request.retries < failures:
        raise self.retry(countdown=0.2, exc=RuntimeError(f"{key} fails attempt {self.request.retries}"))


@app.task(name="spread")
def spread(*numbers: int) -> int:
    return sum(numbers)
