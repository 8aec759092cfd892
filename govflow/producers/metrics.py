"""The outbox relay's Prometheus metrics, served with the workers' at ``/metrics``.

The two gauges describe the database, not the process: every relay, leader or standby,
sets them from the same query, so aggregate them with ``max``, not ``sum``.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge

OUTBOX_WAITING = Gauge("govflow_outbox_waiting", "Outbox rows not yet published to the stream.")
OUTBOX_OLDEST_AGE = Gauge(
    "govflow_outbox_oldest_age_seconds",
    "Seconds since the oldest unpublished outbox row was written; 0 when none waits.",
)
OUTBOX_PUBLISHED = Counter(
    "govflow_outbox_published_total", "Outbox rows this process's relay published."
)
RELAY_ERRORS = Counter(
    "govflow_outbox_relay_errors_total",
    "Relay attempts that failed and were retried, by the server that failed.",
    ["server"],
)
RELAY_LEADER = Gauge(
    "govflow_outbox_relay_leader", "1 while this process's relay holds the publishing lock."
)
