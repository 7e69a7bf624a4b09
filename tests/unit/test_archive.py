"""Export and import: a verified JSON Lines round trip, and archives that do not verify."""

from __future__ import annotations

import gzip
import hashlib
import json
from pathlib import Path
from typing import Any

import pytest

from migration_fsm.cli import cli
from migration_fsm.exceptions import BadInput, DataError
from migration_fsm.tasks.memory import MemoryTaskStore
from migration_fsm.tasks.records import TaskStatus
from migration_fsm.tasks.sql import SqlTaskStore
from migration_fsm.testing import make_records
from migration_fsm.tools.archive import export_tasks, import_tasks, verify_archive
from migration_fsm.tools.validate import validate
from tests.support.cli import run_cli
from tests.support.datatools import (
    create_task_table,
    everything,
    hundred_thousand,
    sql_stores,
    tasks,
    write_stores_config,
)


def test_100000_tasks_round_trip_through_an_export(tmp_path: Path) -> None:
    """old -> .jsonl -> empty store: validate finds them equal, and the summary counts them."""
    old = MemoryTaskStore("old", hundred_thousand())
    path = tmp_path / "old.jsonl"
    summary = export_tasks(old, path, side="old", batch_size=5000)
    assert (100_000, "old", "old") == (summary.count, summary.side, summary.store)
    assert [path] == list(tmp_path.iterdir())  # no partial file left behind
    with path.open(encoding="utf-8") as handle:
        first = json.loads(handle.readline())
    assert "t0000000" == first["key"]
    restored = MemoryTaskStore("restored")
    imported = import_tasks(restored, path, batch_size=5000)
    assert (100_000, summary) == (imported.loaded, imported.summary)
    report = validate(old, restored, batch_size=5000, settle=0)
    assert report.ok
    assert (100_000, 100_000, 0, 0, 0, 0) == (
        report.old_count,
        report.new_count,
        report.missing,
        report.extra,
        report.mismatched,
        report.status_differs,
    )


@pytest.fixture
def archive(tmp_path: Path) -> Path:
    """A plain (not gzip) export of 20 tasks in every status."""
    path = tmp_path / "tasks.jsonl"
    export_tasks(MemoryTaskStore("old", tasks(20, mixed=True)), path, side="old")
    return path


def _rewrite(path: Path, change: dict[int, str | None]) -> None:
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    for index, replacement in change.items():
        lines[index] = "" if replacement is None else replacement
    path.write_text("".join(lines), encoding="utf-8")


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        ("status", "the SHA-256 of the records does not match"),
        ("payload", "the digest of the checksums does not match"),
        ("drop", "19 records, the summary says 20"),
        ("truncate", "has no summary line"),
        ("garbage", "line 4: not a task record"),
        ("after", "line 22: data after the summary line"),
    ],
)
def test_an_archive_that_does_not_verify_is_refused_before_anything_is_loaded(
    archive: Path, edit: str, message: str
) -> None:
    """Any edit, a lost line or a cut-off file is a DataError saying what is wrong; the store stays empty."""
    lines = archive.read_text(encoding="utf-8").splitlines(keepends=True)
    record = json.loads(lines[3])
    if edit == "status":
        record["status"] = str(
            TaskStatus.CANCELLED if record["status"] != "cancelled" else TaskStatus.PENDING
        )
        _rewrite(archive, {3: json.dumps(record) + "\n"})
    elif edit == "payload":
        record["payload"] = {"changed": True}
        _rewrite(archive, {3: json.dumps(record) + "\n"})
    elif edit == "drop":
        _rewrite(archive, {3: None})
    elif edit == "truncate":
        _rewrite(archive, {20: None})
    elif edit == "garbage":
        _rewrite(archive, {3: '{"key": ""}\n'})
    else:
        archive.write_text(archive.read_text(encoding="utf-8") + lines[0], encoding="utf-8")
    store = MemoryTaskStore("new")
    with pytest.raises(DataError, match=message):
        import_tasks(store, archive)
    assert 0 == len(store)


def test_import_is_idempotent_and_a_missing_file_is_bad_input(archive: Path, tmp_path: Path) -> None:
    """Importing twice leaves the same store; a file that does not exist is BadInput (exit 2)."""
    store = MemoryTaskStore("new")
    import_tasks(store, archive)
    once = everything(store)
    import_tasks(store, archive)
    assert once == everything(store)
    assert 20 == verify_archive(archive).count
    with pytest.raises(BadInput, match="does not exist"):
        import_tasks(store, tmp_path / "nope.jsonl")


