"""The dashboard in a real headless Chromium (Debian's ``chromium``, driven by Playwright).

A worker and the API run against the test servers; events go through the whole pipeline,
one of them into the dead-letter stream (its webhook answers 500, one attempt allowed).
The page must show what the database holds, and its replay button must bring the dead
letter back to completion once the webhook is fixed. Its approvals inbox decides, by
clicking, approvals that executions wait on, and the worker runs them on; its detail
view shows an execution's event, steps, approvals and tasks; its executions are searched
and paged as ``GET /executions`` answers.

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
from govflow.db import dead_letters, executions
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
from tests.dashboard_helpers import chromium_page, text_of
from tests.pipeline_helpers import apply, running_worker, wait_for

pytestmark = [pytest.mark.anyio, pytest.mark.slow, pytest.mark.timeout(300)]

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


async def shown_counts(page: Page) -> dict[str, int]:
    """The counters by status as the page shows them (before the first refresh: none)."""
    counts = {}
    for status in ("queued", "running", "retrying", "waiting", "completed", "dead_lettered"):
        text = await text_of(page, f"count-{status}")
        if text.isdigit() and int(text):
            counts[status] = int(text)
    return counts


async def test_the_dashboard_shows_the_database_and_replays_a_dead_letter(
    make_settings: Callable[..., Settings],
    pool: AsyncConnectionPool[Any],
    redis: Redis,
    tmp_path: Path,
) -> None:
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
            running_worker(settings, concurrency=1) as worker,
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

            async with chromium_page(playwright) as browsing:
                page = browsing.page
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

                # The worker, by its heartbeat: live, with its two consumers.
                shown_worker = page.locator(
                    f'[data-testid="worker-row"][data-worker="{worker.id}"]'
                )
                await wait_for(
                    lambda: shown_worker.get_attribute("data-state"),
                    lambda state: state == "live",
                    within=20,
                    what="the worker shown live",
                )
                assert await page.get_by_test_id("worker-row").count() == 1
                consumers = shown_worker.get_by_test_id("worker-consumers")
                assert await consumers.text_content() == "2"  # one per group
                live_consumers = page.get_by_test_id("live-consumers")
                assert [await live_consumers.nth(n).text_content() for n in (0, 1)] == ["1", "1"]

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
                assert not browsing.problems, browsing.problems

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

    async with (
        serving(create_app(settings)) as url,
        async_playwright() as playwright,
        chromium_page(playwright) as browsing,
    ):
        page = browsing.page
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


# The approvals inbox and the execution detail --------------------------------------------

DECIDER = "tok-decide-91c4"  # read and decide; no operate: dead letters stay hidden

APPROVAL = """
name: policy-approval
entity: policy
trigger: create
actions:
  - create_approval:
      approvers: [compliance-officer, ciso]
      required: all
      due_in: 5d
      wait: true
      on_approved: [{assign: {assignee: publisher}}]
      on_rejected: [{create_task: {title: "Rework {data.title}", assignee: "{data.owner}"}}]
  - create_task: {title: "Publish {data.title}", assignee: "{data.owner}"}
"""

ASSESSMENT = """
name: assessment-signoff
entity: assessment
trigger: create
actions:
  - create_approval: {approvers: [risk-committee], wait: true}
"""


async def approval_ids(pool: AsyncConnectionPool[Any]) -> dict[str, tuple[str, str]]:
    """Each entity's approval and execution ids."""
    found = await rows(
        pool,
        "SELECT e.entity_id, a.id::text, e.id::text FROM approvals a"
        " JOIN workflow_executions e ON e.id = a.execution_id",
    )
    return {entity: (approval, execution) for entity, approval, execution in found}


async def execution_status(pool: AsyncConnectionPool[Any], execution_id: str) -> str:
    ((status,),) = await rows(
        pool, f"SELECT status FROM workflow_executions WHERE id = '{execution_id}'"
    )
    return str(status)


async def shown_entities(page: Page) -> list[str]:
    """The entities of the approvals the inbox shows, in its order."""
    return await attributes(page, "approval-row", "data-entity")


async def attributes(page: Page, test_id: str, name: str) -> list[str]:
    """Attribute ``name`` of every element with ``test_id``, read at one instant.

    One evaluation in the page: a refresh that rebuilds the rows between two reads would
    otherwise leave a test waiting for a row that is gone.
    """
    found: list[str] = await page.get_by_test_id(test_id).evaluate_all(
        "(nodes, name) => nodes.map((node) => node.getAttribute(name))", name
    )
    return found


