"""Celery (Redis broker): the job as two tasks, late acknowledgement (at least once).

Worker: ``celery -A benchmarks.peer_apps.celery_app worker -Q $BENCH_QUEUE``.
Producer: ``python -m benchmarks.peer_apps.celery_app RUN N RATE``.
"""

# mypy: disable-error-code="import-not-found,untyped-decorator"
# (the peers' packages live in benchmarks/.peers/py, not in govflow's environment)

from __future__ import annotations

import threading
from typing import Any

import psycopg
from celery import Celery

from benchmarks.peer_apps import common

app = Celery("bench", broker=common.REDIS_URL)
app.conf.update(
    task_default_queue=common.QUEUE,
    task_acks_late=True,  # acknowledged after the job, as govflow and the other peers do
    task_ignore_result=True,
    worker_prefetch_multiplier=4,
    worker_hijack_root_logger=False,
    broker_transport_options={"global_keyprefix": f"{common.QUEUE}:"},
    broker_connection_retry_on_startup=True,
)

_local = threading.local()


def conn() -> psycopg.Connection[Any]:
    """This worker thread's one connection."""
    if not hasattr(_local, "conn"):
        _local.conn = psycopg.connect(common.DATABASE_URL, autocommit=True)
    connection: psycopg.Connection[Any] = _local.conn
    return connection


@app.task(name="bench.record")
def record(event: dict[str, Any]) -> None:
    effects.delay(common.record(conn(), event))


@app.task(name="bench.effects")
def effects(job: dict[str, Any]) -> None:
    common.effects(conn(), job)


def send(events: list[dict[str, Any]]) -> None:
    for event in events:
        record.delay(event)


if __name__ == "__main__":
    common.produce_from_argv(send)
