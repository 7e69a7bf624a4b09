"""Backfill: keyset batches, a checkpoint per batch, throttling, resuming after SIGKILL."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace
from pathlib import Path

import click
import pytest

from migration_fsm import fsm
from migration_fsm.cli import cli
from migration_fsm.config import load_settings
from migration_fsm.exceptions import BadInput, ConfigError, DataError
from migration_fsm.fsm import Phase
from migration_fsm.journal import Journal, make_engine
from migration_fsm.migration import Migration
from migration_fsm.tasks.factory import build_store
from migration_fsm.tasks.memory import MemoryTaskStore
from migration_fsm.tasks.records import TaskRecord
from migration_fsm.tasks.sql import SqlTaskStore
from migration_fsm.tools import runs
from migration_fsm.tools.backfill import backfill_migration, copy_tasks
from migration_fsm.tools.validate import validate
from tests.support.cli import ROOT, CliResult
from tests.support.datatools import (
    MEMORY,
    create_task_table,
    everything,
    memory_store,
    memory_stores,
    row_counts,
    sql_stores,
    tasks,
    write_stores_config,
)


class Crash(BaseException):
    """Stands for the process dying: no `except Exception` can swallow it."""


class SpyStore(MemoryTaskStore):
    """A memory store that records each scan's limit and can crash on a given `put_many`."""

    def __init__(
        self, name: str, records: Sequence[TaskRecord] = (), crash_on_put: int | None = None
    ) -> None:
        self.limits: list[int] = []
        self.puts: list[list[str]] = []
        self.crash_on_put = crash_on_put
        super().__init__(name, records)
        self.puts.clear()

    def scan(self, after: str | None, limit: int) -> Sequence[TaskRecord]:
        self.limits.append(limit)
        return super().scan(after, limit)

    def put_many(self, records: Sequence[TaskRecord]) -> int:
        if self.crash_on_put is not None and len(self.puts) + 1 == self.crash_on_put:
            self.crash_on_put = None
            raise Crash
        self.puts.append([r.key for r in records])
        return super().put_many(records)


def test_batches_checkpoint_each_batch_and_read_one_batch_at_a_time() -> None:
    """Each batch is one put_many, then a checkpoint of its last key; no scan asks for more than a batch."""
    old = SpyStore("old", tasks(230))
    new = SpyStore("new")
    checkpoints: list[tuple[str, int]] = []
    result = copy_tasks(old, new, batch_size=50, checkpoint=lambda key, n: checkpoints.append((key, n)))
    assert [("t0000049", 50), ("t0000099", 100), ("t0000149", 150), ("t0000199", 200), ("t0000229", 230)] == (
        checkpoints
    )
    assert {50} == set(old.limits)
    assert [50, 50, 50, 50, 30] == [len(keys) for keys in new.puts]
    assert (230, 230, None) == (result.copied, result.total, result.resumed_from)
    assert everything(old) == everything(new)


def test_max_rate_caps_the_rows_per_second() -> None:
    """--max-rate 400 makes 200 rows take about half a second, in batches no larger than the rate."""
    old, new = SpyStore("old", tasks(200)), SpyStore("new")
    started = time.monotonic()
    result = copy_tasks(old, new, batch_size=1000, max_rate=400)
    elapsed = time.monotonic() - started
    assert 200 == result.copied
    assert elapsed >= 0.45
    assert result.rows_per_second <= 450
    assert max(old.limits) <= 400


def test_a_crash_mid_run_resumes_from_the_checkpoint_rewriting_at_most_one_batch() -> None:
    """After a crash the next run starts after the last checkpoint; the copy equals the old side."""
    old = SpyStore("old", tasks(500, mixed=True))
    new = SpyStore("new", crash_on_put=4)
    checkpoints: list[str] = []
    with pytest.raises(Crash):
        copy_tasks(old, new, batch_size=100, checkpoint=lambda key, n: checkpoints.append(key))
    assert ["t0000099", "t0000199", "t0000299"] == checkpoints
    result = copy_tasks(old, new, batch_size=100, after=checkpoints[-1])
    assert ("t0000299", 200) == (result.resumed_from, result.copied)
    assert everything(old) == everything(new)
    written = [key for keys in new.puts for key in keys]
    assert len(written) == len(set(written))


def test_duplicate_or_unordered_keys_stop_the_backfill_naming_store_and_key() -> None:
    """A key returned twice is a DataError naming the store and the key; that page is not written."""

    class Repeating(MemoryTaskStore):
        def scan(self, after: str | None, limit: int) -> Sequence[TaskRecord]:
            page = list(super().scan(after, limit))
            return [*page, page[-1]] if page else page

    new = MemoryTaskStore("new")
    with pytest.raises(DataError, match=r"store 'legacy' returned key 't0000009' after 't0000009'"):
        copy_tasks(Repeating("legacy", tasks(10)), new, batch_size=20)
    assert 0 == len(new)


