"""The transactional outbox: publish an event by committing it with your own change.

Call ``enqueue`` (async psycopg) or ``enqueue_sync`` (plain psycopg: Flask, Django,
scripts) on the connection that makes the business change, inside the same transaction.
The event is a row of ``outbox`` until ``govflow run --role relay`` publishes it to the
stream: a rollback drops it with the change, and a commit while Redis is down is
published once Redis is back. No Redis connection is needed to enqueue::

    async with await psycopg.AsyncConnection.connect(url) as conn, conn.transaction():
        await conn.execute("UPDATE policies SET status = %s WHERE id = %s", (to, policy_id))
        await enqueue(conn, new_event("policy.status_changed", policy_id, data=..., changes=...))

Services in other languages insert the wire JSON with plain SQL instead: see
``deploy/examples/outbox.sql`` and ``deploy/examples/node-producer/``.
"""

from __future__ import annotations

from govflow.db.outbox import enqueue, enqueue_sync

__all__ = ["enqueue", "enqueue_sync"]