async def test_the_inbox_approves_and_rejects_and_the_executions_go_on(
    make_settings: Callable[..., Settings], pool: AsyncConnectionPool[Any], redis: Redis
) -> None:
    settings = make_settings(api_tokens=f"{API_TOKENS} {DECIDER}:read,decide")
    await apply(pool, APPROVAL)
    await apply(pool, ASSESSMENT)
    events = [
        new_event("policy.created", "POL-1", tenant="acme", data={"title": "Access control"}),
        new_event(
            "policy.created",
            "POL-2",
            tenant="acme",
            data={"title": "Data retention", "owner": "bo"},
        ),
        new_event("assessment.created", "ASM-1", tenant="acme", data={"title": "Vendor risk"}),
    ]
    async with (
        running_worker(settings, concurrency=1),
        serving(create_app(settings)) as url,
        async_playwright() as playwright,
        chromium_page(playwright) as browsing,
    ):
        await Publisher(redis, Keys(settings.prefix)).publish_many(events)
        await wait_for(
            lambda: by_status(pool), lambda s: s == {"waiting": 3}, within=60, what="3 waiting"
        )
        ids = await approval_ids(pool)
        page = browsing.page

        # A reader sees the inbox, and no button to decide with.
        await page.goto(f"{url}/#token={TOKENS['reader']}")
        await wait_for(
            lambda: shown_entities(page),
            lambda e: sorted(e) == ["ASM-1", "POL-1", "POL-2"],
            within=20,
            what="the inbox to show the three pending approvals",
        )
        assert await text_of(page, "count-waiting") == "3"
        assert "decide scope" in await text_of(page, "inbox-note")
        assert await page.locator('[data-testid^="approve-"]').count() == 0
        pol1 = page.locator(f'[data-testid="approval-row"][data-approval="{ids["POL-1"][0]}"]')
        assert await pol1.get_by_test_id("approval-progress").text_content() == "0 of 2"
        assert "(in 4 d 23 h)" in (await pol1.get_by_test_id("approval-due").text_content() or "")

        # A token with the decide scope, given in the page, brings the buttons.
        await page.get_by_role("button", name="Forget token").click()
        await page.locator("#token-input").fill(DECIDER)
        await page.get_by_role("button", name="Use").click()
        await wait_for(
            lambda: page.locator('[data-testid^="approve-"]').count(),
            lambda n: n == 3,
            within=20,
            what="an approve button on each pending approval",
        )

        # The inbox of one approver; the first of two approvals leaves POL-1 waiting.
        await page.get_by_test_id("inbox-approver").fill("ciso")
        await page.get_by_test_id("inbox-submit").click()
        await wait_for(
            lambda: shown_entities(page),
            lambda e: e == ["POL-1", "POL-2"],
            within=20,
            what="ciso's approvals only",
        )
        assert await pol1.get_by_test_id("decide-by").input_value() == "ciso"
        await pol1.get_by_test_id("decide-comment").fill("controls look right")
        await page.get_by_test_id(f"approve-{ids['POL-1'][0]}").click()
        await wait_for(
            lambda: pol1.get_by_test_id("approval-progress").text_content(),
            lambda t: t == "1 of 2",
            within=20,
            what="POL-1 to show one approval of two",
        )
        assert "ciso approved" in (await pol1.get_by_test_id("decision").text_content() or "")
        assert await execution_status(pool, ids["POL-1"][1]) == "waiting"

        # The second approver: the approval is approved, and the execution runs on.
        assert await pol1.get_by_test_id("decide-by").input_value() == "compliance-officer"
        await page.get_by_test_id(f"approve-{ids['POL-1'][0]}").click()
        await wait_for(
            lambda: execution_status(pool, ids["POL-1"][1]),
            lambda s: s == "completed",
            within=60,
            what="POL-1's execution to complete once approved",
        )
        pol1_row = page.locator(f'[data-testid="exec-row"][data-execution="{ids["POL-1"][1]}"]')
        await wait_for(
            lambda: pol1_row.get_attribute("data-status"),
            lambda s: s == "completed",
            within=20,
            what="the page to show POL-1 completed",
        )
        assert await shown_entities(page) == ["POL-2"]

        # A rejection runs the rejection branch, and the execution ends.
        pol2 = page.locator(f'[data-testid="approval-row"][data-approval="{ids["POL-2"][0]}"]')
        await pol2.get_by_test_id("decide-comment").fill("no owner named")
        await page.get_by_test_id(f"reject-{ids['POL-2'][0]}").click()
        await wait_for(
            lambda: execution_status(pool, ids["POL-2"][1]),
            lambda s: s == "completed",
            within=60,
            what="POL-2's execution to complete once rejected",
        )
        await wait_for(
            lambda: text_of(page, "inbox-note"),
            lambda t: t.startswith("No approvals pending for ciso."),
            within=20,
            what="ciso's inbox to empty",
        )

        # The detail of the rejected execution: its event, steps, approval and task.
        await pol2_detail(page, pool, ids["POL-2"][1])

        # The inbox links each approval to its execution.
        await page.get_by_test_id("inbox-approver").fill("")
        await page.get_by_test_id("inbox-submit").click()
        await wait_for(
            lambda: shown_entities(page), lambda e: e == ["ASM-1"], within=20, what="ASM-1 only"
        )
        await page.get_by_test_id("approval-execution").click()
        await wait_for(
            lambda: text_of(page, "detail-id"),
            lambda t: t == ids["ASM-1"][1],
            within=20,
            what="the detail of ASM-1's execution",
        )
        step = page.get_by_test_id("detail-step")
        assert await step.count() == 1
        assert await step.get_attribute("data-status") == "completed"
        assert await page.get_by_test_id("detail-approval").get_attribute("data-status") == (
            "pending"
        )
        assert not browsing.problems, browsing.problems

    found = await rows(
        pool,
        'SELECT e.entity_id, d."by", d.decision, d.comment FROM approval_decisions d'
        " JOIN approvals a ON a.id = d.approval_id"
        " JOIN workflow_executions e ON e.id = a.execution_id ORDER BY d.decided_at",
    )
    assert found == [
        ("POL-1", "ciso", "approve", "controls look right"),
        ("POL-1", "compliance-officer", "approve", None),
        ("POL-2", "ciso", "reject", "no owner named"),
    ]
    assert await rows(pool, "SELECT entity_id, status FROM approvals ORDER BY entity_id") == [
        ("ASM-1", "pending"),
        ("POL-1", "approved"),
        ("POL-2", "rejected"),
    ]


