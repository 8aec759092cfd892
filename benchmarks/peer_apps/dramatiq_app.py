"""Dramatiq (Redis broker): the job as two actors; messages are acknowledged after the job.

Worker: ``dramatiq benchmarks.peer_apps.dramatiq_app``.
Producer: ``python -m benchmarks.peer_apps.dramatiq_app RUN N RATE``.
"""

# mypy: disable-error-code="import-not-found,untyped-decorator"
# (the peers' packages live in benchmarks/.peers/py, not in govflow's environment)

from __future__ import annotations

import threading
from typing import Any

import dramatiq
import psycopg
from dramatiq.brokers.redis import RedisBroker

from benchmarks.peer_apps import common

broker = RedisBroker(url=common.REDIS_URL, namespace=f"{common.QUEUE}-dramatiq")
dramatiq.set_broker(broker)
_local = threading.local()


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


def send(events: list[dict[str, Any]]) -> None:
    for event in events:
        record.send(event)


if __name__ == "__main__":
    common.produce_from_argv(send)
