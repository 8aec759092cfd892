"""``govflow workflows``: validate, apply, list, diff, and switch definitions on and off.

``diff`` says what ``apply`` would do with each file against the latest stored version of
its name: a new workflow, an unchanged one, or the lines a new version would change.
``disable`` and ``enable`` switch a workflow's latest version off and on; the workers see
it at their next batch (``db.workflows.set_enabled``).
"""

from __future__ import annotations

import difflib
import functools
from pathlib import Path
from typing import Annotated, Literal

import msgspec
import psycopg
import typer
import yaml
from rich.table import Column
from rich.text import Text

from govflow.cli.context import (
    JsonFlag,
    console,
    database_url,
    help_without_command,
    print_error,
    print_json,
    run_async,
)
from govflow.cli.tables import listing_table
from govflow.db.workflows import (
    WorkflowVersion,
    apply_workflow,
    latest_version,
    list_workflows,
    set_enabled,
)
from govflow.plugins.registry import check_actions
from govflow.schemas.codec import decode_workflow
from govflow.schemas.errors import GovflowError, InvalidEntryError
from govflow.schemas.settings import Settings
from govflow.schemas.templates import check_workflow
from govflow.schemas.workflows import Workflow

app = typer.Typer(
    help="Register, list, compare and switch workflow definitions.",
    callback=help_without_command,
)

Files = Annotated[list[Path], typer.Argument(help="YAML or JSON definitions.")]
Name = Annotated[str, typer.Argument(metavar="NAME", help="The workflow's name.")]


@app.command("apply")
def apply_command(files: Files, as_json: JsonFlag = False) -> None:
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


async def _apply(
    workflows: list[tuple[Path, Workflow]], settings: Settings
) -> list[tuple[int, bool]]:
    # One transaction: a failure half-way applies none of the files.
    async with (
        await psycopg.AsyncConnection.connect(database_url(settings), connect_timeout=10) as conn,
        conn.transaction(),
    ):
        return [await apply_workflow(conn, wf) for _, wf in workflows]


@app.command("validate")
def validate_command(files: Files) -> None:
    """Check definitions as `apply` does, and apply nothing; exit 1 when one is invalid."""
    workflows, errors = _check_definitions(files)
    for error in errors:
        print_error(error)
    for path, wf in workflows:
        console.print(f"{path}: {wf.name} is valid", markup=False)
    if errors:
        raise typer.Exit(1)


@app.command("list")
def list_command(
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
    async with await _connect(settings) as conn:
        return await list_workflows(conn, all_versions=all_versions)


# diff -----------------------------------------------------------------------------------


class Difference(msgspec.Struct, frozen=True, kw_only=True):
    """What ``apply`` would do with one file's definition.

    ``state``: ``new`` (no workflow has the name: apply makes v1), ``unchanged`` (apply
    keeps ``version``), or ``changed`` (apply makes ``version + 1``; ``diff`` says how).
    ``enabled`` is whether the latest stored version is switched on now.
    """

    file: str
    name: str
    state: Literal["new", "unchanged", "changed"]
    version: int | None  # the latest stored version; None when new
    enabled: bool | None
    diff: str = ""  # unified, of the definitions as YAML


@app.command("diff")
def diff_command(
    files: Files,
    exit_code: Annotated[
        bool, typer.Option("--exit-code", help="Exit 1 when apply would change anything.")
    ] = False,
    as_json: JsonFlag = False,
) -> None:
    """Show what `apply` would change against the latest stored version of each name."""
    workflows = _read_definitions(files)
    found = run_async(functools.partial(_diff, workflows), redis=False)
    if as_json:
        print_json(found)
    else:
        for d in found:
            _print_difference(d)
    if exit_code and any(d.state != "unchanged" for d in found):
        raise typer.Exit(1)


async def _diff(workflows: list[tuple[Path, Workflow]], settings: Settings) -> list[Difference]:
    async with await _connect(settings) as conn:
        return [
            _difference(path, wf, await latest_version(conn, wf.name)) for path, wf in workflows
        ]


def _difference(path: Path, wf: Workflow, stored: WorkflowVersion | None) -> Difference:
    if stored is None:
        return Difference(file=str(path), name=wf.name, state="new", version=None, enabled=None)
    same = stored.definition == wf
    lines = difflib.unified_diff(
        _as_yaml(stored.definition),
        _as_yaml(wf),
        fromfile=f"{wf.name} v{stored.version} (stored)",
        tofile=str(path),
    )
    return Difference(
        file=str(path),
        name=wf.name,
        state="unchanged" if same else "changed",
        version=stored.version,
        enabled=stored.enabled,
        diff="" if same else "".join(lines),
    )


def _as_yaml(wf: Workflow) -> list[str]:
    text: str = yaml.safe_dump(msgspec.to_builtins(wf), sort_keys=False, allow_unicode=True)
    return text.splitlines(keepends=True)


def _print_difference(d: Difference) -> None:
    switched_off = " (disabled now: `govflow workflows enable` switches it on)"
    off = switched_off if d.enabled is False else ""
    if d.state == "new":
        console.print(f"{d.name}: new; apply makes v1 ({d.file})", markup=False)
    elif d.state == "unchanged":
        console.print(f"{d.name}: unchanged, v{d.version}{off}", markup=False)
    else:
        assert d.version is not None
        console.print(f"{d.name}: apply makes v{d.version + 1}{off}", markup=False)
        console.print(d.diff.rstrip("\n"), markup=False, highlight=False, soft_wrap=True)


# enable, disable ------------------------------------------------------------------------


@app.command("disable")
def disable_command(name: Name, as_json: JsonFlag = False) -> None:
    """Stop a workflow matching events at once; executions already started run on."""
    _switch(name, enabled=False, as_json=as_json)


@app.command("enable")
def enable_command(name: Name, as_json: JsonFlag = False) -> None:
    """Let a disabled workflow match events again, from the next event on."""
    _switch(name, enabled=True, as_json=as_json)


def _switch(name: str, *, enabled: bool, as_json: bool) -> None:
    async def body(settings: Settings) -> tuple[int, bool] | None:
        async with await _connect(settings) as conn:
            return await set_enabled(conn, name, enabled)

    result = run_async(body, redis=False)
    if result is None:
        raise GovflowError(f"no workflow named {name!r} (see `govflow workflows list`)")
    version, changed = result
    if as_json:
        print_json({"name": name, "version": version, "enabled": enabled, "changed": changed})
        return
    state = "enabled" if enabled else "disabled"
    console.print(f"{name} v{version} {state}" + ("" if changed else " already"), markup=False)


# reading definitions --------------------------------------------------------------------


def _read_definitions(files: list[Path]) -> list[tuple[Path, Workflow]]:
    """Read and validate every file; on any error print one line per problem and exit 2."""
    workflows, errors = _check_definitions(files)
    if errors:
        for error in errors:
            print_error(error)
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
            print_error(f"warning: {warning}")
        if findings.errors:
            errors.extend(findings.errors)
            continue
        if (earlier := first_file.setdefault(wf.name, path)) != path:
            errors.append(f"{path}: defines {wf.name!r}, as {earlier} does")
            continue
        workflows.append((path, wf))
    return workflows, errors


async def _connect(settings: Settings) -> psycopg.AsyncConnection[tuple[object, ...]]:
    return await psycopg.AsyncConnection.connect(
        database_url(settings), connect_timeout=10, autocommit=True
    )
