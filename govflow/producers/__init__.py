"""Producers: publish events to the stream directly, or through the transactional outbox."""

from govflow.producers.publish import DEFAULT_RETRY, Publisher, PublishRetry, SyncPublisher
from govflow.schemas.errors import DeploymentMismatchError, PublishError

__all__ = [
    "DEFAULT_RETRY",
    "DeploymentMismatchError",
    "PublishError",
    "PublishRetry",
    "Publisher",
    "SyncPublisher",
]
