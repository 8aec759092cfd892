"""Connect to one Redis server or to a Redis Cluster, whichever a URL names.

The URL is the same either way (``redis://host:port/0``, ``rediss://user:pass@...``): on
connect, one ``INFO cluster`` asks the server, and ``cluster_enabled:1`` makes the client
redis-py's ``RedisCluster``, which learns the slots and the other nodes from the one the
URL names. ``?cluster=yes`` or ``?cluster=no`` in the URL decides without asking, for an
ACL user who may not run ``INFO``. Everything above this module takes either client
(``consumers.streams.RedisClient``); keys that one call touches share a hash tag.
"""

from __future__ import annotations

import traceback
from typing import Any
from urllib.parse import unquote_plus

import structlog
from redis import exceptions as redis_errors
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster

from govflow.consumers.streams import RedisClient
from govflow.schemas.errors import ConfigError

log = structlog.get_logger(__name__)

_FLAG = "cluster"
_YES = frozenset({"1", "yes", "true", "on"})
_NO = frozenset({"0", "no", "false", "off"})
# Options of a plain client that RedisCluster does not take (it retries on its own).
_PLAIN_ONLY = frozenset({"retry_on_timeout"})


class _Cluster(RedisCluster):
    """redis-py's cluster client, with one of its races reported as what it is.

    When a node fails, the client disconnects that node's connections while other tasks
    may be writing on them, and the write fails with ``AttributeError`` or ``TypeError``
    from inside redis-py (redis/redis-py#3546; the fix, #4217, is not released). Callers
    retry connection errors, not those, so this turns them into ``ConnectionError``.
    """

    async def execute_command(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return await super().execute_command(*args, **kwargs)
        except (AttributeError, TypeError) as e:
            if not _raised_by_a_connection(e):
                raise
            raise redis_errors.ConnectionError(f"connection closed mid-command: {e}") from e


def _raised_by_a_connection(error: BaseException) -> bool:
    frames = traceback.extract_tb(error.__traceback__)
    return any(
        f.filename.endswith(("redis/asyncio/connection.py", "asyncio/streams.py")) for f in frames
    )


def split_flag(url: str) -> tuple[str, bool | None]:
    """The URL without its ``cluster`` query parameter, and what that parameter said.

    Only the query changes: the rest is kept as written. (``urlunsplit`` would turn
    ``unix:///path`` into ``unix:/path``, which redis-py refuses.)

    Raises:
        ConfigError: a ``cluster`` value that is neither yes nor no.
    """
    base, _, fragment = url.partition("#")
    head, _, query = base.partition("?")
    kept = []
    values = []
    for param in query.split("&") if query else []:
        key, _, value = param.partition("=")
        if unquote_plus(key) == _FLAG:
            values.append(unquote_plus(value).lower())
        else:
            kept.append(param)
    if not values:
        return url, None
    rest = head + ("?" + "&".join(kept) if kept else "") + ("#" + fragment if fragment else "")
    if values[-1] in _YES:
        return rest, True
    if values[-1] in _NO:
        return rest, False
    raise ConfigError(f"the Redis URL's `cluster` parameter is {values[-1]!r}: use yes or no")


async def is_cluster(url: str) -> bool:
    """Whether the server at ``url`` is a node of a Redis Cluster (``INFO cluster``).

    A server that refuses ``INFO`` (an ACL without it) is taken for a single server.
    """
    probe = Redis.from_url(url, socket_connect_timeout=5, socket_timeout=5)
    try:
        info: dict[str, Any] = await probe.info("cluster")
    except redis_errors.NoPermissionError:
        log.warning(
            "redis.cluster_probe_refused",
            hint="taken for a single server; add ?cluster=yes or ?cluster=no to the URL",
        )
        return False
    finally:
        await probe.aclose()
    return bool(info.get("cluster_enabled"))


async def connect(url: str, **options: Any) -> RedisClient:
    """A client of the server or cluster at ``url`` (replies as bytes).

    Args:
        url: ``redis://``, ``rediss://`` or ``unix://``; may carry ``?cluster=yes|no``.
        options: client options (timeouts, health checks), given to either client.

    Raises:
        redis.exceptions.ConnectionError: nothing answers at ``url``.
        ConfigError: a ``cluster`` parameter that is neither yes nor no.
    """
    plain_url, flag = split_flag(url)
    cluster = flag if flag is not None else await is_cluster(plain_url)
    if not cluster:
        return Redis.from_url(plain_url, **options)
    client = _Cluster.from_url(plain_url, **_cluster_options(options))
    await client.initialize()
    log.info("redis.cluster", nodes=len(client.get_nodes()))
    return client


def unprobed(url: str, **options: Any) -> RedisClient:
    """A client chosen by the URL's ``cluster`` flag alone (a single server's without one).

    It connects on its first command: for a caller that must start while Redis is away.
    """
    plain_url, flag = split_flag(url)
    if flag:
        return _Cluster.from_url(plain_url, **_cluster_options(options))
    return Redis.from_url(plain_url, **options)


def _cluster_options(options: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in options.items() if k not in _PLAIN_ONLY}
