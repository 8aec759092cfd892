"""The ``govflow`` command line: one entry point, and one line on stderr per error.

Every command reads its settings through ``govflow.cli.context`` (the environment, then the global
flags, then its own) and runs its async body with ``run_async``. To add a group of
commands, make a ``typer.Typer()`` in its own module and ``app.add_typer`` it below.

Exit status: 0 on success, 2 for a bad argument, file or setting, 1 when a server cannot
be reached or anything else goes wrong. Errors are one sentence on stderr, never a
traceback, and never a password.
"""

from __future__ import annotations

import functools
import sys
from importlib.metadata import version as package_version
from typing import Annotated, Any

import msgspec
import psycopg
import typer
from redis import exceptions as redis_errors

from govflow.cli import approvals as approvals_cli
from govflow.cli import check as check_cli
from govflow.cli import config as config_cli
from govflow.cli import dlq as dlq_cli
from govflow.cli import execution_ops, executions, outcome, pause
from govflow.cli import lag as lag_cli
from govflow.cli import tasks as tasks_cli
from govflow.cli import webhooks as webhooks_cli
from govflow.cli import workflows as workflows_cli
from govflow.cli.context import (
    console,
    database_url,
    help_without_command,
    print_error,
    run_async,
    set_global_flags,
)
from govflow.cli.serve import serve
from govflow.core import deployment
from govflow.db import migrate as db_migrate
from govflow.producers.publish import Publisher
from govflow.runtime.embedded import EmbeddedServerError
from govflow.runtime.log import configure_logging
from govflow.runtime.worker import parse_roles, run_workers
from govflow.schemas.codec import encode, json_schemas
from govflow.schemas.errors import ConfigError, GovflowError, InvalidEntryError, UnavailableError
from govflow.schemas.events import Change, Event, new_event
from govflow.schemas.settings import Settings

# Errors a person fixes by changing an argument, a file or a setting: exit 2.
BAD_INPUT = (ConfigError, InvalidEntryError, msgspec.ValidationError)
# A server that cannot be reached (``core.unavailable``), or that refuses what we ask:
# exit 1 with the server's own words. Not a retry decision: a command tries once.
SERVER_ERRORS = (
    UnavailableError,
    EmbeddedServerError,
    redis_errors.RedisError,
    psycopg.OperationalError,
)


app = typer.Typer(
    name="govflow",
    help="Run governance workflows from domain events.",
    pretty_exceptions_enable=False,
)
app.add_typer(workflows_cli.app, name="workflows", invoke_without_command=True)
app.command("lag")(lag_cli.lag)
app.command("check")(check_cli.check)
app.add_typer(dlq_cli.app, name="dlq")
app.add_typer(executions.app, name="executions")
executions.app.command("cancel")(execution_ops.cancel_command)
executions.app.command("retry")(execution_ops.retry_command)
executions.app.command("prune")(execution_ops.prune_command)
app.add_typer(approvals_cli.app, name="approvals")
app.add_typer(tasks_cli.app, name="tasks")
app.add_typer(webhooks_cli.app, name="webhooks")
app.command("serve")(serve)
app.command("config")(config_cli.config)
app.command("pause")(pause.pause_command)
app.command("resume")(pause.resume_command)


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"govflow {package_version('govflow')}")
        raise typer.Exit


