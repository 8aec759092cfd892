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
import os
import re
import sys
from importlib.metadata import version as package_version
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import urlsplit

import msgspec
import psycopg
import typer
from redis import exceptions as redis_errors
from rich.table import Column
from rich.text import Text

from govflow.cli import approvals as approvals_cli
from govflow.cli import config as config_cli
from govflow.cli import dlq as dlq_cli
from govflow.cli import executions, outcome
from govflow.cli import lag as lag_cli
from govflow.cli import tasks as tasks_cli
from govflow.cli import webhooks as webhooks_cli
from govflow.cli.context import JsonFlag, console, print_json, run_async, set_global_flags
from govflow.cli.serve import serve
from govflow.cli.tables import listing_table
from govflow.core import deployment
from govflow.db import migrate as db_migrate
from govflow.db.workflows import WorkflowVersion, apply_workflow, list_workflows
from govflow.plugins.registry import check_actions
from govflow.producers.publish import Publisher
from govflow.runtime.embedded import EmbeddedServerError
from govflow.runtime.log import MASK, configure_logging, redact_url
from govflow.runtime.worker import parse_roles, run_workers
from govflow.schemas.codec import decode_workflow, encode, json_schemas
from govflow.schemas.errors import ConfigError, GovflowError, InvalidEntryError, UnavailableError
from govflow.schemas.events import Change, Event, new_event
from govflow.schemas.settings import Settings
from govflow.schemas.templates import check_workflow
from govflow.schemas.workflows import Workflow

_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*://[^\s'\"]+")

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


def _help_without_command(ctx: typer.Context) -> None:
    """Print the help of a group called without a command, and exit 2."""
    if ctx.invoked_subcommand is None:
        typer.echo(ctx.get_help(), err=True)
        raise typer.Exit(2)


app = typer.Typer(
    name="govflow",
    help="Run governance workflows from domain events.",
    pretty_exceptions_enable=False,
)
workflows_app = typer.Typer(
    help="Register and list workflow definitions.", callback=_help_without_command
)
app.add_typer(workflows_app, name="workflows", invoke_without_command=True)
app.command("lag")(lag_cli.lag)
app.add_typer(dlq_cli.app, name="dlq")
app.add_typer(executions.app, name="executions")
app.add_typer(approvals_cli.app, name="approvals")
app.add_typer(tasks_cli.app, name="tasks")
app.add_typer(webhooks_cli.app, name="webhooks")
app.command("serve")(serve)
app.command("config")(config_cli.config)


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
    _help_without_command(ctx)


@app.command()
def migrate() -> None:
    """Create or upgrade the database schema; safe to run twice, and concurrently."""
    applied = run_async(_migrate, redis=False, start=True)
    console.print(f"applied {', '.join(applied)}" if applied else "schema is up to date")


async def _migrate(settings: Settings) -> list[str]:
    applied = await db_migrate.migrate(_database_url(settings))
    # The database is this deployment's from now on: another prefix is refused.
    async with await psycopg.AsyncConnection.connect(
        _database_url(settings), autocommit=True, connect_timeout=10
    ) as conn:
        await deployment.record_prefix(conn, settings.prefix)
    return applied


@workflows_app.command("apply")
def workflows_apply(
    files: Annotated[list[Path], typer.Argument(help="YAML or JSON definitions.")],
    as_json: JsonFlag = False,
) -> None:
    """Validate every file, then register each changed definition as a new version."""
    workflows = _read_definitions(files)
    results = run_async(functools.partial(_apply, workflows), redis=False, start=True)
    if as_json:
        print_json(
            [
                {"file": str(path), "name": wf.name, "version": version, "changed": changed}
                for (path, wf), (version, changed) in zip(workflows, results, strict=True)
            ]
        )
        return
    for (_, wf), (version, changed) in zip(workflows, results, strict=True):
        console.print(f"{wf.name} v{version} {'changed' if changed else 'unchanged'}")


def _read_definitions(files: list[Path]) -> list[tuple[Path, Workflow]]:
    """Read and validate every file; on any error print one line per problem and exit 2."""
    workflows, errors = _check_definitions(files)
    if errors:
        for error in errors:
            _print_error(error)
        raise typer.Exit(2)
    return workflows


