"""The one module that speaks raw Redis Streams: it hands back ``Entry`` Structs.

Every call here works on Redis 6.2 and 7.x, and on Redis Cluster as long as the keys
given to one call share a hash tag (``schemas.keys`` sees to that). redis-py refuses
``EVALSHA`` in a cluster pipeline and loads no script for one, so the scripts go out as
raw ``EVALSHA`` commands and are loaded (on every primary) when a server answers
NOSCRIPT: after a restart or a failover, whose new primary has an empty script cache.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeAlias

import msgspec
import structlog
from redis import exceptions as redis_errors
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from redis.commands.core import AsyncScript

from govflow.consumers import scripts
from govflow.consumers.seal import SEAL_FIELD, Seal
from govflow.schemas.codec import decode_command, decode_event
from govflow.schemas.commands import RunWorkflow
from govflow.schemas.errors import GroupMissingError, InvalidEntryError
from govflow.schemas.events import Event
from govflow.schemas.keys import Keys

log = structlog.get_logger(__name__)

# The field that carries the attempt number of a retried or replayed entry; the
# delivery counter of XPENDING is lost when an entry is added anew.
# The one field of each entry: the event of an events entry, the command of a commands entry.
EVENT_FIELD = b"event"
COMMAND_FIELD = b"command"
ATTEMPT_FIELD = b"attempt"
# The field that marks an entry put back by `govflow dlq replay` (the dead letter's id).
REPLAY_FIELD = b"replay_of"
# The most entries one script call appends: Redis runs nothing else while a script runs.
APPEND_CHUNK = 500
# The largest attempt an entry's field may claim: far above any GOVFLOW_MAX_ATTEMPTS, and
# far below 2**31, the limit of the dead_letters.attempts column.
MAX_ATTEMPT = 1_000_000
# The field that carries the token of an entry that keeps its entity's order, once it was
# retried or parked (``consumers.ordering``): the id it was first published under.
HOLD_FIELD = b"hold"
# The fields an entry may have: its event or command, and govflow's bookkeeping. An entry
# with more is refused before anything counts its fields into a script (a dead letter of
# 5,001 fields is more than Lua's unpack takes).
# The fields only govflow may set: honoured only under a valid seal (``consumers.seal``,
# which says why ``hold`` needs none).
CONTROL_FIELDS = (ATTEMPT_FIELD, REPLAY_FIELD)
WIRE_FIELDS = (EVENT_FIELD, COMMAND_FIELD, *CONTROL_FIELDS, HOLD_FIELD, SEAL_FIELD)
MAX_FIELDS = len(WIRE_FIELDS) - 1  # an entry holds an event or a command, not both
BLOCK_MS = 1000  # how long a read waits: below the client's socket timeout (redis-py#3138)

RedisClient: TypeAlias = Redis | RedisCluster


class Entry(msgspec.Struct, frozen=True):
    """One stream entry as delivered to a consumer."""

    stream: str
    id: str
    fields: dict[bytes, bytes]
    attempt: int = 1  # which delivery of this message this is, across retries
    # When this worker read it (monotonic): what was committed before it was published is
    # visible to any read of Postgres begun after this.
    read_at: float = msgspec.field(default_factory=time.monotonic)

    def field(self, name: bytes) -> bytes | None:
        """A field's value, or None."""
        return self.fields.get(name)

    def kept_fields(self) -> dict[bytes, bytes]:
        """The fields to carry on (to a retry, a parked list): of an entry with more
        fields than the wire format has, only the wire format's."""
        if len(self.fields) <= MAX_FIELDS:
            return self.fields
        return {k: v for k, v in self.fields.items() if k in WIRE_FIELDS}

    def payload(self) -> dict[str, str]:
        """The fields as text, without govflow's delivery bookkeeping.

        Of an entry with more fields than the wire format has, only the wire format's.
        """
        return {
            k.decode(errors="replace"): v.decode(errors="replace")
            for k, v in self.kept_fields().items()
            if k not in (ATTEMPT_FIELD, HOLD_FIELD, SEAL_FIELD)
        }


def read_at(batch: Sequence[Entry]) -> float:
    """When the last of a batch's entries was read (monotonic), or now for none."""
    return max((entry.read_at for entry in batch), default=time.monotonic())


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
    if len(entry.fields) > MAX_FIELDS:
        raise InvalidEntryError(
            f"entry has {len(entry.fields)} fields, over the wire format's {MAX_FIELDS}"
            f" (`{name.decode()}` and govflow's own); only those are kept in its dead letter"
        )
    raw = entry.field(name)
    if raw is None:
        raise InvalidEntryError(f"entry has no `{name.decode()}` field")
    return raw


class Hold(msgspec.Struct, frozen=True):
    """An entry that keeps its entity's order: the entity, and the entry's token."""

    entity: str
    token: str