def test_backfill_without_stores_is_a_config_error(store: Journal) -> None:
    """No [stores.old] configured: ConfigError (exit 2) saying what to configure."""
    with pytest.raises(ConfigError, match=r"no \[stores.old\] table"):
        backfill_migration(store, load_settings(None, database_url=store.url), "default")


def test_backfill_records_progress_and_a_finished_run_starts_fresh(engine_with_memory: Journal) -> None:
    """The CLI's backfill checkpoints in mfsm_backfill; once it has finished, the next run starts over."""
    store = engine_with_memory
    settings = load_settings(None, database_url=store.url, stores=memory_stores())
    memory_store("old").put_many(tasks(120))
    first = backfill_migration(store, settings, "default", batch_size=50)
    progress = runs.backfill_progress(store, "default")
    assert progress is not None
    assert (120, 120, None) == (first.copied, first.total, first.resumed_from)
    assert ("t0000119", 120, True) == (progress.cursor, progress.copied, progress.done)
    runs.save_backfill(store, "default", cursor="t0000049", copied=50)  # as if killed after a batch
    resumed = backfill_migration(store, settings, "default", batch_size=50)
    assert ("t0000049", 70) == (resumed.resumed_from, resumed.copied)
    progress = runs.backfill_progress(store, "default")
    assert progress is not None
    # The stored count goes on from the checkpoint's: 50 before the kill, 70 since.
    assert ("t0000119", 120, True) == (progress.cursor, progress.copied, progress.done)
    fresh = backfill_migration(store, settings, "default", batch_size=50)
    assert (None, 120) == (fresh.resumed_from, fresh.copied)


