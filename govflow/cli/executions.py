"""``govflow executions``: what ran, for which event, and how far each execution got.

``show --json`` prints the view ``GET /executions/{id}`` answers (``db.views.read_execution``):
the execution with every step of its workflow version, those not started yet included
("step 2 of 5").
"""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table
from rich.text import Text

from govflow.cli.context import JsonFlag, console, print_json, run_async
from govflow.db import executions, views
from govflow.db.executions import Execution
from govflow.runtime.connections import database_pool
from govflow.schemas.errors import GovflowError
from govflow.schemas.settings import Settings

app = typer.Typer(help="List executions and show one with its steps.")


@app.command("list")
def list_command(
    status: Annotated[
        str | None,
        typer.Option(help="queued, running, retrying, completed or dead_lettered."),
    ] = None,
    entity_id: Annotated[str | None, typer.Option("--entity-id", help="One entity's.")] = None,
    workflow: Annotated[str | None, typer.Option(help="One workflow's (by name).")] = None,
    limit: Annotated[int, typer.Option(min=1, help="At most this many, newest first.")] = 50,
    as_json: JsonFlag = False,
) -> None:
    """List executions, newest first."""

    async def body(settings: Settings) -> list[Execution]:
        async with database_pool(settings, max_size=1) as pool, pool.connection() as conn:
            return await executions.list_executions(
                conn, status=status, entity_id=entity_id, workflow=workflow, limit=limit
            )

    rows = run_async(body, redis=False)
    if as_json:
        print_json(rows)
        return
    if not rows:
        console.print("no executions")
        return
    table = Table("id", "workflow", "entity", "status", "attempts", "created", "last error")
    for e in rows:
        table.add_row(
            e.id,
            f"{e.workflow_name} v{e.workflow_version}",
            Text(f"{e.entity_type} {e.entity_id}"),
            e.status,
            str(e.attempts),
            f"{e.created_at:%Y-%m-%d %H:%M:%S}",
            Text(e.last_error or ""),
        )
    console.print(table)


@app.command("show")
def show_command(
    execution_id: Annotated[str, typer.Argument(metavar="ID", help="The execution id.")],
    as_json: JsonFlag = False,
) -> None:
    """Show one execution: its event, status, and each step of its workflow."""

    async def body(settings: Settings) -> views.ExecutionView | None:
        async with database_pool(settings, max_size=1) as pool, pool.connection() as conn:
            return await views.read_execution(conn, execution_id)

    detail = run_async(body, redis=False)
    if detail is None:
        raise GovflowError(f"no execution with id {execution_id}")
    if as_json:
        print_json(detail)
        return
    console.print(
        f"execution {detail.id}: {detail.workflow_name} v{detail.workflow_version}"
        f" for {detail.entity_type} {detail.entity_id} (tenant {detail.tenant})",
        markup=False,
    )
    console.print(
        f"event {detail.event_id}; {detail.status}, {detail.completed_steps} of"
        f" {detail.total_steps} steps completed, {detail.attempts} deliveries",
        markup=False,
    )
    if detail.last_error:
        console.print(f"last error: {detail.last_error}", markup=False)
    table = Table("step", "action", "status", "attempts", "error")
    for s in detail.steps:
        table.add_row(
            f"{s.step} of {s.of}", s.action, s.status, str(s.attempts), Text(s.error or "")
        )
    console.print(table)
