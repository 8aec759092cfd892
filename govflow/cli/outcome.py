"""``govflow publish --wait``: what an event caused, or why it caused nothing.

The workflows an event matches are known as soon as it is published: the enabled
definitions, matched here as the trigger matcher matches them. For each, the execution
(its id is derived from the event and the workflow) is polled until it completes, waits
for a person, or is dead-lettered, or until the time runs out. An event that matches no
workflow is not waited for: the answer names the nearest miss and why it missed.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import msgspec
from psycopg import AsyncConnection

from govflow.consumers.matching import Miss, explain
from govflow.db import executions, workflows
from govflow.schemas.commands import execution_id
from govflow.schemas.events import Event
from govflow.schemas.workflows import StoredWorkflow

# Statuses an execution stays in until a person or an operator acts.
SETTLED = frozenset({"completed", "waiting", "dead_lettered", "cancelled"})
POLL_S = 0.2


class Caused(msgspec.Struct, frozen=True, kw_only=True):
    """One execution the event caused, as far as it got within the wait."""

    workflow: str
    version: int
    execution_id: str
    status: str | None  # None: not started within the wait
    last_error: str | None = None


class NearestMiss(msgspec.Struct, frozen=True, kw_only=True):
    """The enabled workflow that came nearest to matching, and what it lacked."""

    workflow: str
    reason: str


class Outcome(msgspec.Struct, frozen=True, kw_only=True):
    """What ``publish --wait`` reports about one event."""

    event_id: str
    executions: list[Caused]
    nearest_miss: NearestMiss | None = None
    enabled_workflows: int = 0


def matched(
    enabled: list[StoredWorkflow], event: Event
) -> tuple[list[StoredWorkflow], NearestMiss | None]:
    """The workflows the event matches; when none, the nearest miss (or ``None``: none enabled)."""
    hits: list[StoredWorkflow] = []
    misses: list[tuple[Miss, str]] = []
    for wf in enabled:
        miss = explain(wf.definition, event)
        if miss is None:
            hits.append(wf)
        else:
            misses.append((miss, wf.name))
    if hits or not misses:
        return hits, None
    miss, name = max(misses, key=lambda m: m[0].nearness)
    return hits, NearestMiss(workflow=name, reason=miss.reason)


async def publish_and_wait(
    publish: Callable[[], Awaitable[str]],
    conn: AsyncConnection[Any],
    event: Event,
    timeout_s: float,
) -> Outcome:
    """Publish with ``publish()``, then wait for what the event causes."""
    enabled = await workflows.enabled_latest(conn)
    event_id = await publish()
    hits, miss = matched(enabled, event)
    return Outcome(
        event_id=event_id,
        executions=await wait_for(conn, event, hits, timeout_s) if hits else [],
        nearest_miss=miss,
        enabled_workflows=len(enabled),
    )


async def wait_for(
    conn: AsyncConnection[Any], event: Event, hits: list[StoredWorkflow], timeout_s: float
) -> list[Caused]:
    """Poll the executions of ``hits`` for ``event`` until all settle or ``timeout_s`` passes."""
    ids = {wf.name: execution_id(event.tenant, event.id, wf.name) for wf in hits}
    found: dict[str, executions.State] = {}
    with anyio.move_on_after(timeout_s):
        while True:
            found = await executions.states(conn, list(ids.values()))
            if len(found) == len(ids) and all(s.status in SETTLED for s in found.values()):
                break
            await anyio.sleep(POLL_S)
    caused = []
    for wf in hits:
        state = found.get(ids[wf.name])
        caused.append(
            Caused(
                workflow=wf.name,
                version=wf.version,
                execution_id=ids[wf.name],
                status=state.status if state else None,
                last_error=state.last_error if state else None,
            )
        )
    return caused


def lines(outcome: Outcome, timeout_s: float) -> list[str]:
    """The outcome as a person reads it, one line each."""
    if outcome.executions:
        return [_line(c, timeout_s) for c in outcome.executions]
    if outcome.nearest_miss is None:
        return ["matched no workflow: none is enabled (add one with `govflow workflows apply`)"]
    miss = outcome.nearest_miss
    return [
        f"matched no workflow (of {outcome.enabled_workflows} enabled); nearest miss:",
        f"  {miss.workflow}: {miss.reason}",
    ]


def _line(c: Caused, timeout_s: float) -> str:
    head = f"{c.workflow} v{c.version}: "
    if c.status is None:
        return head + f"not started within {timeout_s:g}s (is `govflow run` running?)"
    tail = f" ({c.last_error})" if c.last_error and c.status != "completed" else ""
    return f"{head}{c.status}{tail}, execution {c.execution_id[:8]}"