def test_a_resumed_backfill_killed_again_keeps_its_count(
    engine_with_memory: Journal, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each checkpoint of a resumed run stores the whole count so far, not this run's alone:
    killed once more after a batch, the progress says 75 of 120, not 25."""
    store = engine_with_memory
    settings = load_settings(None, database_url=store.url, stores=memory_stores())
    memory_store("old").put_many(tasks(120))
    runs.start_backfill(store, "default")
    runs.save_backfill(store, "default", cursor="t0000049", copied=50)  # as if killed after a batch
    new = memory_store("new")
    put_many = new.put_many
    batches: list[int] = []

    def dies_on_the_second_batch(records: Sequence[TaskRecord]) -> int:
        batches.append(len(records))
        if len(batches) == 2:
            raise Crash
        return put_many(records)

    monkeypatch.setattr(new, "put_many", dies_on_the_second_batch)
    with pytest.raises(Crash):
        backfill_migration(store, settings, "default", batch_size=25)
    progress = runs.backfill_progress(store, "default")
    assert progress is not None
    assert ("t0000074", 75, False) == (progress.cursor, progress.copied, progress.done)


def test_backfill_is_allowed_while_routing_makes_old_authoritative(
    engine_with_memory: Journal, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Whether backfill may run follows the routing table, not a list of phase names: made
    authoritative in preparation, the new side is protected there too, and the message names
    the phases where old is still authoritative."""
    store = engine_with_memory
    settings = load_settings(None, database_url=store.url, stores=memory_stores())
    memory_store("old").put_many(tasks(3))
    assert "old" == fsm.ROUTING[Phase.PREPARATION].authoritative
    monkeypatch.setitem(
        fsm.ROUTING,
        Phase.PREPARATION,
        replace(fsm.ROUTING[Phase.PREPARATION], authoritative="new"),
    )
    with pytest.raises(BadInput, match=r"only safe in dual_write; .* roll back to dual_write first"):
        backfill_migration(store, settings, "default", batch_size=2)
    assert [] == list(memory_store("new").scan(None, 10))
    monkeypatch.undo()
    assert 3 == backfill_migration(store, settings, "default", batch_size=2).copied


@pytest.fixture
def engine_with_memory(store: Journal) -> Iterator[Journal]:
    """A migration `default` in `preparation`, with empty shared memory stores."""
    MEMORY.clear()
    Migration(store, load_settings(None, database_url=store.url, actor="tester"), "default").init()
    yield store
    MEMORY.clear()


# -- SIGKILL at random moments, on SQLite and PostgreSQL ------------------------------------


def _backfill_argv(url: str, config: str, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "migration_fsm",
        "backfill",
        "--db",
        url,
        "--config",
        config,
        "--batch-size",
        "40",
        *extra,
    ]


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MIGRATION_FSM_")}
    env["PYTHONPATH"] = str(ROOT)
    return env


def _wait_for_progress(store: Journal, beyond: int, proc: subprocess.Popen[bytes]) -> int:
    """Poll the backfill checkpoint until it passes `beyond` rows (or the process ends)."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and proc.poll() is None:
        progress = runs.backfill_progress(store, "default")
        if progress is not None and not progress.done and progress.copied > beyond:
            return progress.copied
        time.sleep(0.01)
    return beyond


@pytest.mark.slow
def test_backfill_killed_at_random_moments_resumes_to_an_identical_copy(
    upgraded_url: str, tmp_path: Path
) -> None:
    """SIGKILLed mid-copy again and again, then re-run: new == old, each key once, validate clean."""
    rng = random.Random(4)
    create_task_table(upgraded_url, "old_tasks")
    create_task_table(upgraded_url, "new_tasks")
    with SqlTaskStore(upgraded_url, "old_tasks", name="old") as old:
        old.put_many(tasks(1200, mixed=True))
    config = write_stores_config(tmp_path / "mfsm.toml", sql_stores(upgraded_url))
    kills, copied = 0, 0
    with Journal.open(upgraded_url) as store:
        Migration(store, load_settings(None, database_url=upgraded_url, actor="tester"), "default").init()
        for _ in range(3):
            proc = subprocess.Popen(  # throttled so that the kills land mid-copy
                _backfill_argv(upgraded_url, config, "--max-rate", "800"),
                env=_env(),
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            copied = _wait_for_progress(store, copied, proc)
            time.sleep(rng.uniform(0, 0.15))
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGKILL)
                kills += 1
            proc.wait(timeout=30)
        progress = runs.backfill_progress(store, "default")
    assert kills >= 2
    assert progress is not None
    assert not progress.done
    final = subprocess.run(
        [*_backfill_argv(upgraded_url, config), "--json"],
        env=_env(),
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    assert 0 == final.returncode, final.stderr
    doc = json.loads(final.stdout)
    assert {"copied", "total", "seconds", "rows_per_second", "resumed_from", "paths"} == set(doc)
    assert doc["copied"] == doc["paths"]["fast"] + doc["paths"]["records"]
    assert progress.cursor == doc["resumed_from"]
    assert 1200 == doc["total"]
    assert (1200, 1200) == row_counts(upgraded_url, "new_tasks")
    with (
        SqlTaskStore(upgraded_url, "old_tasks", name="old") as old,
        SqlTaskStore(upgraded_url, "new_tasks", name="new") as new,
    ):
        assert everything(old) == everything(new)
        report = validate(old, new, settle=0)
    assert report.ok
    assert (0, 0, 0, 0) == (report.missing, report.extra, report.mismatched, report.status_differs)


def test_backfill_bad_input_exits_2_and_bad_data_exits_1_writing_nothing(
    upgraded_url: str, tmp_path: Path
) -> None:
    """No stores or a missing table: exit 2; a row that cannot be read: exit 1; the new side stays empty."""
    create_task_table(upgraded_url, "old_tasks")
    create_task_table(upgraded_url, "new_tasks")
    with Journal.open(upgraded_url) as store:
        Migration(store, load_settings(None, database_url=upgraded_url, actor="tester"), "default").init()

    def backfill(config: str, *extra: str) -> object:
        args = ["backfill", "--db", upgraded_url, "--config", config, *extra]
        return cli.main(args, prog_name="migration-fsm", standalone_mode=False)

    empty = write_stores_config(tmp_path / "none.toml", {})
    with pytest.raises(ConfigError, match=r"no \[stores.old\] table") as no_stores:
        backfill(empty)
    assert 2 == no_stores.value.exit_code
    absent = write_stores_config(tmp_path / "absent.toml", sql_stores(upgraded_url, old="no_such_table"))
    with pytest.raises(ConfigError, match="no_such_table") as no_table:
        backfill(absent)
    assert 2 == no_table.value.exit_code
    config = write_stores_config(tmp_path / "mfsm.toml", sql_stores(upgraded_url))
    with pytest.raises(click.BadParameter):
        backfill(config, "--batch-size", "0")
    with SqlTaskStore(upgraded_url, "old_tasks", name="old") as old:
        old.put_many(tasks(5))
    engine = make_engine(upgraded_url)
    with engine.begin() as conn:
        conn.exec_driver_sql("UPDATE old_tasks SET status = 'zombie' WHERE key = 't0000003'")
    engine.dispose()
    with pytest.raises(DataError, match=r"'t0000003'.*'zombie'") as bad_row:
        backfill(config)
    assert 1 == bad_row.value.exit_code
    assert (0, 0) == row_counts(upgraded_url, "new_tasks")


def test_backfill_refuses_once_new_is_authoritative(
    engine: Migration, upgraded_url: str, tmp_path: Path, cli: Callable[..., CliResult]
) -> None:
    """From cutover on, backfill exits 2 and copies nothing (it would undo finished work)."""
    for table in ("old_tasks", "new_tasks"):
        create_task_table(upgraded_url, table)
    config = write_stores_config(tmp_path / "c.toml", sql_stores(upgraded_url))
    settings = load_settings(config, database_url=upgraded_url)
    old = build_store(settings.stores["old"], "old")
    old.put_many(tasks(5))
    for _ in range(2):
        engine.advance()
    result = cli("backfill", "--db", upgraded_url, "--config", config)
    assert 2 == result.code
    assert "roll back to dual_write" in result.error_line
    new = build_store(settings.stores["new"], "new")
    assert [] == list(new.scan(None, 10))
    for opened in (old, new):
        getattr(opened, "close", lambda: None)()
