"""`python -m migration_fsm.adapters.rq setup --url URL --queue NAME` indexes the queue's jobs;
`check` prints what keeps the store from working (exit 1) or `ok`."""

from __future__ import annotations

import argparse
import sys

from migration_fsm.adapters._cli import run

from .store import RqTaskStore, setup


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m migration_fsm.adapters.rq")
    parser.add_argument("command", choices=["setup", "check"])
    parser.add_argument("--url", default="redis://127.0.0.1:6379/0", help="the Redis RQ uses")
    parser.add_argument("--queue", default="default")
    args = parser.parse_args(argv)
    return run(args, lambda a: setup(a.url, a.queue), lambda a: RqTaskStore(a.url, queue=a.queue))


if __name__ == "__main__":
    sys.exit(main())
