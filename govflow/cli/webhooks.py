"""``govflow webhooks secret``: the key that signs webhooks, and rotating it.

With ``GOVFLOW_WEBHOOK_SECRET`` set, that key signs and this command only says so; else
the keys live in Postgres (``govflow migrate`` makes the first).
"""

from __future__ import annotations

from typing import Annotated

import psycopg
import typer

from govflow.cli.context import run_async
from govflow.db import webhook_keys
from govflow.schemas.errors import ConfigError
from govflow.schemas.settings import Settings

app = typer.Typer(help="The key that signs webhooks.")


@app.command("secret")
def secret(
    rotate: Annotated[
        bool,
        typer.Option(
            "--rotate",
            help="Make a new key; the old one keeps signing for GOVFLOW_WEBHOOK_KEY_GRACE.",
        ),
    ] = False,
) -> None:
    """Print the current signing key (the receivers' secret); --rotate makes a new one first."""
    key = run_async(lambda s: _secret(s, rotate=rotate), redis=False)
    typer.echo(key)
    if rotate:
        typer.echo(
            "govflow: a new key signs now; the previous one signs too until"
            " GOVFLOW_WEBHOOK_KEY_GRACE has passed",
            err=True,
        )


async def _secret(settings: Settings, *, rotate: bool) -> str:
    if settings.webhook_secret:
        if rotate:
            raise ConfigError(
                "GOVFLOW_WEBHOOK_SECRET is set, so it signs: to rotate, set it to the new key"
                " followed by the old one (space-separated), then drop the old one later"
            )
        return settings.webhook_secret.split()[0]
    assert settings.database_url is not None  # resolved by run_async
    async with await psycopg.AsyncConnection.connect(
        settings.database_url, connect_timeout=10
    ) as conn:
        if rotate:
            async with conn.transaction():
                return await webhook_keys.rotate(conn)
        keys = await webhook_keys.signing(conn, settings.webhook_key_grace)
    if not keys:
        raise ConfigError("no webhook signing key: run `govflow migrate`")
    return keys[0]
