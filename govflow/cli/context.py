"""What every command needs: its settings, the servers' URLs, a way to run async code.

A command module stays short by calling ``run_async(fn)``: the settings come from the
environment and the global flags, missing URLs from the running embedded servers (or, for
``run``, ``serve``, ``migrate`` and ``workflows apply``, from ones they start), and ``fn``
runs under ``anyio.run``. Output goes through ``print_json`` (``--json``) or ``console``.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Annotated, Any, TypeVar
from urllib.parse import urlsplit

import anyio
import msgspec
import structlog
import typer
from rich.console import Console

from govflow.core import deployment, tracing
from govflow.runtime import embedded, local_servers
from govflow.runtime.log import MASK, redact_url
from govflow.schemas.codec import encode
from govflow.schemas.errors import ConfigError
from govflow.schemas.settings import Settings

T = TypeVar("T")

log = structlog.get_logger(__name__)

_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*://[^\s'\"]+")

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

    With no ``GOVFLOW_DATA_DIR`` nor ``--data-dir``, the data directory is the ``.govflow``
    folder found in the current folder or a parent, else ``.govflow`` here
    (``runtime.local_servers``); either way an absolute path.

    Raises:
        ConfigError: an unknown ``GOVFLOW_`` variable or a value of the wrong type, or
            ``GOVFLOW_TRACING=on`` without the ``otel`` extra.
    """
    flags = {**_global_flags, **overrides}
    configured = flags.get("data_dir") or os.environ.get("GOVFLOW_DATA_DIR")
    data_dir = (
        Path(str(configured)).expanduser().resolve()
        if configured
        else local_servers.default_data_dir(Path.cwd())
    )
    settings = Settings.from_env(os.environ, **{**flags, "data_dir": str(data_dir)})
    # Every command's settings pass here: spans are exported as OTEL_* says, or not made.
    tracing.configure(settings.tracing, os.environ)
    return settings


@contextlib.contextmanager
def resolved(
    settings: Settings, *, redis: bool = True, database: bool = True, start: bool = False
) -> Iterator[Settings]:
    """Yield ``settings`` with the URLs a command needs, from embedded servers where unset.

    A command that may start the servers (``start``: ``run``, ``serve``, and the set-up
    commands ``migrate`` and ``workflows apply``) starts or reuses the ones under the data
    directory, records them there for the others while the block runs, and stops those it
    started when the block exits. Any other command uses the servers a running process
    recorded (``runtime.local_servers``), and never starts one. Only the servers a command
    needs are looked for: ``govflow publish`` needs no Postgres.

    Args:
        settings: the configured settings; a URL set there is used as it is.
        redis: the command talks to Redis.
        database: the command talks to Postgres.
        start: the command may start the embedded servers.

    Raises:
        NoServersError: a command that may not start them found none running.
        EmbeddedMissingError: no URL is set and the ``govflow[embedded]`` extra is missing.
    """
    want_redis = redis and settings.redis_url is None
    want_postgres = database and settings.database_url is None
    if not (want_redis or want_postgres):
        yield settings
        return
    data_dir = Path(settings.data_dir)
    if not start:
        urls = local_servers.running_urls(data_dir, redis=want_redis, database=want_postgres)
        log.info("embedded.found", data_dir=str(data_dir), servers=sorted(urls))
        yield msgspec.structs.replace(settings, **urls)
        return
    embedded.require_installed()
    urls = {}
    with contextlib.ExitStack() as stack:
        if want_redis:
            urls["redis_url"] = stack.enter_context(embedded.embedded_redis(data_dir))
        if want_postgres:
            urls["database_url"] = stack.enter_context(embedded.embedded_postgres(data_dir))
        log.info("embedded.using", data_dir=str(data_dir), servers=sorted(urls))
        stack.enter_context(
            local_servers.announced(
                data_dir, redis_url=urls.get("redis_url"), database_url=urls.get("database_url")
            )
        )
        yield msgspec.structs.replace(settings, **urls)


def run_async(
    fn: Callable[[Settings], Awaitable[T]],
    *,
    redis: bool = True,
    database: bool = True,
    start: bool = False,
    check: bool = True,
    **overrides: object,
) -> T:
    """Run ``fn(settings)`` under ``anyio.run``, with the servers the command needs.

    Args:
        fn: the command's body.
        redis: the command talks to Redis (with no URL set: the running embedded one).
        database: the command talks to Postgres (likewise).
        start: with no URL set, start the embedded servers rather than find running ones.
        check: refuse a database another deployment recorded before ``fn`` runs
            (``core.deployment``); the worker and the API check on their own.
        overrides: settings the command's own flags set.
    """
    configured = load_settings(**overrides)
    with resolved(configured, redis=redis, database=database, start=start) as settings:

        async def body(settings: Settings) -> T:
            if check and database and settings.database_url is not None:
                await deployment.check_prefix_at(settings.database_url, settings.prefix)
            return await fn(settings)

        return anyio.run(body, settings)


def print_json(value: Any) -> None:
    """Write one JSON document, and nothing else, on stdout."""
    sys.stdout.buffer.write(encode(value) + b"\n")
    sys.stdout.flush()


def database_url(settings: Settings) -> str:
    """The database URL of ``settings``.

    Raises:
        ConfigError: there is none.
    """
    if settings.database_url is None:
        raise ConfigError("no database URL: set GOVFLOW_DATABASE_URL")
    return settings.database_url


def help_without_command(ctx: typer.Context) -> None:
    """Print the help of a group called without a command, and exit 2."""
    if ctx.invoked_subcommand is None:
        typer.echo(ctx.get_help(), err=True)
        raise typer.Exit(2)


def print_error(message: str) -> None:
    """Write ``message`` as one line on stderr, with passwords masked."""
    line = " ".join(redact_url(message).split())
    for secret in _secrets():
        line = line.replace(secret, MASK)
    sys.stderr.write(f"govflow: {line}\n")
    sys.stderr.flush()


def _secrets() -> set[str]:
    """The passwords of every URL in the environment and the arguments, to scrub them."""
    found: set[str] = set()
    for value in [*os.environ.values(), *sys.argv]:
        for url in _URL.findall(value):
            if password := urlsplit(url).password:
                found.add(password)
    return found
