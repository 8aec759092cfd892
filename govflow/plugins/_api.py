"""What an action is: the ``@action`` decorator, the context a step runs in, its effects.

``govflow.plugins`` re-exports this; the built-in actions use it as a plug-in does.
"""

from __future__ import annotations

import dis
import inspect
import re
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Any, Generic, TypeVar, get_type_hints

import aiohttp
import httpx
import msgspec
from psycopg import AsyncConnection

from govflow.consumers.matching import MISSING, lookup
from govflow.db.batch import Batched
from govflow.plugins.hosts import HostSlots
from govflow.schemas.commands import RunWorkflow
from govflow.schemas.errors import InvalidEntryError, PermanentError
from govflow.schemas.events import Event
from govflow.schemas.settings import Settings

P = TypeVar("P", bound=msgspec.Struct)


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

    def extend(self, other: Effects) -> None:
        """Queue every row queued in ``other`` too, after this batch's."""
        for statement, rows in other.rows.items():
            self.rows.setdefault(statement, []).extend(rows)

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
    """What an action sees of the step it runs.

    Attributes:
        transaction: the batch's open transaction; None for an I/O action, which runs
            before it (``@action(..., io=True)``).
        http: the worker's httpx client, for a plug-in's requests.
        webhooks: the session webhooks go out through (``plugins.webhook.deliver``).
        hosts: one slot per request in flight to a host, shared by the worker.
        signing_keys: the webhook signing keys, the newest first.
    """

    command: RunWorkflow
    step: int
    now: datetime
    transaction: AsyncConnection[Any] | None
    effects: Effects
    http: httpx.AsyncClient
    webhooks: aiohttp.ClientSession
    settings: Settings
    hosts: HostSlots
    signing_keys: tuple[str, ...] = ()

    @property
    def conn(self) -> AsyncConnection[Any]:
        """The batch's open transaction, for an action with SQL of its own.

        Raises:
            PermanentError: the action is an I/O action, which runs outside the transaction.
        """
        if self.transaction is None:
            raise PermanentError(
                f"step {self.step}: an I/O action (io=True) runs outside the transaction and has"
                " no ctx.conn; queue its rows with ctx.effects"
            )
        return self.transaction

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
    """An action: its parameters' Struct and the coroutine that carries it out.

    ``io`` marks an action that talks to the outside world (a webhook, an SMTP server):
    it runs before the batch's transaction, concurrently with the batch's other I/O steps,
    and its queued rows are written in the transaction afterwards. Any other action runs
    inside the transaction, with ``ctx.conn``.

    ``suspends``: whether ``run``'s code awaits anything (``@action`` reads it from the
    code). One that does not runs to its end once started: no time limit could stop it.
    """

    name: str
    params: type[P]
    run: Callable[[StepContext, P], Awaitable[None]]
    io: bool = False
    suspends: bool = True

    async def __call__(self, ctx: StepContext, params: P) -> None:
        """Run the action, as the decorated function would (for a plug-in's own tests)."""
        await self.run(ctx, params)

    def parse(self, raw: dict[str, Any]) -> P:
        """Validate a step's parameters.

        Raises:
            InvalidEntryError: the parameters do not fit the action.
        """
        try:
            return msgspec.convert(raw, self.params)
        except msgspec.ValidationError as e:
            raise InvalidEntryError(f"action {self.name}: {e}") from e


def action(
    name: str, *, io: bool = False
) -> Callable[[Callable[[StepContext, P], Awaitable[None]]], ActionType[P]]:
    """Declare the action ``name``; its parameters are the Struct the second argument names.

    ``io=True``: the action calls the outside world, so it runs outside the transaction.
    ::

        @action("send_sms", io=True)
        async def send_sms(ctx: StepContext, params: SmsParams) -> None: ...

    Raises:
        TypeError: the function is not ``async def f(ctx: StepContext, params: SomeStruct)``.
    """

    def declare(run: Callable[[StepContext, P], Awaitable[None]]) -> ActionType[P]:
        return ActionType(name, _params_of(name, run), run, io, _suspends(run))

    return declare


def _suspends(run: Callable[..., Any]) -> bool:
    """Whether ``run``'s own code awaits anything: ``await``, ``async for`` and ``async
    with`` each compile to a ``YIELD_VALUE``. Without a code object, assume it does."""
    code = getattr(run, "__code__", None)
    return code is None or any(i.opname == "YIELD_VALUE" for i in dis.get_instructions(code))


def _params_of(name: str, run: Callable[..., Any]) -> type[Any]:
    """The Struct annotated on the second parameter of ``run``."""
    usage = f"action {name}: write `async def f(ctx: StepContext, params: SomeStruct) -> None`"
    if not inspect.iscoroutinefunction(run):
        raise TypeError(f"{usage}; {run.__qualname__} is not async")
    parameters = list(inspect.signature(run).parameters)
    if len(parameters) != 2:
        raise TypeError(f"{usage}; {run.__qualname__} takes {len(parameters)} arguments")
    try:
        hints = get_type_hints(run)
    except NameError as e:  # an annotation imported only under TYPE_CHECKING
        raise TypeError(f"{usage}; {run.__qualname__}: {e}") from e
    params = hints.get(parameters[1])
    if not (isinstance(params, type) and issubclass(params, msgspec.Struct)):
        raise TypeError(f"{usage}; {parameters[1]} is annotated {params!r}, not a Struct")
    return params


_FIELD = re.compile(r"\{([A-Za-z_][\w.]*)\}")


def render(template: str, event: Event) -> str:
    """Replace each ``{dotted.path}`` with that value of the event; a missing one with ''.

    A value reads as in the event's JSON (a time in ISO 8601); only the field a path
    starts at is converted, not the whole event, once per field each render.
    """
    if "{" not in template:
        return template
    fields: dict[str, Any] = {}

    def value_of(match: re.Match[str]) -> str:
        name, _, rest = match.group(1).partition(".")
        if name not in fields:
            fields[name] = _field(event, name)
        value = fields[name] if not rest else lookup(fields[name], rest)
        return "" if value is MISSING or value is None else str(value)

    return _FIELD.sub(value_of, template)


def _field(event: Event, name: str) -> Any:
    """A field of the event as its JSON holds it; MISSING if it has none by that name."""
    if name not in Event.__struct_fields__:
        return MISSING
    value = getattr(event, name)
    return MISSING if value is msgspec.UNSET else msgspec.to_builtins(value)
