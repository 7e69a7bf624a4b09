"""Validation: exactly the injected differences among 100,000 tasks, none for a concurrent
writer, the CLI's report and exit codes, and the stored runs."""

from __future__ import annotations

import json
import random
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text

from migration_fsm.cli import cli
from migration_fsm.config import Settings, load_settings
from migration_fsm.fsm import Phase
from migration_fsm.journal import Journal, make_engine
from migration_fsm.journal.ledger import Ledger
from migration_fsm.migration import Migration
from migration_fsm.tasks.memory import MemoryTaskStore
from migration_fsm.tasks.records import TaskRecord, TaskStatus
from migration_fsm.tasks.sql import SqlTaskStore
from migration_fsm.tools import runs
from migration_fsm.tools.validate import classify, validate, validate_migration
from tests.support.cli import run_cli
from tests.support.clock import FakeClock
from tests.support.datatools import (
    MEMORY,
    create_task_table,
    hundred_thousand,
    memory_store,
    memory_stores,
    sql_stores,
    task,
    tasks,
    write_stores_config,
)


def _counts(records: list[TaskRecord]) -> dict[str, int]:
    found = Counter(str(r.status) for r in records)
    return {str(status): found.get(str(status), 0) for status in TaskStatus}


def test_finds_exactly_the_injected_differences_among_100000_tasks() -> None:
    """Missing, extra, mismatched (with fields) and status-only differences are each found exactly once."""
    base = list(hundred_thousand())
    changed = list(base)
    changed[20] = base[20].model_copy(update={"payload": {"to": "someone else"}})
    changed[30] = base[30].model_copy(update={"type": "sms", "status": TaskStatus.COMPLETED})
    changed[40] = base[40].model_copy(update={"created_at": base[40].created_at + timedelta(seconds=1)})
    changed[60] = base[60].model_copy(update={"status": TaskStatus.COMPLETED})
    changed[70] = base[70].model_copy(update={"attempts": 3})
    changed[80] = base[80].model_copy(update={"status": TaskStatus.FAILED, "attempts": 1})
    changed[90] = base[90].model_copy(update={"metadata": {"moved": True}, "updated_at": base[0].updated_at})
    for index in (99_999, 50_000, 10):
        del changed[index]
    extra = [task(100_001), base[500].model_copy(update={"key": "t0000500a"})]
    changed += extra
    report = validate(MemoryTaskStore("old", base), MemoryTaskStore("new", changed), settle=0)
    assert {
        "ok": False,
        "old_count": 100_000,
        "new_count": 99_999,
        "missing": 3,
        "extra": 2,
        "mismatched": 3,
        "status_differs": 3,
        "counts_by_status": {"old": _counts(base), "new": _counts(changed)},
        "samples": {
            "missing": ["t0000010", "t0050000", "t0099999"],
            "extra": ["t0000500a", "t0100001"],
            "mismatched": [
                {"key": "t0000020", "fields": ["payload"]},
                {"key": "t0000030", "fields": ["type", "status"]},
                {"key": "t0000040", "fields": ["created_at"]},
            ],
        },
        # Additive keys (issue 12): pending on old, finished on new (60 and 80; 30 is another
        # task); the ledger's figures are None when validate runs without it.
        "runnable_old_copies": 2,
        "executed_twice": None,
        "refused_executions": None,
        # How each key was compared: memory stores have no identity rows, so as records; the
        # 11 differences were re-read (90 differs in metadata and updated_at only: equal).
        "rows_by_path": {"in_database": 0, "raw": 0, "decoded": 0, "records": 99_991, "reread": 11},
    } == report.as_json()


def test_samples_are_the_first_n_in_key_order() -> None:
    """validate_sample_size caps each sample list; counts still cover every difference."""
    report = validate(MemoryTaskStore("old", tasks(50)), MemoryTaskStore("new"), sample_size=4, settle=0)
    assert (50, ["t0000000", "t0000001", "t0000002", "t0000003"]) == (report.missing, report.sample_missing)


