"""The one module that speaks raw Redis Streams: it hands back ``Entry`` Structs.

Every call here works on Redis 6.2 and 7.x, and on Redis Cluster as long as the keys
given to one call share a hash tag (``schemas.keys`` sees to that). redis-py refuses
``EVALSHA`` in a cluster pipeline and loads no script for one, so the scripts go out as
raw ``EVALSHA`` commands and are loaded (on every primary) when a server answers
NOSCRIPT: after a restart or a failover, whose new primary has an empty script cache.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any, Literal, TypeAlias

import msgspec
from redis import exceptions as redis_errors
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from redis.commands.core import AsyncScript

from govflow.consumers import scripts
from govflow.schemas.codec import decode_command, decode_event, encode
from govflow.schemas.commands import RunWorkflow
from govflow.schemas.errors import GroupMissingError, InvalidEntryError
from govflow.schemas.events import Event
from govflow.schemas.keys import Role

# The field that carries the attempt number of a retried or replayed entry; the
# delivery counter of XPENDING is lost when an entry is added anew.
# The one field of each entry: the event of an events entry, the command of a commands entry.
EVENT_FIELD = b"event"
COMMAND_FIELD = b"command"
ATTEMPT_FIELD = b"attempt"
# The field that marks an entry put back by `govflow dlq replay` (the dead letter's id).
REPLAY_FIELD = b"replay_of"
# The largest attempt an entry's field may claim: far above any GOVFLOW_MAX_ATTEMPTS, and
# far below 2**31, the limit of the dead_letters.attempts column.
MAX_ATTEMPT = 1_000_000
# The field that carries the token of an entry that keeps its entity's order, once it was
# retried or parked (``consumers.ordering``): the id it was first published under.
HOLD_FIELD = b"hold"
# XACK ids per script call: Lua's unpack() has a limit of a few thousand values.
_ACK_CHUNK = 1000

RedisClient: TypeAlias = Redis | RedisCluster


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
            if k not in (ATTEMPT_FIELD, HOLD_FIELD)
        }


def event_of(entry: Entry) -> Event:
    """The event an entry of an events stream carries.

    Raises:
        InvalidEntryError: no ``event`` field, or not an event.
    """
    return decode_event(_field_of(entry, EVENT_FIELD))


def command_of(entry: Entry) -> RunWorkflow:
    """The command an entry of a commands stream carries.

    Raises:
        InvalidEntryError: no ``command`` field, or not a command.
    """
    return decode_command(_field_of(entry, COMMAND_FIELD))


def _field_of(entry: Entry, name: bytes) -> bytes:
    raw = entry.field(name)
    if raw is None:
        raise InvalidEntryError(f"entry has no `{name.decode()}` field")
    return raw


class Fence(msgspec.Struct, frozen=True):
    """The lease a hand-over requires: ``key`` held by ``owner`` (``""``: none required)."""

    key: str
    owner: str = ""


class Hold(msgspec.Struct, frozen=True):
    """An entry that keeps its entity's order: the entity, and the entry's token."""

    entity: str
    token: str


class HandOver(msgspec.Struct, frozen=True, kw_only=True):
    """Where one entry goes: acknowledged, retried, dead-lettered or parked.

    ``hold`` names the entity whose order the entry keeps: set on every retry, dead letter
    and park of such an entry, and on the acknowledgement of the one in front.
    """

    entry_id: str
    kind: Literal["ack", "retry", "dead", "park"]
    hold: Hold | None = None
    target: str = ""  # retry: the retry set; dead: the dead-letter stream
    due: float = 0.0  # retry: when, in seconds since the epoch
    role: Role = "events"  # retry: the stream it goes back to
    fields: dict[bytes, bytes] = {}  # retry, park: the fields it goes back with
    record: dict[str, str] = {}  # dead: the fields of the dead letter


class Streams:
    """Typed stream operations over one Redis or Redis Cluster client (replies as bytes)."""

    def __init__(self, redis: RedisClient) -> None:
        self.redis = redis
        self._ack = redis.register_script(scripts.ACK)
        self._retry = redis.register_script(scripts.RETRY)
        self._dead = redis.register_script(scripts.DEAD_LETTER)
        self._park = redis.register_script(scripts.PARK)
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
        self,
        stream: str,
        group: str,
        consumer: str,
        min_idle_ms: int,
        count: int,
        start: str = "0-0",
    ) -> tuple[list[Entry], str]:
        """Take over entries idle longer than ``min_idle_ms`` from consumers that stopped.

        Each entry's attempt counts its deliveries (the claim included), so an entry
        that crashes every worker it reaches is dead-lettered in the end.

        Returns:
            The entries claimed, and where the next sweep of the pending list starts:
            ``XAUTOCLAIM`` looks at no more than ``10 * count`` pending entries per call,
            so a sweep that always started at ``0-0`` would never reach idle entries
            behind that many busy ones. ``0-0`` once the whole list was swept.
        """
        reply = await self.redis.xautoclaim(
            stream, group, consumer, min_idle_ms, start, count=count
        )  # fmt: skip
        cursor = reply[0].decode() if isinstance(reply[0], bytes) else str(reply[0])
        # Redis 7 adds a third element, the ids it found deleted; 6.2 has two.
        claimed: list[tuple[bytes, dict[bytes, bytes] | None]] = reply[1]
        live = [(i, f) for i, f in claimed if f]
        gone = [i for i, f in claimed if not f]
        if gone:  # trimmed or deleted while pending: nothing left to run
            await self.redis.xack(stream, group, *gone)
        if not live:
            return [], cursor
        pipe = self.redis.pipeline(transaction=False)
        for entry_id, _ in live:
            pipe.xpending_range(stream, group, entry_id, entry_id, 1)
        counts = await pipe.execute()
        entries = []
        for (entry_id, fields), pending in zip(live, counts, strict=True):
            deliveries = pending[0]["times_delivered"] if pending else 1
            attempt = attempt_of(fields) + deliveries - 1
            entries.append(Entry(stream, entry_id.decode(), fields, attempt))
        return entries, cursor

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
        items: Sequence[HandOver],
        *,
        fence: Fence,
        held: str,
        parked: Callable[[str], str],
    ) -> bool:
        """Hand each entry over, in order, in one round trip; False when fenced.

        Fenced means another worker holds the partition's lease: nothing more was handed
        over, and what is left stays pending for the new owner.

        Args:
            stream: the stream the entries were read from.
            group: their consumer group.
            items: what becomes of each entry; kept in order, so a retry that holds an
                entity comes before the entries parked behind it.
            fence: the lease the hand-over requires.
            held: the partition's hash of held entities.
            parked: the parked list of an entity.
        """
        args = (stream, group, items, fence, held, parked)
        try:
            results = await self._send(*args)
        except redis_errors.NoScriptError:
            # Every script call before the failure acted only if its XACK did, so sending
            # them all again once the scripts are loaded changes nothing twice.
            await self._load_scripts()
            results = await self._send(*args)
        return all(r != -1 for r in results)

    async def _send(
        self,
        stream: str,
        group: str,
        items: Sequence[HandOver],
        fence: Fence,
        held: str,
        parked: Callable[[str], str],
    ) -> list[Any]:
        pipe = self.redis.pipeline(transaction=False)
        plain = [i.entry_id for i in items if i.kind == "ack" and i.hold is None]
        for start in range(0, len(plain), _ACK_CHUNK):
            ids = plain[start : start + _ACK_CHUNK]
            _queue(
                pipe, self._ack, [stream, fence.key, held, held], [group, fence.owner, "", "", *ids]
            )
        for item in items:
            if item.kind != "ack" or item.hold is not None:
                _queue(pipe, *self._hand_over(stream, group, item, fence, held, parked))
        results: list[Any] = await pipe.execute()
        return results

    def _hand_over(
        self,
        stream: str,
        group: str,
        item: HandOver,
        fence: Fence,
        held: str,
        parked: Callable[[str], str],
    ) -> tuple[AsyncScript, list[str], list[Any]]:
        entity, token = (item.hold.entity, item.hold.token) if item.hold else ("", "")
        parked_key = parked(entity) if entity else held  # a key of the slot, never touched
        owner = fence.owner
        if item.kind == "ack":
            return (
                self._ack,
                [stream, fence.key, held, parked_key],
                [group, owner, entity, token, item.entry_id],
            )
        if item.kind == "retry":
            member = encode({"to": item.role, "id": item.entry_id, "fields": _flat(item.fields)})
            due_ms = int(item.due * 1000)
            return (
                self._retry,
                [stream, item.target, fence.key, held],
                [group, owner, item.entry_id, due_ms, member, entity, token],
            )
        if item.kind == "dead":
            flat = [x for kv in item.record.items() for x in kv]
            return (
                self._dead,
                [stream, item.target, fence.key, held, parked_key],
                [group, owner, item.entry_id, entity, token, *flat],
            )
        member = encode({"hold": token, "fields": _flat(item.fields)})
        return (
            self._park,
            [stream, fence.key, held, parked_key],
            [group, owner, item.entry_id, entity, token, member],
        )

    async def _load_scripts(self) -> None:
        """Load every script (on a cluster, on every primary: SCRIPT LOAD goes to all)."""
        for script in (self._ack, self._retry, self._dead, self._park):
            await self.redis.script_load(script.script)

    async def holders(self, held: str, entities: Sequence[str]) -> dict[str, str]:
        """The token of the entry in front of each held entity among ``entities``."""
        if not entities:
            return {}
        tokens: list[Any] = await self.redis.hmget(held, list(entities))
        return {e: t.decode() for e, t in zip(entities, tokens, strict=True) if t is not None}

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
    """The attempt an entry's fields carry; a missing or garbled one counts as the first.

    Any producer can write any ``attempt``: a huge one is capped, or the dead letter of
    its entry (``attempts`` is a Postgres integer) would be refused and stop the worker.
    """
    try:
        return min(max(1, int(fields.get(ATTEMPT_FIELD, b"1"))), MAX_ATTEMPT)
    except ValueError:
        return 1


def _flat(fields: dict[bytes, bytes]) -> list[str]:
    flat: list[str] = []
    for k, v in fields.items():
        flat += [k.decode(errors="replace"), v.decode(errors="replace")]
    return flat


def _queue(pipe: Any, script: AsyncScript, keys: Sequence[str], args: Sequence[Any]) -> None:
    """Queue a script call on a pipeline, the same way for Redis and Redis Cluster."""
    pipe.execute_command("EVALSHA", script.sha, len(keys), *keys, *args)
