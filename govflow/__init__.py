"""govflow: governance workflows from domain events, on Redis Streams and Postgres.

What a service that publishes events, or a package that adds an action, imports::

    from govflow import Publisher, SyncPublisher, new_event, action

and what a service that owns the user interface calls to decide approvals and complete
tasks (``Decisions`` async, ``decide`` and ``complete_task`` from synchronous code; a
refusal raises ``RefusedError``)::

    from govflow import Decisions, RefusedError, complete_task, decide

Everything else is reached through its room: ``govflow.producers`` (publishing and the
outbox), ``govflow.plugins`` (the action plug-in API), ``govflow.schemas`` (the wire
formats).
"""

import importlib
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
    from govflow.operations.decisions import Decisions, RefusedError, complete_task, decide
    from govflow.plugins import action

# Imported when asked for: the plug-in API and the decisions bring psycopg and httpx with
# them (about half a second), which a service that only publishes should not pay for.
_LAZY = {
    "action": "govflow.plugins",
    "Decisions": "govflow.operations.decisions",
    "RefusedError": "govflow.operations.decisions",
    "complete_task": "govflow.operations.decisions",
    "decide": "govflow.operations.decisions",
}


def __getattr__(name: str) -> object:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'govflow' has no attribute {name!r}")


__all__ = [
    "Decisions",
    "DeploymentMismatchError",
    "Event",
    "PublishError",
    "PublishRetry",
    "Publisher",
    "RefusedError",
    "SyncPublisher",
    "action",
    "complete_task",
    "decide",
    "new_event",
]
