"""Producers: publish events to the stream directly, or through the transactional outbox."""

from govflow.producers.publish import DEFAULT_RETRY, Publisher, PublishRetry, SyncPublisher
from govflow.schemas.errors import PublishError

__all__ = ["DEFAULT_RETRY", "PublishError", "PublishRetry", "Publisher", "SyncPublisher"]
