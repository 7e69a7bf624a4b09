"""Real operator processes on both databases: a SIGKILL in the middle of a step is resumed
exactly once from its checkpoint, and of eight racing `advance` commands exactly one wins.

The CLI runs in subprocesses that import the steps of `tests/support/steps.py` through config;
steps and test talk through files in `tmp_path`. Every wait is bounded, so a broken build
fails instead of hanging, and no assertion depends on how long anything took.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from migration_fsm import commands
from migration_fsm.config import load_settings
from migration_fsm.fsm import Phase
from migration_fsm.journal import Journal
from migration_fsm.migration import Migration
from tests.support.cli import ROOT, CliResult, run_cli
from tests.support.forkserver import ForkServer, child_env
from tests.support.steps import CHECKPOINT, PROC_DIR_ENV, touch

pytestmark = pytest.mark.slow

QUICK = "tests.support.steps:quick_step"
SLEEPY = "tests.support.steps:sleepy_step"
HOLD = "tests.support.steps:hold_step"
RACERS = 8
RACE_ROUNDS = max(1, int(os.environ.get("MFSM_RACE_ROUNDS", "20")))
WAIT = 60.0  # the most any single wait may take before the test fails
HOST = socket.gethostname()


def holder(actor: str, pid: int) -> str:
    """How the lease (and the PostgreSQL advisory lock) names a process."""
    return f"{actor} [{HOST}:{pid}]"


def proc_env(proc_dir: Path) -> dict[str, str]:
    """The environment of a CLI subprocess: ours without MIGRATION_FSM_*, `tests` importable,
    the steps' folder set."""
    return child_env({PROC_DIR_ENV: str(proc_dir)})


def write_config(path: Path, *, steps: list[str], lease_seconds: float, heartbeat_seconds: float) -> Path:
    """A TOML config running `steps` on preparation -> dual_write."""
    path.write_text(
        f"lease_seconds = {lease_seconds}\n"
        f"heartbeat_seconds = {heartbeat_seconds}\n"
        "[steps]\n"
        f'"preparation->dual_write" = {json.dumps(steps)}\n',
        encoding="utf-8",
    )
    return path


def wait_for(done: Callable[[], bool], what: str, timeout: float = WAIT) -> None:
    """Poll `done` until it holds; fail saying `what` did not happen in time."""
    deadline = time.monotonic() + timeout
    while not done():
        if time.monotonic() > deadline:
            pytest.fail(f"gave up after {timeout:.0f} s waiting for {what}")
        time.sleep(0.02)


def spawn(argv: list[str], proc_dir: Path, log: Path) -> subprocess.Popen[bytes]:
    """Start `python ARGV` in the project root, stdout and stderr to `log`.{out,err}."""
    with log.with_suffix(".out").open("wb") as out, log.with_suffix(".err").open("wb") as err:
        return subprocess.Popen(
            [sys.executable, *argv],
            cwd=ROOT,
            env=proc_env(proc_dir),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=err,
        )


def finished(proc: subprocess.Popen[bytes], log: Path) -> CliResult:
    """The exit code and output of a process that has ended."""
    code = proc.wait(timeout=WAIT)
    return CliResult(
        code,
        log.with_suffix(".out").read_text(encoding="utf-8"),
        log.with_suffix(".err").read_text(encoding="utf-8"),
    )


def jsonl(path: Path) -> list[dict[str, Any]]:
    """The records a step appended to `path`."""
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


class Operator:
    """Runs CLI commands against one database and config, as one named actor at a time."""

    def __init__(self, url: str, config: Path, proc_dir: Path) -> None:
        self.url = url
        self.config = config
        self.proc_dir = proc_dir

    def args(self, command: list[str], actor: str, migration: str = "default") -> list[str]:
        return [*command, "-m", migration, "--db", self.url, "--config", str(self.config), "--actor", actor]

    def run(self, *command: str, actor: str = "observer", migration: str = "default") -> CliResult:
        return run_cli(
            *self.args(list(command), actor, migration),
            env={"PYTHONPATH": str(ROOT), PROC_DIR_ENV: str(self.proc_dir)},
            timeout=WAIT,
            subprocess=True,  # real processes: these race, are killed and take over leases
        )

    def status(self) -> dict[str, Any]:
        result = self.run("status", "--json")
        assert 0 == result.code, result.stderr
        report: dict[str, Any] = json.loads(result.stdout)
        return report


def create_migration(url: str, migration: str = "default") -> None:
    """`init`, in this process: setting up is not what these tests are about."""
    with Journal.open(url) as store:
        Migration(store, load_settings(None, database_url=url, actor="setup"), migration).init()