@app.callback(invoke_without_command=True)
def _global_options(
    ctx: typer.Context,
    redis_url: Annotated[
        str | None, typer.Option(help="Overrides GOVFLOW_REDIS_URL.", show_default=False)
    ] = None,
    database_url: Annotated[
        str | None, typer.Option(help="Overrides GOVFLOW_DATABASE_URL.", show_default=False)
    ] = None,
    prefix: Annotated[
        str | None, typer.Option(help="Overrides GOVFLOW_PREFIX.", show_default=False)
    ] = None,
    data_dir: Annotated[
        str | None, typer.Option(help="Overrides GOVFLOW_DATA_DIR.", show_default=False)
    ] = None,
    log_level: Annotated[
        str | None,
        typer.Option(
            help="debug, info, warning or error.", show_default="info for run, else warning"
        ),
    ] = None,
    version: Annotated[
        bool,
        typer.Option(
            "--version", is_eager=True, callback=_print_version, help="Print the version and exit."
        ),
    ] = False,
) -> None:
    """Run governance workflows from domain events."""
    # A one-shot command's stderr is for its error; the workers say what they do.
    default_level = "info" if ctx.invoked_subcommand == "run" else "warning"
    try:
        configure_logging(level=log_level or default_level)
    except ValueError as e:
        raise ConfigError(f"--log-level: {e}") from e
    set_global_flags(
        redis_url=redis_url, database_url=database_url, prefix=prefix, data_dir=data_dir
    )
    help_without_command(ctx)


@app.command()
def migrate() -> None:
    """Create or upgrade the database schema; safe to run twice, and concurrently."""
    applied = run_async(_migrate, redis=False, start=True)
    console.print(f"applied {', '.join(applied)}" if applied else "schema is up to date")


async def _migrate(settings: Settings) -> list[str]:
    applied = await db_migrate.migrate(database_url(settings))
    # The database is this deployment's from now on: another prefix is refused.
    async with await psycopg.AsyncConnection.connect(
        database_url(settings), autocommit=True, connect_timeout=10
    ) as conn:
        await deployment.record_prefix(conn, settings.prefix)
    return applied


@app.command()
def publish(
    type: Annotated[str, typer.Argument(help="<entity>.<change>, e.g. policy.created.")],
    entity_id: Annotated[str, typer.Option("--entity-id", help="The entity that changed.")],
    tenant: Annotated[str, typer.Option(help="The tenant the entity belongs to.")] = "default",
    data: Annotated[str, typer.Option(help="The entity after the change, a JSON object.")] = "{}",
    changes: Annotated[
        str, typer.Option(help='{"field": {"from": ..., "to": ...}} as JSON.')
    ] = "{}",
    actor: Annotated[str | None, typer.Option(help="Who made the change.")] = None,
    id: Annotated[str | None, typer.Option(help="The event id; a new UUID when absent.")] = None,
    wait: Annotated[
        bool,
        typer.Option(
            "--wait",
            help="Then print the executions it caused by workflow, or why it matched none.",
        ),
    ] = False,
    wait_timeout: Annotated[
        float, typer.Option("--wait-timeout", min=0, help="Seconds --wait waits at most.")
    ] = 10.0,
) -> None:
    """Publish one event to the stream and print its id (with --wait, what it caused)."""
    event = new_event(
        type,
        entity_id,
        tenant=tenant,
        data=_json_option("--data", data, dict[str, Any]),
        changes=_json_option("--changes", changes, dict[str, Change]),
        actor=actor,
        id=id,
    )
    if not wait:
        console.print(run_async(functools.partial(_publish, event), database=False))
        return
    caused = run_async(functools.partial(_publish_and_wait, event, wait_timeout))
    console.print(caused.event_id, markup=False)
    for line in outcome.lines(caused, wait_timeout):
        console.print(line, markup=False)


async def _publish_and_wait(event: Event, timeout_s: float, settings: Settings) -> outcome.Outcome:
    async with await psycopg.AsyncConnection.connect(
        database_url(settings), connect_timeout=10, autocommit=True
    ) as conn:
        return await outcome.publish_and_wait(
            functools.partial(_publish, event, settings), conn, event, timeout_s
        )


async def _publish(event: Event, settings: Settings) -> str:
    if settings.redis_url is None:
        raise ConfigError("no Redis URL: set GOVFLOW_REDIS_URL")
    async with await Publisher.connect(settings.redis_url, settings.keys()) as publisher:
        return await publisher.publish(event)