def test_classify_ignores_updated_at_and_metadata() -> None:
    """Only identity and progress fields make a difference; `updated_at` and `metadata` do not."""
    a = task(1)
    assert classify(a, a.model_copy(update={"metadata": {"x": 1}, "updated_at": a.created_at})) is None
    assert ("status_differs", ["status"]) == classify(a, a.model_copy(update={"status": TaskStatus.RUNNING}))
    assert ("missing", []) == classify(a, None)
    assert ("extra", []) == classify(None, a)


def in_process(capsys: pytest.CaptureFixture[str], *args: str) -> int:
    """Run a CLI command in this process (no interpreter start-up); returns its exit code."""
    capsys.readouterr()
    code = cli.main(list(args), prog_name="migration-fsm", standalone_mode=False)
    assert isinstance(code, int)
    return code


class SlowScan(MemoryTaskStore):
    """A memory store whose pages take a few milliseconds, like a database's."""

    def scan(self, after: str | None, limit: int) -> Sequence[TaskRecord]:
        time.sleep(0.004)
        return super().scan(after, limit)


def test_a_concurrent_dual_writer_is_not_reported_as_a_difference() -> None:
    """Dual writes (inserts, status changes) landing during the scan are re-read, not reported."""
    base = list(hundred_thousand()[:20_000])
    old, new = SlowScan("old", base), SlowScan("new", base)
    stop = threading.Event()
    written = 0

    def writer() -> None:
        nonlocal written
        rng = random.Random(7)
        while not stop.is_set():
            i = rng.randrange(20_000)
            if written % 2:
                record = task(i).model_copy(update={"key": f"t{i:07d}w{written}"})
            else:
                record = task(i, status=rng.choice(list(TaskStatus)), attempts=rng.randrange(3))
            old.put(record)  # the authoritative side first, as DualWriter does
            new.put(record)
            written += 1
            stop.wait(0.0002)

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        report = validate(old, new, batch_size=200)
    finally:
        stop.set()
        thread.join()
    assert written > 200
    assert (0, 0, 0, 0) == (report.missing, report.extra, report.mismatched, report.status_differs)
    assert report.ok
    assert report.old_count == report.new_count


def test_a_write_in_flight_at_the_scan_tail_gets_its_whole_settle_time() -> None:
    """The newest difference waits its settle time too, not only the oldest of its batch: a
    task written to old whose write to new lands 0.1 s after the scan reached it (the tail of
    the key space, where a live producer writes) is not reported missing, even though an
    earlier difference of the same batch has long settled."""
    base = tasks(4000)
    old = SlowScan("old", [*base, task(9999)])  # t9999: the newest task, on old only so far
    early = base[0].model_copy(update={"status": TaskStatus.COMPLETED})  # settled long before
    landed = threading.Event()

    class Tail(SlowScan):
        def scan(self, after: str | None, limit: int) -> Sequence[TaskRecord]:
            page = super().scan(after, limit)
            if len(page) < limit and not landed.is_set():  # the scan reached the tail
                landed.set()
                threading.Timer(0.1, self.put, args=(task(9999),)).start()
            return page

    new = Tail("new", [early, *base[1:]])
    started = time.monotonic()
    report = validate(old, new, batch_size=50, settle=0.3)
    assert time.monotonic() - started > 0.3  # the scan outlasted the first difference's settle
    assert landed.is_set()
    assert (0, 0, 1) == (report.missing, report.mismatched, report.status_differs)
    assert report.ok


