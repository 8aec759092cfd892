"""Shared steps of the dashboard tests: a page in Debian's headless Chromium, read by test id.

The browser is the real one (driven by Playwright); a page collects every script error
and every console error it logs, and a test ends by asserting there were none.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from playwright.async_api import ConsoleMessage, Page, Playwright

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
# Chromium logs every 4xx answer to fetch() as a console error. A page asked to work
# without a scope is refused with 401 or 403 on purpose; anything else is a problem.
_REFUSED = re.compile(r"Failed to load resource: the server responded with a status of 40[13]\b")


def require_chromium() -> None:
    # Never skipped: CI installs the package (.ci/run); a missing browser is a failure.
    assert CHROMIUM.exists(), (
        f"{CHROMIUM} is missing: install Debian's chromium (apt-get install chromium)"
    )


class Browsing:
    """An open page, and the problems it reported so far."""

    def __init__(self, page: Page) -> None:
        self.page = page
        self.problems: list[str] = []
        page.on("pageerror", lambda e: self.problems.append(f"page error: {e}"))
        page.on("console", self._console)

    def _console(self, message: ConsoleMessage) -> None:
        if message.type == "error" and not _REFUSED.search(message.text):
            self.problems.append(f"console: {message.text}")


@asynccontextmanager
async def chromium_page(playwright: Playwright, *, height: int = 800) -> AsyncIterator[Browsing]:
    """Launch headless Chromium and open one page on it; close the browser on the way out."""
    require_chromium()
    browser = await playwright.chromium.launch(
        executable_path=str(CHROMIUM),
        headless=True,
        args=CHROMIUM_ARGS,
        timeout=120_000,  # a first start builds the font cache: slow on a busy machine
    )
    try:
        yield Browsing(await browser.new_page(viewport={"width": 1440, "height": height}))
    finally:
        await browser.close()


async def text_of(page: Page, test_id: str) -> str:
    """The text of the first element with ``test_id``, stripped."""
    return (await page.get_by_test_id(test_id).first.text_content() or "").strip()
