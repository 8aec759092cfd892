"""What becomes of each entry of a batch: decided, and carried out, in one place.

An entry ends in exactly one way, its fate: acknowledged, scheduled for a retry after a
backoff, dead-lettered, parked behind the entry in front of its entity
(``consumers.ordering``), or left alone when a newer delivery of its execution fenced it
off (``db.fencing``). ``Settler.settle`` decides each fate from the handler's outcome
(``Settler.hand_over``), records the dead letters in Postgres, then hands every entry over
in one round trip of scripts (``consumers.scripts``). Each script acknowledges first and
acts only if its XACK removed the entry, so settling the same entry twice (after a claim)
changes nothing; and each is fenced on the partition's lease when one is held.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Literal, TypeVar

import msgspec
import prometheus_client
import structlog
from psycopg_pool import AsyncConnectionPool

from govflow.consumers import scripts
from govflow.consumers.outcomes import Outcome, RetryPolicy
from govflow.consumers.streams import ATTEMPT_FIELD, HOLD_FIELD, Entry, Hold, Streams
from govflow.core import metrics
from govflow.core.unavailable import until_available
from govflow.db import dead_letters
from govflow.schemas.keys import GROUP_OF, Keys, Role

log = structlog.get_logger(__name__)
T = TypeVar("T")

Fate = Literal["ack", "retry", "dead", "park", "fenced"]

_LOG_EVENT: dict[Fate, str] = {
    "ack": "entry.acknowledged",
    "retry": "entry.retried",
    "dead": "entry.dead_lettered",
    "park": "entry.parked",
    "fenced": "entry.left",
}
# An acknowledgement is the everyday case, logged at debug (``--log-level debug``): an
# info line for each was the largest single cost in the worker's profile.
_LOG_LEVEL: dict[Fate, int] = {
    "ack": logging.DEBUG,
    "retry": logging.INFO,
    "dead": logging.INFO,
    "park": logging.INFO,
    "fenced": logging.INFO,
}
# XACK ids per script call: Lua's unpack() has a limit of a few thousand values.
_ACK_CHUNK = 1000


class Verdict(msgspec.Struct, frozen=True, kw_only=True):
    """One entry as its handling left it.

    Attributes:
        outcome: what the handler said; None when the entry is parked behind its entity.
        hold: the entity whose order the entry keeps, if any.
        front: the entry is in front of its entity's hold, so its end lifts the hold.
    """

    entry: Entry
    outcome: Outcome | None
    hold: Hold | None = None
    front: bool = False

    @property
    def fate(self) -> Fate:
        """How the entry ends."""
        return "park" if self.outcome is None else self.outcome.kind


class Settler:
    """Settle the entries of one partition of one group: the one place that decides a fate.

    Args:
        fence: the partition's lease and its holder, when partitions are leased; every
            hand-over then does nothing unless this worker still holds the lease.
        stopping: whether the consumer is stopping, so an outage is not waited out.
    """

    def __init__(
        self,
        *,
        streams: Streams,
        pool: AsyncConnectionPool[Any],
        keys: Keys,
        role: Role,
        partition: int,
        policy: RetryPolicy,
        fence: scripts.Fence | None,
        stopping: Callable[[], bool],
    ) -> None:
        self._streams = streams
        self._pool = pool
        self._keys = keys
        self._role = role
        self._partition = partition
        self._policy = policy
        self._fence = fence
        self._stopping = stopping
        self.stream = keys.stream(role, partition)
        self.group = GROUP_OF[role]
        self._counters: dict[tuple[str, str], prometheus_client.Counter] = {}  # by (fate, cause)

    async def settle(self, verdicts: Sequence[Verdict]) -> bool:
        """Record the dead letters, then hand each entry over, in order; False when fenced.

        Fenced means another worker holds the partition's lease: nothing more was handed
        over, and what is left stays pending for the new owner.

        Raises:
            GaveUpError: stopping while a server is unavailable; the entries stay pending.
        """
        letters = [
            _letter(v.entry, v.outcome)
            for v in verdicts
            if v.outcome is not None and v.outcome.kind == "dead"
        ]
        if letters:
            await self._until_available(lambda: self._record(letters))
        # Acknowledgements that release no hold go first, many to a call; the rest keep
        # their order, so a retry that holds an entity precedes the entries parked behind it.
        plain = [v.entry.id for v in verdicts if v.fate == "ack" and not v.front]
        calls = [
            scripts.acknowledge(
                stream=self.stream,
                group=self.group,
                ids=plain[start : start + _ACK_CHUNK],
                fence=self._fence,
            )
            for start in range(0, len(plain), _ACK_CHUNK)
        ]
        # A fenced entry is another worker's now: left as it is, hold and all, for it.
        calls += [
            self.hand_over(v)
            for v in verdicts
            if v.fate != "fenced" and (v.fate != "ack" or v.front)
        ]
        replies = await self._until_available(lambda: self._streams.run_in_order(calls))
        if any(r == -1 for r in replies):
            return False
        # An acknowledgement is logged at debug: at info, the batch's entries are not
        # looked at one by one (each would build a line only to drop it).
        logged = {fate for fate, level in _LOG_LEVEL.items() if log.is_enabled_for(level)}
        for verdict in verdicts:
            if verdict.fate in logged:
                self._report(verdict)
        self._count(verdicts)
        return True

    def hand_over(self, verdict: Verdict) -> scripts.ScriptCall:
        """The script that ends one entry as its verdict says."""
        entry, outcome, hold = verdict.entry, verdict.outcome, verdict.hold
        order = self._order(hold)
        # A retried or parked entry goes back with its token: it keeps its entity's order.
        token = {HOLD_FIELD: hold.token.encode()} if hold is not None else {}
        if outcome is None:
            assert order is not None  # only an entry that keeps an order is parked
            return scripts.ack_and_park(
                stream=self.stream,
                group=self.group,
                fence=self._fence,
                entry_id=entry.id,
                fields=self._streams.sealed(
                    {**entry.kept_fields(), ATTEMPT_FIELD: str(entry.attempt).encode(), **token}
                ),
                order=order,  # parked: no attempt is counted
            )
        if outcome.kind == "ack":
            return scripts.acknowledge(
                stream=self.stream,
                group=self.group,
                fence=self._fence,
                ids=[entry.id],
                order=order if verdict.front else None,  # only the one in front releases
            )
        if outcome.kind == "retry":
            attempt = entry.attempt + 1 if outcome.counts else entry.attempt
            return scripts.ack_and_schedule_retry(
                stream=self.stream,
                group=self.group,
                fence=self._fence,
                entry_id=entry.id,
                retry_set=self._keys.retry(self._partition),
                delay_ms=int(self._policy.retry_delay(outcome, entry.attempt) * 1000),
                to=self._role,
                fields=self._streams.sealed(
                    {**entry.kept_fields(), ATTEMPT_FIELD: str(attempt).encode(), **token}
                ),
                order=order,
            )
        assert outcome.kind == "dead"  # a fenced entry is never handed over
        return scripts.ack_and_dead_letter(
            stream=self.stream,
            group=self.group,
            fence=self._fence,
            entry_id=entry.id,
            dead_stream=self._keys.dead(self._partition),
            letter=_dead_fields(entry, outcome),
            order=order,
        )

    def _order(self, hold: Hold | None) -> scripts.EntityOrder | None:
        if hold is None:
            return None
        return scripts.EntityOrder(
            entity=hold.entity,
            token=hold.token,
            held=self._keys.held(self.group, self._partition),
            parked=self._keys.parked(self.group, hold.entity, self._partition),
        )

    async def _until_available(self, call: Callable[[], Awaitable[T]]) -> T:
        return await until_available(call, stopping=self._stopping, stream=self.stream)

    async def _record(self, letters: list[dead_letters.NewDeadLetter]) -> None:
        async with self._pool.connection() as conn, conn.transaction():
            await dead_letters.record(conn, letters)

    def _count(self, verdicts: Sequence[Verdict]) -> None:
        """Count the batch's entries by fate and cause: one increment per kind."""
        kinds = Counter((v.fate, _cause(v.outcome)) for v in verdicts)
        for kind, n in kinds.items():
            counter = self._counters.get(kind)
            if counter is None:  # the labelled child, looked up once per kind
                counter = self._counters[kind] = metrics.ENTRIES.labels(
                    self.stream, self.group, *kind
                )
            counter.inc(n)

    def _report(self, verdict: Verdict) -> None:
        entry, outcome, fate = verdict.entry, verdict.outcome, verdict.fate
        log.log(
            _LOG_LEVEL[fate],
            _LOG_EVENT[fate],
            stream=self.stream,
            entry_id=entry.id,
            event_id=outcome.event_id if outcome else None,
            execution_id=outcome.execution_id if outcome else None,
            attempt=entry.attempt,
            reason=(outcome.reason or None) if outcome else None,
        )


