"""What "a server is unavailable" means: the one classification every part of govflow uses.

A failure is one of three things:

- **a server is unavailable** (``is_unavailable``): Redis does not answer or its cluster is
  mid-failover; Postgres cannot be reached, is shutting down or starting (SQLSTATE class
  08, 57P01-57P03), has no connection slot left (53300), or the pool has no connection to
  give in time. The work in hand is held, never counted as a failed attempt: the caller
  backs off and tries the same work again once the server answers.
- **an action failed**: whatever an action's own code raised (``ActionFailedError`` wraps
  it, so an ``OSError`` from a plug-in's SMTP client or a ``QueryCanceled`` from its
  statement is not mistaken for an outage). It counts an attempt and is retried.
- **permanent** (``PermanentError``): dead-lettered at once.

Anything else is a failure that counts an attempt.
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
from govflow.schemas.errors import ActionFailedError, UnavailableError

log = structlog.get_logger(__name__)
T = TypeVar("T")

# A Redis server that is not (yet) there: down, unreachable, or loading its data set.
REDIS_NOT_ANSWERING = (
    redis_errors.ConnectionError,
    redis_errors.TimeoutError,
    redis_errors.BusyLoadingError,
)
# A cluster or a replica set mid-failover: a slot without a primary, a multi-key call
# mid-migration, no node of the cluster reachable, or a replica not yet promoted.
REDIS_CLUSTER_MOVING = (
    redis_errors.ClusterDownError,
    redis_errors.TryAgainError,
    redis_errors.RedisClusterException,
    redis_errors.ReadOnlyError,
)
# ConnectionError subclasses that no wait fixes: wrong credentials, or an ACL refusal.
REDIS_REFUSED = (redis_errors.AuthenticationError, redis_errors.AuthorizationError)
# SQLSTATEs of a Postgres that is going away, starting, or full: class 08 (connection
# exception) is matched by its prefix.
POSTGRES_AWAY_STATES = frozenset({"57P01", "57P02", "57P03", "53300"})
# Every type an unavailable server raises; ``is_unavailable`` decides for each instance.
# OSError covers a socket that fails below either client.
UNAVAILABLE = (
    *REDIS_NOT_ANSWERING,
    *REDIS_CLUSTER_MOVING,
    psycopg.OperationalError,
    psycopg.InterfaceError,
    PoolTimeout,
    UnavailableError,
    OSError,
)
# Whatever Redis (or the cluster client) answers instead of a reply, unavailable or not.
# AttributeError too: while a primary fails over, redis-py's cluster client can use a
# connection it has half torn down (its writer None) and raise that for a failed call.
REDIS_FAILED = (*UNAVAILABLE, redis_errors.RedisError, AttributeError)


def is_unavailable(error: BaseException) -> bool:
    """Whether ``error`` means a server is unavailable: hold the work, count no attempt.

    An error raised by an action's code reaches here as ``ActionFailedError``, never an
    outage, whatever it wraps.
    """
    if isinstance(error, (ActionFailedError, *REDIS_REFUSED)) or not isinstance(error, UNAVAILABLE):
        return False
    if isinstance(error, psycopg.OperationalError) and not isinstance(error, PoolTimeout):
        state = error.sqlstate
        # No SQLSTATE: the client lost or could not open its connection.
        return state is None or state.startswith("08") or state in POSTGRES_AWAY_STATES
    return True


class GaveUpError(Exception):
    """A server stayed unavailable until the caller began to stop; the work was left."""


async def until_available(
    call: Callable[[], Awaitable[T]], *, stopping: Callable[[], bool], **where: str
) -> T:
    """Run ``call`` until it succeeds, backing off while a server is unavailable.

    Once ``stopping()`` says so, give up instead: whatever was not handed over stays
    pending, and whoever claims it finds the committed work and finishes the hand-over.
    ``where`` says in each warning what waits (``stream=...``, ``step=...``).

    Raises:
        GaveUpError: a server was unavailable and the caller is stopping.
    """
    backoff = Backoff()
    while True:
        try:
            return await call()
        except UNAVAILABLE as e:
            if not is_unavailable(e):
                raise
            log.warning("server.unavailable", **where, error=str(e))
            if stopping():
                raise GaveUpError(str(e)) from e
            await anyio.sleep(backoff.next_delay())
