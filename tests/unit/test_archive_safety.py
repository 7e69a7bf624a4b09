"""Export never replaces what it should not, import checks what it loads and when: bad input
is one line with exit 2 (a transition in the way: exit 3), and nothing is written."""

from __future__ import annotations

import hashlib
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text

from migration_fsm import commands
from migration_fsm.config import Settings
from migration_fsm.exceptions import BadInput, ConcurrentChange, LeaseHeld, StepFailed
from migration_fsm.journal import Journal, make_engine
from migration_fsm.tasks.memory import MemoryTaskStore
from migration_fsm.tasks.records import TaskRecord
from migration_fsm.tasks.sql import SqlTaskStore
from migration_fsm.tools.archive import export_tasks
from migration_fsm.tools.runs import import_runs
from tests.support.cli import CliResult
from tests.support.datatools import create_task_table, everything, sql_stores, tasks, write_stores_config
from tests.support.steps import FAIL_ENV

# -- export: what it refuses to replace ------------------------------------------------------


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def old() -> MemoryTaskStore:
    return MemoryTaskStore("old", tasks(7))


def test_an_existing_file_is_replaced_only_with_overwrite(tmp_path: Path, old: MemoryTaskStore) -> None:
    target = tmp_path / "backup.jsonl"
    target.write_text("keep me\n", encoding="utf-8")
    with pytest.raises(BadInput, match="exists: choose another file, or pass --overwrite"):
        export_tasks(old, target, side="old")
    assert "keep me\n" == target.read_text(encoding="utf-8")
    assert [target] == list(tmp_path.iterdir())  # no temporary file left behind
    assert 7 == export_tasks(old, target, side="old", overwrite=True).count
    assert [target] == list(tmp_path.iterdir())


@pytest.mark.parametrize("kind", ["fifo", "symlink", "folder", "folder with slash", "device"])
def test_a_non_regular_file_is_never_replaced_even_with_overwrite(
    tmp_path: Path, old: MemoryTaskStore, kind: str
) -> None:
    real = tmp_path / "real.jsonl"
    real.write_text("the real file\n", encoding="utf-8")
    target: Path | str
    if kind == "fifo":
        target = tmp_path / "pipe"
        os.mkfifo(target)
        says = "it exists and is a FIFO"
    elif kind == "symlink":
        target = tmp_path / "link.jsonl"
        target.symlink_to(real)
        says = "it exists and is a symbolic link"
    elif kind == "folder":
        target = tmp_path
        says = "it is a folder; give a file name"
    elif kind == "folder with slash":
        target = f"{tmp_path / 'nothing-here'}/"
        says = "it is a folder; give a file name"
    else:
        target = Path(os.devnull)
        says = "it exists and is a character device"
    for overwrite in (False, True):
        with pytest.raises(BadInput, match=says) as caught:
            export_tasks(old, target, side="old", overwrite=overwrite)
        assert "\n" not in str(caught.value)
    assert "the real file\n" == real.read_text(encoding="utf-8")
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".partial")]


def test_a_missing_folder_is_bad_input(tmp_path: Path, old: MemoryTaskStore) -> None:
    with pytest.raises(BadInput, match=r"folder .* does not exist"):
        export_tasks(old, tmp_path / "no" / "such" / "x.jsonl", side="old")


@pytest.fixture
def sqlite_world(tmp_path: Path) -> tuple[Settings, Path, Path]:
    """A migration database and an old store, each its own SQLite file, and a config for them."""
    control, tables = tmp_path / "control.db", tmp_path / "tasks.db"
    journal = Journal(f"sqlite:///{control}", engine=make_engine(f"sqlite:///{control}", create=True))
    journal.upgrade()
    journal.close()
    create_task_table(f"sqlite:///{tables}", "old_tasks")
    create_task_table(f"sqlite:///{tables}", "new_tasks")
    with SqlTaskStore(f"sqlite:///{tables}", "old_tasks", name="old") as store:
        store.put_many(tasks(30))
    settings = Settings.model_validate(
        {"database_url": f"sqlite:///{control}", "actor": "test", "stores": sql_stores(f"sqlite:///{tables}")}
    )
    commands.init(settings, "default")
    return settings, control, tables


