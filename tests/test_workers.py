"""Worker health: heartbeats in Redis, `govflow check` as a liveness probe, and `lag` by liveness.

Workers run for real (in this process, or as `govflow run` subprocesses that a test can
freeze with SIGSTOP and kill with SIGKILL); the heartbeat interval is cut to 0.5 s so a
worker goes stale within 2 s. `govflow check` runs as a pod's probe would: a
subprocess on the same host, reading Redis.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import pytest
from psycopg_pool import AsyncConnectionPool
from redis.asyncio import Redis

from govflow.operations.lag import read_lag
from govflow.operations.workers import WorkerStatus, read_workers
from govflow.producers.publish import Publisher
from govflow.schemas.events import new_event
from govflow.schemas.keys import Keys
from govflow.schemas.settings import Settings
from tests.ops_helpers import govflow, govflow_env
from tests.pipeline_helpers import (
    apply,
    running_worker,
    start_cli_worker,
    stop_process,
    wait_for,
)
from tests.webhook_server import Reply, serve

pytestmark = pytest.mark.anyio

BEAT_S = 0.5  # the heartbeat interval of these tests' workers: stale after 2 s


@pytest.fixture
def fast_beats(make_settings: Callable[..., Settings]) -> Settings:
    """Settings whose workers beat every ``BEAT_S``."""
    return make_settings(heartbeat_interval=BEAT_S)


async def workers_of(redis: Redis, settings: Settings) -> list[WorkerStatus]:
    return await read_workers(redis, Keys(settings.prefix))


async def one_worker(redis: Redis, settings: Settings, state: str) -> WorkerStatus:
    """Wait until the one worker listed is in ``state`` and names its consumers."""
    (found,) = await wait_for(
        lambda: workers_of(redis, settings),
        lambda ws: len(ws) == 1 and ws[0].state == state and bool(ws[0].consumers),
        within=30,
        what=f"one worker {state}, with its consumers",
    )
    return found


async def check(settings: Settings, *args: str) -> subprocess.CompletedProcess[bytes]:
    """`govflow check ARGS` in a subprocess, with the worker's Redis and prefix."""
    assert settings.redis_url is not None
    assert settings.database_url is not None
    return await govflow(
        govflow_env(settings.redis_url, settings.database_url, settings.prefix), "check", *args
    )


def failed_with(result: subprocess.CompletedProcess[bytes], words: str) -> bool:
    """Exit 1, one line on stderr that says ``words``, nothing on stdout."""
    lines = result.stderr.decode().splitlines()
    return result.returncode == 1 and len(lines) == 1 and words in lines[0] and not result.stdout


async def test_the_heartbeat_says_what_a_worker_runs_and_lag_shows_its_consumers_at_once(
    fast_beats: Settings, redis: Redis, pool: AsyncConnectionPool[Any]
) -> None:
    keys = Keys(fast_beats.prefix)
    async with running_worker(fast_beats, concurrency=1) as worker:
        shown = await one_worker(redis, fast_beats, "live")
        assert (shown.id, shown.host, shown.pid) == (worker.id, socket.gethostname(), os.getpid())
        assert shown.roles == ["actions", "triggers"]
        assert shown.live
        assert shown.partitions == {}  # one partition: nothing leased
        assert {(c.stream, c.group) for c in shown.consumers} == {
            (keys.events(), "triggers"),
            (keys.commands(), "actions"),
        }
        # No entry yet: Redis lists no consumer, and lag shows them from the heartbeat.
        assert await redis.xinfo_consumers(keys.events(), "triggers") == []
        report = await read_lag(redis, pool, keys)
        for group in report.groups:
            (consumer,) = group.consumers
            assert (consumer.live, consumer.worker, consumer.pending) == (True, worker.id, 0)
        assert [w.id for w in report.workers] == [worker.id]
    stopped = await one_worker(redis, fast_beats, "stopped")
    assert not stopped.live
    assert stopped.stopped_at is not None
    # Its consumers left the groups with nothing pending: lag no longer lists them.
    report = await read_lag(redis, pool, keys)
    assert [g.consumers for g in report.groups] == [[], []]
    assert [w.state for w in report.workers] == ["stopped"]