def test_export_and_import_commands_restore_a_sql_side(
    upgraded_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`export --side old` then `import --side new` into an empty table gives an equal side."""
    create_task_table(upgraded_url, "old_tasks")
    create_task_table(upgraded_url, "new_tasks")
    with SqlTaskStore(upgraded_url, "old_tasks", name="old") as old:
        old.put_many(tasks(250, mixed=True))
    config = write_stores_config(
        tmp_path / "mfsm.toml", sql_stores(upgraded_url), ["backfill_batch_size = 60"]
    )
    assert 0 == run_cli("init", "--db", upgraded_url).code
    out = tmp_path / "backup.jsonl.gz"  # gzip, by its name
    exported = run_cli("export", "--db", upgraded_url, "--config", config, "--side", "old", "--out", str(out))
    assert 0 == exported.code, exported.stderr
    assert "exported 250 tasks of the old side" in exported.stdout
    with gzip.open(out, "rt", encoding="utf-8") as handle:
        assert 251 == sum(1 for _ in handle)
    missing = tmp_path / "missing.jsonl"
    code = cli.main(
        [
            "import",
            "--db",
            upgraded_url,
            "--config",
            config,
            "--side",
            "new",
            "--in",
            str(out),
            "--into-other-side",
        ],
        prog_name="migration-fsm",
        standalone_mode=False,
    )
    assert 0 == code
    assert "loaded 250 tasks into the new side" in " ".join(capsys.readouterr().out.split())
    with pytest.raises(BadInput):
        cli.main(
            ["import", "--db", upgraded_url, "--config", config, "--side", "new", "--in", str(missing)],
            prog_name="migration-fsm",
            standalone_mode=False,
        )
    with (
        SqlTaskStore(upgraded_url, "old_tasks", name="old") as old,
        SqlTaskStore(upgraded_url, "new_tasks", name="new") as new,
    ):
        assert everything(old) == everything(new)


def test_run_at_survives_an_export_and_an_import(tmp_path: Path) -> None:
    """Scheduled times, set and None, come back equal; the archive is format 2."""
    records = make_records([f"k{i:02d}" for i in range(12)], run_at=True)
    path = tmp_path / "old.jsonl.gz"
    summary = export_tasks(MemoryTaskStore("old", records), path, side="old")
    assert "migration-fsm-tasks/2" == summary.as_json()["format"]
    restored = MemoryTaskStore("restored")
    import_tasks(restored, path)
    assert records == everything(restored)


def _format_1(path: Path, records: list[Any]) -> None:
    """An archive as a version before run_at wrote it: no run_at key, format 1."""
    lines, digest, content = [], hashlib.sha256(), hashlib.sha256()
    for record in records:
        line = (json.dumps(record.model_dump(mode="json", exclude={"run_at"})) + "\n").encode()
        lines.append(line)
        content.update(line)
        digest.update(f"{record.checksum()}\n".encode())
    summary = {
        "format": "migration-fsm-tasks/1", "side": "old", "store": "old", "count": len(records),
        "digest": digest.hexdigest(), "sha256": content.hexdigest(),
        "started_at": "2026-01-01T00:00:00+00:00", "finished_at": "2026-01-01T00:00:01+00:00",
    }  # fmt: skip
    path.write_bytes(b"".join(lines) + (json.dumps({"summary": summary}) + "\n").encode())


def test_an_archive_of_format_1_still_imports(tmp_path: Path) -> None:
    """An archive written before run_at existed verifies and imports, with no scheduled times;
    one of format 1 that holds a run_at does not verify."""
    records = tasks(5)
    path = tmp_path / "before.jsonl"
    _format_1(path, records)
    assert "migration-fsm-tasks/1" == verify_archive(path).as_json()["format"]
    restored = MemoryTaskStore("restored")
    assert 5 == import_tasks(restored, path).loaded
    assert records == everything(restored)
    assert all(record.run_at is None for record in everything(restored))
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    lines[2] = lines[2].replace('"key"', '"run_at": "2026-01-01T00:00:00Z", "key"', 1)
    path.write_text("".join(lines), encoding="utf-8")
    with pytest.raises(
        DataError, match="line 3 has a run_at, which format migration-fsm-tasks/1 does not hold"
    ):
        verify_archive(path)
