"""The retry mover: puts each scheduled retry back on its stream when it is due."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import anyio
import structlog

from govflow.consumers.streams import Streams
from govflow.core import metrics
from govflow.core.backoff import Backoff
from govflow.core.service import run_every
from govflow.core.unavailable import is_unavailable
from govflow.schemas.keys import Keys

log = structlog.get_logger(__name__)

POLL_S = 0.25


class RetryMover:
    """Move due retries of every partition back; safe to run in many processes at once.

    Moving is one Lua script per partition (ZRANGEBYSCORE, XADD, ZREM), so a retry is
    never moved twice nor lost between the set and the stream.
    """

    def __init__(
        self,
        streams: Streams,
        keys: Keys,
        poll_s: float = POLL_S,
        partitions: Callable[[], Iterable[int]] | None = None,
    ) -> None:
        self._streams = streams
        self._keys = keys
        # With leased partitions, only the ones this worker holds (others move their own).
        self._partitions = partitions or keys.all_partitions
        self._poll_s = poll_s
        self._backoff = Backoff()
        self._stopped = anyio.Event()

    def stop(self) -> None:
        """Stop after the current pass."""
        self._stopped.set()

    async def run(self) -> None:
        """Move due retries every ``poll_s`` until stopped."""
        await run_every(self._poll_s, self._move, self._stopped)

    async def _move(self) -> float | None:
        """One pass over the partitions; after a failure, the backoff delay to wait."""
        try:
            for p in self._partitions():
                moved = await self._streams.move_due(
                    self._keys.retry(p),
                    self._keys.events(p),
                    self._keys.commands(p),
                    self._keys.dead(p),
                )
                if moved:
                    metrics.RETRIES_MOVED.inc(moved)
                    log.info("retry.moved", partition=p, count=moved)
        except Exception as e:
            # Moving must never stop the worker (redis-py's cluster client can raise
            # AttributeError mid-failover); the retries stay in their set meanwhile.
            if is_unavailable(e):
                log.warning("retry.move_failed", error=str(e))
            else:
                log.exception("retry.move_failed")
            return self._backoff.next_delay()
        self._backoff.reset()
        return None