@pytest.mark.slow
async def test_check_passes_while_the_worker_runs_and_fails_when_it_freezes_or_dies(
    fast_beats: Settings, redis: Redis, pool: AsyncConnectionPool[Any], tmp_path: Path
) -> None:
    keys = Keys(fast_beats.prefix)
    log = tmp_path / "worker.log"
    with log.open("wb") as stderr:
        proc = start_cli_worker(
            fast_beats, "--role", "triggers", "--concurrency", "1", stderr=stderr,
            GOVFLOW_HEARTBEAT_INTERVAL=str(BEAT_S),
        )  # fmt: skip
    try:
        live = await one_worker(redis, fast_beats, "live")
        assert live.pid == proc.pid
        ok = await check(fast_beats)
        assert ok.returncode == 0, ok.stderr.decode()
        assert f"worker {live.id} is live" in ok.stdout.decode()
        assert (await check(fast_beats, "--role", "triggers")).returncode == 0
        assert failed_with(
            await check(fast_beats, "--role", "actions"), "no worker with the actions role"
        )

        # An event that matches no workflow: delivered and acknowledged, so Redis lists
        # the consumer from now on.
        await Publisher(redis, keys).publish(new_event("policy.created", "POL-1"))
        await wait_for(
            lambda: redis.xinfo_consumers(keys.events(), "triggers"),
            lambda rows: len(rows) == 1 and rows[0]["pending"] == 0 and rows[0]["idle"] < 5000,
            within=30,
            what="the consumer to take the event and acknowledge it",
        )

        # Frozen: the process lives (its metrics thread would answer), its loop does not.
        proc.send_signal(signal.SIGSTOP)
        try:
            await one_worker(redis, fast_beats, "stale")
            frozen = await check(fast_beats)
            assert failed_with(frozen, f"worker {live.id} is stale: no heartbeat for"), frozen
        finally:
            proc.send_signal(signal.SIGCONT)
        await one_worker(redis, fast_beats, "live")
        assert (await check(fast_beats)).returncode == 0

        # Killed: stale for good, and its consumer (nothing pending) leaves lag's list,
        # though Redis lists it until the janitor retires it.
        proc.send_signal(signal.SIGKILL)
        await anyio.to_thread.run_sync(proc.wait)
        await one_worker(redis, fast_beats, "stale")
        assert len(await redis.xinfo_consumers(keys.events(), "triggers")) == 1
        report = await read_lag(redis, pool, keys)
        assert report.groups[0].consumers == []
        assert [(w.id, w.state, w.live) for w in report.workers] == [(live.id, "stale", False)]
        assert failed_with(await check(fast_beats), "is stale")
    finally:
        stop_process(proc)


STUCK = """
name: stuck
entity: policy
trigger: create
actions:
  - notify: {webhook: "WEBHOOK", message: "{entity_id}"}
"""


@pytest.mark.slow
async def test_check_fails_for_a_worker_whose_consumers_stall(
    make_settings: Callable[..., Settings], redis: Redis, pool: AsyncConnectionPool[Any]
) -> None:
    """A batch stuck on a receiver that never answers: the loop turns, nothing progresses."""
    settings = make_settings(
        heartbeat_interval=BEAT_S,
        stall_after=3.0,  # an idle consumer polls every second: never stalled
        webhook_secret="s3cret",
        webhook_timeout=60.0,
        step_timeout=60.0,
    )
    keys = Keys(settings.prefix)
    with serve() as receiver:
        await apply(pool, STUCK.replace("WEBHOOK", receiver.plan("/stuck", Reply(hold=True))))
        async with (
            running_worker(settings, roles=frozenset({"triggers"}), concurrency=1),
            running_worker(settings, roles=frozenset({"actions"}), concurrency=1),
        ):
            await Publisher(redis, keys).publish(new_event("policy.created", "POL-1"))
            await wait_for(
                lambda: workers_of(redis, settings),
                lambda ws: (
                    sorted((w.roles[0], w.state) for w in ws)
                    == [("actions", "stalled"), ("triggers", "live")]
                ),
                within=30,
                what="the action worker stalled and the trigger worker live",
            )
            stalled = await check(settings, "--role", "actions")
            assert failed_with(stalled, "is stalled: no consumer progressed for"), stalled
            assert (await check(settings, "--role", "triggers")).returncode == 0
            # Stalled is not gone: its consumer, the batch in hand, is still its own.
            actions = (await read_lag(redis, pool, keys)).groups[1]
            assert [(c.live, c.pending) for c in actions.consumers] == [(True, 1)]
            # Any live worker of the deployment will do with --any-host.
            assert (await check(settings, "--any-host")).returncode == 0
            receiver.release()
            await wait_for(
                lambda: workers_of(redis, settings),
                lambda ws: {w.state for w in ws} == {"live"},
                within=30,
                what="the action worker to make progress again",
            )


async def test_check_without_any_worker_or_with_a_bad_role_says_so(fast_beats: Settings) -> None:
    assert failed_with(await check(fast_beats), f"no worker on {socket.gethostname()}")
    assert failed_with(await check(fast_beats, "--any-host"), "no worker has a heartbeat")
    bad = await check(fast_beats, "--role", "janitor")
    assert bad.returncode == 2
    assert bad.stderr.decode().splitlines() == [
        "govflow: unknown role janitor: use triggers, actions, relay"
    ]