async def pol2_detail(page: Page, pool: AsyncConnectionPool[Any], execution_id: str) -> None:
    """Open POL-2's rejected execution and check what the detail shows against Postgres."""
    row = page.locator(f'[data-testid="exec-row"][data-execution="{execution_id}"]')
    await row.get_by_test_id("open-execution").click()
    await wait_for(
        lambda: text_of(page, "detail-id"),
        lambda t: t == execution_id,
        within=20,
        what="the detail view of POL-2's execution",
    )
    event = page.get_by_test_id("detail-event")
    assert await event.locator('dd[data-field="type"]').text_content() == "policy.created"
    assert await event.locator('dd[data-field="entity"]').text_content() == "policy POL-2"
    assert '"title": "Data retention"' in await text_of(page, "detail-event-data")

    recorded = dict(
        await rows(
            pool,
            f"SELECT step, status FROM execution_steps WHERE execution_id = '{execution_id}'",
        )
    )
    assert recorded == {1: "completed", 4: "completed"}  # the approval, the rejection branch
    # Step 2 waits behind the approval and never ran; step 3 is the branch of an approval.
    assert await attributes(page, "detail-step", "data-step") == ["1", "2", "3", "4"]
    assert await attributes(page, "detail-step", "data-status") == [
        "completed",
        "skipped",
        "skipped",
        "completed",
    ]
    steps = page.get_by_test_id("detail-step")
    for i in (0, 3):
        assert await steps.nth(i).get_by_test_id("step-attempts").text_content() == "1"
        assert (await steps.nth(i).get_by_test_id("step-after").text_content() or "").startswith(
            "+"
        )
    assert "if step 1 is rejected" in (await steps.nth(3).text_content() or "")

    approval = page.get_by_test_id("detail-approval")
    assert await approval.get_attribute("data-status") == "rejected"
    decision = await approval.get_by_test_id("decision").text_content() or ""
    assert "ciso rejected" in decision
    assert "no owner named" in decision
    task = page.get_by_test_id("detail-task")
    assert await task.count() == 1
    assert await task.get_attribute("data-status") == "open"
    assert "Rework Data retention" in (await task.text_content() or "")


