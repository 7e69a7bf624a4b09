"""`status --watch` redraws for the operator on call; logs are structured events on stderr."""

from __future__ import annotations

import json
import os
import pty
import select
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from migration_fsm.config import Settings
from migration_fsm.journal import Journal
from migration_fsm.migration import Migration
from tests.support.cli import ROOT, CliResult, ctrl_c_interrupts


def _read_until(fd: int, needle: bytes, timeout: float) -> bytes:
    """Read from `fd` until `needle` appears or `timeout` passes."""
    seen = b""
    deadline = time.monotonic() + timeout
    while needle not in seen and time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], 0.2)
        if ready:
            try:
                seen += os.read(fd, 65536)
            except OSError:
                break
    return seen


def _wait_reading(fd: int, proc: subprocess.Popen[bytes], timeout: float) -> int:
    """Wait for `proc` to exit while reading (and dropping) what it writes to `fd`: a child
    redrawing a terminal nobody reads would block in its write and never exit."""
    deadline = time.monotonic() + timeout
    while proc.poll() is None and time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], 0.1)
        if ready:
            try:
                os.read(fd, 65536)
            except OSError:
                break
    return proc.wait(timeout=max(deadline - time.monotonic(), 1))


def test_status_watch_redraws_until_interrupted(engine: Migration, upgraded_url: str, tmp_path: Path) -> None:
    """On a terminal, status --watch shows a phase change made meanwhile and exits 0 on Ctrl-C."""
    primary, secondary = pty.openpty()
    env = {k: v for k, v in os.environ.items() if not k.startswith("MIGRATION_FSM_")}
    env.update(COLUMNS="120", LINES="40", TERM="xterm")
    stderr = (tmp_path / "stderr").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "migration_fsm", "status", "--watch", "--db", upgraded_url],
        stdin=secondary,
        stdout=secondary,
        stderr=stderr,
        env=env,
        cwd=ROOT,
        preexec_fn=ctrl_c_interrupts,  # noqa: PLW1509 -- a test's child, no threads of ours in between
    )
    os.close(secondary)
    try:
        first = _read_until(primary, b"preparation", timeout=30)
        assert b"advance" in first  # the allowed triggers of preparation
        engine.advance()
        later = _read_until(primary, b"rollback", timeout=60)  # dual_write allows rollback
        assert b"rollback" in later
        proc.send_signal(signal.SIGINT)
        assert 0 == _wait_reading(primary, proc, timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(primary)
        stderr.close()


def test_transition_guard_and_step_events_go_to_stderr_as_json(
    store: Journal, upgraded_url: str, cli: Callable[..., CliResult], tmp_path: Path
) -> None:
    """Piped stderr carries one JSON event per guard, step and transition; stdout has none."""
    config = tmp_path / "c.toml"
    config.write_text(
        '[guards]\n"preparation->dual_write" = ["min_soak"]\n'
        '[steps]\n"preparation->dual_write" = ["tests.support.steps:step_a"]\n'
    )
    env = {"PYTHONPATH": str(ROOT)}
    assert 0 == cli("init", "--db", upgraded_url, env=env).code
    result = cli("advance", "--db", upgraded_url, "--config", str(config), env=env)
    assert 0 == result.code, result.stderr
    events = [json.loads(line) for line in result.stderr.splitlines()]
    by_name = {e["event"]: e for e in events}
    assert {"guard", "step", "transition"} <= set(by_name)
    assert ("default", "min_soak", True) == (
        by_name["guard"]["migration"],
        by_name["guard"]["guard"],
        by_name["guard"]["passed"],
    )
    assert ("tests.support.steps:step_a", 2) == (by_name["step"]["step"], by_name["step"]["seq"])
    transition = by_name["transition"]
    assert ("advance", 2, "committed") == (transition["trigger"], transition["seq"], transition["status"])
    assert isinstance(transition["duration_ms"], float)
    assert "{" not in result.stdout


@pytest.mark.parametrize("password", ["s3cret-Pa55"])
def test_password_never_printed(password: str, cli: Callable[..., CliResult]) -> None:
    """A database password appears in no output, on success or on failure."""
    url = f"postgresql+psycopg://postgres:{password}@127.0.0.1:1/nowhere"
    for args in (["status"], ["status", "--json"], ["advance"], ["db", "upgrade"], ["history"]):
        result = cli(*args, "--db", url)
        assert 4 == result.code, result.stderr
        assert password not in result.stdout + result.stderr
        assert "***" in result.error_line


def test_settings_env_overrides_file_and_cli_overrides_env(tmp_path: Path) -> None:
    """Precedence: command-line option > MIGRATION_FSM_* variable > TOML file > default."""
    from migration_fsm.config import load_settings

    config = tmp_path / "c.toml"
    config.write_text('actor = "from-file"\nlease_seconds = 12\n')
    old = dict(os.environ)
    try:
        os.environ["MIGRATION_FSM_ACTOR"] = "from-env"
        settings: Settings = load_settings(config)
        assert ("from-env", 12.0) == (settings.actor, settings.lease_seconds)
        assert "from-cli" == load_settings(config, actor="from-cli").actor
    finally:
        os.environ.clear()
        os.environ.update(old)
