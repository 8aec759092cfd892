"""govflow: governance workflows from domain events, on Redis Streams and Postgres.

What a service that publishes events, or a package that adds an action, imports::

    from govflow import Publisher, SyncPublisher, new_event, action

Everything else is reached through its room: ``govflow.producers`` (publishing and the
outbox), ``govflow.plugins`` (the action plug-in API), ``govflow.schemas`` (the wire
formats).
"""

from govflow.plugins import action
from govflow.producers import (
    DeploymentMismatchError,
    Publisher,
    PublishError,
    PublishRetry,
    SyncPublisher,
)
from govflow.schemas.events import Event, new_event

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
