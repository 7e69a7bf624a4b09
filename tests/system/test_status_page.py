"""The status page in a real headless browser (Debian's Chromium, driven by Playwright): it
draws the phase diagram with the current phase marked, the routing and the journal, saves a
screenshot, and shows a phase change made meanwhile without a reload."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.sync_api import Browser, Page, sync_playwright

from migration_fsm.migration import Migration
from migration_fsm.serve import StatusServer

pytestmark = pytest.mark.slow

#: How long the page may take to show a change (it polls every 1.5 s): a bound against a hang,
#: not a measurement.
SHOWN_WITHIN_MS = 15_000
TOKEN = "page-token"  # noqa: S105  a test's own token


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    assert chromium, "Debian's chromium is not installed: `make chromium` (or .ci/run) installs it"
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        yield launched
        launched.close()


def current_phase(page: Page) -> str:
    return str(page.locator("#phases li.current").inner_text())


@pytest.mark.parametrize("db_url", ["sqlite", "postgresql"], indirect=True)
def test_the_page_shows_the_migration_and_follows_a_phase_change(
    engine: Migration, browser: Browser, tmp_path: Path
) -> None:
    server = StatusServer(engine.settings, "default", listen="127.0.0.1:0", token=TOKEN)
    server.start()
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    try:
        page.goto(server.url + f"?token={TOKEN}")
        page.wait_for_function(
            "document.getElementById('phase').textContent === 'preparation'", timeout=SHOWN_WITHIN_MS
        )
        # The journal is read after the status (`refresh` in page.html): wait for it too.
        page.wait_for_function(
            "document.getElementById('journal').rows.length === 1", timeout=SHOWN_WITHIN_MS
        )
        assert "preparation" == current_phase(page)
        assert "step" == page.locator("#phases li.current").get_attribute("aria-current")
        assert "old" in page.locator("#routing").inner_text()
        assert "init" in page.locator("#journal").inner_text()
        assert not page.locator("#banner").is_visible()

        engine.advance()
        page.wait_for_function(
            "document.getElementById('phase').textContent === 'dual_write'", timeout=SHOWN_WITHIN_MS
        )
        assert "dual_write" == current_phase(page)
        assert ["preparation"] == page.locator("#phases li.done").all_inner_texts()
        page.wait_for_function(
            "document.getElementById('journal').rows.length === 2", timeout=SHOWN_WITHIN_MS
        )
        assert "preparation->dual_write" in page.locator("#journal tr").first.inner_text()

        shot = tmp_path / "status-page.png"
        page.screenshot(path=str(shot), full_page=True)
        assert shot.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
        assert shot.stat().st_size > 10_000  # a drawn page, not a blank one
    finally:
        page.close()
        server.shutdown()


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_without_the_token_neither_the_page_nor_its_api_answers(engine: Migration, browser: Browser) -> None:
    server = StatusServer(engine.settings, "default", listen="127.0.0.1:0", token=TOKEN)
    server.start()
    page = browser.new_page()
    try:
        status = page.goto(server.url)
        assert status is not None
        assert 401 == status.status
        page.goto(server.url + "?token=wrong")
        assert 401 == page.evaluate("fetch('/api/status').then(r => r.status)")
    finally:
        page.close()
        server.shutdown()
