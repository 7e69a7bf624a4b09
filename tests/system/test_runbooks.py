"""The runbooks run as written: every ```sh block of docs/MIGRATION.md, then of
docs/ROLLBACK.md, in order, through `bash -e`, against two SQLite task stores."""

from __future__ import annotations

import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
from contextlib import closing
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from migration_fsm.commands import status, verify
from migration_fsm.config import load_settings
from migration_fsm.demo.systems import NEW_SCHEMA, OLD_SCHEMA
from tests.support.cli import ROOT

pytestmark = pytest.mark.slow

RUNBOOKS = ("MIGRATION.md", "ROLLBACK.md")
SH_BLOCK = re.compile(r"^```sh\n(.*?)^```$", flags=re.DOTALL | re.MULTILINE)
#: Names the command that stopped the block (`set -e` stops at it).
PROLOGUE = "trap 'echo \"runbook command failed with exit $?: $BASH_COMMAND\" >&2' ERR\n"
#: Saves the block's environment, so the next block sees its `export`s, as in one shell session.
EPILOGUE = '\nenv -0 > "$RUNBOOK_ENV_FILE"\n'
BLOCK_TIMEOUT = 600.0  # a guard against a hang only: a loaded machine makes each command slow
TASKS = 300
COMPLETED = 200
STUCK = range(COMPLETED, TASKS, 20)  # left `running` on the old side by a dead worker


def sh_blocks(name: str) -> list[str]:
    """The ```sh blocks of docs/NAME, in document order."""
    return SH_BLOCK.findall((ROOT / "docs" / name).read_text(encoding="utf-8"))


def make_stores(directory: Path) -> None:
    """old.db: the demo's old task manager with TASKS runs (done, queued, STUCK running);
    new.db: the demo's new queue, empty."""
    base = datetime(2026, 11, 2, 8, 0, tzinfo=UTC)
    rows = []
    for i in range(TASKS):
        state = "done" if i < COMPLETED else "running" if i in STUCK else "queued"
        at = (base + timedelta(seconds=i)).isoformat(timespec="microseconds")
        worker = "old-worker-3" if state == "running" else None
        payload = json.dumps({"invoice": i})
        rows.append((f"run-{i:04d}", "send_invoice", payload, state, int(state != "queued"), at, at, worker))
    with closing(sqlite3.connect(directory / "old.db")) as old:
        old.executescript(OLD_SCHEMA)
        old.executemany(
            "INSERT INTO runs (run_id, task_name, args, state, tries, enqueued_at, modified_at, worker)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            rows,
        )
        old.commit()
    with closing(sqlite3.connect(directory / "new.db")) as new:
        new.executescript(NEW_SCHEMA)


def run_block(doc: str, number: int, block: str, cwd: Path, env: dict[str, str]) -> dict[str, str]:
    """Run one block through `bash -e` in `cwd`; its environment afterwards, or fail the test
    with the block, the command that failed and the output."""
    env_file = cwd / ".runbook-env"
    proc = subprocess.Popen(
        ["bash", "-e", "-c", PROLOGUE + block + EPILOGUE],
        cwd=cwd,
        env={**env, "RUNBOOK_ENV_FILE": str(env_file)},
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # so a timeout can stop the block's background commands too
    )
    try:
        stdout, stderr = proc.communicate(timeout=BLOCK_TIMEOUT)
        verdict = f"failed with exit {proc.returncode}"
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        verdict = f"did not finish in {BLOCK_TIMEOUT:g} s"
    if proc.returncode != 0:
        pytest.fail(
            f"docs/{doc}, sh block {number} {verdict}:\n{block}\n"
            f"--- stdout (end) ---\n{stdout[-4000:]}\n--- stderr (end) ---\n{stderr[-6000:]}",
            pytrace=False,
        )
    pairs = (item.partition("=") for item in env_file.read_text(encoding="utf-8").split("\0") if item)
    return {key: value for key, _, value in pairs if key not in ("_", "SHLVL", "PWD", "OLDPWD")}


