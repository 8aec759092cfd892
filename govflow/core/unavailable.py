"""What "a server is unavailable" means: the one classification every service uses.

An unavailable server is waited for, never counted as a failed attempt: the work in hand
is held, the caller backs off, and the same work is tried again once the server answers.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TypeVar

import anyio
import psycopg
import structlog
from psycopg_pool import PoolTimeout
from redis import exceptions as redis_errors

from govflow.core.backoff import Backoff
from govflow.schemas.errors import UnavailableError

log = structlog.get_logger(__name__)
T = TypeVar("T")

# A Redis server that is not (yet) there: down, unreachable, or loading its data set.
REDIS_NOT_ANSWERING = (
    redis_errors.ConnectionError,
    redis_errors.TimeoutError,
    redis_errors.BusyLoadingError,
)
# A cluster mid-failover: a slot without a primary, a multi-key call mid-migration, or no
# node of the cluster reachable.
REDIS_CLUSTER_MOVING = (
    redis_errors.ClusterDownError,
    redis_errors.TryAgainError,
    redis_errors.RedisClusterException,
)
# Postgres cannot be reached, or the pool has no connection to give within its timeout.
POSTGRES_UNAVAILABLE = (psycopg.OperationalError, PoolTimeout)
# Redis or Postgres cannot be reached: wait and try again, counting no attempt. OSError
# covers a socket that fails below either client.
UNAVAILABLE = (
    *REDIS_NOT_ANSWERING,
    *REDIS_CLUSTER_MOVING,
    *POSTGRES_UNAVAILABLE,
    UnavailableError,
    OSError,
)
# Whatever Redis (or the cluster client) answers instead of a reply, unavailable or not.
REDIS_FAILED = (*UNAVAILABLE, redis_errors.RedisError)


class GaveUpError(Exception):
    """A server stayed unavailable until the caller began to stop; the work was left."""


async def until_available(
    call: Callable[[], Awaitable[T]], *, stopping: Callable[[], bool], stream: str
) -> T:
    """Run ``call`` until it succeeds, backing off while a server is unavailable.

    Once ``stopping()`` says so, give up instead: whatever was not handed over stays
    pending, and whoever claims it finds the committed work and finishes the hand-over.

    Raises:
        GaveUpError: a server was unavailable and the caller is stopping.
    """
    backoff = Backoff()
    while True:
        try:
            return await call()
        except UNAVAILABLE as e:
            log.warning("server.unavailable", stream=stream, error=str(e))
            if stopping():
                raise GaveUpError(str(e)) from e
            await anyio.sleep(backoff.next_delay())
