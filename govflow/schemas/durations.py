"""Durations as a definition writes them: ``30s``, ``5m``, ``2h``, ``1d``, or a number of seconds."""

from __future__ import annotations

import re
from typing import Any

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86_400.0}
DURATION_PATTERN = r"^\d+(\.\d+)?(ms|s|m|h|d)?$"
DURATION_JSON_SCHEMA: dict[str, Any] = {
    "anyOf": [
        {"type": "number", "exclusiveMinimum": 0},
        {"type": "string", "pattern": DURATION_PATTERN},
    ]
}


def parse_duration(value: object) -> float:
    """Seconds in ``value``: a positive number, or a string such as ``30s`` or ``1.5m``.

    Raises:
        ValueError: not a positive duration.
    """
    if isinstance(value, int | float) and not isinstance(value, bool):
        seconds = float(value)
    elif isinstance(value, str) and (match := _DURATION.match(value)):
        seconds = float(match[1]) * _SECONDS[match[2] or "s"]
    else:
        raise ValueError(f"{value!r} is not a duration (write e.g. 30s, 5m, 2h)")
    if seconds <= 0:
        raise ValueError(f"{value!r} is not a positive duration")
    return seconds


OFF = ("off", "never", "0")


def parse_retention(value: str) -> float | None:
    """Seconds in a retention such as ``30d``; ``None`` for ``off`` (keep for good).

    Raises:
        ValueError: neither a positive duration nor ``off``.
    """
    if value.strip().lower() in OFF:
        return None
    return parse_duration(value)
