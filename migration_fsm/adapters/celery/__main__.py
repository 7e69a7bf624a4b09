"""`python -m migration_fsm.adapters.celery setup --app MODULE:APP [--queue NAME]` creates the
adapter's registry in the result backend's Redis and registers the tasks already waiting;
`check --app MODULE:APP` prints what keeps the store from working (exit 1) or `ok`."""

from __future__ import annotations

import argparse
import sys

from migration_fsm.adapters._cli import run

from .store import CeleryTaskStore, setup


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m migration_fsm.adapters.celery")
    parser.add_argument("command", choices=["setup", "check"])
    parser.add_argument("--app", required=True, help="the Celery application, package.module:attribute")
    parser.add_argument("--queue", default="celery")
    args = parser.parse_args(argv)
    return run(args, lambda a: setup(a.app, a.queue), lambda a: CeleryTaskStore(a.app, queue=a.queue))


if __name__ == "__main__":
    sys.exit(main())
