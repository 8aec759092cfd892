"""A worker's heartbeat: what it runs, what it holds, and whether it moves, in Redis.

Every ``GOVFLOW_HEARTBEAT_INTERVAL`` seconds the worker writes its hash and scores its id
in the deployment's index (the format and the reading are in ``operations.workers``).
The beat runs on the worker's event loop, so a loop that is wedged stops beating, while
the metrics thread would still answer; a loop that turns while every consumer is stuck
keeps beating with an old ``last_progress_at``. ``govflow check`` reads both.

A worker that runs no consumer (the relay alone, or more workers than partitions) has
nothing that could stall: its progress is its beat.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable

import anyio
import msgspec
import structlog

from govflow.consumers.streams import RedisClient
from govflow.core.progress import Progress
from govflow.core.service import run_every
from govflow.core.unavailable import REDIS_FAILED
from govflow.operations.workers import (
    GONE_KEPT_S,
    ConsumerRef,
    WorkerRecord,
    encode_record,
    server_now,
)
from govflow.schemas.keys import Keys

log = structlog.get_logger(__name__)

LAST_BEAT_TIMEOUT_S = 5.0  # the "stopped" beat on the way out, at most


class Holdings(msgspec.Struct, frozen=True):
    """What a worker runs at one moment: its consumers, and the partitions it leases."""

    consumers: list[ConsumerRef]
    partitions: dict[str, list[int]]


def worker_id() -> str:
    """An id unique in the deployment: the host, the pid, and a token (pids are reused)."""
    return f"{socket.gethostname()}-{os.getpid()}-{os.urandom(3).hex()}"


class Heartbeat:
    """Write the worker's heartbeat every ``every_s`` until ``stop()``; then say it stopped.

    Args:
        redis: the worker's client.
        keys: the deployment's key names.
        worker: this worker's id (``worker_id()``).
        roles: the roles it runs.
        holdings: what it runs and holds right now.
        progress: marked by its consumers.
        every_s: seconds between two beats.
        stall_after_s: no progress for this long is a stall (written for the readers).
    """

    def __init__(
        self,
        redis: RedisClient,
        keys: Keys,
        *,
        worker: str,
        roles: frozenset[str],
        holdings: Callable[[], Holdings],
        progress: Progress,
        every_s: float,
        stall_after_s: float,
    ) -> None:
        self._redis = redis
        self._keys = keys
        self.worker = worker
        self._roles = sorted(roles)
        self._holdings = holdings
        self._progress = progress
        self._every_s = every_s
        self._stall_after_s = stall_after_s
        self._started = time.monotonic()
        self._started_at: float | None = None  # on Redis's clock, fixed at the first beat
        self._stopped = anyio.Event()

    def stop(self) -> None:
        """Beat once more as stopped, and return from ``run()``."""
        self._stopped.set()

    async def run(self) -> None:
        """Beat until stopped; a beat that fails is logged, and the next one tries again."""
        await run_every(self._every_s, self.beat, self._stopped)
        with anyio.move_on_after(LAST_BEAT_TIMEOUT_S, shield=True):
            await self.beat(stopping=True)

    async def beat(self, *, stopping: bool = False) -> None:
        """Write the heartbeat now (the worker does, once its consumers are built)."""
        try:
            await self._write(stopping=stopping)
        except REDIS_FAILED as e:
            log.warning("heartbeat.failed", error=str(e) or type(e).__name__)

    async def _write(self, *, stopping: bool) -> None:
        now = await server_now(self._redis)
        held = self._holdings()
        # Ages from the monotonic clock, placed on Redis's: a skewed host clock changes nothing.
        progressed = now - self._progress.seconds_since() if held.consumers else now
        if self._started_at is None:
            self._started_at = round(now - (time.monotonic() - self._started), 3)
        record = WorkerRecord(
            id=self.worker,
            host=socket.gethostname(),
            pid=os.getpid(),
            roles=self._roles,
            consumers=held.consumers,
            partitions=held.partitions,
            started_at=self._started_at,
            beat_at=round(now, 3),
            last_progress_at=round(progressed, 3),
            beat_every_s=self._every_s,
            stall_after_s=self._stall_after_s,
            stopped_at=round(now, 3) if stopping else None,
        )
        key = self._keys.heartbeat(self.worker)
        pipe = self._redis.pipeline(transaction=False)  # one key a call: fine on a cluster
        pipe.hset(key, mapping=encode_record(record))  # type: ignore[arg-type]
        pipe.pexpire(key, int(GONE_KEPT_S * 1000))
        pipe.zadd(self._keys.heartbeats(), {self.worker: int(now * 1000)})
        pipe.zremrangebyscore(self._keys.heartbeats(), "-inf", int((now - GONE_KEPT_S) * 1000))
        await pipe.execute()
