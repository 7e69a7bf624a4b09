"""`python -m migration_fsm.adapters.rq setup --url URL --queue NAME` indexes the queue's jobs;
`check` prints what keeps the store from working (exit 1) or `ok`."""

from __future__ import annotations

import argparse
import sys

from migration_fsm.exceptions import MigrationFSMError

from .store import RqTaskStore, setup


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m migration_fsm.adapters.rq")
    parser.add_argument("command", choices=["setup", "check"])
    parser.add_argument("--url", default="redis://127.0.0.1:6379/0", help="the Redis RQ uses")
    parser.add_argument("--queue", default="default")
    args = parser.parse_args(argv)
    try:
        if args.command == "setup":
            for line in setup(args.url, args.queue):
                print(line)
            return 0
        store = RqTaskStore(args.url, queue=args.queue)
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
