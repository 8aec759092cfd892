"""govflow: governance workflows from domain events, on Redis Streams and Postgres.

What a service that publishes events, or a package that adds an action, imports::

    from govflow import Publisher, SyncPublisher, new_event, action

Everything else is reached through its room: ``govflow.producers`` (publishing and the
outbox), ``govflow.plugins`` (the action plug-in API), ``govflow.schemas`` (the wire
formats).
"""

from typing import TYPE_CHECKING

from govflow.producers import (
    DeploymentMismatchError,
    Publisher,
    PublishError,
    PublishRetry,
    SyncPublisher,
)
from govflow.schemas.events import Event, new_event

if TYPE_CHECKING:
    from govflow.plugins import action


def __getattr__(name: str) -> object:
    # The plug-in API brings psycopg and httpx with it (about half a second): a service
    # that only publishes should not pay for them, so ``action`` is imported when asked for.
    if name == "action":
        from govflow.plugins import action

        return action
    raise AttributeError(f"module 'govflow' has no attribute {name!r}")


__all__ = [
    "DeploymentMismatchError",
    "Event",
    "PublishError",
    "PublishRetry",
    "Publisher",
    "SyncPublisher",
    "action",
    "new_event",
]
