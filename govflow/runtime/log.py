"""Logging: structlog configured once, for the whole program, by ``configure_logging``.

Logs go to stderr, because stdout belongs to the ``--json`` output of the command line.
On a terminal they are readable lines; anywhere else one JSON object per line. Secrets
never reach either: passwords in URLs and values under secret-looking keys are masked.
"""

from __future__ import annotations

import logging
import re
import sys
from typing import Any

import msgspec
import structlog
from structlog.typing import EventDict, Processor, WrappedLogger

MASK = "***"

# scheme://user:password@host: keep the user, hide the password (an empty one stays empty).
_URL_PASSWORD = re.compile(r"(?P<head>[A-Za-z][A-Za-z0-9+.\-]*://[^:@/\s]*):(?P<pw>[^@/\s]+)@")
_SECRET_KEY = re.compile(r"token|secret|password|passwd|api_key|authorization", re.IGNORECASE)

# repr: an exotic value must never stop a log line from being written.
_ENCODER = msgspec.json.Encoder(enc_hook=repr)


def _dumps(obj: Any, default: Any = None) -> bytes:
    # JSONRenderer passes default=...; msgspec.json.encode would refuse the keyword.
    return _ENCODER.encode(obj)


def _dumps_str(obj: Any, default: Any = None) -> str:
    # logging.Formatter must return str; this renders records of other libraries.
    return _ENCODER.encode(obj).decode()


def redact_url(url: str) -> str:
    """Replace the password of every ``scheme://user:password@host`` in ``url`` by ``***``."""
    return _URL_PASSWORD.sub(rf"\g<head>:{MASK}@", url)


def _redact(value: Any) -> Any:
    if isinstance(value, str):
        return redact_url(value) if "://" in value else value
    if isinstance(value, msgspec.Struct):
        # A Settings logged whole would carry the database password and the API tokens.
        value = msgspec.structs.asdict(value)
    if isinstance(value, dict):
        return {k: (MASK if value_is_secret(k, v) else _redact(v)) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_redact(v) for v in value]
    return value


def value_is_secret(key: object, value: object) -> bool:
    """Whether ``value`` sits under a key named like a token, a secret or a password."""
    return isinstance(key, str) and bool(value) and _SECRET_KEY.search(key) is not None


def redact_secrets(_logger: WrappedLogger, _method: str, event_dict: EventDict) -> EventDict:
    """Mask URL passwords anywhere, and values under secret-looking keys."""
    return {
        key: (MASK if key != "event" and value_is_secret(key, value) else _redact(value))
        for key, value in event_dict.items()
    }


def configure_logging(json: bool | None = None, level: str = "info") -> None:
    """Configure structlog (and the standard library's loggers) to write to stderr.

    Args:
        json: JSON lines when true, readable lines when false; ``None`` picks JSON unless
            stderr is a terminal.
        level: the lowest level written: ``debug``, ``info``, ``warning`` or ``error``.

    Raises:
        ValueError: ``level`` is not a level name.
    """
    levels = logging.getLevelNamesMapping()
    if level.upper() not in levels:
        raise ValueError(f"unknown log level {level!r}")
    numeric = levels[level.upper()]
    if json is None:
        json = not sys.stderr.isatty()

    shared: list[Processor] = [
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.StackInfoRenderer(),
        redact_secrets,
    ]
    if json:
        tail: list[Processor] = [
            # Frames' local variables would carry payloads and secrets into the logs.
            structlog.processors.ExceptionRenderer(
                structlog.tracebacks.ExceptionDictTransformer(show_locals=False)
            ),
            structlog.processors.JSONRenderer(serializer=_dumps),
        ]
        foreign: Processor = structlog.processors.JSONRenderer(serializer=_dumps_str)
        factory: Any = structlog.BytesLoggerFactory(sys.stderr.buffer)
    else:
        console = structlog.dev.ConsoleRenderer(
            colors=sys.stderr.isatty(),
            # Not the locals either: rich shows them by default, settings and payloads too.
            exception_formatter=structlog.dev.RichTracebackFormatter(show_locals=False),
        )
        tail = [console]
        foreign = console
        factory = structlog.WriteLoggerFactory(sys.stderr)

    structlog.configure(
        processors=[structlog.contextvars.merge_contextvars, *shared, *tail],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=factory,
        cache_logger_on_first_use=True,
    )

    # psycopg_pool, pgserver and friends log through the standard library: same format,
    # same stream, warnings and up unless we were asked for more.
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[structlog.stdlib.add_logger_name, *shared],
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, foreign],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(max(numeric, logging.WARNING))