class Traces(msgspec.Struct, frozen=True):
    """What Redis still carries of some executions and events, in one partition.

    ``undecided``: a place held more entries than were looked at, so the absence of a
    trace proves nothing this time.
    """

    undecided: bool
    executions: frozenset[str]
    events: frozenset[str]
    held: frozenset[str]  # entities whose order is held: their entries wait in parked lists


async def load_seal(redis: RedisClient, keys: Keys, *, create: bool = True) -> Seal | None:
    """The deployment's seal; made first if ``create`` (a worker) and there is none yet.

    None: no key is recorded (an operator's replay before any worker ran).
    """
    if create:
        await redis.set(keys.seal(), secrets.token_hex(32), nx=True)
    key: Any = await redis.get(keys.seal())
    if not key:
        return None
    return Seal(key if isinstance(key, bytes) else str(key).encode(), CONTROL_FIELDS)


class Streams:
    """Typed stream operations over one Redis or Redis Cluster client (replies as bytes).

    Args:
        seal: signs the entries written back and checks the control fields of those
            read; None (tools and tests that write no entries back) trusts them as read.
    """

    def __init__(self, redis: RedisClient, seal: Seal | None = None) -> None:
        self.redis = redis
        self._seal = seal
        self._scripts: dict[str, AsyncScript] = {}

    def sealed(self, fields: Mapping[bytes, bytes]) -> dict[bytes, bytes]:
        """``fields`` signed, so that their control fields are honoured when read back."""
        return self._seal.sign(fields) if self._seal is not None else dict(fields)

    def _checked(self, fields: dict[bytes, bytes]) -> dict[bytes, bytes]:
        return self._seal.verify(fields) if self._seal is not None else fields

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
        return _entries(stream, reply[0][1], self._checked) if reply else []

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
        # Entries trimmed or deleted while pending: Redis 7 drops them from the pending
        # list and names them in a third element; 6.2 claims them and answers nil.
        claimed: list[tuple[bytes | None, dict[bytes, bytes] | None]] = reply[1]
        live = [(i, f) for i, f in claimed if i is not None and f]
        if len(live) < len(claimed):
            await self._ack_deleted(stream, group, consumer, start, cursor, len(claimed))
        if not live:
            return [], cursor
        pipe = self.redis.pipeline(transaction=False)
        for entry_id, _ in live:
            pipe.xpending_range(stream, group, entry_id, entry_id, 1)
        counts = await pipe.execute()
        entries = []
        for (entry_id, raw), pending in zip(live, counts, strict=True):
            fields = self._checked(raw)
            deliveries = pending[0]["times_delivered"] if pending else 1
            attempt = attempt_of(fields) + deliveries - 1
            entries.append(Entry(stream, entry_id.decode(), fields, attempt))
        return entries, cursor

    async def _ack_deleted(
        self, stream: str, group: str, consumer: str, start: str, cursor: str, count: int
    ) -> None:
        """Acknowledge the entries a sweep claimed that no longer exist: nothing left to run.

        On 6.2 the reply does not name them, so look for them among what ``consumer``
        holds in the range the sweep covered (an entry that exists is left alone: it may
        be in hand here).
        """
        end = "+" if cursor == "0-0" else f"({cursor}"
        held: Any = await self.redis.xpending_range(
            stream, group, start, end, 10 * count, consumername=consumer
        )
        ids = [p["message_id"] for p in held]
        if not ids:
            return
        pipe = self.redis.pipeline(transaction=False)
        for entry_id in ids:
            pipe.xrange(stream, entry_id, entry_id, count=1)
        found = await pipe.execute()
        gone = [entry_id for entry_id, rows in zip(ids, found, strict=True) if not rows]
        if gone:
            await self.redis.xack(stream, group, *gone)
            log.info("claim.deleted_acknowledged", stream=stream, count=len(gone))

    async def renew(self, stream: str, group: str, consumer: str, ids: Sequence[str]) -> set[str]:
        """Reset the idle time of the entries ``consumer`` still owns; return those."""
        if not ids:
            return set()
        call = scripts.renew_pending(stream=stream, group=group, consumer=consumer, ids=ids)
        kept: list[bytes] = await self.run(call)
        return {i.decode() for i in kept}

    async def append(self, field: bytes, values: Mapping[str, Sequence[bytes]]) -> None:
        """Add one entry per value to each stream of ``values``, with the one field
        ``field``: in one round trip, at most ``APPEND_CHUNK`` entries to a script call."""
        calls = [
            scripts.append(stream=stream, field=field, values=chunk[i : i + APPEND_CHUNK])
            for stream, chunk in values.items()
            for i in range(0, len(chunk), APPEND_CHUNK)
        ]
        if calls:
            await self.run_in_order(calls)

    async def run(self, call: scripts.ScriptCall) -> Any:
        """Run one script call (loading the script if the server has lost it)."""
        return await self._script(call.lua)(keys=call.keys, args=call.args)

    async def run_in_order(self, calls: Sequence[scripts.ScriptCall]) -> list[Any]:
        """Run script calls in order in one round trip; return their replies.

        Every call that settles an entry acts only if its XACK removed the entry, so when
        a server that lost its scripts refuses some, sending them all again once they are
        loaded changes nothing twice.
        """
        try:
            return await self._send(calls)
        except redis_errors.NoScriptError:
            # On a cluster SCRIPT LOAD goes to every primary.
            for lua in dict.fromkeys(c.lua for c in calls):
                await self.redis.script_load(lua)
            return await self._send(calls)

    async def _send(self, calls: Sequence[scripts.ScriptCall]) -> list[Any]:
        # redis-py refuses EVALSHA in a cluster pipeline: send the raw command instead.
        pipe = self.redis.pipeline(transaction=False)
        for call in calls:
            sha = self._script(call.lua).sha
            pipe.execute_command("EVALSHA", sha, len(call.keys), *call.keys, *call.args)
        results: list[Any] = await pipe.execute()
        return results

    def _script(self, lua: str) -> AsyncScript:
        script = self._scripts.get(lua)
        if script is None:
            script = self._scripts[lua] = self.redis.register_script(lua)
        return script

    async def holders(self, held: str, entities: Sequence[str]) -> dict[str, str]:
        """The token of the entry in front of each held entity among ``entities``."""
        if not entities:
            return {}
        tokens: list[Any] = await self.redis.hmget(held, list(entities))
        return {e: t.decode() for e, t in zip(entities, tokens, strict=True) if t is not None}

    async def move_due(
        self, retry_key: str, events: str, commands: str, dead: str, limit: int = 500
    ) -> int:
        """Put retries whose time has come back on their stream; return how many."""
        call = scripts.move_due_retries(
            retry_set=retry_key,
            events=events,
            commands=commands,
            dead=dead,
            limit=limit,
        )
        moved: int = await self.run(call)
        return moved

    async def traces(
        self, place: TracePlace, execution_ids: Sequence[str], event_ids: Sequence[str],
        entities: Sequence[str], limit: int,
    ) -> Traces:  # fmt: skip
        """Look in one partition's streams, pending lists, retry set and holds for the
        given executions (by their commands) and events; at most ``limit`` per place."""
        starts = (
            await self._undelivered_start(place.events, place.groups[0]),
            await self._undelivered_start(place.commands, place.groups[1]),
        )
        call = scripts.find_traces(
            streams=(place.events, place.commands), groups=place.groups, starts=starts,
            retry_set=place.retry, held=place.held, execution_ids=execution_ids,
            event_ids=event_ids, entities=entities, limit=limit,
        )  # fmt: skip
        undecided, executions, events, held = await self.run(call)
        return Traces(
            bool(undecided),
            frozenset(_decoded(executions)),
            frozenset(_decoded(events)),
            frozenset(_decoded(held)),
        )

    async def _undelivered_start(self, stream: str, group: str) -> str:
        """Where the entries ``group`` has not been delivered yet begin: an XRANGE start.

        Read before the script runs: an entry delivered in between is looked at twice
        (in the stream and in the pending list), never missed.
        """
        try:
            infos: list[dict[str, Any]] = await self.redis.xinfo_groups(stream)
        except redis_errors.ResponseError as e:
            if "no such key" not in str(e):
                raise
            return "-"
        for info in infos:
            if _text(info["name"]) == group:
                return f"({_text(info['last-delivered-id'])}"
        return "-"  # no group yet: every entry is still to be delivered

    async def retire(self, stream: str, group: str, consumer: str) -> bool:
        """Remove a consumer from its group if, and only if, it has nothing pending."""
        call = scripts.retire_idle_consumer(stream=stream, group=group, consumer=consumer)
        try:
            return bool(await self.run(call))
        except redis_errors.ResponseError as e:
            if "NOGROUP" in str(e):  # the group went with its stream (a failover): no one to retire
                return False
            raise

    async def consumers(self, stream: str, group: str) -> list[dict[str, Any]]:
        """XINFO CONSUMERS, with text keys and names."""
        rows = await self.redis.xinfo_consumers(stream, group)
        return [
            {"name": r["name"].decode(), "pending": r["pending"], "idle": r["idle"]} for r in rows
        ]


class TracePlace(msgspec.Struct, frozen=True, kw_only=True):
    """The keys of one partition the reconciler looks in (they share its hash tag)."""

    events: str
    commands: str
    groups: tuple[str, str]  # the events' group, then the commands'
    retry: str
    held: tuple[str, str]  # the held hashes of the events' group, then the commands'


def _decoded(values: Sequence[bytes | str]) -> list[str]:
    return [_text(v) for v in values]


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _entries(
    stream: str,
    items: Sequence[tuple[bytes, dict[bytes, bytes] | None]],
    checked: Callable[[dict[bytes, bytes]], dict[bytes, bytes]],
) -> list[Entry]:
    out = []
    for entry_id, raw in items:
        if raw is None:  # trimmed while pending; never delivered by ">" reads
            continue
        fields = checked(raw)
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
