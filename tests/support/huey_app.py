"""A small Huey application for the adapter's tests, on the SQLite file `MFSM_TEST_HUEY_FILE`.

Its tasks record each execution in the demo's `ExecutionLog` at `MFSM_TEST_LOG` (the side effect
the tests count): `send_email`, `resize_image` and `charge_card` (the demo producer's types,
keyword arguments), `add(a, b)` (positional arguments) and `flaky(key, failures)`, which fails
its first `failures` attempts. When `MFSM_TEST_CONTROL` is set, the consumer is gated
(`gate_consumer`) on that migration database. `huey_consumer tests.support.huey_app.huey` runs it.
"""

from __future__ import annotations

import os
import time
from typing import Any

from huey import SqliteHuey

from migration_fsm.adapters.huey.worker import gate_consumer
from migration_fsm.demo.systems import ExecutionLog
from migration_fsm.demo.worker import as_task_database, stable_share

huey = SqliteHuey("app", filename=os.environ.get("MFSM_TEST_HUEY_FILE", "huey-test.db"))
WORK_SECONDS = float(os.environ.get("MFSM_TEST_WORK_MS", "10")) / 1000
SLOW_SECONDS = float(os.environ.get("MFSM_TEST_SLOW_MS", "0")) / 1000
SLOW_SHARE = float(os.environ.get("MFSM_TEST_SLOW_SHARE", "0"))
_log: ExecutionLog | None = None

if os.environ.get("MFSM_TEST_CONTROL"):
    consumer = gate_consumer(
        huey,
        os.environ["MFSM_TEST_CONTROL"],
        side="old",
        migration=os.environ.get("MFSM_TEST_MIGRATION", "default"),
        backoff_seconds=0.05,
        worker_id=os.environ.get("MFSM_TEST_WORKER_ID"),
        worker_ttl_seconds=float(os.environ.get("MFSM_TEST_WORKER_TTL", "10")),
    )


def effect(key: str) -> None:
    global _log  # noqa: PLW0603 - one log per process, opened on first use
    if _log is None:
        _log = ExecutionLog(as_task_database(os.environ["MFSM_TEST_LOG"]))
    _log.record(key, "old")
    slow = SLOW_SECONDS and stable_share(key) < SLOW_SHARE
    time.sleep(SLOW_SECONDS if slow else WORK_SECONDS)


@huey.task(name="send_email", context=True)
def send_email(task: Any = None, **_payload: Any) -> None:
    effect(str(task.id))


@huey.task(name="resize_image", context=True)
def resize_image(task: Any = None, **_payload: Any) -> None:
    effect(str(task.id))


@huey.task(name="charge_card", context=True)
def charge_card(task: Any = None, **_payload: Any) -> None:
    effect(str(task.id))


@huey.task(context=True)
def add(a: int, b: int, task: Any = None) -> int:
    effect(str(task.id))
    return a + b


@huey.task(retries=3, context=True)
def flaky(key: str, failures: int, task: Any = None) -> None:
    attempt = 3 - task.retries
    effect(str(task.id))
    if attempt < failures:
        raise RuntimeError(f"{key} fails attempt {attempt}")
