"""Exponential backoff with jitter for reconnecting to Redis and Postgres."""

from __future__ import annotations

import random


class Backoff:
    """Delays of 0.1 s doubling up to ``maximum``, each with ±10 % jitter (psycopg_pool's shape)."""

    INITIAL_DELAY = 0.1
    DELAY_BACKOFF = 2.0
    DELAY_JITTER = 0.1

    def __init__(self, maximum: float = 5.0) -> None:
        self._maximum = maximum
        self._delay = self.INITIAL_DELAY

    def next_delay(self) -> float:
        """The delay to wait now; the next one will be longer."""
        delay = self._delay * (1 + random.uniform(-self.DELAY_JITTER, self.DELAY_JITTER))
        self._delay = min(self._delay * self.DELAY_BACKOFF, self._maximum)
        return delay

    def reset(self) -> None:
        """Start again from the shortest delay after a success."""
        self._delay = self.INITIAL_DELAY
