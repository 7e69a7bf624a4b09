"""`python -m migration_fsm.adapters.procrastinate setup --url URL` creates the adapter's
registry table; `check --url URL` prints what keeps the store from working (exit 1) or `ok`."""

from __future__ import annotations

import argparse
import sys

from migration_fsm.adapters._cli import run

from .store import ProcrastinateTaskStore, setup


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m migration_fsm.adapters.procrastinate")
    parser.add_argument("command", choices=["setup", "check"])
    parser.add_argument("--url", required=True, help="Procrastinate's PostgreSQL database")
    args = parser.parse_args(argv)
    return run(args, lambda a: setup(a.url), lambda a: ProcrastinateTaskStore(a.url))


if __name__ == "__main__":
    sys.exit(main())
