"""``govflow pause GROUP`` and ``govflow resume GROUP`` (the logic is consumers/pause.py)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated

import typer

from govflow.cli.context import JsonFlag, console, print_json, run_async
from govflow.consumers import pause
from govflow.operations.dlq import default_actor, when
from govflow.runtime.connections import redis_client
from govflow.schemas.settings import Settings

Group = Annotated[
    str, typer.Argument(metavar="GROUP", help=f"{' or '.join(pause.GROUPS)}.", show_default=False)
]


def pause_command(
    group: Group,
    reason: Annotated[str | None, typer.Option(help="Why, recorded with the pause.")] = None,
    actor: Annotated[
        str | None, typer.Option(help="Who pauses it, recorded.", show_default="the OS user")
    ] = None,
    as_json: JsonFlag = False,
) -> None:
    """Stop the group's consumers taking entries; the batches in hand finish first."""
    wanted = pause.Pause(
        group=pause.check_group(group),
        by=actor or default_actor(),
        since=datetime.now(UTC),
        reason=reason,
    )

    async def body(settings: Settings) -> tuple[pause.Pause, bool]:
        async with redis_client(settings) as redis:
            return await pause.pause(redis, settings.keys(), wanted)

    current, changed = run_async(body, database=False)
    if as_json:
        print_json({"paused": current, "changed": changed})
        return
    already = "" if changed else " already"
    console.print(
        f"{group}{already} paused by {current.by} since {when(current.since)}", markup=False
    )


def resume_command(group: Group, as_json: JsonFlag = False) -> None:
    """Let the group's consumers take entries again."""
    pause.check_group(group)

    async def body(settings: Settings) -> pause.Pause | None:
        async with redis_client(settings) as redis:
            return await pause.resume(redis, settings.keys(), group)

    lifted = run_async(body, database=False)
    if as_json:
        print_json({"group": group, "lifted": lifted, "changed": lifted is not None})
        return
    if lifted is None:
        console.print(f"{group} was not paused", markup=False)
    else:
        console.print(f"{group} resumed (paused by {lifted.by} since {when(lifted.since)})")