def test_validate_cli_reports_records_the_run_and_exits_by_verdict(
    upgraded_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`validate --json` exits 1 while tasks are missing, 0 once fixed; every run is stored."""
    create_task_table(upgraded_url, "old_tasks")
    create_task_table(upgraded_url, "new_tasks")
    records = tasks(300, mixed=True)
    with (
        SqlTaskStore(upgraded_url, "old_tasks", name="old") as old,
        SqlTaskStore(upgraded_url, "new_tasks", name="new") as new,
    ):
        old.put_many(records)
        new.put_many(
            [r for r in records if r.key not in ("t0000005", "t0000006")]
            + [task(999), records[7].model_copy(update={"type": "sms"})]
        )
    config = write_stores_config(tmp_path / "mfsm.toml", sql_stores(upgraded_url))
    with Journal.open(upgraded_url) as store:
        Migration(store, load_settings(None, database_url=upgraded_url, actor="tester"), "default").init()
    common = ("--db", upgraded_url, "--config", config)
    bad = run_cli("validate", "--json", *common)
    assert 1 == bad.code, bad.stderr
    doc = json.loads(bad.stdout)
    assert (False, 300, 299, 2, 1, 1) == (
        doc["ok"],
        doc["old_count"],
        doc["new_count"],
        doc["missing"],
        doc["extra"],
        doc["mismatched"],
    )
    assert {"missing": ["t0000005", "t0000006"], "extra": ["t0000999"]} == {
        k: doc["samples"][k] for k in ("missing", "extra")
    }
    assert [{"key": "t0000007", "fields": ["type"]}] == doc["samples"]["mismatched"]
    # Additive keys (issue 12): nothing ran on new, and the ledger has no execution yet.
    assert (0, 0, 0) == (doc["runnable_old_copies"], doc["executed_twice"], doc["refused_executions"])
    with SqlTaskStore(upgraded_url, "new_tasks", name="new") as new:
        new.put_many(records[5:8])
    assert 0 == in_process(capsys, "validate", *common)
    human = capsys.readouterr().out
    assert "validation: ok" in human
    assert "t0000999" in human  # the extra task is still reported
    assert "executed_twice" in human
    assert "refused_executions" in human
    assert "runnable_old_copies" in human
    assert 0 == in_process(capsys, "history", *common)
    rows = [
        line for line in capsys.readouterr().out.split("validate runs")[1].splitlines() if "prepar" in line
    ]
    assert [True, False] == ["NOT OK" in row for row in rows]  # both runs, oldest first
    with Journal.open(upgraded_url) as store:
        latest = runs.latest_validation(store, "default")
    assert latest is not None
    assert (True, "preparation", 0, 1) == (
        latest.ok,
        latest.phase,
        latest.summary["missing"],
        latest.summary["extra"],
    )


def test_a_mismatch_alone_is_not_ok_and_the_cli_exits_1(upgraded_url: str, tmp_path: Path) -> None:
    """A differing identity with nothing missing still fails: `ok` is False (the report and
    the stored run) and `validate` exits 1."""
    records = tasks(20)
    changed = [*records[:3], records[3].model_copy(update={"payload": {"to": "someone else"}}), *records[4:]]
    report = validate(MemoryTaskStore("old", records), MemoryTaskStore("new", changed), settle=0)
    assert (0, 0, 1, False) == (report.missing, report.extra, report.mismatched, report.ok)
    assert report.as_json()["ok"] is False

    create_task_table(upgraded_url, "old_tasks")
    create_task_table(upgraded_url, "new_tasks")
    with (
        SqlTaskStore(upgraded_url, "old_tasks", name="old") as old,
        SqlTaskStore(upgraded_url, "new_tasks", name="new") as new,
    ):
        old.put_many(records)
        new.put_many(changed)
    config = write_stores_config(tmp_path / "mfsm.toml", sql_stores(upgraded_url))
    with Journal.open(upgraded_url) as store:
        Migration(store, load_settings(None, database_url=upgraded_url, actor="tester"), "default").init()
    result = run_cli("validate", "--json", "--db", upgraded_url, "--config", config)
    assert 1 == result.code, result.stderr
    doc = json.loads(result.stdout)
    assert (False, 0, 1) == (doc["ok"], doc["missing"], doc["mismatched"])
    with Journal.open(upgraded_url) as store:
        latest = runs.latest_validation(store, "default")
    assert latest is not None
    assert latest.ok is False


def test_a_run_at_difference_alone_is_a_mismatch() -> None:
    """Two copies that differ only in `run_at` (same type, payload and created_at, same
    status) hold different identities: the raw comparison cannot settle them as equal."""
    records = tasks(5)
    at = records[0].created_at + timedelta(hours=1)
    changed = [*records[:2], records[2].model_copy(update={"run_at": at}), *records[3:]]
    report = validate(MemoryTaskStore("old", records), MemoryTaskStore("new", changed), settle=0)
    assert (0, 0, 1, 0) == (report.missing, report.extra, report.mismatched, report.status_differs)
    assert [{"key": "t0000002", "fields": ["run_at"]}] == report.sample_mismatched


def test_json_types_of_a_decoded_payload_are_part_of_its_identity() -> None:
    """Payloads that Python's `==` calls equal but whose JSON differs (`true` and `1`, `1` and
    `1.0`) are mismatches, inside a run of equal rows as well as alone; equal JSON is not."""
    records = tasks(40)
    changed = list(records)
    for i, value in ((10, True), (11, 1.0), (39, 1)):
        records[i] = records[i].model_copy(update={"payload": {"n": 1}})
        changed[i] = changed[i].model_copy(update={"payload": {"n": value}})
    report = validate(MemoryTaskStore("old", records), MemoryTaskStore("new", changed), settle=0)
    assert ["t0000010", "t0000011"] == [s["key"] for s in report.sample_mismatched]
    assert (0, 0, 2, False) == (report.missing, report.extra, report.mismatched, report.ok)


def test_every_sample_is_capped_at_the_sample_size() -> None:
    """`sample_size` caps the extra and mismatched samples too; the counts cover everything."""
    records = tasks(6)
    changed = [r.model_copy(update={"type": "sms"}) for r in records[:3]] + tasks(3, start=10)
    report = validate(
        MemoryTaskStore("old", records[:3]), MemoryTaskStore("new", changed), sample_size=2, settle=0
    )
    assert (3, ["t0000010", "t0000011"]) == (report.extra, report.sample_extra)
    assert (3, ["t0000000", "t0000001"]) == (report.mismatched, [s["key"] for s in report.sample_mismatched])


# -- validate_migration: the configured stores, the execution ledger, the stored run --------

M = "default"


class ScanRecorder(MemoryTaskStore):
    """A memory store that remembers how many rows each `scan` asked for."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.limits: list[int] = []

    def scan(self, after: str | None, limit: int) -> Sequence[TaskRecord]:
        self.limits.append(limit)
        return super().scan(after, limit)


