"""The one fork server of the process tests: `python -m tests.support.forkserver` imports
the CLI once and forks a fresh process per CLI run, so a run costs milliseconds to start,
not the ~0.4 s of a new interpreter's imports.

Each stdin line is a request `{"runs": [RUN, ...], "go": PATH or null}`, each RUN
`{"argv": [...], "log": PATH, "crash_at": POINT or null}`. Every run writes its stdout and
stderr to LOG.out and LOG.err; given `go`, it writes LOG.ready and waits for the file GO to
appear before it starts (a barrier for races); given `crash_at`, it is armed to SIGKILL
itself there (`crashkit`). The server reaps the runs, writes `{"pid", "code"}` to LOG.exit
as each ends (code -9: it died of SIGKILL), and answers the request with one stdout line
`{"exits": [{"pid", "code"}, ...]}` in the order of its runs. Nothing here touches a
database before forking, so every run starts as fresh as `python -m migration_fsm` would.

`ForkServer` is the test side.
"""

from __future__ import annotations

import importlib
import json
import os
import select
import signal
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, NoReturn

from tests.support.cli import ROOT, CliResult
from tests.support.steps import touch

BARRIER_TIMEOUT = 60.0
#: How long the test side waits for a request's answer.
WAIT = 120.0


def serve() -> int:
    """Answer requests from stdin until it closes (see the module's docstring)."""
    warm_up()
    from migration_fsm.cli import main as cli_main

    for line in sys.stdin:
        request = json.loads(line)
        go = None if request.get("go") is None else Path(request["go"])
        pids: list[int] = []
        for run in request["runs"]:
            sys.stdout.flush()
            sys.stderr.flush()
            pid = os.fork()
            if pid == 0:
                _forked(cli_main, run.get("crash_at"), run["argv"], Path(run["log"]), go)
            pids.append(pid)
        logs = {pid: Path(run["log"]) for pid, run in zip(pids, request["runs"], strict=True)}
        codes: dict[int, int] = {}
        while len(codes) < len(pids):
            pid, status = os.wait()
            codes[pid] = os.waitstatus_to_exitcode(status)
            touch(logs[pid].with_suffix(".exit"), json.dumps({"pid": pid, "code": codes[pid]}))
        print(json.dumps({"exits": [{"pid": pid, "code": codes[pid]} for pid in pids]}), flush=True)
    return 0


def warm_up() -> None:
    """Do once, before forking, the imports and caches every command would repeat."""
    for module in ("alembic.command", "alembic.runtime.migration", "psycopg", "migration_fsm.cli"):
        importlib.import_module(module)
    from migration_fsm.config import load_settings
    from migration_fsm.journal import head_revisions, make_engine

    head_revisions()
    load_settings(None)
    for url in ("postgresql+psycopg://warm@127.0.0.1/up", "sqlite://"):
        make_engine(url).dispose()  # loads the dialect and its driver; connects nowhere


def _forked(
    cli_main: Callable[[list[str]], int], crash_at: str | None, argv: list[str], log: Path, go: Path | None
) -> NoReturn:
    """The forked run: never returns to the server's loop."""
    code = 70
    try:
        with log.with_suffix(".out").open("wb") as out, log.with_suffix(".err").open("wb") as err:
            os.dup2(out.fileno(), 1)
            os.dup2(err.fileno(), 2)
        if go is not None:
            touch(log.with_suffix(".ready"), str(os.getpid()))
            deadline = time.monotonic() + BARRIER_TIMEOUT
            while not go.exists():
                if time.monotonic() > deadline:
                    raise TimeoutError(f"barrier {go} never opened")
                time.sleep(0.002)
        if crash_at is None:
            code = cli_main(argv)
        else:
            from tests.support.crashkit import CrashPoint, run_armed

            code = run_armed(cli_main, CrashPoint.parse(crash_at), argv)
    except BaseException:  # noqa: BLE001 - report anything, then leave with a code of our own
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def child_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of a subprocess: no MIGRATION_FSM_* of ours, `tests` importable."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MIGRATION_FSM_")}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    env.update(extra or {})
    return env


class ForkServer:
    """The test side of `python -m tests.support.forkserver`."""

    def __init__(self, folder: Path, env: Mapping[str, str] | None = None) -> None:
        self.folder = folder
        with (folder / "server.err").open("wb") as err:
            self.server = subprocess.Popen(
                [sys.executable, "-m", "tests.support.forkserver"],
                cwd=ROOT,
                env=child_env(env),
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=err,
                text=True,
                start_new_session=True,  # its runs share its process group: one kill ends all
            )

    def submit(self, runs: Sequence[Mapping[str, Any]], go: Path | None = None) -> None:
        """Send one request; its answer is read by `answer`."""
        assert self.server.stdin is not None
        request = {"runs": list(runs), "go": None if go is None else str(go)}
        self.server.stdin.write(json.dumps(request) + "\n")
        self.server.stdin.flush()

    def answer(self, logs: Sequence[Path]) -> list[tuple[int, CliResult]]:
        """The pid and result of each run of the request just submitted, in order."""
        assert self.server.stdout is not None
        ready, _, _ = select.select([self.server.stdout], [], [], WAIT)
        if not ready:
            self.close()
            raise TimeoutError(f"the forked CLI runs did not end within {WAIT:.0f} s")
        exits = json.loads(self.server.stdout.readline())["exits"]
        results = []
        for log, ended in zip(logs, exits, strict=True):
            out, err = (log.with_suffix(suffix).read_text(encoding="utf-8") for suffix in (".out", ".err"))
            results.append((int(ended["pid"]), CliResult(int(ended["code"]), out, err)))
        return results

    def run(self, crash_at: object | None, argv: list[str], log: Path) -> tuple[int, CliResult]:
        """The pid and result of one CLI run in a fresh process, armed to die at `crash_at`
        (a `CrashPoint`; exit code -9: it did)."""
        self.submit(
            [{"argv": argv, "log": str(log), "crash_at": None if crash_at is None else str(crash_at)}]
        )
        return self.answer([log])[0]

    def close(self) -> None:
        """Let the server end (its stdin closes), or kill it and its runs."""
        try:
            self.server.communicate(timeout=WAIT)
        except subprocess.TimeoutExpired:
            os.killpg(self.server.pid, signal.SIGKILL)
            self.server.communicate(timeout=WAIT)


if __name__ == "__main__":
    sys.exit(serve())
