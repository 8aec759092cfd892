"""How a handler says what became of each entry, and the retry policy that decides it."""

from __future__ import annotations

import random
from typing import Literal, TypedDict, Unpack

import msgspec


class Outcome(msgspec.Struct, frozen=True, kw_only=True):
    """The end of one delivery: acknowledged, retried later, dead-lettered, or fenced.

    ``fenced`` means another worker started the execution since (``db.fencing``): this
    delivery wrote nothing, and its entry is left alone for the worker that owns it now.

    ``cause`` is a short, bounded label for metrics (``invalid_entry``,
    ``permanent_error``, ``attempts_exhausted``, ``error``, ``busy``); ``reason`` is the
    sentence an operator reads. A retry counts an attempt unless ``counts`` is false: an
    entry that could not start (``busy``) failed nothing.
    """

    kind: Literal["ack", "retry", "dead", "fenced"]
    reason: str = ""
    cause: str = ""
    event_id: str | None = None
    event_type: str | None = None
    execution_id: str | None = None
    delay: float | None = None  # a retry's delay, when the action asked for one
    tenant: str | None = None
    counts: bool = True  # whether a retry counts as an attempt


ACK = Outcome(kind="ack")
FENCED = Outcome(kind="fenced")


class EntryIds(TypedDict, total=False):
    """What an outcome's log line and dead letter name the entry by."""

    event_id: str | None
    event_type: str | None
    execution_id: str | None
    tenant: str | None


def dead(reason: str, cause: str, **ids: Unpack[EntryIds]) -> Outcome:
    """Dead-letter the entry with ``reason``."""
    return Outcome(kind="dead", reason=reason, cause=cause, **ids)


def later(reason: str, cause: str, delay: float, **ids: Unpack[EntryIds]) -> Outcome:
    """Try the entry again after ``delay`` seconds, counting no attempt: it failed nothing."""
    return Outcome(kind="retry", reason=reason, cause=cause, delay=delay, counts=False, **ids)


# Past this many doublings every delay is at its cap anyway (2**64 seconds is far above
# any cap), and the power stays a float that cannot overflow.
_MAX_DOUBLINGS = 64


class RetryPolicy(msgspec.Struct, frozen=True):
    """Exponential backoff with jitter, capped, up to ``max_attempts`` deliveries."""

    max_attempts: int = 5
    backoff_base: float = 2.0
    backoff_max: float = 3600.0

    def delay(self, attempt: int) -> float:
        """Seconds before the retry that follows failed ``attempt`` (2, 4, 8, ... ±20%, capped)."""
        doublings = min(max(attempt - 1, 0), _MAX_DOUBLINGS)
        return min(self.backoff_base * 2.0**doublings * random.uniform(0.8, 1.2), self.backoff_max)

    def retry_delay(self, outcome: Outcome, attempt: int) -> float:
        """The delay ``outcome`` asked for (capped at ``backoff_max``), else the backoff's."""
        if outcome.delay is None:
            return self.delay(attempt)
        return min(max(outcome.delay, 0.0), self.backoff_max)

    def exhausted(self, attempt: int) -> bool:
        """Whether a failure of ``attempt`` is the last one allowed."""
        return attempt >= self.max_attempts

    def after_failure(
        self, attempt: int, error: str, *, delay: float | None = None, **ids: Unpack[EntryIds]
    ) -> Outcome:
        """Retry a failed delivery, or dead-letter it once attempts are exhausted.

        ``delay``: the seconds the failure asked to wait (``RetryLater``, ``Retry-After``).
        """
        if self.exhausted(attempt):
            return dead(
                f"{error} (attempt {attempt} of {self.max_attempts})", "attempts_exhausted", **ids
            )
        return Outcome(kind="retry", reason=error, cause="error", delay=delay, **ids)