def query(path: Path, sql: str, *params: str) -> list[tuple[object, ...]]:
    """The rows of one query on a SQLite file."""
    with closing(sqlite3.connect(path)) as conn:
        return conn.execute(sql, params).fetchall()


def test_runbooks_run_in_order(tmp_path: Path) -> None:
    """Every sh block of MIGRATION.md then ROLLBACK.md succeeds, and the walk ends consistent."""
    bin_dir = Path(sys.executable).parent
    assert (bin_dir / "migration-fsm").exists(), f"migration-fsm is not installed in {bin_dir}"
    make_stores(tmp_path)
    base_env = {k: v for k, v in os.environ.items() if not k.startswith("MIGRATION_FSM_")}
    base_env["PATH"] = f"{bin_dir}{os.pathsep}{base_env.get('PATH', '')}"
    old, new = tmp_path / "old.db", tmp_path / "new.db"
    for doc in RUNBOOKS:
        blocks = sh_blocks(doc)
        assert blocks, f"docs/{doc} has no sh block"
        env = dict(base_env)  # each runbook starts in a fresh shell, in the same folder
        for number, block in enumerate(blocks, start=1):
            env = run_block(doc, number, block, tmp_path, env)
        if doc == "MIGRATION.md":
            # No task lost or doubled: the stuck runs were handed over once, to new only:
            # pending there with one more attempt, cancelled on old (never re-queued there).
            assert_handed_over(old, new)

    # MIGRATION.md walked `default` to complete; ROLLBACK.md rolled its drill back to preparation.
    for database, phase in (("migration_fsm.db", "complete"), ("rollback-drill.db", "preparation")):
        settings = load_settings(None, database_url=f"sqlite:///{tmp_path / database}", actor="test")
        assert phase == status(settings, "default").state.phase
        assert phase == verify(settings, "default").phase
    # ROLLBACK.md's drill is a second migration on the same stores, with a ledger of its own
    # that knows nothing of the first one's hand-overs: its backfill copies old's statuses,
    # the first migration's hand-over markers included (the 5 stuck runs, and the 95 queued
    # runs that `retire_old` handed over to new), and its rollbacks agree with it.
    queued = TASKS - COMPLETED - 5
    assert [("cancelled", 0, queued), ("cancelled", 1, 5), ("done", 1, COMPLETED)] == query(
        old, "SELECT state, tries, count(*) FROM runs GROUP BY 1, 2 ORDER BY 1, 2"
    )
    assert [("cancelled", 0, queued), ("cancelled", 1, 5), ("completed", 1, COMPLETED)] == query(
        new, "SELECT status, attempts, count(*) FROM jobs GROUP BY 1, 2 ORDER BY 1, 2"
    )


def assert_handed_over(old: Path, new: Path) -> None:
    """Where MIGRATION.md leaves the tasks: every run once on each side; the STUCK runs (their
    worker died) pending on new with attempts 2, cancelled on old with tries 1; the queued
    runs pending on new, and handed over to it by `retire_old` at cleanup (cancelled on old,
    so a stock old worker started later does not run them alongside new: issue 12)."""
    queued = TASKS - COMPLETED - len(STUCK)
    assert [("cancelled", 0, queued), ("cancelled", 1, len(STUCK)), ("done", 1, COMPLETED)] == query(
        old, "SELECT state, tries, count(*) FROM runs GROUP BY 1, 2 ORDER BY 1, 2"
    )
    assert [("completed", 1, COMPLETED), ("pending", 0, queued), ("pending", 2, len(STUCK))] == query(
        new, "SELECT status, attempts, count(*) FROM jobs GROUP BY 1, 2 ORDER BY 1, 2"
    )


def test_readme_links_the_runbooks() -> None:
    """The README points at every runbook in docs/."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    for name in ("MIGRATION.md", "ROLLBACK.md", "VALIDATION.md", "ARCHITECTURE.md"):
        assert f"(docs/{name})" in text, name
