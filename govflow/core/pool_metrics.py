"""The Postgres pools' statistics (psycopg_pool's ``get_stats()``), read at each scrape.

A worker watches its pool under the name ``worker``, ``govflow serve`` its own under
``api``. Sizes and waiting requests are gauges; what psycopg_pool counts from the pool's
start is exposed as counters, so that ``rate()`` works on them. Pools watched under one
name are summed (the tests run several workers in one process).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator
from typing import Any

from prometheus_client import REGISTRY
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from psycopg_pool import AsyncConnectionPool

# psycopg_pool's key -> (metric name, help, factor to the metric's unit)
GAUGES = {
    "pool_min": ("govflow_db_pool_min", "Connections the pool keeps open at least.", 1.0),
    "pool_max": ("govflow_db_pool_max", "Connections the pool may open at most.", 1.0),
    "pool_size": ("govflow_db_pool_size", "Connections open, lent or not.", 1.0),
    "pool_available": ("govflow_db_pool_available", "Connections open and idle.", 1.0),
    "requests_waiting": (
        "govflow_db_pool_requests_waiting",
        "Requests waiting for a connection now.",
        1.0,
    ),
}
COUNTERS = {
    "requests_num": ("govflow_db_pool_requests", "Connections asked of the pool.", 1.0),
    "requests_queued": (
        "govflow_db_pool_requests_queued",
        "Requests that had to wait for a connection.",
        1.0,
    ),
    "requests_wait_ms": (
        "govflow_db_pool_requests_wait_seconds",
        "Time spent waiting for a connection, all requests together.",
        0.001,
    ),
    "requests_errors": (
        "govflow_db_pool_request_errors",
        "Requests that got no connection (a time-out, the pool full or closed).",
        1.0,
    ),
    "connections_num": ("govflow_db_pool_connections", "Connections opened to Postgres.", 1.0),
    "connections_errors": (
        "govflow_db_pool_connection_errors",
        "Connections to Postgres that failed to open.",
        1.0,
    ),
    "connections_lost": (
        "govflow_db_pool_connections_lost",
        "Connections found broken when checked or returned.",
        1.0,
    ),
}


class PoolCollector(Collector):
    """The statistics of the pools watched in this process, per pool name."""

    def __init__(self) -> None:
        self._pools: dict[int, tuple[str, AsyncConnectionPool[Any]]] = {}

    def watch(self, name: str, pool: AsyncConnectionPool[Any]) -> None:
        """Report ``pool``'s statistics under ``name`` until ``unwatch``."""
        self._pools[id(pool)] = (name, pool)

    def unwatch(self, pool: AsyncConnectionPool[Any]) -> None:
        """Stop reporting ``pool`` (it is closing)."""
        self._pools.pop(id(pool), None)

    def collect(self) -> Iterator[Metric]:
        """One family per statistic, a sample per pool name."""
        totals: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
        for name, pool in list(self._pools.values()):
            try:
                stats = pool.get_stats()
            except RuntimeError:  # its counters changed while copied (another thread): next time
                continue
            for key, value in stats.items():
                totals[name][key] += value
        for table, family in ((GAUGES, GaugeMetricFamily), (COUNTERS, CounterMetricFamily)):
            for key, (metric, text, factor) in table.items():
                found = family(metric, text, labels=["pool"])
                for name, summed in sorted(totals.items()):
                    found.add_metric([name], summed.get(key, 0.0) * factor)
                yield found


POOLS = PoolCollector()
REGISTRY.register(POOLS)
