"""The deployment's figures as Prometheus metrics, read once per scrape of ``govflow serve``.

Lag, pending entries, ages, retries, dead letters, overdue work, the outbox backlog, the
work waiting for people and the workers' states describe Redis and Postgres, not a process: one process reads them, the
API, on each scrape of its ``/metrics`` (``govflow lag``'s report), and the workers do
not. With several API replicas each reports the same figures: aggregate with ``max``,
not ``sum``.

When Redis or Postgres does not answer in time the last figures read are served again,
and ``govflow_lag_fresh`` says 0.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from govflow.operations.lag import LagReport
from govflow.operations.workers import ROLES, STATES

_GROUP = ["stream", "group"]


class LagCollector(Collector):
    """The metrics of one lag report: the last one read, and whether it is this scrape's."""

    def __init__(self, report: LagReport | None, *, fresh: bool) -> None:
        self._report = report
        self._fresh = fresh

    def collect(self) -> Iterator[Metric]:
        """Every family of the report; only ``govflow_lag_fresh`` before the first one."""
        yield GaugeMetricFamily(
            "govflow_lag_fresh",
            "1 when the deployment's figures were read for this scrape; 0 when Redis or"
            " Postgres did not answer in time and they are the last ones read.",
            value=1 if self._fresh else 0,
        )
        if self._report is not None:
            yield from _groups(self._report)
            yield from _totals(self._report)
            yield _workers(self._report)


def _groups(report: LagReport) -> Iterator[Metric]:
    length = GaugeMetricFamily(
        "govflow_stream_length",
        "Entries in the stream: retained history, not backlog.",
        labels=["stream"],
    )
    families = {
        "lag": GaugeMetricFamily(
            "govflow_group_lag",
            "Entries not yet delivered to the group (an estimate when govflow_group_lag_valid"
            " is 0).",
            labels=_GROUP,
        ),
        "lag_valid": GaugeMetricFamily(
            "govflow_group_lag_valid", "1 when govflow_group_lag is exact, 0 when estimated.",
            labels=_GROUP,
        ),
        "pending": GaugeMetricFamily(
            "govflow_group_pending", "Entries delivered to the group, not yet acknowledged.",
            labels=_GROUP,
        ),
        "oldest_pending": GaugeMetricFamily(
            "govflow_group_oldest_pending_age_seconds",
            "Age of the group's oldest pending entry, from its id; 0 when none is pending.",
            labels=_GROUP,
        ),
        "oldest_undelivered": GaugeMetricFamily(
            "govflow_group_oldest_undelivered_age_seconds",
            "Age of the oldest entry not yet delivered to the group, from its id; 0 when"
            " none waits.",
            labels=_GROUP,
        ),
        "parked": GaugeMetricFamily(
            "govflow_group_parked",
            "Entries waiting behind a held entity (per-entity order), in neither lag nor"
            " pending.",
            labels=_GROUP,
        ),
        "paused": GaugeMetricFamily(
            "govflow_group_paused",
            "1 while an operator paused the group (govflow pause): its lag grows meanwhile.",
            labels=_GROUP,
        ),
    }  # fmt: skip
    streams: set[str] = set()
    for g in report.groups:
        if g.stream not in streams:
            streams.add(g.stream)
            length.add_metric([g.stream], g.length)
        labels = [g.stream, g.group]
        families["lag"].add_metric(labels, g.lag)
        families["lag_valid"].add_metric(labels, 1 if g.lag_valid else 0)
        families["pending"].add_metric(labels, g.pending)
        families["oldest_pending"].add_metric(labels, g.oldest_pending_age_s or 0.0)
        families["oldest_undelivered"].add_metric(labels, g.oldest_undelivered_age_s or 0.0)
        families["parked"].add_metric(labels, g.parked)
        families["paused"].add_metric(labels, 1 if g.paused else 0)
    yield length
    yield from families.values()


def _totals(report: LagReport) -> Iterator[Metric]:
    yield GaugeMetricFamily(
        "govflow_retry_scheduled",
        "Entries waiting in the retry sets.",
        value=report.retry_scheduled,
    )
    yield GaugeMetricFamily(
        "govflow_dead_letters_open",
        "Dead letters neither replayed nor purged.",
        value=report.dead_letters,
    )
    if report.outbox is None:
        return  # read without Postgres: no outbox, no overdue work
    overdue = GaugeMetricFamily(
        "govflow_overdue",
        "Work untouched past GOVFLOW_RECONCILE_AFTER: unfinished executions, and outbox rows"
        " published but not taken up; the reconciler puts back what Redis no longer carries.",
        labels=["kind"],
    )
    overdue.add_metric(["execution"], report.overdue)
    overdue.add_metric(["outbox"], report.outbox.overdue)
    yield overdue
    yield GaugeMetricFamily(
        "govflow_outbox_waiting",
        "Outbox rows not yet published to the stream.",
        value=report.outbox.waiting,
    )
    yield GaugeMetricFamily(
        "govflow_outbox_oldest_age_seconds",
        "Seconds since the oldest unpublished outbox row was written; 0 when none waits.",
        value=report.outbox.oldest_age_s or 0.0,
    )
    yield from _people(report)


def _people(report: LagReport) -> Iterator[Metric]:
    """Work that waits for people: approvals and tasks, and their deadlines."""
    yield GaugeMetricFamily(
        "govflow_executions_waiting",
        "Executions waiting for a decision or a task.",
        value=report.waiting,
    )
    yield GaugeMetricFamily(
        "govflow_approvals_pending",
        "Approvals with no outcome yet.",
        value=report.approvals_pending,
    )
    yield GaugeMetricFamily(
        "govflow_tasks_open", "Tasks neither done nor expired.", value=report.tasks_open
    )
    yield GaugeMetricFamily(
        "govflow_timers_due",
        "Deadlines of approvals and tasks past due and not yet fired (overdue deadlines).",
        value=report.timers_due,
    )


def _workers(report: LagReport) -> Metric:
    counts = {(role, state): 0 for role in ROLES for state in STATES}
    for w in report.workers:
        for role in w.roles:
            counts[role, w.state] = counts.get((role, w.state), 0) + 1
    family = GaugeMetricFamily(
        "govflow_workers",
        "Worker processes listed by their heartbeats, by role and state: live, stalled (no"
        " consumer progressed within GOVFLOW_STALL_AFTER), stale (no heartbeat: killed or"
        " frozen) or stopped; gone ones stay listed 15 minutes.",
        labels=["role", "state"],
    )
    for (role, state), n in sorted(counts.items()):
        family.add_metric([role, state], n)
    return family
