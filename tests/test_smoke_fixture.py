"""The fixtures give a working database on both backends."""

from __future__ import annotations

from migration_fsm.engine import Engine
from migration_fsm.fsm import Phase


def test_engine_fixture_starts_in_preparation(engine: Engine) -> None:
    """A fresh migration is in preparation at version 1."""
    state = engine.store.get("default")
    assert (Phase.PREPARATION, 1) == (state.phase, state.version)
