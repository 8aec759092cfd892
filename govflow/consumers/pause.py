"""Pausing a group: its consumers take no entries while ``{prefix}:pause:{group}`` exists.

``govflow pause GROUP`` sets the key, holding who paused it, when and why;
``govflow resume GROUP`` deletes it. Every consumer of the group (``consumers.loop``)
looks at the key before it reads, at most every ``CHECK_S``: within that it stops taking
entries, new or claimed, and the batch in hand finishes and is settled as usual. Nothing
else stops: publishing goes on and the entries wait in the stream (``govflow lag`` shows
the lag grow, and the group as paused), retries still come due onto it, and an entry
pending for a consumer stays pending until the group resumes.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime

import msgspec
import structlog

from govflow.consumers.streams import RedisClient
from govflow.core.unavailable import REDIS_FAILED
from govflow.schemas.errors import ConfigError
from govflow.schemas.keys import GROUP_OF, Keys

log = structlog.get_logger(__name__)

CHECK_S = 1.0  # how long a consumer may go on reading after its group was paused
GROUPS = tuple(GROUP_OF.values())


class Pause(msgspec.Struct, frozen=True, kw_only=True):
    """A group paused: by whom, since when, and why."""

    group: str
    by: str
    since: datetime
    reason: str | None = None


_PAUSE = msgspec.json.Decoder(Pause)


def check_group(group: str) -> str:
    """``group`` if it is one of govflow's groups.

    Raises:
        ConfigError: it is not.
    """
    if group not in GROUPS:
        raise ConfigError(f"no group {group!r}: the groups are {' and '.join(GROUPS)}")
    return group


async def pause(redis: RedisClient, keys: Keys, pause: Pause) -> tuple[Pause, bool]:
    """Pause ``pause.group``; return the pause in force, and whether this call set it."""
    key = keys.pause(check_group(pause.group))
    if await redis.set(key, msgspec.json.encode(pause), nx=True):
        return pause, True
    current = await read_pause(redis, keys, pause.group)
    return (current or pause), False


async def resume(redis: RedisClient, keys: Keys, group: str) -> Pause | None:
    """Resume ``group``; return the pause this lifted, or ``None`` when it was not paused."""
    raw = await redis.getdel(keys.pause(check_group(group)))
    return _decode(group, raw)


async def read_pause(redis: RedisClient, keys: Keys, group: str) -> Pause | None:
    """The pause of ``group``, or ``None`` when it runs."""
    return _decode(group, await redis.get(keys.pause(check_group(group))))


async def read_pauses(redis: RedisClient, keys: Keys) -> dict[str, Pause]:
    """Every group paused now, by name."""
    pipe = redis.pipeline(transaction=False)
    for group in GROUPS:
        pipe.get(keys.pause(group))
    found = zip(GROUPS, await pipe.execute(), strict=True)
    return {g: p for g, raw in found if (p := _decode(g, raw)) is not None}


def _decode(group: str, raw: bytes | str | None) -> Pause | None:
    """The pause a key holds; one written by hand (any value) pauses all the same."""
    if raw is None:
        return None
    try:
        return _PAUSE.decode(raw)
    except msgspec.DecodeError:
        return Pause(group=group, by="unknown", since=datetime.fromtimestamp(0, UTC))


class PauseFlag:
    """Whether a consumer's group is paused, read from Redis at most every ``CHECK_S``."""

    def __init__(self, redis: RedisClient, keys: Keys, group: str) -> None:
        self._redis = redis
        self._key = keys.pause(group)
        self._group = group
        self._paused = False
        self._checked_at = float("-inf")

    async def paused(self) -> bool:
        """Whether the group is paused; while Redis is away, what it was last seen to be."""
        now = time.monotonic()
        if now - self._checked_at < CHECK_S:
            return self._paused
        self._checked_at = now
        try:
            paused = bool(await self._redis.exists(self._key))
        except REDIS_FAILED:
            return self._paused  # the read that follows finds Redis away and backs off
        if paused != self._paused:
            log.info("consumer.paused" if paused else "consumer.resumed", group=self._group)
        self._paused = paused
        return paused
