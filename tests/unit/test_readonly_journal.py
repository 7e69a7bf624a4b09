"""A read-only SQLite journal (an archived one, or an on-call user without write access) can be
read: `status`, `history` and `verify` open it read-only and write nothing; a command that
writes says the database is unavailable (exit 4)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from migration_fsm import commands
from migration_fsm.config import Settings


def read_only(*paths: Path, on: bool) -> None:
    """Read-only bits, and for root (who ignores them) the immutable attribute, which no one
    can write through."""
    for path in paths:
        if on:
            path.chmod(0o555 if path.is_dir() else 0o444)
        if os.geteuid() == 0:
            subprocess.run(["chattr", "+i" if on else "-i", str(path)], check=True)
        if not on:
            path.chmod(0o700)


@pytest.fixture
def archived(tmp_path: Path) -> Iterator[Path]:
    """A journal in WAL mode with a committed transition, closed cleanly (no -wal, no -shm),
    the file and its folder read-only."""
    folder = tmp_path / "archive"
    folder.mkdir()
    journal = folder / "journal.db"
    settings = Settings(database_url=f"sqlite:///{journal}", actor="alice")
    commands.db_upgrade(settings)
    commands.init(settings, "default")
    commands.advance(settings, "default")
    assert not [p for p in folder.iterdir() if p.name.endswith(("-wal", "-shm"))]
    read_only(journal, folder, on=True)
    try:
        with pytest.raises(PermissionError):  # it really is read-only, for this process too
            (folder / "probe").write_text("x", encoding="utf-8")
        yield journal
    finally:
        read_only(folder, journal, on=False)
        shutil.rmtree(folder)


def mfsm(journal: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "migration_fsm", *args, "--db", f"sqlite:///{journal}"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        cwd="/",
        env={k: v for k, v in os.environ.items() if not k.startswith("MIGRATION_FSM_")},
    )


def test_read_commands_read_a_read_only_journal(archived: Path) -> None:
    before = archived.read_bytes()
    for command in (("status", "--json"), ("history", "--json"), ("verify",)):
        result = mfsm(archived, *command)
        assert 0 == result.returncode, (command, result.stderr)
    assert '"phase": "dual_write"' in mfsm(archived, "status", "--json").stdout
    assert before == archived.read_bytes()
    assert sorted(p.name for p in archived.parent.iterdir()) == ["journal.db"]


def test_a_write_to_a_read_only_journal_is_exit_4(archived: Path) -> None:
    result = mfsm(archived, "advance")
    assert 4 == result.returncode, result.stderr
    assert "Traceback" not in result.stderr
