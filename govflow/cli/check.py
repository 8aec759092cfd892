"""``govflow check``: exit 0 while a worker beats and makes progress; the liveness probe.

Run in a worker's container (a Kubernetes ``exec`` probe), it judges the worker started
last on this host: a pod's hostname is its own, and a container restarted in the pod is
a newer worker on the same host. With ``--any-host`` it asks whether any worker of the
deployment is live instead. The heartbeats are read from Redis (``operations.workers``);
Postgres is not asked, since a probe that failed with Postgres would restart every
worker during an outage for nothing.
"""

from __future__ import annotations

import socket
from typing import Annotated

import typer

from govflow.cli.context import console, run_async
from govflow.cli.lag import format_age
from govflow.operations.workers import ROLES, WorkerStatus, read_workers
from govflow.runtime.connections import redis_client
from govflow.schemas.errors import ConfigError, UnhealthyError
from govflow.schemas.settings import Settings


def check(
    role: Annotated[
        str | None,
        typer.Option(help="Judge only workers that run this role: triggers, actions or relay."),
    ] = None,
    any_host: Annotated[
        bool,
        typer.Option("--any-host", help="Pass when any worker of the deployment is live."),
    ] = False,
) -> None:
    """Exit 0 when this host's worker beats and makes progress; else 1, saying why.

    The worker judged is the one started last on this host (a pod's, in a container).
    """
    if role is not None and role not in ROLES:
        raise ConfigError(f"unknown role {role}: use {', '.join(ROLES)}")
    found = run_async(_read, database=False)
    host = None if any_host else socket.gethostname()
    console.print(verdict(found, host=host, role=role), markup=False)


async def _read(settings: Settings) -> list[WorkerStatus]:
    async with redis_client(settings) as redis:
        return await read_workers(redis, settings.keys())


def verdict(workers: list[WorkerStatus], *, host: str | None, role: str | None) -> str:
    """The line to print when the worker judged is live.

    Args:
        workers: every worker listed (``read_workers``).
        host: judge the worker started last on this host; None: any live worker passes.
        role: consider only workers that run this role.

    Raises:
        UnhealthyError: no worker to judge, or the one judged is not live.
    """
    where = f" on {host}" if host is not None else ""
    with_role = f" with the {role} role" if role is not None else ""
    candidates = [
        w for w in workers if (host is None or w.host == host) and (role is None or role in w.roles)
    ]
    if not candidates:
        raise UnhealthyError(f"no worker{with_role}{where} has a heartbeat")
    if host is None:
        live = [w for w in candidates if w.state == "live"]
        if not live:
            raise UnhealthyError(
                f"none of the {len(candidates)} workers{with_role} listed is live: "
                + ", ".join(f"{w.id} {w.state}" for w in candidates)
            )
        return f"{len(live)} of {len(candidates)} workers{with_role} live"
    newest = max(candidates, key=lambda w: w.started_at)
    if newest.state == "stopped":
        raise UnhealthyError(f"worker {newest.id} stopped")
    if newest.state == "stale":
        raise UnhealthyError(
            f"worker {newest.id} is stale: no heartbeat for {format_age(newest.heartbeat_age_s)}"
        )
    if newest.state == "stalled":
        raise UnhealthyError(
            f"worker {newest.id} is stalled: no consumer progressed for"
            f" {format_age(newest.progress_age_s)}"
        )
    return (
        f"worker {newest.id} is live: heartbeat {format_age(newest.heartbeat_age_s)} ago,"
        f" progress {format_age(newest.progress_age_s)} ago"
    )
