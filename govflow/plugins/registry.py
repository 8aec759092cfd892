"""The action types a workflow may name, and how a package adds its own.

A third-party package adds an action type with an entry point in the group
``govflow.actions`` that names an ``ActionType`` object::

    [project.entry-points."govflow.actions"]
    open_ticket = "acme_grc.actions:OPEN_TICKET"
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from datetime import datetime
from functools import cache
from importlib.metadata import entry_points
from typing import Any, Generic, TypeVar

import httpx
import msgspec
from psycopg import AsyncConnection

from govflow.consumers.matching import MISSING, lookup
from govflow.db.batch import Batched
from govflow.schemas.commands import RunWorkflow
from govflow.schemas.errors import InvalidEntryError
from govflow.schemas.events import Event
from govflow.schemas.settings import Settings

P = TypeVar("P", bound=msgspec.Struct)

ENTRY_POINT_GROUP = "govflow.actions"


class Effects:
    """Effect rows gathered over a batch, written in the batch's transaction.

    A ``Batched`` statement runs once over all its rows; a plain SQL string runs
    with ``executemany``. Every statement must be idempotent on (execution_id, step): a
    redelivered command that replays a step writes nothing new.
    """

    def __init__(self) -> None:
        self.rows: dict[Batched | str, list[tuple[Any, ...]]] = {}

    def add(self, statement: Batched | str, row: tuple[Any, ...]) -> None:
        """Queue one row for ``statement``."""
        self.rows.setdefault(statement, []).append(row)

    async def flush(self, conn: AsyncConnection[Any]) -> None:
        """Write every queued row, statement by statement in the order first queued."""
        async with conn.cursor() as cur:
            for statement, rows in self.rows.items():
                if isinstance(statement, Batched):
                    await cur.execute(statement.statement().encode(), (statement.parameter(rows),))
                else:
                    await cur.executemany(statement.encode(), rows)
        self.rows.clear()


class StepContext(msgspec.Struct, frozen=True, kw_only=True):
    """What an action sees of the step it runs."""

    command: RunWorkflow
    step: int
    now: datetime
    conn: AsyncConnection[Any]  # the batch's open transaction, for actions with their own SQL
    effects: Effects
    http: httpx.AsyncClient
    settings: Settings

    @property
    def event(self) -> Event:
        """The event that started the execution."""
        return self.command.event

    @property
    def idempotency_key(self) -> str:
        """The same for every try of this step: ``<execution id>:<step>``."""
        return f"{self.command.execution_id}:{self.step}"

    def render(self, template: str) -> str:
        """Fill ``{data.title}``-style fields from the event."""
        return render(template, self.event)


class ActionType(msgspec.Struct, Generic[P], frozen=True):
    """An action: its parameters' Struct and the coroutine that carries it out."""

    name: str
    params: type[P]
    run: Callable[[StepContext, P], Awaitable[None]]

    def parse(self, raw: dict[str, Any]) -> P:
        """Validate a step's parameters.

        Raises:
            InvalidEntryError: the parameters do not fit the action.
        """
        try:
            return msgspec.convert(raw, self.params)
        except msgspec.ValidationError as e:
            raise InvalidEntryError(f"action {self.name}: {e}") from e


_FIELD = re.compile(r"\{([A-Za-z_][\w.]*)\}")


def render(template: str, event: Event) -> str:
    """Replace each ``{dotted.path}`` with that value of the event; a missing one with ''."""
    source = msgspec.to_builtins(event)

    def value_of(match: re.Match[str]) -> str:
        value = lookup(source, match.group(1))
        return "" if value is MISSING or value is None else str(value)

    return _FIELD.sub(value_of, template)


@cache
def registry() -> dict[str, ActionType[Any]]:
    """The built-in action types plus every one installed through entry points."""
    from govflow.plugins.builtin import BUILTIN

    types = {a.name: a for a in BUILTIN}
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        action = ep.load()
        if not isinstance(action, ActionType):
            raise InvalidEntryError(f"entry point {ep.name} is not a govflow ActionType")
        types[ep.name] = action
    return types


def check_actions(steps: list[tuple[str, dict[str, Any]]], source: str = "definition") -> None:
    """Check that every step names a known action with valid parameters.

    Raises:
        InvalidEntryError: an unknown action or bad parameters.
    """
    known = registry()
    for number, (name, params) in enumerate(steps, start=1):
        if name not in known:
            raise InvalidEntryError(
                f"{source}: action {number} is {name!r}, not one of {', '.join(sorted(known))}"
            )
        try:
            known[name].parse(params)
        except InvalidEntryError as e:
            raise InvalidEntryError(f"{source}: action {number}: {e.reason}") from e
