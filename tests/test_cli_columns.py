"""Every human listing fits an 80-column terminal, and an id shown short leads to the detail."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import pytest
from psycopg_pool import AsyncConnectionPool
from redis.asyncio import Redis

from govflow.db import dead_letters, executions, fencing
from govflow.db.dead_letters import NewDeadLetter
from govflow.db.executions import NewExecution
from govflow.db.id_prefix import prefix_range
from govflow.db.workflows import apply_workflow
from govflow.plugins.builtin import APPROVALS, TASKS
from govflow.schemas.codec import decode_workflow
from govflow.schemas.keys import Keys
from tests.ops_helpers import govflow, govflow_env

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

WIDTH = 80
LONG = "a-rather-long-name-of-a-governance-workflow-for-high-risk-policies"
WORKFLOW = f"""\
name: {LONG}
entity: policy
trigger: create
actions:
  - create_task: {{title: "Review {{data.title}}"}}
  - notify: {{webhook: "https://hooks.example.org/grc"}}
"""
# Two ids that share their first eight characters, and one that does not.
TWINS = ("abcd1234-0000-4000-8000-000000000001", "abcd1234-0000-4000-8000-000000000002")
SINGLE = "0123abcd-0000-4000-8000-000000000003"
ERROR = "step 2: webhook https://hooks.example.org/grc answered 503 Service Unavailable " * 3


async def make_data(pool: AsyncConnectionPool[Any], redis: Redis, keys: Keys) -> None:
    now = datetime.now(UTC)
    async with pool.connection() as conn:
        await apply_workflow(conn, decode_workflow(WORKFLOW))
        await executions.insert_queued(
            conn,
            [
                NewExecution(i, LONG, 1, f"ev-{n}", "policy", f"POL-{n}-{LONG}", "acme", now)
                for n, i in enumerate((*TWINS, SINGLE))
            ],
        )
        await fencing.claim(conn, (await fencing.lock(conn, [SINGLE])).epochs)
        await executions.complete_steps(conn, [(SINGLE, 1, "create_task")])
        await executions.fail_step(conn, SINGLE, 2, "notify", ERROR)
        await executions.set_failed(conn, SINGLE, "dead_lettered", ERROR)
        await dead_letters.record(
            conn,
            [
                NewDeadLetter(
                    stream=keys.commands(),
                    message_id="1733000000000-0",
                    payload={"command": json.dumps({"long": LONG * 3})},
                    error=ERROR,
                    attempts=5,
                    event_id="ev-2",
                    event_type="policy.created",
                    execution_id=SINGLE,
                )
            ],
        )
    # An approval and a task with long names, as the built-in actions write them.
    due = datetime.now(UTC)
    async with pool.connection() as conn:
        approval = (SINGLE, 3, f"POL-2-{LONG}", [LONG, f"{LONG}-2"], 2, due, True)
        await conn.execute(APPROVALS.statement().encode(), (APPROVALS.parameter([approval]),))
        task = (SINGLE, 1, f"POL-2-{LONG}", f"Review {LONG}", f"{LONG}-owner", due, False)
        await conn.execute(TASKS.statement().encode(), (TASKS.parameter([task]),))
    await redis.xadd(keys.events(), {"event": "{}"})
    await redis.xgroup_create(keys.events(), "triggers", id="0")
    await redis.xreadgroup("triggers", f"worker-{LONG}-4242", {keys.events(): ">"}, count=1)


def column(text: str, header: str, next_header: str) -> str:
    """The text of a table's column, folded lines joined, from its header line down."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if f" {header} " in f" {line} ")
    left, right = lines[start].index(header), lines[start].index(next_header)
    cells = [line[left:right].strip() for line in lines[start + 2 :]]
    return "".join(cells[: cells.index("")] if "" in cells else cells)


async def test_listings_fit_80_columns_and_ids_lead_to_the_detail(
    redis_server_url: str,
    database_url: str,
    pool: AsyncConnectionPool[Any],
    redis: Redis,
    prefix: str,
) -> None:
    await make_data(pool, redis, Keys(prefix))
    env = {**govflow_env(redis_server_url, database_url, prefix), "COLUMNS": str(WIDTH)}
    listings = {
        "executions list": ("executions", "list"),
        "executions show": ("executions", "show", SINGLE[:8]),
        "dlq list": ("dlq", "list"),
        "dlq show": ("dlq", "show", "1"),
        "lag": ("lag",),
        "workflows list": ("workflows", "list"),
        "approvals list": ("approvals", "list"),
        "tasks list": ("tasks", "list"),
        "config": ("config",),
    }
    for name, args in listings.items():
        result = await govflow(env, *args)
        text = result.stdout.decode()
        assert result.returncode == 0, (name, result.stderr)
        too_wide = [line for line in text.splitlines() if len(line) > WIDTH]
        assert not too_wide, f"{name}:\n{text}"
        if name == "executions list":
            assert {SINGLE[:8], TWINS[0][:8]} <= {line.split()[0] for line in text.splitlines()}
        if name == "executions show":
            assert SINGLE in text  # the full id, from its first eight characters
            assert "".join(ERROR.split()) in "".join(text.split())  # folded, never cut
        if name == "lag":
            assert column(text, "consumer", "pending") == f"worker-{LONG}-4242"


async def test_an_ambiguous_or_unknown_prefix_is_refused(
    redis_server_url: str, database_url: str, pool: AsyncConnectionPool[Any], redis: Redis,
    prefix: str,
) -> None:  # fmt: skip
    await make_data(pool, redis, Keys(prefix))
    env = govflow_env(redis_server_url, database_url, prefix)

    ambiguous = await govflow(env, "executions", "show", "abcd")
    unknown = await govflow(env, "executions", "show", "ffff")
    dashed = await govflow(env, "executions", "show", TWINS[1].replace("-", "").upper(), "--json")

    assert ambiguous.returncode == 2
    twins = ", ".join(TWINS)
    assert ambiguous.stderr.decode().splitlines() == [
        f"govflow: abcd is the start of more than one execution id ({twins}): give more of it"
    ]
    assert (unknown.returncode, unknown.stderr) == (1, b"govflow: no execution with id ffff\n")
    assert dashed.returncode == 0, dashed.stderr
    assert json.loads(dashed.stdout)["id"] == TWINS[1]


def test_a_prefix_is_a_range_of_uuids() -> None:
    low, high = prefix_range("ABCD-12") or ("", "")
    assert (str(low), str(high)) == (
        "abcd1200-0000-0000-0000-000000000000",
        "abcd12ff-ffff-ffff-ffff-ffffffffffff",
    )
    assert prefix_range("no-such-id") is None
    assert prefix_range("") is None
    assert prefix_range("0" * 33) is None
