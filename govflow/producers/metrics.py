"""The outbox relay's Prometheus metrics, served with the workers' at ``/metrics``.

The backlog (``govflow_outbox_waiting`` and its age) describes the database, not a relay:
``govflow serve`` reads it once per scrape (``operations.lag_metrics``).
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge

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
