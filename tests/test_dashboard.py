"""The dashboard in a real headless Chromium (Debian's ``chromium``, driven by Playwright).

A worker and the API run against the test servers; events go through the whole pipeline,
one of them into the dead-letter stream (its webhook answers 500, one attempt allowed).
The page must show what the database holds, and its replay button must bring the dead
letter back to completion once the webhook is fixed.

A second test opens the page as a loopback reader with no tokens set: the dead letters
are shown read-only, and the counts beside each other say what each counts.

The screenshot goes to ``$DASHBOARD_SCREENSHOT`` when set (``docs/dashboard.png``
for the README), else to the test's temporary directory.
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import anyio
import pytest
from playwright.async_api import Page, async_playwright
from psycopg_pool import AsyncConnectionPool
from redis.asyncio import Redis

from govflow.api.app import create_app
from govflow.consumers import pause
from govflow.db import dead_letters
from govflow.db.dead_letters import NewDeadLetter
from govflow.operations import interventions, lag
from govflow.producers.publish import Publisher
from govflow.schemas.events import Change, new_event
from govflow.schemas.keys import Keys
from govflow.schemas.settings import Settings
from tests.api_helpers import (
    API_TOKENS,
    THREE_STEPS,
    TOKENS,
    seed_execution,
    serving,
)
from tests.pipeline_helpers import apply, running_worker, wait_for

pytestmark = [pytest.mark.anyio, pytest.mark.slow, pytest.mark.timeout(300)]

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

REVIEW = """
name: policy-review
entity: policy
trigger: create
actions:
  - create_task: {title: "Review {data.title}", assignee: "{data.owner}"}
  - assign: {assignee: risk-team}
  - create_approval: {approvers: [compliance-officer], due_in_days: 5}
"""

NOTIFY = """
name: notify-grc
entity: policy
trigger: status_change
actions:
  - create_task: {title: "Check {data.title}"}
  - notify: {webhook: "WEBHOOK", message: "{data.title} changed"}
