"""The outbox frontier: the highest row id the relay may publish without breaking id order.

Every outbox row draws its id while its transaction holds a shared advisory lock
(``ORDER_LOCK_KEY``, taken by the id's default: migration ``0005_outbox_order.sql``) and
keeps it until the transaction ends. So, once the relay has read the last id drawn, ``L``,
and then the transactions holding that lock, every id up to ``L`` belongs to one of them
or to a transaction already ended; when none of them holds the lock any longer, each row
up to ``L`` is committed (and visible) or rolled back for good, and rows up to ``L`` can be
published in id order without a lower id ever turning up later.

Transactions that insert nothing into the outbox never take the lock, so a long report or
batch job elsewhere in the database never holds the relay back. A service transaction that
inserted into the outbox and stays open does: rows drawn after its id wait for it, up to
``max_wait_s``; past that the relay publishes what is committed and logs
``relay.order_wait_exceeded``, and the late row goes out when it commits, after higher ids.
"""

from __future__ import annotations

import time
from typing import Any

import psycopg
import structlog

log = structlog.get_logger(__name__)

ORDER_LOCK_KEY = int.from_bytes(b"govflowo", "big")  # the key 0005_outbox_order.sql takes
MAX_WAIT_S = 60.0

_LAST_DRAWN = "SELECT coalesce(pg_sequence_last_value('outbox_id_seq'), 0)"
# pg_locks shows a bigint advisory key as its high and low 32 bits, with objsubid 1.
_HOLDERS = (
    "SELECT coalesce(array_agg(virtualtransaction), '{}') FROM pg_locks"
    " WHERE locktype = 'advisory' AND objsubid = 1"
    " AND classid = (%(key)s >> 32)::oid AND objid = (%(key)s & 4294967295)::oid"
    " AND database = (SELECT oid FROM pg_database WHERE datname = current_database())"
)
_STILL_HOLDING = (
    _HOLDERS.replace("SELECT coalesce(array_agg(virtualtransaction), '{}')", "SELECT count(*)")
    + " AND virtualtransaction = ANY(%(holders)s)"
)


class _Sighting:
    """The last id drawn, and the transactions that might still commit an id up to it."""

    def __init__(self, last_drawn: int, holders: list[str]) -> None:
        self.last_drawn = last_drawn
        self.holders = holders
        self.seen_at = time.monotonic()


class Frontier:
    """Track the highest outbox id that no open transaction can still fill in below.

    Args:
        max_wait_s: how long rows may wait behind one open outbox transaction.
    """

    def __init__(self, max_wait_s: float = MAX_WAIT_S) -> None:
        self._max_wait_s = max_wait_s
        self._safe = 0
        self._sighting: _Sighting | None = None

    async def advance(self, conn: psycopg.AsyncConnection[Any]) -> int:
        """The highest id that may be published now (rows up to it are final).

        A few small queries: the last id drawn and the lock's holders, then whether
        those holders are gone. Called on the relay's own connection, outside a
        transaction, so each query sees the commits made before it.
        """
        for _ in range(2):  # settle the last sighting, then look again at once
            if self._sighting is None:
                self._sighting = await _sight(conn)
            sighting = self._sighting
            if sighting.holders and await _still_holding(conn, sighting.holders):
                waited = time.monotonic() - sighting.seen_at
                if waited < self._max_wait_s:
                    return self._safe
                log.warning(
                    "relay.order_wait_exceeded",
                    waited_s=round(waited, 1),
                    up_to_id=sighting.last_drawn,
                    open_transactions=len(sighting.holders),
                )
            self._safe = max(self._safe, sighting.last_drawn)
            self._sighting = None
        return self._safe


async def _sight(conn: psycopg.AsyncConnection[Any]) -> _Sighting:
    # In this order: a transaction that drew an id up to the one read first already
    # held the lock, so the second read finds it unless it has ended.
    cur = await conn.execute(_LAST_DRAWN)
    row = await cur.fetchone()
    last_drawn = int(row[0]) if row else 0
    cur = await conn.execute(_HOLDERS, {"key": ORDER_LOCK_KEY})
    holders = await cur.fetchone()
    return _Sighting(last_drawn, list(holders[0]) if holders else [])


async def _still_holding(conn: psycopg.AsyncConnection[Any], holders: list[str]) -> bool:
    cur = await conn.execute(_STILL_HOLDING, {"key": ORDER_LOCK_KEY, "holders": holders})
    row = await cur.fetchone()
    return bool(row and row[0])
