"""``govflow config``: the settings a command would run with, and where each came from.

Secrets are masked as the logs mask them: the password of every URL, and the value of
every setting named like a token, a secret or a password.
"""

from __future__ import annotations

import os
from typing import Any

import msgspec
from rich.table import Column
from rich.text import Text

from govflow.cli.context import JsonFlag, console, global_flags, load_settings, print_json
from govflow.cli.tables import listing_table
from govflow.runtime.log import MASK, redact_url, value_is_secret

# Shown for a URL left unset: a command then looks for the embedded servers.
UNSET_URL = "(unset: the embedded server)"


class Setting(msgspec.Struct, frozen=True, kw_only=True):
    """One setting: its environment name, its value (masked) and where it came from."""

    name: str
    env: str
    value: Any
    source: str  # default, environment, REDIS_URL / DATABASE_URL, or the flag (--prefix)


def effective_settings() -> list[Setting]:
    """Every setting as a command would read it, secrets masked.

    Raises:
        ConfigError: an unknown ``GOVFLOW_`` variable or a value of the wrong type.
    """
    settings = load_settings()
    flags = global_flags()
    found: list[Setting] = []
    for field in msgspec.structs.fields(settings):
        value = getattr(settings, field.name)
        env = f"GOVFLOW_{field.name.upper()}"
        if flags.get(field.name) is not None:
            source = f"--{field.name.replace('_', '-')}"
        elif os.environ.get(env):
            source = "environment"
        elif os.environ.get(field.name.upper()) and field.name.endswith("_url"):
            source = field.name.upper()  # REDIS_URL, DATABASE_URL
        else:
            source = "default"
        found.append(
            Setting(name=field.name, env=env, value=_masked(field.name, value), source=source)
        )
    return found


def _masked(name: str, value: Any) -> Any:
    if value_is_secret(name, value):
        return MASK
    if isinstance(value, str) and "://" in value:
        return redact_url(value)
    return value


def config(as_json: JsonFlag = False) -> None:
    """Print the effective settings (environment, then global flags), secrets masked."""
    found = effective_settings()
    if as_json:
        print_json({s.name: s.value for s in found})
        return
    table = listing_table(
        Column("setting", no_wrap=True),
        Column("value", overflow="fold", ratio=1),
        Column("from", no_wrap=True),
    )
    for s in found:
        shown = UNSET_URL if s.value is None and s.name.endswith("_url") else s.value
        table.add_row(s.env, Text(str(shown) if shown != "" else "(empty)"), s.source)
    console.print(table)
