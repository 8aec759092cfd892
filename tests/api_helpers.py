"""Shared steps of the HTTP API and dashboard tests: serve an app, seed rows, poll.

The app runs under a real uvicorn on a free loopback port, in the test's own event loop;
rows are written with govflow's own queries, so what the API reads is what the pipeline
writes.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import Any, TypeVar

import anyio
import uvicorn
from litestar import Litestar
from psycopg_pool import AsyncConnectionPool

from govflow.cli.serve import listen
from govflow.db import executions, fencing
from govflow.db.executions import NewExecution

T = TypeVar("T")

# Tokens the tests configure: one per scope, one with every scope.
TOKENS = {
    "publisher": "tok-publish-3f9a",
    "reader": "tok-read-77c1",
    "operator": "tok-operate-0d2e",
    "decider": "tok-decide-51a0",
    "admin": "tok-admin-b5e8",
}
API_TOKENS = (
    f"{TOKENS['publisher']}:publish {TOKENS['reader']}:read "
    f"{TOKENS['operator']}:operate {TOKENS['decider']}:decide "
    f"{TOKENS['admin']}:publish,read,operate,decide"
)

THREE_STEPS = """
name: three-steps
entity: policy
trigger: create
actions:
  - create_task: {title: "Review {data.title}"}
  - assign: {assignee: risk-team}
  - create_approval: {approvers: [compliance-officer]}
"""


def bearer(who: str) -> dict[str, str]:
    """The Authorization header of one of ``TOKENS``."""
    return {"Authorization": f"Bearer {TOKENS[who]}"}


@asynccontextmanager
async def serving(app: Litestar, host: str = "127.0.0.1") -> AsyncIterator[str]:
    """Serve ``app`` with uvicorn on a free port of ``host``; yield its base URL."""
    sock = listen(host, 0)
    port = sock.getsockname()[1]
    config = uvicorn.Config(app, log_config=None, access_log=False, lifespan="on")
    server = uvicorn.Server(config)
    stopped = anyio.Event()

    async def serve() -> None:
        try:
            await server.serve([sock])
        finally:
            stopped.set()

    async with anyio.create_task_group() as tg:
        tg.start_soon(serve)
        deadline = time.monotonic() + 30
        while not server.started:
            if time.monotonic() > deadline or stopped.is_set():
                raise AssertionError("uvicorn did not start within 30 s")
            await anyio.sleep(0.02)
        try:
            yield f"http://{host}:{port}"
        finally:
            # Let the server finish its shutdown (the lifespan closes the pool) even when
            # the test failed, rather than cancel it half-way and bury the failure.
            server.should_exit = True
            with anyio.CancelScope(shield=True), anyio.move_on_after(30):
                await stopped.wait()


async def seed_execution(
    pool: AsyncConnectionPool[Any],
    *,
    workflow: str = "three-steps",
    version: int = 1,
    entity_id: str = "POL-1",
    completed_steps: int = 0,
    failed_step: tuple[int, str] | None = None,
    status: str = "queued",
) -> str:
    """Record one execution as the pipeline would, with some steps done; return its id.

    ``status`` ``completed`` finishes it; ``retrying`` or ``dead_lettered`` records the
    failure of ``failed_step`` (step, error).
    """
    execution_id = str(uuid.uuid4())
    async with pool.connection() as conn:
        await executions.insert_queued(
            conn,
            [
                NewExecution(
                    execution_id,
                    workflow,
                    version,
                    f"evt-{execution_id}",
                    "policy",
                    entity_id,
                    "acme",
                    datetime.now(UTC),
                )
            ],
        )
        if status != "queued":
            await fencing.claim(conn, (await fencing.lock(conn, [execution_id])).epochs)
        actions = ["create_task", "assign", "create_approval"]
        await executions.complete_steps(
            conn, [(execution_id, n, actions[n - 1]) for n in range(1, completed_steps + 1)]
        )
        if failed_step is not None:
            step, error = failed_step
            await executions.fail_step(conn, execution_id, step, actions[step - 1], error)
        if status == "completed":
            await executions.finish(conn, [execution_id])
        elif status in ("retrying", "dead_lettered"):
            error = failed_step[1] if failed_step else "failed"
            await executions.set_failed(conn, execution_id, status, error)  # type: ignore[arg-type]
    return execution_id