def test_the_cli_never_exports_over_a_configured_database(
    sqlite_world: tuple[Settings, Path, Path], cli: Callable[..., CliResult], tmp_path: Path
) -> None:
    """Not the migration database, not the store's own file (nor its WAL), with --overwrite."""
    settings, control, tables = sqlite_world
    config = write_stores_config(tmp_path / "mfsm.toml", sql_stores(f"sqlite:///{tables}"))
    before = {path: digest(path) for path in (control, tables)}
    for target in (control, tables, Path(f"{tables}-wal")):
        if not target.exists():
            continue
        result = cli(
            "export", "--db", settings.database_url, "--config", config,
            "--side", "old", "--out", str(target), "--overwrite",
        )  # fmt: skip
        assert 2 == result.code, result.stderr
        assert "database" in result.error_line
        assert "Traceback" not in result.stderr
    assert before == {path: digest(path) for path in (control, tables)}
    with SqlTaskStore(f"sqlite:///{tables}", "old_tasks", name="old") as store:
        assert 30 == len(everything(store))


def test_the_cli_says_one_line_for_a_folder_and_for_an_unknown_migration(
    sqlite_world: tuple[Settings, Path, Path], cli: Callable[..., CliResult], tmp_path: Path
) -> None:
    settings, _, tables = sqlite_world
    config = write_stores_config(tmp_path / "mfsm.toml", sql_stores(f"sqlite:///{tables}"))
    common = ("--db", settings.database_url, "--config", config, "--side", "old")
    folder = cli("export", *common, "--out", f"{tmp_path}/")
    assert (2, "") == (folder.code, folder.stdout), folder.stderr
    assert "is a folder" in folder.error_line
    unknown = cli("export", "-m", "NOSUCH", *common, "--out", str(tmp_path / "x.jsonl"))
    assert 2 == unknown.code, unknown.stderr
    assert "no migration named 'NOSUCH'" in unknown.error_line
    assert not (tmp_path / "x.jsonl").exists()


# -- import: which side, which migration, and when ---------------------------------------------


@pytest.fixture
def exported(upgraded_url: str, tmp_path: Path) -> tuple[Settings, Path]:
    """An export of the old side (40 tasks) of migration 'default'; both task tables in the
    migration database; the new one empty."""
    create_task_table(upgraded_url, "old_tasks")
    create_task_table(upgraded_url, "new_tasks")
    with SqlTaskStore(upgraded_url, "old_tasks", name="old") as store:
        store.put_many(tasks(40))
    settings = Settings.model_validate(
        {
            "database_url": upgraded_url,
            "actor": "restorer",
            "stores": sql_stores(upgraded_url),
            "backfill_batch_size": 10,
        }
    )
    commands.init(settings, "default")
    path = tmp_path / "old.jsonl.gz"
    summary = commands.export(settings, "default", side="old", out=str(path))
    assert ("default", "old") == (summary.migration, summary.side)
    return settings, path


def new_side(settings: Settings) -> list[TaskRecord]:
    with SqlTaskStore(settings.database_url, "new_tasks", name="new") as store:
        return everything(store)


def test_an_export_of_the_other_side_needs_the_flag(exported: tuple[Settings, Path]) -> None:
    settings, path = exported
    with pytest.raises(
        BadInput, match="holds the old side's tasks, not the new side's: pass --into-other-side"
    ):
        commands.import_(settings, "default", side="new", path=str(path))
    with Journal.open(settings.database_url) as journal:
        assert ([], []) == (new_side(settings), import_runs(journal, "default"))
    result = commands.import_(settings, "default", side="new", path=str(path), into_other_side=True)
    assert 40 == result.loaded == len(new_side(settings))


def test_an_export_of_another_migration_is_refused(exported: tuple[Settings, Path]) -> None:
    settings, path = exported
    commands.init(settings, "other")
    with pytest.raises(
        BadInput, match="exported for migration 'default', not 'other': import it with -m default"
    ):
        commands.import_(settings, "other", side="old", path=str(path))
    with pytest.raises(BadInput, match="no migration named 'NOSUCH'"):
        commands.import_(settings, "NOSUCH", side="old", path=str(path))


