"""Shared steps of the operator-tooling tests (lag, dlq, executions)."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Awaitable, Callable
from typing import TypeVar

import anyio

from tests.test_cli import ROOT, clean_env

T = TypeVar("T")


async def wait_until(
    check: Callable[[], Awaitable[T]], what: str, *, timeout_s: float = 60, every_s: float = 0.1
) -> T:
    """Call ``check`` until it returns something truthy; fail after ``timeout_s``, saying ``what``."""
    last: T | None = None
    with anyio.move_on_after(timeout_s):
        while True:
            last = await check()
            if last:
                return last
            await anyio.sleep(every_s)
    raise AssertionError(f"timed out waiting for {what}; last saw {last!r}")


def govflow_env(redis_url: str, database_url: str, prefix: str) -> dict[str, str]:
    """The environment of a ``govflow`` process for this test's servers and prefix."""
    return {
        **clean_env(),
        "GOVFLOW_REDIS_URL": redis_url,
        "GOVFLOW_DATABASE_URL": database_url,
        "GOVFLOW_PREFIX": prefix,
    }


async def govflow(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[bytes]:
    """Run ``govflow ARGS...`` as an operator would, without blocking the event loop."""
    return await anyio.run_process(
        [sys.executable, "-m", "govflow.cli", *args], env=env, cwd=ROOT, check=False
    )
