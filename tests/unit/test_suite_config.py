"""The test suite's own safety nets are on."""

from __future__ import annotations

import pytest


def test_a_hung_test_fails_instead_of_hanging_the_run(request: pytest.FixtureRequest) -> None:
    """pytest-timeout is loaded with a default timeout, by signal so the other tests go on."""
    config = request.config
    assert config.pluginmanager.hasplugin("timeout")
    assert 60 <= float(config.getini("timeout")) <= 600
    assert "signal" == config.getini("timeout_method")