def _cause(outcome: Outcome | None) -> str:
    """The ``cause`` label of an entry's count: ``held`` for a parked one."""
    if outcome is None:
        return "held"
    return outcome.cause or "ok"


def _letter(entry: Entry, outcome: Outcome) -> dead_letters.NewDeadLetter:
    """The Postgres record of a dead letter."""
    return dead_letters.NewDeadLetter(
        stream=entry.stream,
        message_id=entry.id,
        payload={_storable(k): _storable(v) for k, v in entry.payload().items()},
        error=_storable(outcome.reason),
        attempts=entry.attempt,
        event_id=outcome.event_id,
        event_type=outcome.event_type,
        execution_id=outcome.execution_id,
        tenant=outcome.tenant,
    )


def _storable(text: str) -> str:
    """``text`` without NUL, which Postgres text and jsonb refuse and a poison entry may hold."""
    return text.replace("\x00", "\ufffd")


def _dead_fields(entry: Entry, outcome: Outcome) -> dict[str, str]:
    """The dead-letter stream entry: where it came from, why, and the original fields."""
    record = {
        "stream": entry.stream,
        "message_id": entry.id,
        "error": outcome.reason,
        "attempts": str(entry.attempt),
    }
    record.update({f"payload.{k}": v for k, v in entry.payload().items()})
    return record
