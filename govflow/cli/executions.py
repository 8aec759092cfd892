"""``govflow executions``: what ran, for which event, and how far each execution got.

``execution_detail`` gives an execution with every step of its workflow version, those
not started yet included ("step 2 of 5"); the HTTP API shows the same.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

import msgspec
import typer
from psycopg import AsyncConnection
from rich.table import Table
from rich.text import Text

from govflow.cli.context import JsonFlag, console, print_json, run_async
from govflow.db import executions, views
from govflow.db.executions import Execution, ExecutionRow
from govflow.runtime.connections import database_pool
from govflow.schemas.errors import GovflowError
from govflow.schemas.settings import Settings


class StepProgress(msgspec.Struct, frozen=True, kw_only=True):
    """One step of an execution: ``step`` of ``of``, and where it stands."""

    step: int
    of: int
    action: str
    status: str  # pending (not started), running, failed or completed
    attempts: int
    error: str | None
    updated_at: datetime | None


class ExecutionDetail(ExecutionRow, frozen=True, kw_only=True):
    """An execution with every step of its workflow version."""

    completed_steps: int
    total_steps: int
    steps: list[StepProgress]


async def execution_detail(conn: AsyncConnection[Any], execution_id: str) -> ExecutionDetail | None:
    """One execution with all its steps, or ``None`` when there is no such execution."""
    execution = await executions.get_execution(conn, execution_id, with_steps=False)
    if execution is None:
        return None
    plan = (await views.step_plans(conn, [execution.id])).get(execution.id, [])
    steps = [StepProgress(of=len(plan), **msgspec.structs.asdict(s)) for s in plan]
    return ExecutionDetail(
        **executions.columns(execution),
        completed_steps=sum(1 for s in steps if s.status == "completed"),
        total_steps=len(plan),
        steps=steps,
    )


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

    async def body(settings: Settings) -> ExecutionDetail | None:
        async with database_pool(settings, max_size=1) as pool, pool.connection() as conn:
            return await execution_detail(conn, execution_id)

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
