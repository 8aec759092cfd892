"""``govflow dlq``: list, show, replay and purge dead letters (the logic is operations/dlq.py)."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Annotated, Any

import msgspec
import typer
from rich.table import Column
from rich.text import Text

from govflow.cli.context import JsonFlag, console, print_json, run_async
from govflow.cli.tables import fields_table, listing_table, one_line, rest_of
from govflow.db.dead_letters import DeadLetter, Selection
from govflow.operations.dlq import (
    PurgeReport,
    ReplayReport,
    Skipped,
    default_actor,
    get_letter,
    list_letters,
    purge,
    replay,
    when,
)
from govflow.operations.replay_plan import ReplayPlan, StepRef
from govflow.runtime.connections import database_pool, redis_client
from govflow.schemas.errors import ConfigError, GovflowError
from govflow.schemas.settings import Settings

app = typer.Typer(help="List, show, replay and purge dead letters.")

AllFlag = Annotated[
    bool, typer.Option("--all", help="Every open dead letter that passes the filters.")
]
ReasonFilter = Annotated[
    str | None,
    typer.Option("--reason-filter", help="Only letters whose error contains this text."),
]
EventTypeFilter = Annotated[
    str | None, typer.Option("--event-type", help="Only letters of this event type.")
]
OlderThan = Annotated[
    float | None,
    typer.Option("--older-than", min=0, help="Only letters dead-lettered this many seconds ago."),
]
Actor = Annotated[
    str | None, typer.Option(help="Who does it, recorded.", show_default="the OS user")
]
Ids = Annotated[list[int] | None, typer.Argument(help="Dead-letter ids.", show_default=False)]


@app.command("list")
def list_command(
    reason_filter: ReasonFilter = None,
    event_type: EventTypeFilter = None,
    older_than: OlderThan = None,
    include_done: Annotated[
        bool, typer.Option(help="Also the letters replayed or purged already.")
    ] = False,
    limit: Annotated[int, typer.Option(min=1, help="At most this many, newest first.")] = 100,
    as_json: JsonFlag = False,
) -> None:
    """List the dead letters waiting for an operator, newest first, with their reasons."""
    selection = Selection(reason=reason_filter, event_type=event_type, older_than_s=older_than)

    async def body(settings: Settings) -> list[DeadLetter]:
        async with database_pool(settings, max_size=1) as pool:
            return await list_letters(pool, selection, include_done=include_done, limit=limit)

    letters = run_async(body, redis=False)
    if as_json:
        print_json(letters)
        return
    if not letters:
        console.print("no dead letters" if include_done else "no open dead letters")
        return
    # The error is cut to one line: `dlq show ID` prints all of it. The columns beside
    # it take 6 + 14 + 5 + 8 characters and 2 between each.
    width = rest_of(console.width, 6 + 14 + 5 + 8 + 4 * 2)
    table = listing_table(
        Column("id", justify="right", no_wrap=True),
        Column("dead-lettered", no_wrap=True),
        Column("stream / event / error", overflow="fold", ratio=1),
        Column("tries", justify="right", no_wrap=True),
        Column("state", overflow="fold", max_width=8),
    )
    for d in letters:
        cell = Text(f"{d.stream}  {d.event_type or '-'}\n")
        cell.append(one_line(d.error, width), style="red")
        table.add_row(
            str(d.id), f"{d.created_at:%m-%d %H:%M:%S}", cell, str(d.attempts), _short_state(d)
        )
    console.print(table)


@app.command("show")
def show_command(
    dead_letter_id: Annotated[int, typer.Argument(metavar="ID", help="The dead-letter id.")],
    as_json: JsonFlag = False,
) -> None:
    """Show one dead letter: where it came from, why, its payload and what became of it."""

    async def body(settings: Settings) -> DeadLetter | None:
        async with database_pool(settings, max_size=1) as pool:
            return await get_letter(pool, dead_letter_id)

    letter = run_async(body, redis=False)
    if letter is None:
        raise GovflowError(f"no dead letter with id {dead_letter_id}")
    if as_json:
        print_json(letter)
        return
    rows = [
        ("id", str(letter.id)),
        ("stream", f"{letter.stream} (entry {letter.message_id})"),
        ("event", f"{letter.event_type or '-'} {letter.event_id or ''}".strip()),
        ("execution", letter.execution_id or "-"),
        ("error", letter.error),
        ("attempts", str(letter.attempts)),
        ("dead-lettered", when(letter.created_at)),
        ("state", _state(letter)),
    ]
    if letter.replay_reason:
        rows.append(("replay reason", letter.replay_reason))
    rows.append(("payload", ""))
    console.print(fields_table(rows))
    for field, value in letter.payload.items():
        text = f"  {field}: {_pretty(value)}".replace("\n", "\n  ")
        console.print(text, markup=False, soft_wrap=False, overflow="fold")


@app.command("replay")
def replay_command(
    ids: Ids = None,
    every: AllFlag = False,
    dry_run: Annotated[
        bool, typer.Option(help="Replay nothing; show what each letter would run now.")
    ] = False,
    reason_filter: ReasonFilter = None,
    event_type: EventTypeFilter = None,
    older_than: OlderThan = None,
    rate: Annotated[
        str | None, typer.Option(help="At most N replays a second: N/s (or N/m a minute).")
    ] = None,
    actor: Actor = None,
    reason: Annotated[str | None, typer.Option(help="Why, recorded with the replay.")] = None,
    as_json: JsonFlag = False,
) -> None:
    """Put dead letters back on their stream; each runs once, and done steps are skipped."""
    selection = _selection(ids, every, reason_filter, event_type, older_than)
    per_second = parse_rate(rate) if rate is not None else None
    who = actor or default_actor()

    async def body(settings: Settings) -> ReplayReport:
        keys = settings.keys()
        async with redis_client(settings) as redis, database_pool(settings, max_size=2) as pool:
            return await replay(
                redis,
                pool,
                keys,
                selection,
                actor=who,
                reason=reason,
                dry_run=dry_run,
                rate=per_second,
            )

    report = run_async(body)
    if as_json:
        print_json(report)
    else:
        _print_replay(report)
    _fail_on_unknown(report.skipped)


@app.command("purge")
def purge_command(
    ids: Ids = None,
    every: AllFlag = False,
    reason_filter: ReasonFilter = None,
    event_type: EventTypeFilter = None,
    older_than: OlderThan = None,
    actor: Actor = None,
    as_json: JsonFlag = False,
) -> None:
    """Drop dead letters: they stay in the table, marked purged, and leave every listing."""
    selection = _selection(ids, every, reason_filter, event_type, older_than)
    who = actor or default_actor()

    async def body(settings: Settings) -> PurgeReport:
        async with database_pool(settings, max_size=1) as pool:
            return await purge(pool, selection, actor=who)

    report = run_async(body, redis=False)
    if as_json:
        print_json(report)
    else:
        console.print(
            f"purged {len(report.purged)}"
            + (f": {', '.join(map(str, report.purged))}" if report.purged else "")
        )
        for s in report.skipped:
            console.print(f"skipped {s.id}: {s.why}", markup=False)
    _fail_on_unknown(report.skipped)


_RATE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(?:/\s*([sm]))?\s*$")


def parse_rate(text: str) -> float:
    """``10/s``, ``10`` (a second) or ``30/m`` as replays per second.

    Raises:
        ConfigError: anything else, or zero.
    """
    found = _RATE.match(text)
    if not found or float(found[1]) <= 0:
        raise ConfigError(f"--rate {text!r}: give replays per second as N/s, or N/m a minute")
    return float(found[1]) / (60 if found[2] == "m" else 1)


def _selection(
    ids: list[int] | None,
    every: bool,
    reason: str | None,
    event_type: str | None,
    older_than: float | None,
) -> Selection:
    if bool(ids) == every:
        raise ConfigError("name the dead-letter ids, or --all (with filters), not both")
    return Selection(
        ids=tuple(ids or ()), reason=reason, event_type=event_type, older_than_s=older_than
    )


def _fail_on_unknown(skipped: Sequence[Skipped]) -> None:
    unknown = [str(s.id) for s in skipped if s.why == "no such dead letter"]
    if unknown:
        raise GovflowError(f"no dead letter with id {', '.join(unknown)}")


def _short_state(letter: DeadLetter) -> str:
    """``open``, ``replayed`` or ``purged``: `dlq show` says by whom and when."""
    if letter.purged_at is not None:
        return "purged"
    return "open" if letter.replayed_at is None else "replayed"


def _state(letter: DeadLetter) -> str:
    if letter.purged_at is not None:
        return f"purged by {letter.purged_by}"
    if letter.replayed_at is not None:
        return f"replayed by {letter.replayed_by} at {when(letter.replayed_at)}"
    return "open"


def _pretty(value: Any) -> str:
    """A JSON payload field indented; anything else as it is."""
    try:
        return msgspec.json.format(str(value), indent=2)
    except msgspec.DecodeError:
        return str(value)


def _print_replay(report: ReplayReport) -> None:
    if report.dry_run:
        if not report.plans:
            console.print("no open dead letter to replay")
        for p in report.plans:
            _print_plan(p)
        if report.more:
            console.print(f"(the first {len(report.plans)} letters only: more match)")
    else:
        console.print(f"replayed {len(report.replayed)}")
        for r in report.replayed:
            console.print(f"  {r.id} -> {r.stream} {r.entry_id}", markup=False)
    for s in report.skipped:
        console.print(f"skipped {s.id}: {s.why}", markup=False)


def _print_plan(p: ReplayPlan) -> None:
    what = " ".join(x for x in (p.kind, p.event_type, p.event_id) if x)
    console.print(f"dead letter {p.id} ({p.stream}): {what}", markup=False)
    console.print(f"  failed: {p.error}", markup=False)
    if p.matches is not None:
        matched = ", ".join(p.matches) or "no enabled workflow"
        console.print(f"  now matches: {matched}", markup=False)
    for e in p.executions:
        status = e.status or "new"
        console.print(
            f"  execution {e.execution_id} {e.workflow} v{e.version} ({status})", markup=False
        )
        if e.skipped_steps:
            console.print(f"    skips {_step_list(e.skipped_steps)} (completed)", markup=False)
        if e.would_run:
            console.print(f"    runs {_step_list(e.would_run)}", markup=False)
        console.print(f"    {e.note}", markup=False)
    console.print(f"  -> {p.outcome}", markup=False)


def _step_list(steps: Sequence[StepRef]) -> str:
    return ", ".join(f"{s.step} {s.action}" for s in steps)
