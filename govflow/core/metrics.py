"""govflow's Prometheus metrics, updated by the workers and served at ``/metrics``."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from prometheus_client import Counter, Gauge, Histogram

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

# Set every few seconds from `govflow lag`'s report (govflow/operations/lag.py); they describe Redis and
# Postgres, not the process, so aggregate them across workers with `max`, not `sum`.
STREAM_LENGTH = Gauge(
    "govflow_stream_length", "Entries in the stream: retained history, not backlog.", ["stream"]
)
GROUP_LAG = Gauge(
    "govflow_group_lag",
    "Entries not yet delivered to the group (an estimate when govflow_group_lag_valid is 0).",
    ["stream", "group"],
)
GROUP_LAG_VALID = Gauge(
    "govflow_group_lag_valid", "1 when govflow_group_lag is exact, 0 when estimated.",
    ["stream", "group"],
)  # fmt: skip
GROUP_PENDING = Gauge(
    "govflow_group_pending", "Entries delivered to the group, not yet acknowledged.",
    ["stream", "group"],
)  # fmt: skip
GROUP_OLDEST_PENDING_AGE = Gauge(
    "govflow_group_oldest_pending_age_seconds",
    "Age of the group's oldest pending entry, from its id; 0 when none is pending.",
    ["stream", "group"],
)
GROUP_OLDEST_UNDELIVERED_AGE = Gauge(
    "govflow_group_oldest_undelivered_age_seconds",
    "Age of the oldest entry not yet delivered to the group, from its id; 0 when none waits.",
    ["stream", "group"],
)
GROUP_PARKED = Gauge(
    "govflow_group_parked",
    "Entries waiting behind a held entity (per-entity order), in neither lag nor pending.",
    ["stream", "group"],
)
RETRY_SCHEDULED = Gauge("govflow_retry_scheduled", "Entries waiting in the retry sets.")
DEAD_LETTERS_OPEN = Gauge("govflow_dead_letters_open", "Dead letters neither replayed nor purged.")
OVERDUE = Gauge(
    "govflow_overdue",
    "Work untouched past GOVFLOW_RECONCILE_AFTER: unfinished executions, and outbox rows"
    " published but not taken up; the reconciler puts back what Redis no longer carries.",
    ["kind"],
)
RECONCILED = Counter(
    "govflow_reconciled_total",
    "Work Redis no longer carried, put back by the reconciler: commands emitted again"
    " (execution) and outbox rows published again (outbox).",
    ["kind"],
)

# Work that waits for people.
WAITING = Gauge("govflow_executions_waiting", "Executions waiting for a decision or a task.")
APPROVALS_PENDING = Gauge("govflow_approvals_pending", "Approvals with no outcome yet.")
TASKS_OPEN = Gauge("govflow_tasks_open", "Tasks neither done nor expired.")
TIMERS_DUE = Gauge(
    "govflow_timers_due",
    "Deadlines of approvals and tasks past due and not yet fired (overdue deadlines).",
)
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
