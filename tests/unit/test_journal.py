"""`migration_fsm.journal` is the journal layer's face, and the old `migration_fsm.store`
path still resolves every public name the old module had (with a warning)."""

from __future__ import annotations

import importlib
import sys
import warnings

import pytest

from migration_fsm import journal

#: Every public name of the old one-file `store` module (before the journal was split).
OLD_STORE_NAMES = [
    "JournalEntry",
    "MigrationState",
    "NOTIFY_CHANNEL",
    "SQLITE_BUSY_TIMEOUT_MS",
    "StepRecord",
    "UTCDateTime",
    "alembic_config",
    "chain_hash",
    "head_revisions",
    "journal_table",
    "lease_held_error",
    "lease_holder_name",
    "make_engine",
    "metadata",
    "migrations_dir",
    "migrations_table",
    "repair_log_table",
    "safe_url",
    "steps_table",
    "utcnow",
]


def test_the_facade_exports_what_it_lists() -> None:
    for name in journal.__all__:
        assert getattr(journal, name) is not None, name
    assert set(OLD_STORE_NAMES) <= set(journal.__all__)


def test_the_old_store_path_resolves_every_old_name() -> None:
    sys.modules.pop("migration_fsm.store", None)
    with pytest.warns(DeprecationWarning, match=r"migration_fsm\.store moved to migration_fsm\.journal"):
        old = importlib.import_module("migration_fsm.store")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for name in OLD_STORE_NAMES:
            assert getattr(old, name) is getattr(journal, name), name
        assert old.Store is journal.Journal


def test_migrations_dir_finds_the_revisions() -> None:
    """`migrations_dir()` is computed from its own file: it must still find `env.py`."""
    assert (journal.migrations_dir() / "env.py").is_file()
    assert journal.head_revisions()
