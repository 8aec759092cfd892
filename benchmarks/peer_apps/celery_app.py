"""Celery (Redis broker): each job as two tasks, late acknowledgement (at least once).

Worker: ``celery -A benchmarks.peer_apps.celery_app worker -Q $BENCH_QUEUE``; for the
notify job, with ``--pool gevent`` (``peers.PEERS``).
Producer: ``python -m benchmarks.peer_apps.celery_app RUN N RATE [drain|notify]``.
"""

# mypy: disable-error-code="import-not-found,untyped-decorator"
# (the peers' packages live in benchmarks/.peers/py, not in govflow's environment)

from __future__ import annotations

import threading
from typing import Any

import psycopg
import requests
from celery import Celery
from requests.adapters import HTTPAdapter

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
_connections = common.Connections()  # the notify job's, shared by its greenlets
# One session (one pool of keep-alive connections) for every greenlet: the gevent pool
# starts a greenlet per task, so a session per greenlet would connect anew for each, and
# greenlets switch only on I/O, so sharing one is safe.
_http = requests.Session()
_http.mount("http://", HTTPAdapter(pool_maxsize=common.IO_SLOTS))


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


@app.task(name="bench.notify_record")
def notify_record(event: dict[str, Any]) -> None:
    with _connections.connection() as db:
        job = common.record(db, event, common.NOTIFY)
    notify.delay(job)


# A failed task is acknowledged all the same (task_acks_on_failure_or_timeout), so a
# webhook that fails is retried by the task, 3 times, as Dramatiq and BullMQ retry theirs.
@app.task(name="bench.notify", autoretry_for=(requests.RequestException,), max_retries=3)
def notify(job: dict[str, Any]) -> None:
    body, headers = common.webhook(job)
    answer = _http.post(common.WEBHOOK_URL, data=body, headers=headers, timeout=10)
    answer.raise_for_status()
    with _connections.connection() as db:
        common.notified(db, job, answer.status_code)


def send(events: list[dict[str, Any]]) -> None:
    for event in events:
        record.delay(event)


def send_notify(events: list[dict[str, Any]]) -> None:
    for event in events:
        notify_record.delay(event)


if __name__ == "__main__":
    common.produce_from_argv({"drain": send, "notify": send_notify})
