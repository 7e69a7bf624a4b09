"""`ProcrastinateTaskStore` on a real Procrastinate schema in PostgreSQL: the `TaskStore`
contract, the mapping onto Procrastinate's own columns and statuses, jobs deferred by
Procrastinate itself, and the setup checks."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path

import psycopg
import pytest

from migration_fsm.adapters.procrastinate import JOB_KEY_PREFIX, ProcrastinateTaskStore
from migration_fsm.adapters.procrastinate.store import _first_job_id_after
from migration_fsm.exceptions import DataError
from migration_fsm.tasks.records import ProgressUpdate, TaskStatus
from migration_fsm.testing import T0, TaskStoreContract, changed, make_records
from tests.support.cli import CliResult
from tests.support.datatools import create_task_table, write_stores_config
from tests.support.queues import libpq_url, procrastinate_schema


@pytest.fixture
def pq_url(pg_database: str) -> Iterator[str]:
    with procrastinate_schema(pg_database) as url:
        yield url


@pytest.fixture
def pq_store(pq_url: str) -> Iterator[ProcrastinateTaskStore]:
    store = ProcrastinateTaskStore(pq_url, name="new")
    yield store
    store.close()


def sql(url: str, statement: str, *params: object) -> list[tuple[object, ...]]:
    with psycopg.connect(libpq_url(url), autocommit=True) as conn:
        cur = conn.execute(statement, params)
        return list(cur.fetchall()) if cur.description else []


class TestContract(TaskStoreContract):
    @pytest.fixture
    def task_store(self, pq_store: ProcrastinateTaskStore) -> ProcrastinateTaskStore:
        return pq_store


def test_tasks_are_procrastinate_jobs_in_its_own_columns(
    pq_store: ProcrastinateTaskStore, pq_url: str
) -> None:
    """A task written through the adapter is a job Procrastinate's worker would fetch: its
    task name, arguments, queue, scheduled time and status in Procrastinate's own vocabulary."""
    pending, scheduled = make_records(["a", "b"], run_at=True)[:2]
    pending = changed(pending, status=TaskStatus.PENDING, attempts=0, run_at=None)
    scheduled = changed(
        make_records(["b", "c", "d", "e"], run_at=True)[3], key="b", status=TaskStatus.PENDING, attempts=0
    )
    assert scheduled.run_at is not None
    pq_store.put_many([pending, scheduled])
    rows = sql(
        pq_url,
        "SELECT task_name, args, queue_name, status::text, scheduled_at FROM procrastinate_jobs ORDER BY id",
    )
    assert [
        (pending.type, pending.payload, "default", "todo", None),
        (scheduled.type, scheduled.payload, "default", "todo", scheduled.run_at),
    ] == rows
    events = sql(pq_url, "SELECT type::text FROM procrastinate_events ORDER BY id")
    assert ["deferred", "deferred", "scheduled"] == sorted(str(e[0]) for e in events)


@pytest.mark.parametrize(
    ("status", "job_status", "event"),
    [
        (TaskStatus.COMPLETED, "succeeded", "cancelled"),  # finished elsewhere: Procrastinate says cancelled
        (TaskStatus.FAILED, "failed", "cancelled"),
        (TaskStatus.CANCELLED, "cancelled", "cancelled"),
        (TaskStatus.RUNNING, "doing", "started"),
    ],
)
def test_statuses_map_onto_procrastinates(
    pq_store: ProcrastinateTaskStore, pq_url: str, status: TaskStatus, job_status: str, event: str
) -> None:
    [record] = make_records(["k"])
    pq_store.put(changed(record, status=TaskStatus.PENDING, attempts=0))
    assert pq_store.set_progress("k", status, 2, T0)
    assert [(job_status, 2)] == sql(pq_url, "SELECT status::text, attempts FROM procrastinate_jobs")
    assert event == sql(pq_url, "SELECT type::text FROM procrastinate_events ORDER BY id DESC LIMIT 1")[0][0]
    stored = pq_store.get("k")
    assert stored is not None
    assert (status, 2, record.checksum()) == (stored.status, stored.attempts, stored.checksum())