@app.command()
def run(
    role: Annotated[
        list[str] | None,
        typer.Option(
            help="all, triggers, actions or relay; repeat it or give a comma list.",
            show_default="all",
        ),
    ] = None,
    concurrency: Annotated[
        int,
        typer.Option(
            min=1,
            help="Consumers per group, each handling a batch at a time. With"
            " GOVFLOW_PARTITIONS > 1 a worker runs one per partition it holds instead.",
        ),
    ] = 2,
    metrics_port: Annotated[
        int | None, typer.Option(help="Serve Prometheus /metrics on this port.")
    ] = None,
    metrics_host: Annotated[
        str, typer.Option(help="The address /metrics listens on (0.0.0.0 in a container).")
    ] = "127.0.0.1",
) -> None:
    """Run the workers until SIGTERM or SIGINT (Ctrl-C): the work in hand finishes, exit 0.

    A second signal, a second or more after the first, stops at once (exit 128 + signal).
    """
    roles = parse_roles(role or ["all"])

    async def workers(settings: Settings) -> int:
        return await run_workers(
            settings,
            roles=roles,
            concurrency=concurrency,
            metrics_port=metrics_port,
            metrics_host=metrics_host,
        )

    if status := run_async(workers, start=True, check=False):
        raise typer.Exit(status)


@app.command()
def schema() -> None:
    """Print the JSON Schema of events, commands and workflow definitions."""
    sys.stdout.write(msgspec.json.format(encode(json_schemas()), indent=2).decode() + "\n")


def _json_option(flag: str, text: str, kind: Any) -> Any:
    """Decode a JSON flag into ``kind``, or raise a ``ConfigError`` naming the flag."""
    try:
        return msgspec.json.decode(text, type=kind)
    except msgspec.ValidationError as e:
        raise ConfigError(f"{flag}: {e}") from e
    except msgspec.DecodeError as e:
        raise ConfigError(f"{flag} is not valid JSON: {e}") from e
    except RecursionError as e:
        raise ConfigError(f"{flag} is nested too deeply") from e


def _describe(error: BaseException) -> str:
    if isinstance(error, psycopg.OperationalError):
        return f"cannot use the database: {error}"
    if isinstance(error, redis_errors.RedisError) and not isinstance(error, GovflowError):
        return f"Redis: {str(error) or type(error).__name__}"
    return str(error) or type(error).__name__


def main(argv: list[str] | None = None) -> None:
    """Run the command line; exit with its status."""
    try:
        try:
            status = app(args=argv, prog_name="govflow", standalone_mode=False)
        except BaseExceptionGroup as group:
            # A task group wraps what failed inside it: report the first real error.
            raise _first_leaf(group) from group
    except typer.TyperException as e:
        # A bad command line (typer's UsageError and friends, exit 2) or a file it opened.
        ctx = getattr(e, "ctx", None)
        hint = f" (see '{ctx.command_path} --help')" if ctx is not None else ""
        print_error(f"{e.format_message()}{hint}")
        status = e.exit_code
    except typer.Abort:
        print_error("aborted")
        status = 130
    except psycopg.errors.UndefinedTable:
        print_error("the database has no govflow tables yet: run `govflow migrate` first")
        status = 1
    except BAD_INPUT as e:
        print_error(str(e))
        status = 2
    except SERVER_ERRORS as e:
        print_error(_describe(e))
        status = 1
    except GovflowError as e:
        print_error(str(e))
        status = 1
    except Exception as e:  # noqa: BLE001 - an error is a sentence, never a traceback
        print_error(f"unexpected {type(e).__name__}: {e} (a bug in govflow; please report it)")
        status = 1
    sys.exit(status if isinstance(status, int) else 0)


def _first_leaf(group: BaseExceptionGroup[BaseException]) -> BaseException:
    error: BaseException = group
    while isinstance(error, BaseExceptionGroup):
        error = error.exceptions[0]
    return error
