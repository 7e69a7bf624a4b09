"""`python -m migration_fsm.adapters.NAME setup | check`, as an operator runs it before the
first `advance`: `check` names what is missing and how to fix it (exit 1), `setup` does it,
`check` then says ok; running `setup` again changes nothing."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from celery import Celery

from migration_fsm.adapters.celery.__main__ import main as celery_main
from migration_fsm.adapters.huey.__main__ import main as huey_main
from migration_fsm.adapters.procrastinate.__main__ import main as procrastinate_main
from migration_fsm.adapters.rq.__main__ import main as rq_main
from tests.support import ROOT
from tests.support.forkserver import child_env
from tests.support.queues import private_redis_db, procrastinate_schema
from tests.unit.test_procrastinate_store import sql

APP = "tests.support.huey_app:huey"
CELERY_APP = "tests.support.celery_app:app"
#: A Celery application whose broker and results are not Redis, which the adapter refuses.
IN_MEMORY = Celery("in-memory", broker="memory://", backend="cache+memory://")


def test_rq_check_setup_check(capsys: pytest.CaptureFixture[str]) -> None:
    with private_redis_db() as url:
        assert 1 == rq_main(["check", "--url", url])
        assert "python -m migration_fsm.adapters.rq setup" in capsys.readouterr().err
        assert 0 == rq_main(["setup", "--url", url])
        assert "key index set up" in capsys.readouterr().out
        assert 0 == rq_main(["setup", "--url", url])
        assert "already set up" in capsys.readouterr().out
        assert 0 == rq_main(["check", "--url", url])
        assert "ok\n" == capsys.readouterr().out


def test_procrastinate_check_setup_check(pg_database: str, capsys: pytest.CaptureFixture[str]) -> None:
    with procrastinate_schema(pg_database) as url:
        sql(url, "DROP TABLE mfsm_procrastinate_tasks")
        assert 1 == procrastinate_main(["check", "--url", url])
        assert "python -m migration_fsm.adapters.procrastinate setup" in capsys.readouterr().err
        assert 0 == procrastinate_main(["setup", "--url", url])
        assert "created" in capsys.readouterr().out
        assert 0 == procrastinate_main(["check", "--url", url])
        assert "ok\n" == capsys.readouterr().out
    assert 1 == procrastinate_main(["check", "--url", pg_database])  # no Procrastinate schema at all
    assert "procrastinate schema --apply" in capsys.readouterr().err


def test_huey_setup_and_check_as_an_operator_runs_them(tmp_path: Path) -> None:
    env = child_env({"MFSM_TEST_HUEY_FILE": str(tmp_path / "huey.db")})

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "migration_fsm.adapters.huey", *args, "--app", APP],
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=120, check=False,
        )  # fmt: skip

    missing = run("check")
    assert (1, "") == (missing.returncode, missing.stdout)
    assert "python -m migration_fsm.adapters.huey setup --app MODULE:HUEY" in missing.stderr
    done = run("setup")
    assert 0 == done.returncode, done.stderr
    assert f"mfsm_huey_tasks created in {tmp_path / 'huey.db'}" in done.stdout
    assert ("ok\n", 0) == (run("check").stdout, run("check").returncode)


def test_a_bad_application_is_one_error_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert 2 == huey_main(["check", "--app", "no.such.module:huey"])
    err = capsys.readouterr().err
    assert err.startswith("error: cannot load the Huey application 'no.such.module:huey'")
    assert 1 == len(err.strip().splitlines())


def test_celery_check_setup_check_as_an_operator_runs_them() -> None:
    with private_redis_db() as url:
        env = child_env({"MFSM_TEST_CELERY_REDIS": url})

        def run(*args: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run(
                [sys.executable, "-m", "migration_fsm.adapters.celery", *args, "--app", CELERY_APP],
                cwd=ROOT, env=env, capture_output=True, text=True, timeout=120, check=False,
            )  # fmt: skip

        missing = run("check")
        assert (1, "") == (missing.returncode, missing.stdout)
        assert (
            "python -m migration_fsm.adapters.celery setup --app MODULE:APP --queue celery" in missing.stderr
        )
        done = run("setup")
        assert 0 == done.returncode, done.stderr
        assert "Celery queue 'celery': registry set up" in done.stdout
        assert "already set up" in run("setup").stdout
        ok = run("check")
        assert ("ok\n", 0) == (ok.stdout, ok.returncode)


def test_a_celery_application_not_on_redis_is_one_error_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert 2 == celery_main(["check", "--app", "tests.unit.test_adapter_cli:IN_MEMORY"])
    err = capsys.readouterr().err
    assert err.startswith("error: store 'celery': the Celery application's result_backend is")
    assert 1 == len(err.strip().splitlines())
