"""The package works from a built wheel, not only from a checkout."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.support.cli import ROOT


@pytest.mark.slow
def test_wheel_installs_and_runs_db_upgrade_init_status(tmp_path: Path) -> None:
    """A wheel built from the checkout, installed in a fresh venv, runs db upgrade, init, status."""
    dist = tmp_path / "dist"
    subprocess.run(
        [sys.executable, "-m", "build", "--wheel", "--outdir", str(dist), str(ROOT)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    (wheel,) = dist.glob("migration_fsm-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "migration_fsm/_migrations/env.py" in names
    assert "migration_fsm/py.typed" in names
    assert any(n.startswith("migration_fsm/_migrations/versions/0001") for n in names)

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    subprocess.run([*pip, str(wheel)], check=True, capture_output=True, timeout=600)

    work = tmp_path / "elsewhere"  # not the checkout, so nothing is imported from it
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MIGRATION_FSM_", "PYTHON"))}
    env["MIGRATION_FSM_DATABASE_URL"] = f"sqlite:///{work / 'm.db'}"
    exe = str(venv / "bin" / "migration-fsm")

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [exe, *args], cwd=work, env=env, capture_output=True, text=True, timeout=120, check=False
        )

    assert 0 == run("db", "upgrade").returncode
    assert 0 == run("init").returncode
    status = run("status", "--json")
    assert 0 == status.returncode, status.stderr
    assert ("preparation", 1) == (json.loads(status.stdout)["phase"], json.loads(status.stdout)["version"])
    where = subprocess.run(
        [
            str(venv / "bin" / "python"),
            "-c",
            "import migration_fsm.journal.revisions as s; print(s.migrations_dir())",
        ],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert str(venv) in where
