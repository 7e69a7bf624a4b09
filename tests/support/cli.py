"""The CLI as the tests run it: in this process through `migration_fsm.cli.main` (fast), or
as `python -m migration_fsm` in a subprocess, as a user runs it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from dataclasses import dataclass

import structlog
from click.testing import CliRunner

from tests.support import ROOT

__all__ = ["ROOT", "CliResult", "run_cli", "run_cli_in_process", "run_cli_process"]


@dataclass(frozen=True)
class CliResult:
    code: int
    stdout: str
    stderr: str

    @property
    def error_line(self) -> str:
        """The one `error: ...` line the CLI prints on failure."""
        lines = [line for line in self.stderr.splitlines() if line.startswith("error: ")]
        assert len(lines) == 1, self.stderr
        return lines[0]


def run_cli(
    *args: str, env: dict[str, str] | None = None, timeout: float = 120, subprocess: bool = False
) -> CliResult:
    """Run the CLI with ARGS: in this process through `migration_fsm.cli.main` (the default),
    or, with `subprocess=True`, as `python -m migration_fsm ARGS` as a user runs it. Either way
    the `MIGRATION_FSM_*` variables of our environment are left out and `env` is added."""
    if subprocess:
        return run_cli_process(*args, env=env, timeout=timeout)
    return run_cli_in_process(*args, env=env)


def run_cli_process(*args: str, env: dict[str, str] | None = None, timeout: float = 120) -> CliResult:
    """Run `python -m migration_fsm ARGS` in a subprocess, as a user runs it."""
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("MIGRATION_FSM_")}
    full_env.update(env or {})
    proc = subprocess.run(
        [sys.executable, "-m", "migration_fsm", *args],
        capture_output=True,
        text=True,
        env=full_env,
        timeout=timeout,
        check=False,
        stdin=subprocess.DEVNULL,
    )
    return CliResult(proc.returncode, proc.stdout, proc.stderr)


#: One in-process run at a time: a run swaps sys.stdout, sys.stderr and os.environ.
_IN_PROCESS = threading.Lock()


def run_cli_in_process(*args: str, env: dict[str, str] | None = None) -> CliResult:
    """Run `migration_fsm.cli.main(ARGS)` here, with stdout, stderr and the environment of a
    subprocess, and the logging configuration it changes put back afterwards."""
    from migration_fsm.cli import main

    overrides: dict[str, str | None] = {k: None for k in os.environ if k.startswith("MIGRATION_FSM_")}
    overrides.update(env or {})
    runner = CliRunner()
    with _IN_PROCESS:
        logging_before = structlog.get_config()
        try:
            with runner.isolation(env=overrides) as (stdout, stderr, _):
                code = main(list(args))
                sys.stdout.flush()
                sys.stderr.flush()
                result = CliResult(code, stdout.getvalue().decode(), stderr.getvalue().decode())
        finally:
            structlog.reset_defaults()
            structlog.configure(**logging_before)
    return result


def ctrl_c_interrupts() -> None:
    """`preexec_fn` for a CLI process a test ends with Ctrl-C (SIGINT): its default action, as
    in a terminal's foreground job. A suite started as a background job (`make test &`)
    ignores SIGINT, which every child inherits, and Python then never raises
    KeyboardInterrupt: the child would go on after the test's Ctrl-C."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
