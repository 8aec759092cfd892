"""Retention and housekeeping: trim only what every group acknowledged; retire dead consumers.

Trimming follows the portable rule that works on every Redis version: the safe boundary
of a stream is, over all its groups, the lowest of each group's oldest pending id and the
first id after its last-delivered id. ``XTRIM MINID`` below that boundary can never remove
an entry some group has not acknowledged. A stream with no group yet is never trimmed:
its entries are waiting for the workers that will create it. (Redis 8.2's ``XTRIM ...
ACKED`` says the same in one command; the servers tested here predate it.)
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import anyio
import structlog

from govflow.consumers import scripts
from govflow.consumers.streams import RedisClient, Streams
from govflow.core.service import run_every
from govflow.core.unavailable import is_unavailable
from govflow.schemas.keys import Keys

log = structlog.get_logger(__name__)

EVERY_S = 5.0
TRIM_PAGE = 5_000  # entries one script call may trim: Redis reads each once, then deletes it


def parse_id(entry_id: str | bytes) -> tuple[int, int]:
    """A stream id as (milliseconds, sequence), for comparing."""
    text = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
    ms, _, seq = text.partition("-")
    return int(ms), int(seq or 0)


def next_id(entry_id: tuple[int, int]) -> tuple[int, int]:
    """The smallest id after ``entry_id``."""
    return entry_id[0], entry_id[1] + 1


async def safe_trim_id(redis: RedisClient, stream: str) -> tuple[int, int] | None:
    """The id below which every entry is acknowledged by every group.

    None when nothing may be trimmed (no group, or no stream).
    """
    groups: list[dict[str, Any]] = await redis.xinfo_groups(stream)
    if not groups:
        return None
    candidates = []
    for group in groups:
        candidates.append(next_id(parse_id(group["last-delivered-id"])))
        if group["pending"]:
            summary = await redis.xpending(stream, group["name"])
            if summary["min"] is not None:  # acknowledged since XINFO: none pending now
                candidates.append(parse_id(summary["min"]))
    return min(candidates)


class Janitor:
    """Trim the streams of every partition safely and retire consumers long gone."""

    def __init__(
        self,
        streams: Streams,
        keys: Keys,
        *,
        retention: int,
        consumer_gc_s: float,
        every_s: float = EVERY_S,
        partitions: Callable[[], Iterable[int]] | None = None,
        page: int = TRIM_PAGE,
    ) -> None:
        self._streams = streams
        self._redis = streams.redis
        self._keys = keys
        self._retention = retention
        self._consumer_gc_ms = int(consumer_gc_s * 1000)
        self._every_s = every_s
        self._page = page
        # With leased partitions, only the ones this worker holds (others sweep their own).
        self._partitions = partitions or keys.all_partitions
        self._stopped = anyio.Event()

    def stop(self) -> None:
        """Stop after the current pass."""
        self._stopped.set()

    async def run(self) -> None:
        """Sweep every ``every_s`` until stopped."""
        await run_every(self._every_s, self._tick, self._stopped)

    async def _tick(self) -> None:
        """One sweep; a failure is logged, and the next sweep tries again."""
        try:
            await self.sweep()
        except Exception as e:
            # Housekeeping must never stop the worker (redis-py's cluster client can
            # raise AttributeError mid-failover); the next sweep tries again.
            if is_unavailable(e):
                log.warning("janitor.sweep_failed", error=str(e))
            else:
                log.exception("janitor.sweep_failed")

    async def sweep(self) -> None:
        """One pass: trim each stream, then retire idle consumers with nothing pending."""
        for p in self._partitions():
            for stream in (self._keys.events(p), self._keys.commands(p)):
                if not await self._redis.exists(stream):
                    continue
                await self.trim(stream)
                await self._retire_idle(stream)

    async def trim(self, stream: str) -> int:
        """Trim ``stream`` below its safe boundary, keeping ``retention`` entries; return
        how many entries went.

        Every entry beyond retention that every group acknowledged goes, however many: a
        sweep keeps pace with any drain, so Redis memory comes back down within a sweep.
        Each script call removes at most ``TRIM_PAGE``, so Redis is never busy long.
        """
        boundary = await safe_trim_id(self._redis, stream)
        if boundary is None:
            return 0
        removed = 0
        while True:
            call = scripts.trim_acknowledged(
                stream=stream, below=f"{boundary[0]}-{boundary[1]}", keep=self._retention,
                limit=self._page,
            )  # fmt: skip
            went: int = await self._streams.run(call)
            removed += went
            if went < self._page:
                break
        if removed:
            log.info("stream.trimmed", stream=stream, removed=removed)
        return removed

    async def _retire_idle(self, stream: str) -> None:
        for group in await self._redis.xinfo_groups(stream):
            name = group["name"].decode()
            for consumer in await self._streams.consumers(stream, name):
                if consumer["pending"] == 0 and consumer["idle"] > self._consumer_gc_ms:
                    await self._streams.retire(stream, name, consumer["name"])