def test_aborted_reads_as_cancelled_and_aborting_is_refused(
    pq_store: ProcrastinateTaskStore, pq_url: str
) -> None:
    [record] = make_records(["k"])
    pq_store.put(changed(record, status=TaskStatus.RUNNING))
    sql(pq_url, "UPDATE procrastinate_jobs SET status = 'aborted'")
    stored = pq_store.get("k")
    assert stored is not None
    assert TaskStatus.CANCELLED is stored.status
    sql(pq_url, "UPDATE procrastinate_jobs SET status = 'aborting'")
    with pytest.raises(DataError, match="'aborting'"):
        pq_store.get("k")


def test_a_job_procrastinate_deferred_itself_is_a_task_with_a_reserved_key(
    pq_store: ProcrastinateTaskStore, pq_url: str
) -> None:
    """A job deferred through Procrastinate's own function, by code that knows nothing of the
    migration, is seen: keyed by its id, created when it was deferred, merged into the scan in
    key order, and its progress can be set (a hand-over)."""
    pq_store.put_many(make_records(["a", "zzz"]))
    [(job_id,)] = sql(
        pq_url,
        "SELECT (procrastinate_defer_jobs_v1(ARRAY[ROW('default', 'app.report', 0, NULL, NULL,"
        " '{\"n\": 1}'::jsonb, NULL)::procrastinate_job_to_defer_v1]))[1]",
    )
    key = f"{JOB_KEY_PREFIX}{job_id:020d}"
    assert ["a", key, "zzz"] == [r.key for r in pq_store.scan(None, 10)]
    assert [key] == [r.key for r in pq_store.scan("a", 1)]
    assert ["zzz"] == [r.key for r in pq_store.scan(key, 10)]
    found = pq_store.get(key)
    assert found is not None
    assert ("app.report", {"n": 1}, TaskStatus.PENDING) == (found.type, found.payload, found.status)
    assert 1 == pq_store.set_progress_many(
        [ProgressUpdate(key, TaskStatus.CANCELLED, 1, T0, TaskStatus.PENDING)]
    )
    again = pq_store.get(key)
    assert again is not None
    assert (TaskStatus.CANCELLED, found.checksum()) == (again.status, again.checksum())
    assert 3 == pq_store.count()


def test_a_reserved_key_never_creates_a_job(pq_store: ProcrastinateTaskStore, pq_url: str) -> None:
    [record] = make_records([f"{JOB_KEY_PREFIX}{7:020d}"])
    with pytest.raises(DataError, match="reserved"):
        pq_store.put(record)
    assert [] == sql(pq_url, "SELECT id FROM procrastinate_jobs")


def test_updated_at_follows_procrastinates_own_later_events(
    pq_store: ProcrastinateTaskStore, pq_url: str
) -> None:
    """The updated_at written reads back until Procrastinate moves the job; then its event's time."""
    [record] = make_records(["k"])
    pq_store.put(changed(record, status=TaskStatus.PENDING))
    sql(pq_url, "SELECT procrastinate_finish_job_v1(id, 'succeeded', false) FROM procrastinate_jobs")
    [(at,)] = sql(pq_url, "SELECT max(at) FROM procrastinate_events")
    stored = pq_store.get("k")
    assert stored is not None
    assert (TaskStatus.COMPLETED, at) == (stored.status, stored.updated_at)


def test_a_job_procrastinate_deleted_takes_its_task_with_it(
    pq_store: ProcrastinateTaskStore, pq_url: str
) -> None:
    pq_store.put_many(make_records(["a", "b"]))
    sql(
        pq_url,
        "DELETE FROM procrastinate_jobs"
        " WHERE id = (SELECT job_id FROM mfsm_procrastinate_tasks WHERE key = 'a')",
    )
    assert ["b"] == [r.key for r in pq_store.scan(None, 10)]
    assert pq_store.get("a") is None


def test_queues_limit_the_store_to_its_jobs(pq_url: str) -> None:
    mine = ProcrastinateTaskStore(pq_url, queue="mail", queues=["mail"])
    everything = ProcrastinateTaskStore(pq_url)
    try:
        everything.put_many(make_records(["other"]))
        mine.put_many(make_records(["m1", "m2"]))
        assert ["m1", "m2"] == [r.key for r in mine.scan(None, 10)]
        assert mine.get("other") is None
        assert 2 == sum(mine.count_by_status().values())
        assert 3 == everything.count()
    finally:
        mine.close()
        everything.close()


