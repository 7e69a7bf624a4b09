"""`migration-fsm reconcile` replays the dual-write repair log, on SQLite and PostgreSQL."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from migration_fsm.client import RepairLog
from migration_fsm.config import load_settings
from migration_fsm.journal import Journal
from migration_fsm.migration import Migration
from migration_fsm.tasks.factory import build_store
from migration_fsm.tools.reconcile import open_entries
from tests.support.cli import CliResult
from tests.support.datatools import create_task_table, everything, sql_stores, task, write_stores_config


def test_reconcile_cli_replays_once_and_then_changes_nothing(
    engine: Migration, store: Journal, upgraded_url: str, tmp_path: Path, cli: Callable[..., CliResult]
) -> None:
    """Open entries are copied from the side that has them; a second run finds nothing to do."""
    stores = sql_stores(upgraded_url)
    for table in ("old_tasks", "new_tasks"):
        create_task_table(upgraded_url, table)
    config = write_stores_config(tmp_path / "c.toml", stores)
    settings = load_settings(config, database_url=upgraded_url)
    old = build_store(settings.stores["old"], "old")
    new = build_store(settings.stores["new"], "new")
    old.put_many([task(i) for i in range(3)])
    new.put_many([task(0)])
    repair = RepairLog(upgraded_url, "default")
    repair.record(task(1).key, "new", "ConnectionError: new is down")
    repair.record(task(2).key, "new", "ConnectionError: new is down")
    repair.close()

    first = cli("reconcile", "--json", "--db", upgraded_url, "--config", config)
    assert 0 == first.code, first.stderr
    assert {"replayed": 2, "already_current": 0, "absent": 0, "failed": 0, "open": 0} == json.loads(
        first.stdout
    )
    assert everything(old) == everything(new)
    second = cli("reconcile", "--json", "--db", upgraded_url, "--config", config)
    assert (0, 0) == (json.loads(second.stdout)["replayed"], open_entries(store, "default"))
    for opened in (old, new):
        getattr(opened, "close", lambda: None)()


def test_reconcile_without_stores_is_a_config_error(
    engine: Migration, upgraded_url: str, cli: Callable[..., CliResult]
) -> None:
    """Without [stores.*] in the config, reconcile exits 2 and says what is missing."""
    result = cli("reconcile", "--db", upgraded_url)
    assert 2 == result.code
    assert "stores.old" in result.error_line