@pytest.fixture
def memory_sides(store: Journal, make_settings: Callable[..., Settings]) -> Iterator[Settings]:
    """Settings naming the shared memory stores (`old`, `new`), the migration initialised."""
    MEMORY.clear()
    settings = make_settings(stores=memory_stores(), backfill_batch_size=2, drain_timeout_seconds=0.2)
    Migration(store, settings, M).init()
    yield settings
    MEMORY.clear()


def _succeeded_on_new(ledger: Ledger, *keys: str) -> None:
    for key in keys:
        claim = ledger.claim(M, key, "new", "new-worker").claim
        assert claim is not None
        ledger.finish(claim, "succeeded")


def test_validate_migration_passes_its_settings_and_records_the_run(
    store: Journal, memory_sides: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The scan reads `backfill_batch_size` rows at a time and re-reads the differences in
    batches of that size, each difference at least `settle` seconds after it was seen (a
    batch that settled while the scan went on is re-read without a wait); the samples hold
    at most `validate_sample_size` keys; the stored run holds the report and its duration."""
    from migration_fsm.tools import validate as validate_module

    clock = FakeClock()
    monkeypatch.setattr(validate_module, "time", clock)
    old = MEMORY["old"] = ScanRecorder("old")
    old.put_many(tasks(5))
    settings = memory_sides.model_copy(update={"validate_sample_size": 1})
    settle = 2**-10  # exact in binary: the sums below are too
    run_id, report = validate_migration(store, settings, M, settle=settle)
    assert {2} == set(old.limits)
    assert (5, ["t0000000"]) == (report.missing, report.sample_missing)
    # 5 differences, all seen at one moment of the fake clock: at 4 waiting the first 2 wait
    # out their settle time; the next 2 have settled by then; the last waits its own.
    assert [settle] * 2 == clock.slept
    assert 0.002 == report.seconds  # 0.001953125 s, to the millisecond
    latest = runs.latest_validation(store, M)
    assert latest is not None
    assert (run_id, False, "preparation") == (latest.id, latest.ok, latest.phase)
    assert {**report.as_json(), "seconds": 0.002} == latest.summary


def test_validate_migration_adds_the_ledger_s_figures_while_old_consumes(
    store: Journal, memory_sides: Settings
) -> None:
    """Before cutover (old consumes): the runnable old copies are those whose new copy
    finished plus those the ledger alone says succeeded on new; the tasks new merely holds
    are old's to run. `executed_twice` and `refused_executions` come from the ledger."""
    old, new = memory_store("old"), memory_store("new")
    old.put_many(tasks(6, start=1))
    new.put_many([task(1, status=TaskStatus.COMPLETED, attempts=1), *tasks(5, start=2)])
    with Ledger(memory_sides.database_url, engine=store.engine) as ledger:
        _succeeded_on_new(ledger, "t0000002", "t0000003", "t0000004")
        for key in ("t0000002", "t0000003"):
            assert not ledger.claim(M, key, "old", "old-worker").allowed  # refused, counted
    report = validate_migration(store, memory_sides, M, settle=0)[1]
    assert (4, 0, 2) == (report.runnable_old_copies, report.executed_twice, report.refused_executions)
    assert (0, 0, 0, 1) == (report.missing, report.extra, report.mismatched, report.status_differs)


def test_validate_migration_counts_every_old_copy_new_owns_once_new_consumes(
    store: Journal, memory_sides: Settings
) -> None:
    """From cutover (new consumes) every task with a new copy is new's: each runnable old copy
    counts (what `retire_old` retires), at any percent, except one the ledger says runs on
    old; a key the ledger knows is counted once."""
    engine = Migration(store, memory_sides.model_copy(update={"guards": {"dual_write->cutover": []}}), M)
    engine.advance()
    engine.advance()
    assert (Phase.CUTOVER, 0) == (store.get(M).phase, store.get(M).percent)
    old, new = memory_store("old"), memory_store("new")
    old.put_many(tasks(5, start=1))
    new.put_many([task(1, status=TaskStatus.COMPLETED, attempts=1), *tasks(4, start=2)])
    with Ledger(memory_sides.database_url, engine=store.engine) as ledger:
        _succeeded_on_new(ledger, "t0000002")
        assert not ledger.claim(M, "t0000002", "old", "old-worker").allowed
        assert ledger.claim(M, "t0000003", "old", "old-worker").allowed  # runs on old: not new's yet
    report = validate_migration(store, memory_sides, M, settle=0)[1]
    assert (4, 0, 1) == (report.runnable_old_copies, report.executed_twice, report.refused_executions)


def test_validate_migration_reads_the_ledger_where_ledger_url_says(
    store: Journal, memory_sides: Settings, tmp_path: Path
) -> None:
    """With `ledger_url` the figures come from that database, not the migration database;
    a ledger that cannot be reached leaves them None and the store's own count stands."""
    old, new = memory_store("old"), memory_store("new")
    old.put_many(tasks(3))
    new.put_many([task(0, status=TaskStatus.COMPLETED, attempts=1), *tasks(2, start=1)])
    with Ledger(memory_sides.database_url, engine=store.engine) as ledger:
        _succeeded_on_new(ledger, "t0000001")  # in the migration database: not the ledger's
        assert not ledger.claim(M, "t0000001", "old", "old-worker").allowed
    ledger_url = f"sqlite:///{tmp_path / 'ledger.db'}"
    Journal(ledger_url, engine=make_engine(ledger_url, create=True)).upgrade()
    with Ledger(ledger_url) as ledger:
        _succeeded_on_new(ledger, "t0000002")
        for _ in range(3):
            assert not ledger.claim(M, "t0000002", "old", "old-worker").allowed
    elsewhere = memory_sides.model_copy(update={"ledger_url": ledger_url})
    report = validate_migration(store, elsewhere, M, settle=0)[1]
    assert (2, 0, 3) == (report.runnable_old_copies, report.executed_twice, report.refused_executions)
    gone = memory_sides.model_copy(update={"ledger_url": f"sqlite:///{tmp_path / 'absent.db'}"})
    report = validate_migration(store, gone, M, settle=0)[1]
    assert (1, None, None) == (report.runnable_old_copies, report.executed_twice, report.refused_executions)
    assert not (tmp_path / "absent.db").exists()


@pytest.mark.parametrize("batch_size", [1000, 2], ids=["re-read-at-the-end", "re-read-during-the-scan"])
def test_the_counts_follow_the_re_read(batch_size: int) -> None:
    """A difference is counted as its re-read found it: a copy deleted after the scan is not
    counted, and one written after the scan (a dual write in flight) is; whether the re-read
    comes after the scan or during it (a full batch of differences)."""
    records = tasks(10)
    new = MemoryTaskStore("new", [r for r in records if r.key != "t0000007"])
    new.put(task(3, status=TaskStatus.COMPLETED, attempts=1))

    class ReReadAfterWrites(MemoryTaskStore):
        def get_many(self, keys: Sequence[str]) -> dict[str, TaskRecord]:  # the re-read
            if self.get("t0000003") is not None:
                self.delete("t0000003")
                new.put(task(7))
            return super().get_many(keys)

    report = validate(ReReadAfterWrites("old", records), new, settle=0, batch_size=batch_size)
    assert (9, 10) == (report.old_count, report.new_count)
    none = dict.fromkeys(TaskStatus, 0)
    assert {**none, TaskStatus.PENDING: 9} == report.counts_old
    assert {**none, TaskStatus.PENDING: 9, TaskStatus.COMPLETED: 1} == report.counts_new
    assert (0, 1, ["t0000003"], 0) == (
        report.missing,
        report.extra,
        report.sample_extra,
        report.status_differs,
    )


def test_validate_reads_1000_rows_at_a_time_and_samples_20_keys_by_default() -> None:
    """The defaults of `validate`: pages of 1000 rows, samples of 20 keys."""
    old = ScanRecorder("old")
    old.put_many(tasks(25))
    report = validate(old, MemoryTaskStore("new"), settle=0)
    assert ({1000}, 25, 20) == (set(old.limits), report.missing, len(report.sample_missing))


def test_waiting_differences_are_re_read_once_half_a_batch_settled_or_two_batches_wait(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`recheck_settled`: the differences whose settle time has passed are re-read when they
    make half a batch (rounded down, at least one); otherwise, at two batches waiting, the
    oldest batch is (after its settle time). On a test clock: "settled" is seen more than
    `settle` seconds ago."""
    from migration_fsm.tools import validate as validate_module

    clock = FakeClock()
    monkeypatch.setattr(validate_module, "time", clock)

    def rechecked(batch_size: int, settled: int, young: int) -> list[int | None]:
        validation = validate_module._Validation(MemoryTaskStore(), MemoryTaskStore(), 1, settle=10.0)
        validation.batch_size = batch_size
        validation.pending = [
            (f"k{i:03}", None, TaskStatus.PENDING, clock.now - (10.5 if i < settled else 9.5))
            for i in range(settled + young)
        ]
        counts: list[int | None] = []
        monkeypatch.setattr(validation, "recheck", counts.append)
        validation.recheck_settled()
        return counts

    assert [] == rechecked(7, 2, 11)  # under half of 7 settled, under two batches waiting
    assert [3] == rechecked(7, 3, 10)  # half of 7, rounded down: those 3
    assert [5] == rechecked(7, 5, 0)
    assert [7] == rechecked(7, 0, 14)  # two batches waiting, none settled: the oldest 7
    assert [] == rechecked(7, 0, 13)
    assert [1] == rechecked(3, 1, 0)  # half of 3 is 1
    assert [1] == rechecked(1, 1, 0)  # half of 1 rounds to 0: at least one


def test_the_comparison_in_the_database_pages_and_counts_as_one_page_does(upgraded_url: str) -> None:
    """`scan_joined` reads the join `batch_size * 20` rows at a time: with 65 tasks and a batch
    of 1 (four pages) the report is the one of a single page, whole (counts, samples, paths);
    a payload in another key order is equal by its checksum (decoded)."""
    create_task_table(upgraded_url, "old_tasks")
    create_task_table(upgraded_url, "new_tasks")
    records = tasks(65, mixed=True)
    ran = records[50].model_copy(update={"status": TaskStatus.RUNNING, "attempts": records[50].attempts + 1})
    with (
        SqlTaskStore(upgraded_url, "old_tasks", name="old") as old,
        SqlTaskStore(upgraded_url, "new_tasks", name="new") as new,
    ):
        old.put_many(records)
        new.put_many(
            [r for r in records if r.key not in ("t0000005", "t0000030", "t0000050")]
            + [task(999), records[7].model_copy(update={"type": "sms"}), ran]
        )
        new.put(records[40].model_copy(update={"metadata": {"other": 1}}))  # neither is compared
        new.put(records[60].model_copy(update={"run_at": records[60].created_at}))  # a run_at difference
        new.put(records[41].model_copy(update={"updated_at": records[41].updated_at + timedelta(seconds=1)}))
        reordered = json.dumps({"tags": ["a", "b"], "n": 21, "to": "user21@example.com"})
        engine = make_engine(upgraded_url)
        with engine.begin() as conn:
            conn.execute(text("UPDATE new_tasks SET payload = :p WHERE key = 't0000021'"), {"p": reordered})
        engine.dispose()
        paged = validate(old, new, batch_size=1, settle=0).as_json()
        whole = validate(old, new, batch_size=1000, settle=0).as_json()
    assert whole == paged
    assert (65, 64, 2, 1, 2, 1) == (
        paged["old_count"],
        paged["new_count"],
        paged["missing"],
        paged["extra"],
        paged["mismatched"],
        paged["status_differs"],
    )
    assert {"in_database": 59, "raw": 0, "decoded": 1, "records": 0, "reread": 6} == paged["rows_by_path"]
    on_new = [r for r in records if r.key not in ("t0000005", "t0000030", "t0000050")] + [task(999), ran]
    assert {
        "old": dict(Counter(str(r.status) for r in records)),
        "new": dict(Counter(str(r.status) for r in on_new)),
    } == paged["counts_by_status"]
    assert [{"key": "t0000007", "fields": ["type"]}, {"key": "t0000060", "fields": ["run_at"]}] == paged[
        "samples"
    ]["mismatched"]


def test_a_difference_gone_at_its_re_read_is_not_reported(upgraded_url: str) -> None:
    """A task the scan saw differ (new further along) whose new copy is put back before the
    re-read of the raw identity rows: equal then, so no difference is reported."""
    create_task_table(upgraded_url, "old_tasks")
    create_task_table(upgraded_url, "new_tasks")
    records = tasks(3)
    ahead = records[2].model_copy(update={"status": TaskStatus.RUNNING, "attempts": 1})

    class Settling(SqlTaskStore):
        def identities_of(self, keys: Sequence[str]) -> dict[str, Any]:
            self.put(records[2])  # the write in flight lands before the re-read
            return super().identities_of(keys)

    with (
        SqlTaskStore(upgraded_url, "old_tasks", name="old") as old,
        Settling(upgraded_url, "new_tasks", name="new") as new,
    ):
        old.put_many(records)
        new.put_many([*records[:2], ahead])
        report = validate(old, new, settle=0)
    assert (True, 0, 0, 0, 0, 1) == (
        report.ok,
        report.missing,
        report.extra,
        report.mismatched,
        report.status_differs,
        report.paths["reread"],
    )


def test_equal_raw_rows_compared_in_python_count_as_raw(upgraded_url: str) -> None:
    create_task_table(upgraded_url, "old_tasks")
    create_task_table(upgraded_url, "new_tasks")
    with (
        SqlTaskStore(upgraded_url, "old_tasks", name="old") as old,
        SqlTaskStore(upgraded_url, "new_tasks", name="new") as new,
    ):
        old.put_many(tasks(4))
        new.put_many(tasks(4))
        paths = validate(old, new, settle=0, in_database=False).paths
    assert (4, 0) == (paths["raw"], paths["records"])
