"""What every command needs: its settings, the servers' URLs, a way to run async code.

A command module stays short by calling ``run_async(fn)``: the settings come from the
environment and the global flags, missing URLs from the embedded servers, and ``fn`` runs
under ``anyio.run``. Output goes through ``print_json`` (``--json``) or ``console``.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Annotated, Any, TypeVar

import anyio
import msgspec
import structlog
import typer
from rich.console import Console

from govflow.runtime import embedded
from govflow.schemas.codec import encode
from govflow.schemas.settings import Settings

T = TypeVar("T")

log = structlog.get_logger(__name__)

JsonFlag = Annotated[bool, typer.Option("--json", help="Print one JSON document on stdout.")]
# Not on a terminal, rich would squeeze tables into 80 columns: 160 there, unless COLUMNS
# says otherwise. Every human listing fits 80.
console = Console(
    highlight=False,
    soft_wrap=True,
    width=None if sys.stdout.isatty() or os.environ.get("COLUMNS") else 160,
)


# The settings given as global flags (``govflow --prefix x ...``); one command per process.
_global_flags: dict[str, object] = {}


def set_global_flags(**flags: object) -> None:
    """Record the global flags; ``None`` leaves the environment's value."""
    _global_flags.update(flags)


def global_flags() -> dict[str, object]:
    """The global flags given on the command line; ``None`` for one left out."""
    return dict(_global_flags)


def load_settings(**overrides: object) -> Settings:
    """Read the settings from the environment, the global flags, then ``overrides``.

    Raises:
        ConfigError: an unknown ``GOVFLOW_`` variable or a value of the wrong type.
    """
    return Settings.from_env(os.environ, **{**_global_flags, **overrides})


@contextlib.contextmanager
def resolved(
    settings: Settings, *, redis: bool = True, database: bool = True
) -> Iterator[Settings]:
    """Yield ``settings`` with the URLs a command needs, from embedded servers where unset.

    Only the servers a command needs start: ``govflow publish`` with a Redis URL and no
    database URL starts no Postgres. The servers started here stop when the block exits.

    Args:
        settings: the configured settings; a URL set there is used as it is.
        redis: the command talks to Redis.
        database: the command talks to Postgres.
    """
    start_redis = redis and settings.redis_url is None
    start_postgres = database and settings.database_url is None
    if not (start_redis or start_postgres):
        yield settings
        return
    data_dir = Path(settings.data_dir).resolve()
    urls: dict[str, str] = {}
    with contextlib.ExitStack() as stack:
        if start_redis:
            urls["redis_url"] = stack.enter_context(embedded.embedded_redis(data_dir))
        if start_postgres:
            urls["database_url"] = stack.enter_context(embedded.embedded_postgres(data_dir))
        log.info("embedded.using", data_dir=str(data_dir), servers=sorted(urls))
        yield msgspec.structs.replace(settings, **urls)


def run_async(
    fn: Callable[[Settings], Awaitable[T]],
    *,
    redis: bool = True,
    database: bool = True,
    **overrides: object,
) -> T:
    """Run ``fn(settings)`` under ``anyio.run``, with the servers the command needs.

    Args:
        fn: the command's body.
        redis: the command talks to Redis (an embedded one starts when no URL is set).
        database: the command talks to Postgres (likewise).
        overrides: settings the command's own flags set.
    """
    with resolved(load_settings(**overrides), redis=redis, database=database) as settings:
        return anyio.run(fn, settings)


def print_json(value: Any) -> None:
    """Write one JSON document, and nothing else, on stdout."""
    sys.stdout.buffer.write(encode(value) + b"\n")
    sys.stdout.flush()
