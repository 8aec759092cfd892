"""``govflow tasks``: the tasks workflows open, and completing one.

``list --json`` prints the objects ``GET /tasks`` answers. ``complete`` is the operation
the HTTP API and the Python API run (``operations.decisions``): a refusal (already done,
expired, no such task) exits 1 with the reason on stderr.
"""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Column
from rich.text import Text

from govflow.cli.context import JsonFlag, console, print_json, run_async
from govflow.cli.tables import listing_table, short_id
from govflow.db import decisions
from govflow.db.decisions import Task
from govflow.db.id_prefix import resolve_id
from govflow.operations.decisions import Decisions, RefusedError
from govflow.runtime.connections import database_pool, redis_client
from govflow.schemas.errors import GovflowError
from govflow.schemas.settings import Settings

app = typer.Typer(help="List tasks, and complete one.")


@app.command("list")
def list_command(
    status: Annotated[
        decisions.TaskStatus | None, typer.Option(help="open, done or expired.")
    ] = None,
    assignee: Annotated[str | None, typer.Option(help="Those assigned to this person.")] = None,
    entity_id: Annotated[str | None, typer.Option("--entity-id", help="One entity's.")] = None,
    limit: Annotated[int, typer.Option(min=1, help="At most this many, oldest first.")] = 50,
    as_json: JsonFlag = False,
) -> None:
    """List tasks, oldest first."""

    async def body(settings: Settings) -> list[Task]:
        async with database_pool(settings, max_size=1) as pool, pool.connection() as conn:
            return await decisions.list_tasks(
                conn, status=status, assignee=assignee, entity_id=entity_id, limit=limit
            )

    rows = run_async(body, redis=False)
    if as_json:
        print_json(rows)
        return
    if not rows:
        console.print("no tasks")
        return
    table = listing_table(
        Column("id", no_wrap=True),
        Column("task / workflow / entity", overflow="fold", ratio=2),
        Column("assignee", overflow="fold", ratio=1),
        Column("status", no_wrap=True, min_width=7),
        Column("due", no_wrap=True),
    )
    for t in rows:
        cell = Text(f"{t.title}\n{t.workflow_name} step {t.step}, {t.entity_type} {t.entity_id}")
        if t.completed_by:
            cell.append(f"\ndone by {t.completed_by}", style="green")
        table.add_row(
            short_id(t.id),
            cell,
            Text(t.assignee or "-"),
            t.status,
            f"{t.due_at:%m-%d %H:%M}" if t.due_at else "-",
        )
    console.print(table)


@app.command("complete")
def complete_command(
    task_id: Annotated[
        str, typer.Argument(metavar="ID", help="The task id, or its first characters.")
    ],
    by: Annotated[str, typer.Option("--by", help="Who completed it.")],
    as_json: JsonFlag = False,
) -> None:
    """Mark a task done; a workflow waiting on it goes on."""

    async def body(settings: Settings) -> Task:
        async with database_pool(settings, max_size=2) as pool, redis_client(settings) as redis:
            async with pool.connection() as conn:
                full_id = await resolve_id(conn, "task", task_id)
            try:
                return await Decisions(pool, redis, settings.keys()).complete_task(full_id, by=by)
            except RefusedError as e:
                raise GovflowError(e.reason) from e

    task = run_async(body)
    if as_json:
        print_json(task)
        return
    line = f"task {task.id} done by {by}"
    if task.wait:
        line += f"; execution {short_id(task.execution_id)} goes on"
    console.print(line, markup=False)
