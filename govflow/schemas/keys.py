"""The names of govflow's Redis keys, and which partition an entity belongs to.

With one partition (the default) the keys are ``{prefix}:events``,
``{prefix}:commands``, ``{prefix}:retry`` and ``{prefix}:dead``. With ``N`` partitions
each key gets a Redis Cluster hash tag, ``{prefix}:events:{p3}``: a partition's streams,
retry set, dead-letter stream and lease share one slot, so every Lua script and
multi-key command stays inside it, while partitions spread across shards. With one
partition the names have no tag and land in different slots: a worker refuses to run on a
Redis Cluster with one partition (``govflow.runtime.worker``).
"""

from __future__ import annotations

import zlib
from typing import Literal

import msgspec

Role = Literal["events", "commands"]
GROUP_OF: dict[Role, str] = {"events": "triggers", "commands": "actions"}


class Keys(msgspec.Struct, frozen=True):
    """Key names for one deployment prefix."""

    prefix: str = "govflow"
    partitions: int = 1

    def _key(self, name: str, partition: int) -> str:
        if self.partitions == 1:
            return f"{self.prefix}:{name}"
        return f"{self.prefix}:{name}:{{p{partition}}}"

    def stream(self, role: Role, partition: int = 0) -> str:
        """The stream of events or commands of a partition."""
        return self._key(role, partition)

    def events(self, partition: int = 0) -> str:
        """The stream policy services publish to."""
        return self._key("events", partition)

    def commands(self, partition: int = 0) -> str:
        """The stream of workflow-execution commands."""
        return self._key("commands", partition)

    def retry(self, partition: int = 0) -> str:
        """The sorted set of entries waiting for their retry, scored by due time (ms)."""
        return self._key("retry", partition)

    def dead(self, partition: int = 0) -> str:
        """The dead-letter stream."""
        return self._key("dead", partition)

    def lease(self, group: str, partition: int = 0) -> str:
        """The key whose holder owns a partition for one group (``consumers.partitions``)."""
        return self._key(f"lease:{group}", partition)

    def meta(self) -> str:
        """The hash of what the deployment records about itself (its partition count).

        Read and written alone, never with another key, so it needs no hash tag.
        """
        return f"{self.prefix}:meta"

    def seal(self) -> str:
        """The key of the HMAC that seals the control fields govflow writes
        (``consumers.seal``); read and written alone, so it needs no hash tag."""
        return f"{self.prefix}:seal"

    def pause(self, group: str) -> str:
        """The key that, while it exists, pauses every consumer of a group
        (``consumers.pause``); read and written alone, so it needs no hash tag."""
        return f"{self.prefix}:pause:{group}"

    def workers(self, group: str) -> str:
        """The sorted set of the workers of a group, scored by their last heartbeat (ms)."""
        return f"{self.prefix}:workers:{group}"

    def heartbeat(self, worker_id: str) -> str:
        """The hash one worker process writes about itself (``runtime.heartbeat``)."""
        return f"{self.prefix}:heartbeat:{worker_id}"

    def heartbeats(self) -> str:
        """The sorted set of every worker that wrote a heartbeat, scored by its last (ms)."""
        return f"{self.prefix}:heartbeats"

    def held(self, group: str, partition: int = 0) -> str:
        """The hash of entities whose order is held, entity id -> the entry in front."""
        return self._key(f"held:{group}", partition)

    def parked(self, group: str, entity_id: str, partition: int = 0) -> str:
        """The list of an entity's entries waiting behind the one in front, oldest first.

        The entity id comes after the hash tag, so a ``{`` in it cannot move the key.
        """
        return f"{self._key(f'parked:{group}', partition)}:{entity_id}"

    def partition_of(self, entity_id: str) -> int:
        """The partition of an entity: a stable hash, the same in every language (CRC-32)."""
        return zlib.crc32(entity_id.encode()) % self.partitions

    def all_partitions(self) -> range:
        """Every partition number."""
        return range(self.partitions)
