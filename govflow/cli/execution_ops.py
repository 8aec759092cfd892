"""``govflow executions cancel|retry|prune``: what an operator does to executions.

The logic is in govflow/operations/interventions.py (cancel, retry) and
govflow/consumers/retention.py (prune). Ids may be given by their first characters, as
listings show them; every id is resolved before anything is done, so an unknown one
changes nothing. An execution refused (already finished, not retryable) is named on
stderr, with exit 1, after the others were done.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated, Any

import typer
from psycopg_pool import AsyncConnectionPool

from govflow.cli.context import JsonFlag, console, print_json, run_async
from govflow.cli.tables import short_id
from govflow.consumers.retention import Pruned, prune
from govflow.db.id_prefix import resolve_execution_id
from govflow.operations.dlq import default_actor
from govflow.operations.interventions import InterventionReport, cancel, retry
from govflow.runtime.connections import database_pool, redis_client
from govflow.schemas.durations import parse_duration
from govflow.schemas.errors import ConfigError, GovflowError
from govflow.schemas.settings import Settings

Ids = Annotated[
    list[str],
    typer.Argument(metavar="ID...", help="Execution ids, or their first characters."),
]
Reason = Annotated[str | None, typer.Option(help="Why, recorded with it.")]
Actor = Annotated[
    str | None, typer.Option(help="Who does it, recorded.", show_default="the OS user")
]


def cancel_command(
    ids: Ids, reason: Reason = None, actor: Actor = None, as_json: JsonFlag = False
) -> None:
    """Stop unfinished executions: no step runs after the cancel; recorded with who and why."""
    who = actor or default_actor()

    async def body(settings: Settings) -> InterventionReport:
        async with database_pool(settings, max_size=1) as pool:
            full = await _resolve(pool, ids)
            return await cancel(pool, full, actor=who, reason=reason)

    _report(run_async(body, redis=False), as_json)


def retry_command(
    ids: Ids, reason: Reason = None, actor: Actor = None, as_json: JsonFlag = False
) -> None:
    """Run dead-lettered or cancelled executions again from the step they stopped at, once."""
    who = actor or default_actor()

    async def body(settings: Settings) -> InterventionReport:
        async with redis_client(settings) as redis, database_pool(settings, max_size=2) as pool:
            full = await _resolve(pool, ids)
            return await retry(redis, pool, settings.keys(), full, actor=who, reason=reason)

    _report(run_async(body), as_json)


async def _resolve(pool: AsyncConnectionPool[Any], ids: Sequence[str]) -> list[str]:
    async with pool.connection() as conn:
        return list(dict.fromkeys([await resolve_execution_id(conn, i) for i in ids]))


def _report(report: InterventionReport, as_json: bool) -> None:
    """Print what was done; name what was refused on stderr, and exit 1 if anything was."""
    if as_json:
        print_json(report)
    else:
        verb = "cancelled" if report.kind == "cancel" else "retried"
        for done in report.done:
            via = f", dead letter {done.dead_letter_id} replayed" if done.dead_letter_id else ""
            console.print(
                f"{verb} {short_id(done.execution_id)} (was {done.from_status}{via})",
                markup=False,
            )
    if report.refused:
        what = "cancelled" if report.kind == "cancel" else "retried"
        reasons = "; ".join(f"{short_id(r.execution_id)}: {r.why}" for r in report.refused)
        raise GovflowError(f"not {what}: {reasons}")


def prune_command(
    older_than: Annotated[
        str,
        typer.Option(
            "--older-than",
            help="Finished at least this long ago: 30d, 12h, 90m.",
            show_default=False,
        ),
    ],
    dry_run: Annotated[bool, typer.Option(help="Delete nothing; count what would go.")] = False,
    as_json: JsonFlag = False,
) -> None:
    """Delete finished executions with their steps and effects, and closed dead letters."""
    try:
        seconds = parse_duration(older_than)
    except ValueError as e:
        raise ConfigError(f"--older-than: {e}") from e

    async def body(settings: Settings) -> Pruned:
        async with database_pool(settings, max_size=1) as pool:
            return await prune(pool, seconds, dry_run=dry_run)

    pruned = run_async(body, redis=False)
    if as_json:
        print_json(pruned)
        return
    by_status = ", ".join(f"{s} {n}" for s, n in sorted(pruned.executions.items()))
    console.print(
        f"{'would delete' if dry_run else 'deleted'} {pruned.total} executions"
        + (f" ({by_status})" if by_status else "")
        + f" and {pruned.dead_letters} dead letters",
        markup=False,
    )