"""


class Hook:
    """A webhook receiver on a loopback port that answers with ``status``."""

    def __init__(self) -> None:
        self.status = 500
        self.calls = 0
        self.url = ""


@contextmanager
def webhook_receiver() -> Iterator[Hook]:
    hook = Hook()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            self.rfile.read(int(self.headers.get("Content-Length", 0)))
            hook.calls += 1
            self.send_response(hook.status)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    hook.url = f"http://127.0.0.1:{server.server_address[1]}/grc"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield hook
    finally:
        server.shutdown()
        server.server_close()


async def rows(pool: AsyncConnectionPool[Any], query: str) -> list[tuple[Any, ...]]:
    async with pool.connection() as conn:
        cur = await conn.execute(query.encode())
        found: list[tuple[Any, ...]] = await cur.fetchall()
        return found


async def by_status(pool: AsyncConnectionPool[Any]) -> dict[str, int]:
    found = await rows(pool, "SELECT status, count(*) FROM workflow_executions GROUP BY status")
    return {status: int(n) for status, n in found}


async def text_of(page: Page, test_id: str) -> str:
    return (await page.get_by_test_id(test_id).first.text_content() or "").strip()


async def shown_counts(page: Page) -> dict[str, int]:
    """The counters by status as the page shows them (before the first refresh: none)."""
    counts = {}
    for status in ("queued", "running", "retrying", "completed", "dead_lettered"):
        text = await text_of(page, f"count-{status}")
        if text.isdigit() and int(text):
            counts[status] = int(text)
    return counts


def require_chromium() -> None:
    # Never skipped: CI installs the package (.ci/run); a missing browser is a failure.
    assert CHROMIUM.exists(), (
        f"{CHROMIUM} is missing: install Debian's chromium (apt-get install chromium)"
    )


async def test_the_dashboard_shows_the_database_and_replays_a_dead_letter(
    make_settings: Callable[..., Settings],
    pool: AsyncConnectionPool[Any],
    redis: Redis,
    tmp_path: Path,
) -> None:
    require_chromium()
    settings = make_settings(api_tokens=API_TOKENS, max_attempts=1)
    keys = Keys(settings.prefix)
    screenshot = Path(os.environ.get("DASHBOARD_SCREENSHOT") or tmp_path / "dashboard.png")

    with webhook_receiver() as hook:
        await apply(pool, REVIEW)
        await apply(pool, NOTIFY.replace("WEBHOOK", hook.url))
        events = [
            new_event(
                "policy.created",
                f"POL-{1040 + n}",
                tenant="acme",
                data={"title": title, "owner": f"user-{n}", "status": "draft"},
            )
            for n, title in enumerate(
                ["Access control", "Data retention", "Vendor risk", "Incident response"]
            )
        ]
        events.append(
            new_event(
                "policy.status_changed",
                "POL-1042",
                tenant="acme",
                data={"title": "Vendor risk", "status": "pending_approval"},
                changes={"status": Change("draft", "pending_approval")},
            )
        )
        async with (
            running_worker(settings, concurrency=1),
            serving(create_app(settings)) as url,
            async_playwright() as playwright,
        ):
            await Publisher(redis, keys).publish_many(events)
            await wait_for(
                lambda: by_status(pool),
                lambda s: s == {"completed": 4, "dead_lettered": 1},
                within=60,
                what="4 executions completed and 1 dead-lettered",
            )
            # The dead letter is recorded just after its execution's status commits.
            ((letter_id, reason),) = await wait_for(
                lambda: rows(pool, "SELECT id, error FROM dead_letters WHERE replayed_at IS NULL"),
                bool,
                within=30,
                what="the dead letter recorded",
            )
            assert "webhook answered 500" in reason

            browser = await playwright.chromium.launch(
                executable_path=str(CHROMIUM),
                headless=True,
                args=CHROMIUM_ARGS,
                timeout=120_000,  # a first start builds the font cache: slow on a busy machine
            )
            try:
                page = await browser.new_page(viewport={"width": 1440, "height": 800})
                problems: list[str] = []
                page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
                page.on(
                    "console",
                    lambda m: problems.append(f"console: {m.text}") if m.type == "error" else None,
                )
                await page.goto(f"{url}/#token={TOKENS['admin']}")
                # The token left the URL for sessionStorage.
                await wait_for(
                    lambda: page.evaluate("location.hash"), lambda h: h == "", within=10, what="#"
                )

                # The numbers shown are the database's.
                db_counts = await by_status(pool)
                await wait_for(
                    lambda: shown_counts(page),
                    lambda c: c == db_counts,
                    within=20,
                    what=f"the page to show {db_counts}",
                )
                assert await text_of(page, "throughput-total") == "4"
                report = await lag.read_lag(redis, pool, keys)
                lag_rows = page.get_by_test_id("lag-row")
                assert await lag_rows.count() == len(report.groups)
                for n, group in enumerate(report.groups):
                    row = lag_rows.nth(n)
                    assert await row.get_attribute("data-group") == group.group
                    shown_lag = await row.get_by_test_id("lag-value").text_content()
                    assert shown_lag == str(group.lag)
                    shown_pending = await row.get_by_test_id("pending-value").text_content()
                    assert shown_pending == str(group.pending)
                assert await text_of(page, "lag-dead-letters") == "1"

                executions = page.get_by_test_id("exec-row")
                assert await executions.count() == 5
                dead_row = page.locator('[data-testid="exec-row"][data-status="dead_lettered"]')
                assert await dead_row.get_by_test_id("progress").text_content() == "step 2 of 2"
                steps = dead_row.locator("[data-step-status]")
                assert [await steps.nth(i).get_attribute("data-step-status") for i in (0, 1)] == [
                    "completed",
                    "failed",
                ]

                letters = page.get_by_test_id("dead-row")
                assert await letters.count() == 1
                assert await letters.first.get_attribute("data-dead-letter") == str(letter_id)
                assert reason in (await text_of(page, "dead-reason"))
                await page.screenshot(path=str(screenshot), full_page=True)

                # Fix the webhook, replay by clicking, see it complete.
                hook.status = 200
                await page.get_by_test_id(f"replay-{letter_id}").click()
                await wait_for(
                    lambda: by_status(pool),
                    lambda s: s == {"completed": 5},
                    within=60,
                    what="the replayed execution to complete",
                )
                await wait_for(
                    lambda: shown_counts(page),
                    lambda c: c == {"completed": 5},
                    within=20,
                    what="the page to show 5 completed",
                )
                assert await page.get_by_test_id("dead-row").count() == 0
                assert await text_of(page, "throughput-total") == "5"
                assert not problems, problems
            finally:
                await browser.close()

    ((replayed_by, replay_reason),) = await rows(
        pool, f"SELECT replayed_by, replay_reason FROM dead_letters WHERE id = {int(letter_id)}"
    )
    token_hash = hashlib.sha256(TOKENS["admin"].encode()).hexdigest()[:8]
    assert (replayed_by, replay_reason) == (f"api:{token_hash}", "replayed from the dashboard")
    assert hook.calls == 2  # the failed delivery, then the replayed one
    assert (await anyio.Path(screenshot).stat()).st_size > 10_000


async def test_a_loopback_reader_sees_dead_letters_read_only_and_counts_told_apart(
    make_settings: Callable[..., Settings],
    pool: AsyncConnectionPool[Any],
    redis: Redis,
) -> None:
    """No tokens set: the page on loopback shows the dead letters without a replay button;
    two executions dead-lettered beside one open dead letter (the other's was purged),
    each count labelled for what it counts; a cancelled execution; a paused group."""
    require_chromium()
    settings = make_settings(api_tokens="")
    keys = Keys(settings.prefix)
    await apply(pool, THREE_STEPS)
    dead = [
        await seed_execution(pool, failed_step=(1, "boom"), status="dead_lettered")
        for _ in range(2)
    ]
    cancelled = await seed_execution(pool)
    async with pool.connection() as conn:
        await dead_letters.record(
            conn,
            [
                NewDeadLetter(
                    stream=keys.commands(), message_id=f"1-{n}", payload={"command": "{}"},
                    error=f"webhook answered 500 ({n})", attempts=5, execution_id=exec_id,
                )
                for n, exec_id in enumerate(dead)
            ],
        )  # fmt: skip
        await conn.execute("UPDATE dead_letters SET purged_at = now() WHERE message_id = '1-0'")
    await interventions.cancel(pool, [cancelled], actor="ops", reason=None)
    await pause.pause(
        redis, keys, pause.Pause(group="actions", by="ops", since=datetime.now(UTC), reason=None)
    )

    async with serving(create_app(settings)) as url, async_playwright() as playwright:
        browser = await playwright.chromium.launch(
            executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS, timeout=120_000
        )
        try:
            page = await browser.new_page(viewport={"width": 1440, "height": 800})
            await page.goto(url)
            await wait_for(
                lambda: shown_counts(page),
                lambda c: c == {"dead_lettered": 2},
                within=20,
                what="the page to show 2 dead-lettered",
            )
            assert await text_of(page, "count-cancelled") == "1"
            assert await text_of(page, "lag-dead-letters") == "1"
            totals = await page.locator(".totals").first.text_content() or ""
            assert "open dead letters 1" in " ".join(totals.split())
            letters = page.get_by_test_id("dead-row")
            assert await letters.count() == 1
            assert "webhook answered 500 (1)" in await text_of(page, "dead-reason")
            assert await page.locator("button.replay").count() == 0
            assert await text_of(page, "replay-needs-token") == "token needed to replay"
            actions = page.locator('[data-testid="lag-row"][data-group="actions"]')
            assert await actions.get_by_test_id("paused").count() == 1
            triggers = page.locator('[data-testid="lag-row"][data-group="triggers"]')
            assert await triggers.get_by_test_id("paused").count() == 0
        finally:
            await browser.close()
