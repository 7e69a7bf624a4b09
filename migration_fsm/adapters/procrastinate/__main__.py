"""`python -m migration_fsm.adapters.procrastinate setup --url URL` creates the adapter's
registry table; `check --url URL` prints what keeps the store from working (exit 1) or `ok`."""

from __future__ import annotations

import argparse
import sys

from migration_fsm.exceptions import MigrationFSMError

from .store import ProcrastinateTaskStore, setup


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m migration_fsm.adapters.procrastinate")
    parser.add_argument("command", choices=["setup", "check"])
    parser.add_argument("--url", required=True, help="Procrastinate's PostgreSQL database")
    args = parser.parse_args(argv)
    try:
        if args.command == "setup":
            for line in setup(args.url):
                print(line)
            return 0
        store = ProcrastinateTaskStore(args.url)
        try:
            problems = store.check_setup()
        finally:
            store.close()
    except MigrationFSMError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    for problem in problems:
        print(problem, file=sys.stderr)
    if not problems:
        print("ok")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
