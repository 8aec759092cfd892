"""Control fields only from govflow: an HMAC over the entries govflow writes back.

govflow puts entries back on its streams with bookkeeping fields: ``attempt`` (which
delivery this is), ``replay_of`` (the dead letter a replay comes from) and ``hold`` (the
entity order an entry keeps). A producer writes to the same streams, so it could write
them too: ``attempt`` 5 would make an event's first transient failure final, and
``replay_of`` would run an execution that was dead-lettered. Every entry govflow writes
back therefore carries a seal, an HMAC-SHA256 over all its fields under a key kept in
Redis (``Keys.seal``), which producers cannot read; the fields of an entry with no valid
seal are read without its control fields, as a producer's plain event.

``hold`` is not sealed: a token gives an entry a place only when it is the token govflow
recorded in front of its entity (the ``held`` hash, which producers cannot write), and
otherwise the entry waits behind its entity like any other (``consumers.ordering``). So
a producer's token grants nothing; sealing it would strand the entries parked behind a
hold when an upgrade (or a lost key) made their tokens unreadable.

The key is made by the first worker (``SET NX``); the operator's replay reads it. Entries
written back before a deployment had a key, or after its Redis lost it, lose their
control fields once: an attempt counts from 1 again, a replay runs as a plain delivery.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Collection, Mapping

SEAL_FIELD = b"seal"


class Seal:
    """Sign the fields of entries govflow writes back; strip unsigned control fields."""

    def __init__(self, key: bytes, control: Collection[bytes]) -> None:
        self._key = key
        self._control = frozenset(control)

    def sign(self, fields: Mapping[bytes, bytes]) -> dict[bytes, bytes]:
        """``fields`` with a seal over them, when they hold a control field.

        The fields come back as text (bytes that are not UTF-8 replaced), as the scripts
        that write them back carry them: the seal is over what will be read.
        """
        out = {_text(k): _text(v) for k, v in fields.items() if k != SEAL_FIELD}
        if not self._control.isdisjoint(out):
            out[SEAL_FIELD] = self._mac(out)
        return out

    def verify(self, fields: Mapping[bytes, bytes]) -> dict[bytes, bytes]:
        """``fields`` without the seal, and without control fields unless it is valid."""
        given = fields.get(SEAL_FIELD)
        rest = {k: v for k, v in fields.items() if k != SEAL_FIELD}
        if self._control.isdisjoint(rest):
            return rest
        if given is not None and hmac.compare_digest(given, self._mac(rest)):
            return rest
        return {k: v for k, v in rest.items() if k not in self._control}

    def _mac(self, fields: Mapping[bytes, bytes]) -> bytes:
        mac = hmac.new(self._key, digestmod=hashlib.sha256)
        for name in sorted(fields):  # length-prefixed, so no two field sets read alike
            for part in (name, fields[name]):
                mac.update(len(part).to_bytes(8, "big"))
                mac.update(part)
        return mac.hexdigest().encode()


def _text(value: bytes) -> bytes:
    return value.decode(errors="replace").encode()
