"""``govflow lag``: the report of operations/lag.py as a table, as JSON, or redrawn in place."""

from __future__ import annotations

import functools
import signal
from typing import Annotated

import anyio
import typer
from rich.console import Group as RenderGroup
from rich.console import RenderableType
from rich.live import Live
from rich.table import Column
from rich.text import Text

from govflow.cli.context import JsonFlag, console, print_json, run_async
from govflow.cli.tables import listing_table
from govflow.operations.lag import LagReport, read_lag
from govflow.operations.workers import WorkerStatus
from govflow.runtime.connections import database_pool, redis_client
from govflow.schemas.errors import ConfigError
from govflow.schemas.settings import Settings


def render(report: LagReport) -> RenderableType:
    """The report as a table of groups, one of their consumers, one of the workers, and a
    line of totals."""
    parked = any(g.held_entities for g in report.groups)
    table = listing_table(
        Column("stream", overflow="fold", ratio=1),
        Column("group", overflow="fold"),
        Column("length", justify="right", no_wrap=True),
        Column("lag", justify="right", no_wrap=True),
        Column("pending", justify="right", no_wrap=True),
        Column("oldest\npending", justify="right", no_wrap=True),
        Column("oldest\nundelivered", justify="right", no_wrap=True),
        *([Column("parked\n(held)", justify="right", no_wrap=True)] if parked else []),
    )
    consumers = listing_table(
        Column("group", overflow="fold"),
        Column("consumer", overflow="fold", ratio=1),
        Column("pending", justify="right", no_wrap=True),
        Column("idle", justify="right", no_wrap=True),
        Column("worker", no_wrap=True),
    )
    for g in report.groups:
        table.add_row(
            Text(g.stream),
            Text(f"{g.group} (paused)" if g.paused else g.group),
            str(g.length),
            str(g.lag) if g.lag_valid else f"~{g.lag}",
            str(g.pending),
            format_age(g.oldest_pending_age_s),
            format_age(g.oldest_undelivered_age_s),
            *([f"{g.parked} ({g.held_entities})"] if parked else []),
        )
        for c in g.consumers:
            consumers.add_row(
                Text(g.group),
                Text(c.name),
                str(c.pending),
                format_age(c.idle_s),
                "live" if c.live else Text("gone", style="yellow"),
            )
    totals = [
        f"retries scheduled: {report.retry_scheduled}",
        f"dead letters: {report.dead_letters}",
        f"overdue: {report.overdue}",
    ]
    people = [
        f"waiting for people: {report.waiting}",
        f"approvals pending: {report.approvals_pending}",
        f"tasks open: {report.tasks_open}",
        f"timers due: {report.timers_due}",
    ]
    # One line per kind of figure, so that none runs past 80 columns.
    lines = ["   ".join(totals), "   ".join(people)]
    if report.outbox is not None:
        lines.append(
            f"outbox: {report.outbox.waiting} waiting"
            + (
                f" (oldest {format_age(report.outbox.oldest_age_s)})"
                if report.outbox.waiting
                else ""
            )
            + (f", {report.outbox.overdue} overdue" if report.outbox.overdue else "")
        )
    lines.extend(
        f"{p.group} paused by {p.by} since {p.since:%Y-%m-%d %H:%M:%S %Z}"
        + (f" ({p.reason})" if p.reason else "")
        for p in report.paused
    )
    parts: list[RenderableType] = [table]
    if consumers.row_count:
        parts.extend([Text(""), consumers])
    else:
        parts.append(Text("no consumers", style="dim"))
    parts.extend([Text(""), render_workers(report.workers)])
    parts.extend([Text(""), *(Text(line) for line in lines)])
    if any(not g.lag_valid for g in report.groups):
        parts.append(Text("~ an estimate: too many entries to count", style="dim"))
    return RenderGroup(*parts)


STATE_STYLE = {"live": "green", "stalled": "red", "stale": "red", "stopped": "dim"}


def render_workers(workers: list[WorkerStatus]) -> RenderableType:
    """The workers by their heartbeats: live ones first, then those gone for 15 minutes."""
    if not workers:
        return Text("no workers", style="dim")
    table = listing_table(
        Column("worker", overflow="fold", ratio=1),
        Column("roles", overflow="fold"),
        Column("state", no_wrap=True),
        Column("heartbeat", justify="right", no_wrap=True),
        Column("progress", justify="right", no_wrap=True),
        Column("partitions", overflow="fold"),
    )
    for w in workers:
        table.add_row(
            Text(w.id),
            Text(", ".join(w.roles)),
            Text(w.state, style=STATE_STYLE[w.state]),
            format_age(w.heartbeat_age_s),
            format_age(w.progress_age_s),
            Text(
                " ".join(
                    f"{group}:{','.join(map(str, ps)) or '-'}" for group, ps in w.partitions.items()
                )
                or "-"
            ),
        )
    return table


def format_age(seconds: float | None) -> str:
    """``1.2s``, ``4m05s``, ``3h02m`` or ``2d04h``; ``-`` for no age."""
    if seconds is None:
        return "-"
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    if hours < 48:
        return f"{hours}h{minutes:02d}m"
    days, hours = divmod(hours, 24)
    return f"{days}d{hours:02d}h"


# The command ----------------------------------------------------------------------------


def lag(
    as_json: JsonFlag = False,
    watch: Annotated[bool, typer.Option("--watch", help="Refresh in place until Ctrl-C.")] = False,
    interval: Annotated[
        float, typer.Option(min=0.2, help="Seconds between refreshes with --watch.")
    ] = 2.0,
) -> None:
    """Show how far behind each group is: lag, pending, oldest ages, consumers, dead letters."""
    if as_json and watch:
        raise ConfigError("--json and --watch do not go together: pick one")
    if watch:
        try:
            run_async(functools.partial(_watch, interval))
        except KeyboardInterrupt:  # Ctrl-C before the signal handler was in place
            pass
        return
    report = run_async(_read)
    if as_json:
        print_json(report)
    else:
        console.print(render(report))


async def _read(settings: Settings) -> LagReport:
    async with redis_client(settings) as redis, database_pool(settings, max_size=1) as pool:
        return await read_lag(
            redis, pool, settings.keys(), overdue_after_s=settings.reconcile_after
        )


async def _watch(interval: float, settings: Settings) -> None:
    """Redraw the report every ``interval`` seconds until SIGINT or SIGTERM; exit 0."""
    keys, after = settings.keys(), settings.reconcile_after
    async with (
        redis_client(settings) as redis,
        database_pool(settings, max_size=1) as pool,
        anyio.create_task_group() as tg,
    ):
        tg.start_soon(_cancel_on_signal, tg.cancel_scope)
        if not console.is_terminal:  # a pipe or a file: one report after the other
            while True:
                console.print(render(await read_lag(redis, pool, keys, overdue_after_s=after)))
                await anyio.sleep(interval)
        with Live(console=console, auto_refresh=False, transient=False) as live:
            while True:
                live.update(
                    render(await read_lag(redis, pool, keys, overdue_after_s=after)), refresh=True
                )
                await anyio.sleep(interval)


async def _cancel_on_signal(scope: anyio.CancelScope) -> None:
    with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for _ in signals:
            scope.cancel()
            return
