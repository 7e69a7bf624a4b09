"""`python -m migration_fsm.adapters.huey setup --app MODULE:HUEY` creates the adapter's registry
table in the application's SQLite file and registers the tasks already queued or scheduled;
`check --app MODULE:HUEY` prints what keeps the store from working (exit 1) or `ok`."""

from __future__ import annotations

import argparse
import sys

from migration_fsm.adapters._cli import run

from .store import HueyTaskStore, setup


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m migration_fsm.adapters.huey")
    parser.add_argument("command", choices=["setup", "check"])
    parser.add_argument("--app", required=True, help="the Huey application, package.module:attribute")
    args = parser.parse_args(argv)
    return run(args, lambda a: setup(a.app), lambda a: HueyTaskStore(a.app))


if __name__ == "__main__":
    sys.exit(main())