def kill_inside_step(op: Operator, reaper: list[subprocess.Popen[bytes]]) -> int:
    """Start `advance` as actor `doomed`, SIGKILL it once its step saved a checkpoint and
    sleeps; return the dead process's pid."""
    create_migration(op.url)
    log = op.proc_dir / "doomed"
    proc = spawn(["-m", "migration_fsm", *op.args(["advance"], "doomed")], op.proc_dir, log)
    reaper.append(proc)
    marker = op.proc_dir / "inside_sleepy_step"
    wait_for(lambda: marker.exists() or proc.poll() is not None, "the step to start")
    assert None is proc.poll(), finished(proc, log).stderr
    os.kill(proc.pid, signal.SIGKILL)
    assert -signal.SIGKILL == proc.wait(timeout=WAIT)
    return proc.pid


def assert_interrupted(op: Operator) -> None:
    """`status --json` shows the killed transition at the sleepy step, and allows nothing."""
    report = op.status()
    assert "preparation" == report["phase"]
    assert {
        "seq": 2,
        "trigger": "advance",
        "source": "preparation",
        "dest": "dual_write",
        "step": SLEEPY,
    } == report["interrupted"]
    assert [] == report["allowed"]


def assert_resumed_once(op: Operator, killed_pid: int) -> None:
    """The transition committed once, the done step did not run again and the sleepy step
    ran twice, the second time from its checkpoint; the journal verifies."""
    report = op.status()
    assert ("dual_write", None) == (report["phase"], report["interrupted"])
    verified = op.run("verify")
    assert 0 == verified.code, verified.stderr
    result = op.run("history", "--json")
    assert 0 == result.code, result.stderr
    rows = json.loads(result.stdout)
    assert [1, 2] == [row["seq"] for row in rows]
    row = rows[1]
    assert ("committed", "advance", "doomed") == (row["status"], row["trigger"], row["actor"])
    assert [
        {"name": QUICK, "status": "done", "attempts": 1},
        {"name": SLEEPY, "status": "done", "attempts": 2},
    ] == row["steps"]
    assert [killed_pid] == [run["pid"] for run in jsonl(op.proc_dir / "quick_runs.jsonl")]
    runs = jsonl(op.proc_dir / "sleepy_runs.jsonl")
    assert [(killed_pid, None)] == [(run["pid"], run["checkpoint"]) for run in runs[:1]]
    assert [CHECKPOINT] == [run["checkpoint"] for run in runs[1:]]
    assert killed_pid != runs[1]["pid"]


def takeovers(url: str) -> list[dict[str, Any]]:
    """The takeovers journaled on transition #2."""
    with Journal.open(url) as store:
        return store.entry(store.get("default"), 2).takeovers


def test_sigkill_mid_step_is_stolen_while_the_lease_is_live(
    upgraded_url: str, tmp_path: Path, reaper: list[subprocess.Popen[bytes]]
) -> None:
    """A SIGKILLed step's live lease makes writes exit 3 naming it; `resume --steal` finishes once."""
    # Renewed every second, the dead holder's lease outlives this test even on a loaded machine.
    config = write_config(
        tmp_path / "cfg.toml", steps=[QUICK, SLEEPY], lease_seconds=120, heartbeat_seconds=1
    )
    op = Operator(upgraded_url, config, tmp_path)
    killed = kill_inside_step(op, reaper)
    dead = holder("doomed", killed)

    assert_interrupted(op)
    advance = op.run("advance", actor="rescuer")
    assert 3 == advance.code, advance.stderr
    assert dead in advance.error_line
    assert "resume" in advance.error_line
    resume = op.run("resume", actor="rescuer")
    assert 3 == resume.code, resume.stderr
    assert dead in resume.error_line
    assert "--steal" in resume.error_line
    assert_interrupted(op)

    stolen = op.run("resume", "--steal", actor="rescuer")
    assert 0 == stolen.code, stolen.stderr
    assert_resumed_once(op, killed)
    [takeover] = takeovers(upgraded_url)
    assert ("resume", "rescuer", dead, True) == (
        takeover["command"],
        takeover["actor"],
        takeover["previous_holder"],
        takeover["stolen"],
    )


def test_sigkill_mid_step_resumes_without_steal_once_the_lease_expires(
    upgraded_url: str, tmp_path: Path, reaper: list[subprocess.Popen[bytes]]
) -> None:
    """Once a SIGKILLed step's lease expires, `advance` says resume or abort; plain `resume` finishes once."""
    config = write_config(
        tmp_path / "cfg.toml", steps=[QUICK, SLEEPY], lease_seconds=1, heartbeat_seconds=0.3
    )
    op = Operator(upgraded_url, config, tmp_path)
    killed = kill_inside_step(op, reaper)

    with Journal.open(upgraded_url) as store:
        wait_for(lambda: not store.get("default").lease_live(), "the dead holder's lease to expire")
    assert_interrupted(op)
    advance = op.run("advance", actor="rescuer")
    assert 3 == advance.code, advance.stderr
    assert "resume" in advance.error_line
    assert "abort" in advance.error_line

    resumed = op.run("resume", actor="rescuer")
    assert 0 == resumed.code, resumed.stderr
    assert_resumed_once(op, killed)
    [takeover] = takeovers(upgraded_url)
    assert (holder("doomed", killed), False) == (takeover["previous_holder"], takeover["stolen"])