# Searching executions, page by page ------------------------------------------------------

OTHER = """
name: other-flow
entity: policy
trigger: update
actions:
  - assign: {assignee: risk-team}
"""


async def listed(pool: AsyncConnectionPool[Any], **search: Any) -> list[str]:
    """The ids ``GET /executions`` answers for ``search``: what the page must show."""
    async with pool.connection() as conn:
        found = await executions.list_executions(conn, **search)
    return [e.id for e in found]


async def test_executions_are_searched_and_paged_and_opened_by_link(
    make_settings: Callable[..., Settings], pool: AsyncConnectionPool[Any]
) -> None:
    settings = make_settings(api_tokens=API_TOKENS)
    await apply(pool, THREE_STEPS)
    await apply(pool, OTHER)
    for n in range(12):
        await seed_execution(
            pool, entity_id=f"POL-{100 + n}", completed_steps=3, status="completed"
        )
    retrying = await seed_execution(
        pool, entity_id="POL-200", completed_steps=1, failed_step=(2, "boom"), status="retrying"
    )
    other = await seed_execution(pool, workflow="other-flow", entity_id="POL-300")

    async with (
        serving(create_app(settings)) as url,
        async_playwright() as playwright,
        chromium_page(playwright) as browsing,
    ):
        page = browsing.page

        async def search(
            expected: list[str],
            entity: str = "",
            workflow: str = "",
            status: str = "",
            per: str = "15",
        ) -> None:
            await page.get_by_test_id("search-entity").fill(entity)
            await page.get_by_test_id("search-workflow").fill(workflow)
            await page.get_by_test_id("search-status").select_option(status)
            await page.get_by_test_id("search-limit").select_option(per)
            await page.get_by_test_id("search-submit").click()
            await wait_for(
                lambda: attributes(page, "exec-row", "data-execution"),
                lambda shown: shown == expected,
                within=20,
                what=f"the executions of {entity=} {workflow=} {status=} {per=}",
            )

        # Opened on one execution by its link: the detail shows at once.
        await page.goto(f"{url}/#token={TOKENS['reader']}&execution={retrying}")
        await wait_for(
            lambda: text_of(page, "detail-id"), lambda t: t == retrying, within=20, what="detail"
        )
        assert await page.evaluate("location.hash") == f"#execution={retrying}"
        assert await attributes(page, "detail-step", "data-status") == [
            "completed",
            "failed",
            "pending",
        ]
        failed = page.locator('[data-testid="detail-step"][data-step="2"]')
        assert await failed.get_by_test_id("step-error").text_content() == "boom"
        assert await failed.get_by_test_id("step-attempts").text_content() == "1"
        assert "no longer kept" in await text_of(page, "detail-event")  # seeded: no event kept
        await page.get_by_test_id("detail-close").click()
        assert await page.evaluate("location.hash") == ""
        assert await page.get_by_test_id("detail").is_hidden()

        everything = await listed(pool, limit=100)
        assert len(everything) == 14
        await search(everything)
        assert await page.get_by_test_id("page-next").is_disabled()

        await search(everything[:10], per="10")
        assert await text_of(page, "page-label") == "page 1: rows 1 to 10"
        assert await page.get_by_test_id("page-prev").is_disabled()
        await page.get_by_test_id("page-next").click()
        await wait_for(
            lambda: attributes(page, "exec-row", "data-execution"),
            lambda shown: shown == everything[10:],
            within=20,
            what="the second page",
        )
        assert await text_of(page, "page-label") == "page 2: rows 11 to 14"
        assert await page.get_by_test_id("page-next").is_disabled()
        await page.get_by_test_id("page-prev").click()
        await wait_for(
            lambda: attributes(page, "exec-row", "data-execution"),
            lambda shown: shown == everything[:10],
            within=20,
            what="the first page again",
        )

        await search([retrying], entity="POL-200")
        await search([retrying], status="retrying")
        await search([other], workflow="other-flow")
        await search(await listed(pool, status="completed", limit=10), status="completed", per="10")
        await search([], entity="POL-999")
        assert await text_of(page, "page-label") == "page 1: no executions match"
        assert not browsing.problems, browsing.problems
