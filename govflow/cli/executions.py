"""``govflow executions``: what ran, for which event, and how far each execution got.

``list --json`` and ``show --json`` print the views ``GET /executions`` and
``GET /executions/{id}`` answer (``db.views``):
the execution with every step of its workflow version, those not started yet included
("step 2 of 5").
"""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Column, Table
from rich.text import Text

from govflow.cli.context import JsonFlag, console, print_json, run_async
from govflow.cli.tables import listing_table, one_line, rest_of, short_id
from govflow.db import executions, views
from govflow.db.id_prefix import resolve_execution_id
from govflow.operations.dlq import when
from govflow.runtime.connections import database_pool
from govflow.schemas.errors import GovflowError
from govflow.schemas.settings import Settings

app = typer.Typer(help="List and show executions; cancel, retry and prune them.")


@app.command("list")
def list_command(
    status: Annotated[
        str | None,
        typer.Option(help="queued, running, retrying, completed, dead_lettered or cancelled."),
    ] = None,
    entity_id: Annotated[str | None, typer.Option("--entity-id", help="One entity's.")] = None,
    workflow: Annotated[str | None, typer.Option(help="One workflow's (by name).")] = None,
    limit: Annotated[int, typer.Option(min=1, help="At most this many, newest first.")] = 50,
    as_json: JsonFlag = False,
) -> None:
    """List executions, newest first."""

    async def body(settings: Settings) -> list[views.ExecutionView]:
        async with database_pool(settings, max_size=1) as pool, pool.connection() as conn:
            found = await executions.list_executions(
                conn, status=status, entity_id=entity_id, workflow=workflow, limit=limit
            )
            return await views.read_executions(conn, found)

    rows = run_async(body, redis=False)
    if as_json:
        print_json(rows)
        return
    if not rows:
        console.print("no executions")
        return
    # Names fold, never cut; the last error is cut to one line: `show` prints all of it.
    # The columns beside it take 8 + 13 + 5 + 14 characters and 2 between each.
    width = rest_of(console.width, 8 + 13 + 5 + 14 + 4 * 2)
    table = listing_table(
        Column("id", no_wrap=True),
        Column("workflow / entity / last error", overflow="fold", ratio=1),
        Column("status", no_wrap=True, min_width=13),
        Column("tries", justify="right", no_wrap=True),
        Column("created", no_wrap=True),
    )
    for e in rows:
        cell = Text(f"{e.workflow_name} v{e.workflow_version}\n{e.entity_type} {e.entity_id}")
        if e.last_error:
            cell.append(f"\n{one_line(e.last_error, width)}", style="red")
        table.add_row(
            short_id(e.id), cell, e.status, str(e.attempts), f"{e.created_at:%m-%d %H:%M:%S}"
        )
    console.print(table)


@app.command("show")
def show_command(
    execution_id: Annotated[
        str, typer.Argument(metavar="ID", help="The execution id, or its first characters.")
    ],
    as_json: JsonFlag = False,
) -> None:
    """Show one execution: its event, status, and each step of its workflow."""

    async def body(settings: Settings) -> views.ExecutionView | None:
        async with database_pool(settings, max_size=1) as pool, pool.connection() as conn:
            return await views.read_execution(conn, await resolve_execution_id(conn, execution_id))

    detail = run_async(body, redis=False)
    if detail is None:
        raise GovflowError(f"no execution with id {execution_id}")
    if as_json:
        print_json(detail)
        return
    # Wrapped to the terminal: an 80-column one folds the long lines, never cuts them.
    console.print(
        f"execution {detail.id}: {detail.workflow_name} v{detail.workflow_version}"
        f" for {detail.entity_type} {detail.entity_id} (tenant {detail.tenant})",
        markup=False,
        soft_wrap=False,
    )
    console.print(
        f"event {detail.event_id}; {detail.status}, {detail.completed_steps} of"
        f" {detail.total_steps} steps completed, {detail.attempts} deliveries",
        markup=False,
        soft_wrap=False,
    )
    if detail.last_error:
        console.print(f"last error: {detail.last_error}", markup=False, soft_wrap=False)
    for done in detail.interventions:
        verb = "cancelled" if done.kind == "cancel" else "retried"
        console.print(
            f"{verb} by {done.actor} at {when(done.created_at)} (was {done.from_status})"
            + (f": {done.reason}" if done.reason else ""),
            markup=False,
            soft_wrap=False,
        )
    table = Table(
        Column("step", no_wrap=True),
        Column("action", overflow="fold"),
        Column("status", no_wrap=True),
        Column("tries", justify="right", no_wrap=True),
        Column("error", overflow="fold", ratio=1),
    )
    for s in detail.steps:
        table.add_row(
            f"{s.step} of {s.of}", Text(s.action), s.status, str(s.attempts), Text(s.error or "")
        )
    console.print(table)
