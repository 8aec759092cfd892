"""The one module that speaks raw Redis Streams: it hands back ``Entry`` Structs.

Every call here works on Redis 6.2 and 7.x, and on Redis Cluster as long as the keys
given to one call share a hash tag (``schemas.keys`` sees to that).
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from typing import Any

import msgspec
from redis import exceptions as redis_errors
from redis.asyncio import Redis

from consumers import scripts
from schemas.codec import encode
from schemas.errors import GroupMissingError
from schemas.keys import Role

# The field that carries the attempt number of a retried or replayed entry; the
# delivery counter of XPENDING is lost when an entry is added anew.
ATTEMPT_FIELD = b"attempt"
# The field that marks an entry put back by `govflow dlq replay` (the dead letter's id).
REPLAY_FIELD = b"replay_of"


class Entry(msgspec.Struct, frozen=True):
    """One stream entry as delivered to a consumer."""

    stream: str
    id: str
    fields: dict[bytes, bytes]
    attempt: int = 1  # which delivery of this message this is, across retries

    def field(self, name: bytes) -> bytes | None:
        """A field's value, or None."""
        return self.fields.get(name)

    def payload(self) -> dict[str, str]:
        """The fields as text, without govflow's delivery bookkeeping."""
        return {
            k.decode(errors="replace"): v.decode(errors="replace")
            for k, v in self.fields.items()
            if k not in (ATTEMPT_FIELD,)
        }


class Pending(msgspec.Struct, frozen=True):
    """One pending entry as XPENDING reports it."""

    id: str
    consumer: str
    idle_ms: int
    deliveries: int


class Streams:
    """Typed stream operations over one Redis client (``decode_responses=False``)."""

    def __init__(self, redis: Redis) -> None:
        self.redis = redis
        self._retry = redis.register_script(scripts.RETRY)
        self._dead = redis.register_script(scripts.DEAD_LETTER)
        self._move_due = redis.register_script(scripts.MOVE_DUE)
        self._renew = redis.register_script(scripts.RENEW)
        self._retire = redis.register_script(scripts.RETIRE_CONSUMER)

    async def ensure_group(self, stream: str, group: str) -> None:
        """Create the group at the start of the stream (so nothing published before is missed)."""
        try:
            await self.redis.xgroup_create(stream, group, id="0", mkstream=True)
        except redis_errors.ResponseError as e:
            if "BUSYGROUP" not in str(e):
                raise

    async def read(
        self, stream: str, group: str, consumer: str, count: int, block_ms: int
    ) -> list[Entry]:
        """Deliver up to ``count`` new entries to ``consumer``.

        Raises:
            GroupMissingError: the group or the stream is gone (NOGROUP).
        """
        try:
            reply: Any = await self.redis.xreadgroup(
                group, consumer, {stream: ">"}, count=count, block=block_ms
            )
        except redis_errors.ResponseError as e:
            if "NOGROUP" in str(e):
                raise GroupMissingError(f"group {group} of {stream} is missing") from e
            raise
        # One stream was read: the reply is [[name, [(id, fields), ...]]].
        return _entries(stream, reply[0][1]) if reply else []

    async def claim_idle(
        self, stream: str, group: str, consumer: str, min_idle_ms: int, count: int
    ) -> list[Entry]:
        """Take over entries idle longer than ``min_idle_ms`` from consumers that stopped.

        Each entry's attempt counts its deliveries (the claim included), so an entry
        that crashes every worker it reaches is dead-lettered in the end.
        """
        reply = await self.redis.xautoclaim(
            stream, group, consumer, min_idle_ms, "0-0", count=count
        )
        # Redis 7 adds a third element, the ids it found deleted; 6.2 has two.
        claimed: list[tuple[bytes, dict[bytes, bytes] | None]] = reply[1]
        live = [(i, f) for i, f in claimed if f]
        gone = [i for i, f in claimed if not f]
        if gone:  # trimmed or deleted while pending: nothing left to run
            await self.redis.xack(stream, group, *gone)
        if not live:
            return []
        pipe = self.redis.pipeline(transaction=False)
        for entry_id, _ in live:
            pipe.xpending_range(stream, group, entry_id, entry_id, 1)
        counts = await pipe.execute()
        entries = []
        for (entry_id, fields), pending in zip(live, counts, strict=True):
            deliveries = pending[0]["times_delivered"] if pending else 1
            attempt = attempt_of(fields) + deliveries - 1
            entries.append(Entry(stream, entry_id.decode(), fields, attempt))
        return entries

    async def renew(self, stream: str, group: str, consumer: str, ids: Sequence[str]) -> set[str]:
        """Reset the idle time of the entries ``consumer`` still owns; return those."""
        if not ids:
            return set()
        kept = await self._renew(keys=[stream], args=[group, consumer, *ids])
        return {i.decode() for i in kept}

    async def finish(
        self,
        stream: str,
        group: str,
        *,
        acks: Sequence[str],
        retries: Iterable[tuple[str, str, float, Role, dict[bytes, bytes]]],
        dead: Iterable[tuple[str, str, dict[str, str]]],
    ) -> None:
        """Acknowledge, schedule retries and dead-letter, in one round trip.

        ``retries`` holds (entry id, retry key, due time, target role, fields);
        ``dead`` holds (entry id, dead-letter stream, fields of the dead letter).
        """
        pipe = self.redis.pipeline(transaction=False)
        if acks:
            pipe.xack(stream, group, *acks)
        for entry_id, retry_key, due, role, fields in retries:
            member = encode({"to": role, "id": entry_id, "fields": _flat(fields)})
            await self._retry(
                keys=[stream, retry_key],
                args=[group, entry_id, int(due * 1000), member],
                client=pipe,
            )
        for entry_id, dead_key, record in dead:
            args: list[Any] = [group, entry_id]
            for k, v in record.items():
                args += [k, v]
            await self._dead(keys=[stream, dead_key], args=args, client=pipe)
        await pipe.execute()

    async def move_due(self, retry_key: str, events: str, commands: str, limit: int = 500) -> int:
        """Put retries whose time has come back on their stream; return how many."""
        now_ms = int(time.time() * 1000)
        moved: int = await self._move_due(keys=[retry_key, events, commands], args=[now_ms, limit])
        return moved

    async def retire(self, stream: str, group: str, consumer: str) -> bool:
        """Remove a consumer from its group if, and only if, it has nothing pending."""
        return bool(await self._retire(keys=[stream], args=[group, consumer]))

    async def consumers(self, stream: str, group: str) -> list[dict[str, Any]]:
        """XINFO CONSUMERS, with text keys and names."""
        rows = await self.redis.xinfo_consumers(stream, group)
        return [
            {"name": r["name"].decode(), "pending": r["pending"], "idle": r["idle"]} for r in rows
        ]


def _entries(stream: str, items: Sequence[tuple[bytes, dict[bytes, bytes] | None]]) -> list[Entry]:
    out = []
    for entry_id, fields in items:
        if fields is None:  # trimmed while pending; never delivered by ">" reads
            continue
        out.append(Entry(stream, entry_id.decode(), fields, attempt_of(fields)))
    return out


def attempt_of(fields: dict[bytes, bytes]) -> int:
    """The attempt an entry's fields carry; a missing or garbled one counts as the first."""
    try:
        return max(1, int(fields.get(ATTEMPT_FIELD, b"1")))
    except ValueError:
        return 1


def _flat(fields: dict[bytes, bytes]) -> list[str]:
    flat: list[str] = []
    for k, v in fields.items():
        flat += [k.decode(errors="replace"), v.decode(errors="replace")]
    return flat
