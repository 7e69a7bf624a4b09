"""The `setup` / `check` command line every adapter ships as `python -m migration_fsm.adapters.NAME`."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any

from migration_fsm.exceptions import MigrationFSMError

if TYPE_CHECKING:
    import argparse
    from collections.abc import Callable


def run(
    args: argparse.Namespace,
    setup: Callable[[argparse.Namespace], list[str]],
    open_store: Callable[[argparse.Namespace], Any],
) -> int:
    """`setup` prints what it did (exit 0); `check` prints what keeps the store from working
    (exit 1) or `ok` (exit 0); an error is one `error:` line and its exit code."""
    try:
        if args.command == "setup":
            for line in setup(args):
                print(line)
            return 0
        store = open_store(args)
        try:
            problems: list[str] = store.check_setup()
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