def test_resume_steal_takes_over_from_a_hung_holder(
    upgraded_url: str, tmp_path: Path, reaper: list[subprocess.Popen[bytes]]
) -> None:
    """`resume --steal` takes over at once from a holder that hangs (SIGSTOP) instead of dying;
    on PostgreSQL it ends the hung session that still holds the advisory lock."""
    # No heartbeat falls due before the test ends: SIGSTOP never freezes a SQLite write lock.
    config = write_config(
        tmp_path / "cfg.toml", steps=[QUICK, SLEEPY], lease_seconds=300, heartbeat_seconds=100
    )
    op = Operator(upgraded_url, config, tmp_path)
    create_migration(upgraded_url)
    log = tmp_path / "hung"
    proc = spawn(["-m", "migration_fsm", *op.args(["advance"], "hung")], tmp_path, log)
    reaper.append(proc)
    marker = tmp_path / "inside_sleepy_step"
    wait_for(lambda: marker.exists() or proc.poll() is not None, "the step to start")
    assert None is proc.poll(), finished(proc, log).stderr
    os.kill(proc.pid, signal.SIGSTOP)

    stolen = op.run("resume", "--steal", actor="rescuer")
    assert 0 == stolen.code, stolen.stderr
    report = op.status()
    assert ("dual_write", None) == (report["phase"], report["interrupted"])
    assert 0 == op.run("verify").code


@pytest.fixture
def fork_server(tmp_path: Path) -> Iterator[ForkServer]:
    """The fork server (`tests/support/forkserver.py`): forks racers on request."""
    folder = tmp_path / "fork_server"
    folder.mkdir()
    server = ForkServer(folder, {PROC_DIR_ENV: str(tmp_path)})
    yield server
    server.close()


def race_once(op: Operator, server: ForkServer, migration: str) -> list[tuple[int, CliResult]]:
    """Fork RACERS `advance` commands on `migration`, release them at one barrier, and let
    the winner's step finish once every loser has exited; return their pids and results."""
    folder = op.proc_dir / migration
    folder.mkdir()
    go = folder / "go"
    logs = [folder / f"racer{i}" for i in range(RACERS)]
    racers = [
        {"argv": op.args(["advance"], f"racer{i}", migration), "log": str(log)} for i, log in enumerate(logs)
    ]
    server.submit(racers, go=go)

    def count(suffix: str) -> int:
        return sum(log.with_suffix(suffix).exists() for log in logs)

    wait_for(lambda: count(".ready") + count(".exit") >= RACERS, "every racer to reach the barrier")
    touch(go)
    try:
        wait_for(lambda: count(".exit") >= RACERS - 1, "every racer but the winner to exit")
    finally:
        touch(op.proc_dir / f"release_{migration}")  # let a winner finish, even on failure
    return server.answer(logs)


def test_racing_advances_have_exactly_one_winner(
    upgraded_url: str, tmp_path: Path, fork_server: ForkServer
) -> None:
    """Of eight `advance` processes released together, one commits and seven exit 3 naming it, each round."""
    config = write_config(tmp_path / "cfg.toml", steps=[HOLD], lease_seconds=120, heartbeat_seconds=1)
    op = Operator(upgraded_url, config, tmp_path)
    settings = load_settings(None, database_url=upgraded_url, actor="setup")
    with Journal.open(upgraded_url) as store:
        for round_ in range(RACE_ROUNDS):
            migration = f"race{round_}"
            create_migration(upgraded_url, migration)
            racers = race_once(op, fork_server, migration)
            codes = [result.code for _, result in racers]
            assert [0] + [3] * (RACERS - 1) == sorted(codes), [result.stderr for _, result in racers]
            winner = codes.index(0)
            winner_pid = racers[winner][0]
            for _, loser in racers:
                if loser.code != 0:
                    assert holder(f"racer{winner}", winner_pid) in loser.error_line
            inside = [p.name for p in tmp_path.glob(f"inside_{migration}_*")]
            assert [f"inside_{migration}_{winner_pid}"] == inside

            state = store.get(migration)
            journal = store.journal(state)
            assert [("init", "committed"), ("advance", "committed")] == [
                (str(e.trigger), e.status) for e in journal
            ]
            assert (f"racer{winner}", [1]) == (journal[1].actor, [s.attempts for s in journal[1].steps])
            assert (Phase.DUAL_WRITE, 2, None) == (state.phase, state.version, state.in_progress_seq)
            assert Phase.DUAL_WRITE == commands.verify(settings, migration).phase
    verified = op.run("verify", migration=f"race{RACE_ROUNDS - 1}")
    assert 0 == verified.code, verified.stderr
