"""``run_every``: the one loop of the janitor, the retry mover, the lag gauges and the relay."""

from __future__ import annotations

import itertools

import anyio
import pytest

from govflow.core.service import run_every, wait_stopped

pytestmark = pytest.mark.anyio


async def test_ticks_until_stopped_and_the_stop_cuts_the_wait_short() -> None:
    stopped = anyio.Event()
    ticks: list[float] = []

    async def tick() -> None:
        ticks.append(anyio.current_time())
        if len(ticks) == 3:
            stopped.set()

    started = anyio.current_time()
    with anyio.fail_after(5):
        await run_every(0.05, tick, stopped)
    assert len(ticks) == 3  # no tick after the stop
    assert all(b - a >= 0.04 for a, b in itertools.pairwise(ticks))  # the loop's clock is coarse
    assert anyio.current_time() - started < 1  # the last wait ended at the stop


async def test_a_tick_may_ask_for_its_own_delay() -> None:
    stopped = anyio.Event()
    ticks: list[float] = []

    async def tick() -> float | None:
        ticks.append(anyio.current_time())
        if len(ticks) == 2:
            stopped.set()
        return 0.01  # a backoff, say: shorter than the interval

    with anyio.fail_after(5):
        await run_every(3600, tick, stopped)
    assert len(ticks) == 2


async def test_a_stop_from_outside_ends_a_long_wait() -> None:
    stopped = anyio.Event()
    ticks = 0

    async def tick() -> None:
        nonlocal ticks
        ticks += 1

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(run_every, 3600, tick, stopped)
            await anyio.sleep(0.05)
            stopped.set()
    assert ticks == 1


async def test_stopped_before_it_runs_it_never_ticks() -> None:
    stopped = anyio.Event()
    stopped.set()

    async def tick() -> None:
        raise AssertionError("ticked after stop")

    await run_every(3600, tick, stopped)
    assert await wait_stopped(stopped, 3600)
    assert not await wait_stopped(anyio.Event(), 0.01)
