"""When a worker's consumers last made progress: the signal a liveness probe needs.

A worker whose event loop turns can still have every consumer stuck on one await. Each
consumer marks ``Progress`` when it finishes a batch or polls and finds nothing new; the
heartbeat (``runtime.heartbeat``) reports the last mark, and ``govflow check`` fails once
it is older than ``GOVFLOW_STALL_AFTER``.
"""

from __future__ import annotations

import time


class Progress:
    """The monotonic time of the last mark; starts marked, so a new worker is not stalled."""

    def __init__(self) -> None:
        self._at = time.monotonic()

    def mark(self) -> None:
        """A consumer finished a batch, or polled and found nothing new."""
        self._at = time.monotonic()

    def seconds_since(self) -> float:
        """Seconds since the last mark."""
        return time.monotonic() - self._at
