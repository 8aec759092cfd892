"""A bound on the requests one worker has in flight to each host.

One slow or overloaded receiver gets at most ``per_host`` of the worker's requests at a
time; the others' webhooks go on meanwhile.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from urllib.parse import urlsplit

import anyio


class HostSlots:
    """``per_host`` slots for each host, taken for the length of one request."""

    def __init__(self, per_host: int) -> None:
        self._per_host = per_host
        self._limiters: dict[str, anyio.CapacityLimiter] = {}

    @asynccontextmanager
    async def slot(self, url: str) -> AsyncIterator[None]:
        """Hold one of the slots of ``url``'s host (and port) while the block runs."""
        parts = urlsplit(url)
        host = f"{parts.hostname or ''}:{parts.port or ''}"
        limiter = self._limiters.get(host)
        if limiter is None:
            limiter = self._limiters[host] = anyio.CapacityLimiter(self._per_host)
        try:
            async with limiter:
                yield
        finally:
            if limiter.borrowed_tokens == 0 and limiter.statistics().tasks_waiting == 0:
                self._limiters.pop(host, None)  # a URL template can name any number of hosts
