"""The notify scenario: every event runs a webhook to a receiver that answers after 50 ms.

The workflow ``bench-notify`` (``evidence.created`` events, which ``bench-drain`` does
not match) has one step, ``notify``, POSTing to ``benchmarks.receiver`` on loopback.
govflow runs as the drain runs it, with the receiver's address allowed and ``IN_FLIGHT``
webhooks to one host per worker (``GOVFLOW_WEBHOOK_HOST_CONCURRENCY``; its default, 8,
protects receivers of unknown size), as many as each peer's worker process keeps in
flight. A backlog is published, then the workers drain it: events/s from the first
execution row to the last completion. ``--notify-host-concurrency`` sets govflow's bound
to one host instead, to see what it costs.
"""

from __future__ import annotations

from collections.abc import Callable

import anyio
import msgspec
import psycopg

from benchmarks import gf, peers
from govflow.db.workflows import apply_workflow
from govflow.schemas.settings import Settings
from govflow.schemas.workflows import Workflow

DELAY_MS = 50.0
EVENT_TYPE = "evidence.created"
DEFAULTS = Settings()  # what the workers run with, but for the two settings here
IN_FLIGHT = peers.IO_SLOTS  # webhooks in flight per worker process, for every system


def workflow(url: str) -> dict[str, object]:
    """The notify workflow, posting to ``url``."""
    return {
        "name": "bench-notify",
        "entity": "evidence",
        "trigger": "create",
        "actions": [{"notify": {"webhook": url, "message": "Evidence {entity_id} recorded"}}],
    }


async def _apply(database_url: str, url: str) -> None:
    async with await psycopg.AsyncConnection.connect(database_url) as conn:
        await apply_workflow(conn, msgspec.convert(workflow(url), Workflow))
        await conn.commit()


def setup(database_url: str, url: str) -> None:
    """Register (or point anew) the notify workflow at the receiver's ``url``."""
    anyio.run(_apply, database_url, url)


def env_for(host_concurrency: int | None) -> Callable[[str, str, str], dict[str, str]]:
    """How a worker's environment is made: the drain's, with the receiver's loopback address
    allowed, and ``host_concurrency`` (by default ``IN_FLIGHT``) webhooks to one host."""

    def env(redis_url: str, database_url: str, prefix: str) -> dict[str, str]:
        made = gf.env(redis_url, database_url, prefix)
        made["GOVFLOW_WEBHOOK_ALLOWED_HOSTS"] = "127.0.0.1"
        made["GOVFLOW_WEBHOOK_HOST_CONCURRENCY"] = str(host_concurrency or IN_FLIGHT)
        return made

    return env
