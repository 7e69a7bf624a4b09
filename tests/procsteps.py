"""Step callables and a racer fork server for the process tests (`test_processes.py`).

The CLI subprocesses import the steps through config (`"tests.procsteps:sleepy_step"`).
They talk to the test through files in the folder named by `MFSM_PROC_DIR`.

`python -m tests.procsteps` is a fork server for the race test: it imports the CLI once and
forks a fresh process per racer, so eight racers cost milliseconds to start, not seconds,
and they all wait at one barrier file before running the CLI.
"""

from __future__ import annotations

import importlib
import json
import os
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

from migration_fsm.plugins.context import Context

PROC_DIR_ENV = "MFSM_PROC_DIR"
BARRIER_TIMEOUT = 60.0
HOLD_TIMEOUT = 60.0
CHECKPOINT = {"cursor": "task-0042", "copied": 42}


def _dir() -> Path:
    return Path(os.environ[PROC_DIR_ENV])


def touch(path: Path, content: str = "") -> None:
    """Create `path` atomically, so a poller never sees it half written."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(content, encoding="utf-8")
    tmp.replace(path)


def _append(name: str, record: dict[str, Any]) -> None:
    with (_dir() / name).open("a", encoding="utf-8") as file:
        file.write(json.dumps(record) + "\n")


def quick_step(ctx: Context) -> None:
    """Record that it ran; a step that finishes before the crash must not run again."""
    _append("quick_runs.jsonl", {"pid": os.getpid(), "seq": ctx.seq})


def sleepy_step(ctx: Context) -> None:
    """Continue from the checkpoint when there is one; else save one, say so, and sleep
    until the test kills this process."""
    _append("sleepy_runs.jsonl", {"pid": os.getpid(), "seq": ctx.seq, "checkpoint": ctx.checkpoint})
    if ctx.checkpoint is not None:
        return
    ctx.save_checkpoint(CHECKPOINT)
    touch(_dir() / "inside_sleepy_step", str(os.getpid()))
    time.sleep(HOLD_TIMEOUT)  # killed long before this ends


def hold_step(ctx: Context) -> None:
    """Say it is inside the transition, then hold it until the test says `release`
    (when every loser has exited), so losers always meet a live transition."""
    touch(_dir() / f"inside_{ctx.migration}_{os.getpid()}", str(os.getpid()))
    release = _dir() / f"release_{ctx.migration}"
    deadline = time.monotonic() + HOLD_TIMEOUT
    while not release.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{release} never appeared")
        time.sleep(0.01)


def serve() -> int:
    """Fork racers on request, each a fresh process running the CLI once.

    Each stdin line is a JSON object `{"go": PATH, "racers": [{"argv": [...], "log": PATH}]}`.
    Every racer writes LOG.ready, waits for GO, runs the CLI with stdout and stderr in
    LOG.out and LOG.err, and exits with the CLI's exit code; this process reaps it and
    writes `{"pid", "code"}` to LOG.exit. The imports are paid once, here, before forking.
    """
    _warm_up()
    from migration_fsm.cli import main as cli_main

    for line in sys.stdin:
        request = json.loads(line)
        logs: dict[int, Path] = {}
        for racer in request["racers"]:
            sys.stdout.flush()
            sys.stderr.flush()
            pid = os.fork()
            if pid == 0:
                _race(cli_main, racer["argv"], Path(racer["log"]), Path(request["go"]))
            logs[pid] = Path(racer["log"])
        while logs:
            pid, status = os.wait()
            exit_record = {"pid": pid, "code": os.waitstatus_to_exitcode(status)}
            touch(logs.pop(pid).with_suffix(".exit"), json.dumps(exit_record))
    return 0


def _warm_up() -> None:
    """Do once, before forking, the imports and caches every command would repeat."""
    for module in ("alembic.command", "alembic.runtime.migration", "psycopg", "migration_fsm.cli"):
        importlib.import_module(module)
    from migration_fsm.config import load_settings
    from migration_fsm.journal import head_revisions, make_engine

    head_revisions()
    load_settings(None)
    for url in ("postgresql+psycopg://warm@127.0.0.1/up", "sqlite://"):
        make_engine(url).dispose()  # loads the dialect and its driver; connects nowhere


def _race(cli_main: Callable[[list[str]], int], argv: list[str], log: Path, go: Path) -> NoReturn:
    """The forked racer: never returns to the server's loop."""
    code = 70
    try:
        with log.with_suffix(".out").open("wb") as out, log.with_suffix(".err").open("wb") as err:
            os.dup2(out.fileno(), 1)
            os.dup2(err.fileno(), 2)
        touch(log.with_suffix(".ready"), str(os.getpid()))
        deadline = time.monotonic() + BARRIER_TIMEOUT
        while not go.exists():
            if time.monotonic() > deadline:
                raise TimeoutError(f"barrier {go} never opened")
            time.sleep(0.002)
        code = cli_main(argv)
    except BaseException:  # noqa: BLE001 - report anything, then leave with a code of our own
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


if __name__ == "__main__":
    sys.exit(serve())