def test_task_names_map_an_old_systems_names(pq_store: ProcrastinateTaskStore, pq_url: str) -> None:
    store = ProcrastinateTaskStore(pq_url, task_names={"mail.send.0": "app.tasks.send"})
    try:
        [record] = make_records(["k"])
        store.put(record)
        assert [("app.tasks.send",)] == sql(pq_url, "SELECT task_name FROM procrastinate_jobs")
        assert record == store.get("k")
    finally:
        store.close()


def test_setup_checks_name_the_fix(pg_database: str, pq_url: str) -> None:
    ready = ProcrastinateTaskStore(pq_url)
    bare = ProcrastinateTaskStore(pg_database)
    try:
        assert [] == ready.check_setup()
        sql(pq_url, "DROP TABLE mfsm_procrastinate_tasks")
        [problem] = ready.check_setup()
        assert "python -m migration_fsm.adapters.procrastinate setup" in problem
        [problem] = bare.check_setup()
        assert "procrastinate schema --apply" in problem
    finally:
        ready.close()
        bare.close()


@pytest.mark.parametrize(
    ("after", "first"),
    [
        (None, 0),
        ("a", 0),
        ("procrastinate-job", 0),
        (JOB_KEY_PREFIX, 0),
        (f"{JOB_KEY_PREFIX}{41:020d}", 42),
        (f"{JOB_KEY_PREFIX}{41:020d}x", 42),
        (f"{JOB_KEY_PREFIX}00012", 12 * 10**15),
        (f"{JOB_KEY_PREFIX}00012-", 12 * 10**15),
        (f"{JOB_KEY_PREFIX}00012~", 13 * 10**15),
        (f"{JOB_KEY_PREFIX}99~", None),
        (f"{JOB_KEY_PREFIX}~", None),
        ("procrastinate-jobz", None),
        ("zzz", None),
    ],
)
def test_the_unregistered_scan_starts_at_the_first_key_after(after: str | None, first: int | None) -> None:
    """The keyset bound agrees with Python's string order of the reserved keys."""
    assert first == _first_job_id_after(after)
    if first is not None and after is not None:
        assert f"{JOB_KEY_PREFIX}{first:020d}" > after
        if first:
            assert f"{JOB_KEY_PREFIX}{first - 1:020d}" <= after


def test_put_forward_never_moves_a_finished_task_back(pq_store: ProcrastinateTaskStore) -> None:
    [record] = make_records(["k"])
    pq_store.put(changed(record, status=TaskStatus.COMPLETED))
    assert not pq_store.put_forward(
        changed(record, status=TaskStatus.PENDING, updated_at=T0 + timedelta(days=1))
    )
    stored = pq_store.get("k")
    assert stored is not None
    assert TaskStatus.COMPLETED is stored.status


def test_stores_reachable_refuses_a_store_not_set_up_and_names_the_fix(
    pq_url: str, tmp_path: Path, cli: Callable[..., CliResult]
) -> None:
    """`advance --dry-run` runs `stores_reachable`, which asks the adapter for its setup."""
    config = write_stores_config(
        tmp_path / "mfsm.toml",
        {
            "old": {"kind": "sql", "url": f"sqlite:///{tmp_path / 'old.db'}", "table": "tasks"},
            "new": {"kind": "migration_fsm.adapters.procrastinate:store", "url": pq_url},
        },
        extra=[f'database_url = "sqlite:///{tmp_path / "control.db"}"'],
    )
    create_task_table(f"sqlite:///{tmp_path / 'old.db'}", "tasks")
    assert 0 == cli("db", "upgrade", "--config", config).code
    assert 0 == cli("init", "--config", config).code
    ready = cli("advance", "--dry-run", "--config", config)
    assert 0 == ready.code, ready.stdout + ready.stderr
    sql(pq_url, "DROP TABLE mfsm_procrastinate_tasks")
    refused = cli("advance", "--dry-run", "--config", config)
    assert 1 == refused.code
    assert "new store not set up" in refused.stdout + refused.stderr
    assert "python -m migration_fsm.adapters.procrastinate setup" in refused.stdout + refused.stderr
