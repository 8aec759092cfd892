"""Logging: JSON lines off a terminal, on stderr, with secrets masked."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator

import pytest
import structlog

from govflow.runtime.log import configure_logging, redact_url
from govflow.schemas.settings import Settings


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    structlog.reset_defaults()
    root.handlers[:], root.level = handlers, level


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("redis://:s3cret@cache:6379/0", "redis://:***@cache:6379/0"),
        ("rediss://app:s3cret@cache:6380", "rediss://app:***@cache:6380"),
        ("postgresql://gov:p%40ss@db/app", "postgresql://gov:***@db/app"),
        (
            "postgresql://postgres:@/postgres?host=/tmp",
            "postgresql://postgres:@/postgres?host=/tmp",
        ),
        ("unix:///run/redis.sock", "unix:///run/redis.sock"),
        ("see redis://u:pw@h and postgres://v:pw2@i", "see redis://u:***@h and postgres://v:***@i"),
    ],
)
def test_url_passwords_are_masked(url, expected):
    assert redact_url(url) == expected


def test_json_lines_on_stderr_with_secrets_masked(capfd):
    configure_logging(json=True)
    log = structlog.get_logger("test")
    settings = Settings(database_url="postgresql://gov:hunter2@db/app", api_tokens="abc123:read")
    log.info(
        "probe.done",
        url="redis://app:hunter2@cache/0",
        api_token="abc123",
        webhook_secret="",
        nested={"password": "hunter2", "count": 3},
        settings=settings,
    )
    log.debug("probe.hidden")
    out, err = capfd.readouterr()
    assert out == ""
    assert "hunter2" not in err
    assert "abc123" not in err
    [line] = err.splitlines()
    record = json.loads(line)
    assert record["event"] == "probe.done"
    assert record["level"] == "info"
    assert record["url"] == "redis://app:***@cache/0"
    assert record["api_token"] == "***"
    assert record["webhook_secret"] == ""  # nothing to hide
    assert record["nested"] == {"password": "***", "count": 3}
    assert record["settings"]["database_url"] == "postgresql://gov:***@db/app"
    assert record["settings"]["api_tokens"] == "***"
    assert record["timestamp"].endswith("Z")


def test_context_and_standard_library_records_share_the_format(capfd):
    configure_logging(json=True, level="debug")
    with structlog.contextvars.bound_contextvars(entry_id="1-0"):
        structlog.get_logger("test").debug("entry.handled")
    logging.getLogger("psycopg.pool").warning("pool at %s", "postgres://u:pw@h/d")
    lines = [json.loads(line) for line in capfd.readouterr().err.splitlines()]
    assert lines[0]["entry_id"] == "1-0"
    assert lines[1]["event"] == "pool at postgres://u:***@h/d"
    assert lines[1]["logger"] == "psycopg.pool"
    assert lines[1]["level"] == "warning"


def test_readable_lines_when_asked(capfd):
    configure_logging(json=False)
    structlog.get_logger("test").warning("probe.readable", password="hunter2")
    err = capfd.readouterr().err
    assert "probe.readable" in err
    assert "hunter2" not in err
    with pytest.raises(json.JSONDecodeError):
        json.loads(err)


def test_an_unknown_level_is_refused():
    with pytest.raises(ValueError, match="verbose"):
        configure_logging(level="verbose")