def _check_definitions(files: list[Path]) -> tuple[list[tuple[Path, Workflow]], list[str]]:
    """Read and validate every file: the definitions, and the errors; warnings go to stderr."""
    workflows: list[tuple[Path, Workflow]] = []
    errors: list[str] = []
    first_file: dict[str, Path] = {}
    for path in files:
        try:
            wf = decode_workflow(path.read_bytes(), source=str(path))
            # An unknown action or bad parameters would only fail at run time, per event.
            check_actions(wf.steps(), source=str(path))
        except OSError as e:
            errors.append(f"{path}: {e.strerror or e}")
            continue
        except InvalidEntryError as e:
            errors.append(e.reason)
            continue
        # So would a misspelt template field or a webhook URL that is not one.
        findings = check_workflow(wf, source=str(path))
        for warning in findings.warnings:
            _print_error(f"warning: {warning}")
        if findings.errors:
            errors.extend(findings.errors)
            continue
        if (earlier := first_file.setdefault(wf.name, path)) != path:
            errors.append(f"{path}: defines {wf.name!r}, as {earlier} does")
            continue
        workflows.append((path, wf))
    return workflows, errors


@workflows_app.command("validate")
def workflows_validate(
    files: Annotated[list[Path], typer.Argument(help="YAML or JSON definitions.")],
) -> None:
    """Check definitions as `apply` does, and apply nothing; exit 1 when one is invalid."""
    workflows, errors = _check_definitions(files)
    for error in errors:
        _print_error(error)
    for path, wf in workflows:
        console.print(f"{path}: {wf.name} is valid", markup=False)
    if errors:
        raise typer.Exit(1)


async def _apply(
    workflows: list[tuple[Path, Workflow]], settings: Settings
) -> list[tuple[int, bool]]:
    # One transaction: a failure half-way applies none of the files.
    async with (
        await psycopg.AsyncConnection.connect(_database_url(settings), connect_timeout=10) as conn,
        conn.transaction(),
    ):
        return [await apply_workflow(conn, wf) for _, wf in workflows]


@workflows_app.command("list")
def workflows_list(
    all_versions: Annotated[
        bool, typer.Option("--all", help="Every version, not only the latest.")
    ] = False,
    as_json: JsonFlag = False,
) -> None:
    """List the registered workflows: the latest version of each, or every version."""
    rows = run_async(functools.partial(_list, all_versions), redis=False)
    if as_json:
        print_json(rows)
        return
    table = listing_table(
        Column("name", overflow="fold", ratio=2),
        Column("version", justify="right", no_wrap=True),
        Column("on", overflow="fold", ratio=1),
        Column("enabled", no_wrap=True),
        Column("actions", overflow="fold", ratio=2),
        Column("created", no_wrap=True),
    )
    for row in rows:
        table.add_row(
            Text(row.name),
            str(row.version),
            Text(f"{row.entity} {row.trigger}"),
            "yes" if row.enabled else "no",
            Text(", ".join(next(iter(action)) for action in row.definition.actions)),
            f"{row.created_at:%Y-%m-%d %H:%M}",
        )
    console.print(table)


async def _list(all_versions: bool, settings: Settings) -> list[WorkflowVersion]:
    async with await psycopg.AsyncConnection.connect(
        _database_url(settings), connect_timeout=10, autocommit=True
    ) as conn:
        return await list_workflows(conn, all_versions=all_versions)


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
        _database_url(settings), connect_timeout=10, autocommit=True
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


def _database_url(settings: Settings) -> str:
    if settings.database_url is None:
        raise ConfigError("no database URL: set GOVFLOW_DATABASE_URL")
    return settings.database_url


def _secrets() -> set[str]:
    """The passwords of every URL in the environment and the arguments, to scrub them."""
    found: set[str] = set()
    for value in [*os.environ.values(), *sys.argv]:
        for url in _URL.findall(value):
            if password := urlsplit(url).password:
                found.add(password)
    return found


def _print_error(message: str) -> None:
    """Write ``message`` as one line on stderr, with passwords masked."""
    line = " ".join(redact_url(message).split())
    for secret in _secrets():
        line = line.replace(secret, MASK)
    sys.stderr.write(f"govflow: {line}\n")
    sys.stderr.flush()


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
        _print_error(f"{e.format_message()}{hint}")
        status = e.exit_code
    except typer.Abort:
        _print_error("aborted")
        status = 130
    except psycopg.errors.UndefinedTable:
        _print_error("the database has no govflow tables yet: run `govflow migrate` first")
        status = 1
    except BAD_INPUT as e:
        _print_error(str(e))
        status = 2
    except SERVER_ERRORS as e:
        _print_error(_describe(e))
        status = 1
    except GovflowError as e:
        _print_error(str(e))
        status = 1
    except Exception as e:  # noqa: BLE001 - an error is a sentence, never a traceback
        _print_error(f"unexpected {type(e).__name__}: {e} (a bug in govflow; please report it)")
        status = 1
    sys.exit(status if isinstance(status, int) else 0)


def _first_leaf(group: BaseExceptionGroup[BaseException]) -> BaseException:
    error: BaseException = group
    while isinstance(error, BaseExceptionGroup):
        error = error.exceptions[0]
    return error
