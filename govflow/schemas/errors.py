"""The errors govflow raises on purpose.

Factored out of the other modules so that everything can import it without import loops.
Any exception that is not a ``PermanentError`` means "try again later".
"""

from __future__ import annotations


class GovflowError(Exception):
    """Base of every error govflow raises on purpose."""


class ConfigError(GovflowError):
    """A setting or an argument is wrong; the CLI prints it and exits 2."""


class DeploymentMismatchError(ConfigError):
    """A setting disagrees with what the deployment recorded (partition count, prefix)."""


class InvalidEntryError(GovflowError):
    """A stream entry, file or request body is not what the wire format says."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class PermanentError(GovflowError):
    """A failure that another attempt cannot fix (a webhook 4xx, a chain too deep)."""


class ActionFailedError(GovflowError):
    """An action's own code raised: the step failed, and the attempt counts.

    Whatever it wraps (an ``OSError``, a ``psycopg.OperationalError``) is the action's
    failure, not an outage of govflow's servers.
    """

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class RetryLater(Exception):  # noqa: N818 - a request to the runtime, not an error
    """Raised by an action: try this step again after ``seconds`` (capped by the backoff cap).

    The attempt counts, as any failure's does.
    """

    def __init__(self, seconds: float, reason: str = "") -> None:
        super().__init__(reason or f"retry requested in {seconds:g} s")
        self.seconds = seconds
        self.reason = str(self)


class UnavailableError(GovflowError):
    """Redis or Postgres cannot be reached; the work in hand waits for it."""


class GroupMissingError(GovflowError):
    """The consumer group vanished (FLUSHALL, a restarted Redis without AOF)."""


class PublishError(UnavailableError):
    """An event could not be written to Redis within the publisher's retries."""


class UnhealthyError(GovflowError):
    """No worker to vouch for: its heartbeat is stale, it stopped, or its consumers stalled."""