def test_every_import_is_journaled_with_the_archive_digest(exported: tuple[Settings, Path]) -> None:
    settings, path = exported
    result = commands.import_(settings, "default", side="old", path=str(path))
    with Journal.open(settings.database_url) as journal:
        (run,) = import_runs(journal, "default")
    assert ("old", "restorer", "loaded", 40, None) == (
        run.side,
        run.actor,
        run.outcome,
        run.loaded,
        run.error,
    )
    assert result.summary.digest == run.archive["digest"]
    assert result.summary.sha256 == run.archive["sha256"]
    assert str(path) == run.path


def test_an_import_is_refused_while_a_transition_is_interrupted(
    exported: tuple[Settings, Path], cli: Callable[..., CliResult], tmp_path: Path
) -> None:
    """exit 3 through the CLI; the new side and the journal as they were."""
    settings, path = exported
    failing = settings.model_copy(
        update={"steps": {"preparation->dual_write": ["tests.support.steps:flaky"]}}
    )
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(FAIL_ENV, "1")
        with pytest.raises(StepFailed):  # the transition stays interrupted
            commands.advance(failing, "default")
    assert commands.status(settings, "default").state.in_progress_seq is not None
    config = write_stores_config(tmp_path / "mfsm.toml", sql_stores(settings.database_url))
    result = cli(
        "import", "--db", settings.database_url, "--config", config, "--side", "old", "--in", str(path)
    )
    assert 3 == result.code, result.stderr
    assert "in progress or interrupted" in result.error_line
    with Journal.open(settings.database_url) as journal:
        assert [] == import_runs(journal, "default")


class VersionBumpingStore(SqlTaskStore):
    """A task store that, on its first batch, plays a transition committed between two
    batches of an import (a real one cannot commit while the fence is held)."""

    bumped = False

    def put_many(self, records: Any) -> int:
        loaded = super().put_many(records)
        if not VersionBumpingStore.bumped:
            VersionBumpingStore.bumped = True
            with self.engine.begin() as conn:
                conn.execute(text("UPDATE mfsm_migrations SET version = version + 1 WHERE name = 'default'"))
        return loaded


def test_an_import_stops_before_its_next_batch_when_the_migration_changed(
    exported: tuple[Settings, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    settings, path = exported
    VersionBumpingStore.bumped = False
    monkeypatch.setattr("migration_fsm.tasks.sql.SqlTaskStore", VersionBumpingStore)
    with pytest.raises(ConcurrentChange, match=r"changed while import ran .* stopped before its next batch"):
        commands.import_(settings, "default", side="new", path=str(path), into_other_side=True)
    assert 10 == len(new_side(settings))  # the first batch (10) only
    with Journal.open(settings.database_url) as journal:
        (run,) = import_runs(journal, "default")
    assert ("stopped", 10) == (run.outcome, run.loaded)
    assert "ConcurrentChange" in (run.error or "")


def test_a_held_data_fence_keeps_a_transition_out(upgraded_url: str) -> None:
    """PostgreSQL: the transition is refused at once (the operator lock is held: exit 3).
    SQLite: its claim waits for the fence and then commits."""
    settings = Settings(database_url=upgraded_url, actor="operator", lease_seconds=30)
    commands.init(settings, "default")
    version = commands.status(settings, "default").state.version
    done: list[object] = []
    inside, leave = threading.Event(), threading.Event()

    def advance() -> None:
        inside.wait(10)
        try:
            done.append(commands.advance(settings, "default"))
        except LeaseHeld as exc:
            done.append(exc)

    thread = threading.Thread(target=advance)
    thread.start()
    with (
        Journal.open(upgraded_url) as journal,
        journal.data_fence("default", "backfill-holder", tool="backfill", version=version),
    ):
        inside.set()
        time.sleep(0.5)  # let the transition try while the fence is held
        assert [] == done or isinstance(done[0], LeaseHeld)
        leave.set()
    thread.join(30)
    if "postgresql" in upgraded_url:
        assert isinstance(done[0], LeaseHeld)
        assert version == commands.status(settings, "default").state.version
    else:
        assert not isinstance(done[0], LeaseHeld)
        assert version + 1 == commands.status(settings, "default").state.version
    with (
        Journal.open(upgraded_url) as journal,
        pytest.raises(ConcurrentChange, match="changed while backfill"),
    ):
        journal.data_fence("default", "h", tool="backfill", version=version - 1).__enter__()
