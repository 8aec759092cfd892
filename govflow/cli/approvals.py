"""``govflow approvals``: the approvals workflows ask for, and deciding them.

``list --json`` prints the objects ``GET /approvals`` answers. ``approve`` and ``reject``
are the operation the HTTP API and the Python API run (``operations.decisions``): a
refusal (already decided, expired, not an approver, no such approval) exits 1 with the
reason on stderr.
"""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Column
from rich.text import Text

from govflow.cli.context import JsonFlag, console, print_json, run_async
from govflow.cli.tables import listing_table, short_id
from govflow.db import decisions
from govflow.db.decisions import Approval
from govflow.db.id_prefix import resolve_id
from govflow.operations.decisions import Decisions, RefusedError
from govflow.runtime.connections import database_pool, redis_client
from govflow.schemas.errors import GovflowError
from govflow.schemas.settings import Settings

app = typer.Typer(help="List approvals, and approve or reject one.")

By = Annotated[str, typer.Option("--by", help="Who decides: one of the approvers.")]
Comment = Annotated[str | None, typer.Option(help="Why, recorded with the decision.")]
ApprovalId = Annotated[
    str, typer.Argument(metavar="ID", help="The approval id, or its first characters.")
]


@app.command("list")
def list_command(
    status: Annotated[
        decisions.ApprovalStatus | None,
        typer.Option(help="pending, approved, rejected or expired."),
    ] = None,
    approver: Annotated[str | None, typer.Option(help="Those this person may decide.")] = None,
    entity_id: Annotated[str | None, typer.Option("--entity-id", help="One entity's.")] = None,
    limit: Annotated[int, typer.Option(min=1, help="At most this many, oldest first.")] = 50,
    as_json: JsonFlag = False,
) -> None:
    """List approvals, oldest first, with their decisions."""

    async def body(settings: Settings) -> list[Approval]:
        async with database_pool(settings, max_size=1) as pool, pool.connection() as conn:
            return await decisions.list_approvals(
                conn, status=status, approver=approver, entity_id=entity_id, limit=limit
            )

    rows = run_async(body, redis=False)
    if as_json:
        print_json(rows)
        return
    if not rows:
        console.print("no approvals")
        return
    # Names and comments fold, never cut; the other columns keep to one line.
    table = listing_table(
        Column("id", no_wrap=True),
        Column("workflow / entity / approvers", overflow="fold", ratio=1),
        Column("status", no_wrap=True, min_width=8),
        Column("votes", justify="right", no_wrap=True),
        Column("due", no_wrap=True),
    )
    for a in rows:
        table.add_row(
            short_id(a.id),
            _described(a),
            a.status,
            f"{sum(d.decision == 'approve' for d in a.decisions)}/{a.required}",
            f"{a.due_at:%m-%d %H:%M}" if a.due_at else "-",
        )
    console.print(table)


def _described(a: Approval) -> Text:
    """What an approval is about, who may decide it, and who did."""
    cell = Text(f"{a.workflow_name} step {a.step}\n{a.entity_type} {a.entity_id}\n")
    cell.append(f"approvers: {', '.join(a.approvers)}")
    for d in a.decisions:
        said = f": {d.comment}" if d.comment else ""
        style = "green" if d.decision == "approve" else "red"
        cell.append(f"\n{d.by} {d.decision}d{said}", style=style)
    return cell


@app.command("approve")
def approve_command(
    approval_id: ApprovalId, by: By, comment: Comment = None, as_json: JsonFlag = False
) -> None:
    """Approve: the approval is approved once its required approvals are in."""
    _decide(approval_id, by=by, approve=True, comment=comment, as_json=as_json)


@app.command("reject")
def reject_command(
    approval_id: ApprovalId, by: By, comment: Comment = None, as_json: JsonFlag = False
) -> None:
    """Reject: one rejection rejects the approval."""
    _decide(approval_id, by=by, approve=False, comment=comment, as_json=as_json)


def _decide(text: str, *, by: str, approve: bool, comment: str | None, as_json: bool) -> None:
    async def body(settings: Settings) -> Approval:
        async with database_pool(settings, max_size=2) as pool, redis_client(settings) as redis:
            async with pool.connection() as conn:
                approval_id = await resolve_id(conn, "approval", text)
            try:
                return await Decisions(pool, redis, settings.keys()).decide(
                    approval_id, by=by, approve=approve, comment=comment
                )
            except RefusedError as e:
                raise GovflowError(e.reason) from e

    approval = run_async(body)
    if as_json:
        print_json(approval)
        return
    approvals = sum(d.decision == "approve" for d in approval.decisions)
    line = (
        f"{by} {'approved' if approve else 'rejected'} {approval.id}: the approval is"
        f" {approval.status} ({approvals} of {approval.required} approvals)"
    )
    if approval.wait and approval.status != "pending":
        line += f"; execution {short_id(approval.execution_id)} goes on"
    console.print(line, markup=False)
