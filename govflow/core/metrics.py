"""govflow's Prometheus metrics of one process: a worker's, served on ``--metrics-port``.

What describes the whole deployment (lag, dead letters, the workers' heartbeats) is read
once per scrape by ``govflow serve`` instead (``operations.lag_metrics``). docs/monitoring.md
lists every metric.
"""

from __future__ import annotations

import contextlib
import functools
import time
from collections.abc import Iterator, Sequence
from datetime import datetime
from importlib.metadata import version as package_version

from prometheus_client import Counter, Histogram, Info

from govflow.schemas.errors import PermanentError, RetryLater

# Steps and webhooks: from a database write to a receiver that takes its time-out.
DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)

BUILD_INFO = Info("govflow_build", "The govflow version this process runs.")
BUILD_INFO.info({"version": package_version("govflow")})

ENTRIES = Counter(
    "govflow_entries_total",
    "Stream entries finished, by how they ended (ack, retry, dead) and why.",
    ["stream", "group", "outcome", "cause"],
)
HANDLER_SECONDS = Histogram(
    "govflow_handler_seconds",
    "Time to handle one batch of entries, from delivery to the last commit.",
    ["group"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
BATCH_SIZE = Histogram(
    "govflow_batch_entries",
    "Entries per batch handed to a handler.",
    ["group"],
    buckets=(1, 2, 5, 10, 20, 50, 100, 200, 500),
)
END_TO_END_SECONDS = Histogram(
    "govflow_end_to_end_seconds",
    "From an event's occurred_at to its execution's completion.",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300),
)
CLAIMED = Counter(
    "govflow_claimed_total",
    "Entries taken over from consumers that stopped (XAUTOCLAIM).",
    ["stream", "group"],
)
FENCED = Counter(
    "govflow_executions_fenced_total",
    "Writes of a stale delivery refused: another worker had started the execution since.",
)
RETRIES_MOVED = Counter("govflow_retries_moved_total", "Retries put back on their stream when due.")
EXECUTIONS = Counter(
    "govflow_executions_total",
    "Deliveries of executions run by the action workers, by workflow and how they ended:"
    " completed, retrying, dead_lettered or fenced.",
    ["workflow", "outcome"],
)
STEPS = Counter(
    "govflow_steps_total",
    "Steps run, by workflow, action and outcome: completed, failed, retry_later or permanent.",
    ["workflow", "action", "outcome"],
)
STEP_SECONDS = Histogram(
    "govflow_step_duration_seconds",
    "Time one step's action took, by action, whatever its outcome.",
    ["action"],
    buckets=DURATION_BUCKETS,
)
WEBHOOK_REQUESTS = Counter(
    "govflow_webhook_requests_total",
    "Webhook deliveries by the class of the answer: 2xx, 3xx, 4xx, 5xx, or error when there"
    " was none to use (a time-out, a connection error, a refused address or redirect).",
    ["status_class"],
)
WEBHOOK_SECONDS = Histogram(
    "govflow_webhook_duration_seconds",
    "Time one webhook delivery took, redirects included, whatever its answer.",
    buckets=DURATION_BUCKETS,
)

RECONCILED = Counter(
    "govflow_reconciled_total",
    "Work Redis no longer carried, put back by the reconciler: commands emitted again"
    " (execution) and outbox rows published again (outbox).",
    ["kind"],
)

# Work that waits for people (the counts of what waits: operations.lag_metrics).
DEADLINES_FIRED = Counter(
    "govflow_deadlines_fired_total", "Approvals and tasks expired at their due time.", ["kind"]
)
DECISION_SECONDS = Histogram(
    "govflow_decision_seconds",
    "From an approval or task being created to its outcome (decided, completed or expired).",
    ["kind", "outcome"],
    buckets=(60, 300, 900, 3600, 4 * 3600, 86_400, 3 * 86_400, 7 * 86_400, 30 * 86_400),
)


def observe_completed(finished: Sequence[tuple[str, datetime | None]], now: datetime) -> None:
    """Record the end-to-end latency of executions that just completed."""
    for _, occurred_at in finished:
        if occurred_at is not None:
            END_TO_END_SECONDS.observe(max(0.0, (now - occurred_at).total_seconds()))


# What an execution's delivery ended as, by its entry's outcome (``consumers.outcomes``).
_EXECUTION_OUTCOME = {"ack": "completed", "retry": "retrying", "dead": "dead_lettered"}


def count_execution(workflow: str, outcome_kind: str) -> None:
    """Count one delivery of an execution of ``workflow`` that ended as ``outcome_kind``."""
    _executions(workflow, outcome_kind).inc()


# The series of a label set, looked up once: ``labels()`` checks its values and takes a
# lock on every call, two thirds of what timing and counting a step cost. Workflows,
# actions and outcomes are few, so the caches stay small.
@functools.cache
def _executions(workflow: str, outcome_kind: str) -> Counter:
    return EXECUTIONS.labels(workflow, _EXECUTION_OUTCOME.get(outcome_kind, outcome_kind))


@functools.cache
def _step_series(workflow: str, action: str, outcome: str) -> tuple[Histogram, Counter]:
    return STEP_SECONDS.labels(action), STEPS.labels(workflow, action, outcome)


class observe_step:  # noqa: N801 - used as a function: ``with observe_step(...)``
    """Time and count one step; its outcome is what the block raised, if anything.

    A step cancelled (the worker stopping at once) is neither timed nor counted. A class,
    not a generator: it wraps every step, and costs half as much so.
    """

    __slots__ = ("_action", "_started", "_workflow")

    def __init__(self, workflow: str, action: str) -> None:
        self._workflow, self._action = workflow, action
        self._started = 0.0

    def __enter__(self) -> None:
        self._started = time.perf_counter()

    def __exit__(self, kind: type[BaseException] | None, *_: object) -> None:
        if kind is None:
            outcome = "completed"
        elif issubclass(kind, PermanentError):
            outcome = "permanent"
        elif issubclass(kind, RetryLater):
            outcome = "retry_later"
        elif issubclass(kind, Exception):
            outcome = "failed"
        else:
            return
        seconds, count = _step_series(self._workflow, self._action, outcome)
        seconds.observe(time.perf_counter() - self._started)
        count.inc()


class WebhookRequest:
    """One webhook delivery being timed: set ``status`` once the receiver answered."""

    def __init__(self) -> None:
        self.status: int | None = None


@contextlib.contextmanager
def observe_webhook() -> Iterator[WebhookRequest]:
    """Time one delivery and count it by status class; no status set is an ``error``."""
    request, started = WebhookRequest(), time.perf_counter()
    try:
        yield request
    finally:
        WEBHOOK_SECONDS.observe(time.perf_counter() - started)
        status = request.status
        # Bounded labels, whatever the receiver sent.
        if status is not None and 200 <= status < 600:
            WEBHOOK_REQUESTS.labels(f"{status // 100}xx").inc()
        else:
            WEBHOOK_REQUESTS.labels("error").inc()
