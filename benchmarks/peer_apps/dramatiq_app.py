"""Dramatiq (Redis broker): each job as two actors; messages are acknowledged after the job.

Worker: ``dramatiq benchmarks.peer_apps.dramatiq_app``; for the notify job, with more
threads (``peers.PEERS``).
Producer: ``python -m benchmarks.peer_apps.dramatiq_app RUN N RATE [drain|notify]``.
"""

# mypy: disable-error-code="import-not-found,untyped-decorator"
# (the peers' packages live in benchmarks/.peers/py, not in govflow's environment)

from __future__ import annotations

import threading
from typing import Any

import dramatiq
import psycopg
import requests
from dramatiq.brokers.redis import RedisBroker

from benchmarks.peer_apps import common

broker = RedisBroker(url=common.REDIS_URL, namespace=f"{common.QUEUE}-dramatiq")
dramatiq.set_broker(broker)
_local = threading.local()
_connections = common.Connections()  # the notify job's, shared by its threads


def conn() -> psycopg.Connection[Any]:
    """This worker thread's one connection."""
    if not hasattr(_local, "conn"):
        _local.conn = psycopg.connect(common.DATABASE_URL, autocommit=True)
    connection: psycopg.Connection[Any] = _local.conn
    return connection


@dramatiq.actor(queue_name=common.QUEUE, max_retries=3)
def record(event: dict[str, Any]) -> None:
    effects.send(common.record(conn(), event))


@dramatiq.actor(queue_name=common.QUEUE, max_retries=3)
def effects(job: dict[str, Any]) -> None:
    common.effects(conn(), job)


def http() -> requests.Session:
    """This worker thread's session: its own keep-alive connection to the receiver.

    A ``Session`` is not promised to be thread-safe; the worker threads live as long as
    the worker, so one each costs one connection each.
    """
    if not hasattr(_local, "http"):
        _local.http = requests.Session()
    session: requests.Session = _local.http
    return session


@dramatiq.actor(queue_name=common.QUEUE, max_retries=3)
def notify_record(event: dict[str, Any]) -> None:
    with _connections.connection() as db:
        job = common.record(db, event, common.NOTIFY)
    notify.send(job)


@dramatiq.actor(queue_name=common.QUEUE, max_retries=3)
def notify(job: dict[str, Any]) -> None:
    body, headers = common.webhook(job)
    answer = http().post(common.WEBHOOK_URL, data=body, headers=headers, timeout=10)
    answer.raise_for_status()  # retried by the Retries middleware
    with _connections.connection() as db:
        common.notified(db, job, answer.status_code)


def send(events: list[dict[str, Any]]) -> None:
    for event in events:
        record.send(event)


def send_notify(events: list[dict[str, Any]]) -> None:
    for event in events:
        notify_record.send(event)


if __name__ == "__main__":
    common.produce_from_argv({"drain": send, "notify": send_notify})
