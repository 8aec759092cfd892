"""Metrics in the form operators use, as a real worker and a real API serve them.

A `govflow run` subprocess runs two workflows against a real webhook receiver (one answers
200, one 500); its own ``--metrics-port`` must count executions and steps by workflow,
action and outcome, time steps and webhooks, class webhook answers, and carry its
version and its pool's statistics, and nothing of the deployment-wide lag. The API's
``/metrics`` carries those figures, once per scrape. Both scrapes pass
``promtool check metrics``, and every metric deploy/monitoring names is in one of them.
"""

from __future__ import annotations

import socket
import subprocess
from collections.abc import Callable
from importlib.metadata import version as package_version
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from psycopg_pool import AsyncConnectionPool
from redis.asyncio import Redis

from govflow.api.app import create_app
from govflow.producers.publish import Publisher
from govflow.schemas.events import new_event
from govflow.schemas.keys import Keys
from govflow.schemas.settings import Settings
from tests.api_helpers import serving
from tests.faults.servers import free_port
from tests.pipeline_helpers import apply, start_cli_worker, statuses, stop_process, wait_for
from tests.test_monitoring import promtool, referenced_metrics
from tests.webhook_server import Reply, serve

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

TELL = """
name: tell-{name}
entity: {entity}
trigger: create
actions:
  - create_task: {{title: "{name}"}}
  - notify: {{webhook: "{url}", message: "{{entity_id}}"}}
"""

# Sample names a family of each type exposes (prometheus_client's parser strips them).
SUFFIXES = {
    "counter": ("_total",),
    "histogram": ("_bucket", "_sum", "_count"),
    "gaugehistogram": ("_bucket", "_gsum", "_gcount"),
    "summary": ("_sum", "_count"),
    "info": ("_info",),
}


def sample_names(text: str) -> set[str]:
    """Every sample name a scrape's families expose, those without samples yet included."""
    names: set[str] = set()
    for family in text_string_to_metric_families(text):
        names.add(family.name)
        names.update(family.name + suffix for suffix in SUFFIXES.get(family.type, ()))
        names.update(s.name for s in family.samples)
    return names


def lines(text: str) -> set[str]:
    return set(text.splitlines())


async def test_workers_and_the_api_export_what_operators_and_the_alerts_use(
    make_settings: Callable[..., Settings],
    redis: Redis,
    pool: AsyncConnectionPool[Any],
    tmp_path: Path,
) -> None:
    settings = make_settings(max_attempts=1)
    keys = Keys(settings.prefix)
    port, log = free_port(), tmp_path / "worker.log"
    with serve() as receiver:
        for name, entity, reply in (("ok", "policy", Reply(200)), ("bad", "evidence", Reply(500))):
            url = receiver.plan(f"/{name}", reply)
            await apply(pool, TELL.format(name=name, entity=entity, url=url))
        with log.open("wb") as stderr:
            proc = start_cli_worker(
                settings, "--concurrency", "1", "--metrics-port", str(port), stderr=stderr,
                GOVFLOW_WEBHOOK_SECRET="s3cret",
            )  # fmt: skip
        try:
            await Publisher(redis, keys).publish_many(
                [
                    new_event("policy.created", "POL-1"),
                    new_event("policy.created", "POL-2"),
                    new_event("evidence.created", "EV-1"),
                ]
            )
            await wait_for(
                lambda: statuses(pool),
                lambda s: s == {"completed": 2, "dead_lettered": 1},
                within=60,
                what="2 executions completed, 1 dead-lettered",
            )
            async with httpx.AsyncClient() as http:
                worker = (await http.get(f"http://127.0.0.1:{port}/metrics")).text
            async with (
                serving(create_app(settings)) as api_url,
                httpx.AsyncClient(base_url=api_url) as http,
            ):
                api = (await http.get("/metrics")).text
        finally:
            stop_process(proc)

    assert {
        f'govflow_build_info{{version="{package_version("govflow")}"}} 1.0',
        'govflow_executions_total{outcome="completed",workflow="tell-ok"} 2.0',
        'govflow_executions_total{outcome="dead_lettered",workflow="tell-bad"} 1.0',
        'govflow_steps_total{action="create_task",outcome="completed",workflow="tell-ok"} 2.0',
        'govflow_steps_total{action="notify",outcome="completed",workflow="tell-ok"} 2.0',
        'govflow_steps_total{action="notify",outcome="failed",workflow="tell-bad"} 1.0',
        'govflow_step_duration_seconds_count{action="notify"} 3.0',
        'govflow_webhook_requests_total{status_class="2xx"} 2.0',
        'govflow_webhook_requests_total{status_class="5xx"} 1.0',
        "govflow_webhook_duration_seconds_count 3.0",
    } <= lines(worker)
    assert any(line.startswith('govflow_db_pool_size{pool="worker"}') for line in lines(worker))
    # The deployment's figures are the API's alone: no worker scans the streams for them.
    assert "govflow_group_lag" not in worker
    assert "govflow_dead_letters_open" not in worker
    assert {
        "govflow_lag_fresh 1.0",
        "govflow_dead_letters_open 1.0",
        f'govflow_group_lag{{group="actions",stream="{keys.commands()}"}} 0.0',
        'govflow_workers{role="actions",state="live"} 1.0',
    } <= lines(api)
    assert "govflow_steps_total" not in api  # the workers' counters stay with them

    for scrape in (worker, api):
        promtool("check", "metrics", stdin=scrape.encode())
    missing = referenced_metrics() - sample_names(worker) - sample_names(api)
    assert not missing, f"deploy/monitoring names metrics govflow does not export: {missing}"


def test_a_metrics_port_in_use_is_one_line_and_exit_2(settings: Settings) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = start_cli_worker(settings, "--metrics-port", str(port), stderr=subprocess.PIPE)
        try:
            _, stderr = proc.communicate(timeout=60)
        finally:
            stop_process(proc)
    assert proc.returncode == 2
    assert stderr.decode().splitlines() == [
        f"govflow: cannot serve metrics on 127.0.0.1:{port}: Address already in use"
    ]
