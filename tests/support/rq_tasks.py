"""RQ job functions for the adapter's end-to-end test: each records its execution (the job's
id) in the demo's `ExecutionLog` at `MFSM_TEST_LOG`, the side effect the test counts."""

from __future__ import annotations

import os
import time
from typing import Any

from rq import get_current_job

from migration_fsm.demo.systems import ExecutionLog
from migration_fsm.demo.worker import as_task_database, stable_share

WORK_SECONDS = float(os.environ.get("MFSM_TEST_WORK_MS", "10")) / 1000
SLOW_SECONDS = float(os.environ.get("MFSM_TEST_SLOW_MS", "0")) / 1000
SLOW_SHARE = float(os.environ.get("MFSM_TEST_SLOW_SHARE", "0"))


def _effect() -> None:
    job = get_current_job()
    assert job is not None
    log = ExecutionLog(as_task_database(os.environ["MFSM_TEST_LOG"]))
    try:
        log.record(job.id, "old")
    finally:
        log.close()
    slow = SLOW_SECONDS and stable_share(job.id) < SLOW_SHARE
    time.sleep(SLOW_SECONDS if slow else WORK_SECONDS)


def send_email(**_payload: Any) -> None:
    _effect()


def resize_image(**_payload: Any) -> None:
    _effect()


def charge_card(**_payload: Any) -> None:
    _effect()


def add(a: int, b: int) -> int:
    _effect()
    return a + b
