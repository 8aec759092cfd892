"""Per-entity order: the events of one entity are handled in the order they were published.

A workflow asks for it with ``ordering: entity``. The order then holds end to end:

- A partition (``consumers.partitions``) has one consumer per group in the whole system,
  so one worker reads an entity's entries, in stream order, which is publish order.
- Inside a batch, ``Sequencer`` runs the entries in rounds: every entry that keeps no
  order plus the first entry of each entity, then the next entry of each entity whose
  previous one ended, and so on. Different entities run side by side in one round (one
  Postgres transaction); one entity's entries never do.
- A retry holds the entity: its later entries are parked behind the retried one, without
  counting an attempt, until it ends (completed or dead-lettered); then they go back on
  the stream one at a time, oldest first (the Lua side is in ``consumers.scripts``).
- An entry fenced off (another worker started its execution since: ``db.fencing``)
  belongs to that worker now, like the entity's later entries of the batch, which were
  claimed with it: they are left pending as they are, neither run nor parked.

With one partition (the default) nothing is leased: ``--concurrency`` consumers, maybe in
several processes, read the one stream. A retry still holds its entity and a batch still
runs in rounds, but two consumers can run consecutive events of one entity in parallel
batches: strict order needs ``GOVFLOW_PARTITIONS`` of 2 or more, on one Redis as on a
cluster.

Which entries keep order: a command whose workflow (its latest enabled definition) says
``ordering: entity``; an event whose entity kind (``policy``, ...) has any enabled
workflow that says so (events are matched after they are ordered, so the simple rule
holds back a little more than it must); and any entry that carries a hold token, so a
definition changed mid-way cannot strand the entries parked behind it.

A retry costs other entities nothing: only the held entity waits. What ordering costs in
throughput, as measured: benchmarks/README.md, "Per-entity order".
"""

from __future__ import annotations

from collections import deque
from collections.abc import Awaitable, Callable, Mapping, Sequence

from govflow.consumers.definitions import Definitions
from govflow.consumers.outcomes import FENCED, Outcome
from govflow.consumers.settle import Verdict
from govflow.consumers.streams import (
    HOLD_FIELD,
    Entry,
    Hold,
    Streams,
    command_of,
    event_of,
    read_at,
)
from govflow.schemas.errors import InvalidEntryError
from govflow.schemas.keys import GROUP_OF, Keys, Role


class Ordering:
    """Decide which entries of a batch keep their entity's order, from the definitions.

    The consumer's ordering layer: with it, a batch some of whose entries keep their
    entity's order runs in rounds (``Sequencer``); any other batch runs as it would
    without it, in one go.
    """

    def __init__(self, definitions: Definitions, streams: Streams, keys: Keys) -> None:
        self._definitions = definitions
        self._streams = streams
        self._keys = keys

    async def rounds(self, role: Role, partition: int, batch: Sequence[Entry]) -> Sequencer | None:
        """The rounds to run ``batch`` in, or None when none of its entries keeps an order."""
        holds = await self.holds(role, batch)
        entities = sorted({h.entity for h in holds if h is not None})
        if not entities:
            return None
        held = self._keys.held(GROUP_OF[role], partition)
        return Sequencer(holds, await self._streams.holders(held, entities))

    async def holds(self, role: Role, batch: Sequence[Entry]) -> list[Hold | None]:
        """For each entry, the entity whose order it keeps and its token, or None."""
        workflows = await self._definitions.enabled(since=read_at(batch))
        ordered = [wf.definition for wf in workflows if wf.definition.ordering == "entity"]
        if not ordered and not any(HOLD_FIELD in e.fields for e in batch):
            return [None] * len(batch)
        names = {wf.name for wf in ordered}
        kinds: set[str] = {wf.entity for wf in ordered}
        return [_hold(role, entry, names, kinds) for entry in batch]


def _hold(role: Role, entry: Entry, names: set[str], kinds: set[str]) -> Hold | None:
    token = entry.field(HOLD_FIELD)
    try:
        if role == "events":
            event = event_of(entry)
            keeps = event.entity in kinds
            entity_id = event.entity_id
        else:
            command = command_of(entry)
            keeps = command.workflow_name in names
            entity_id = command.event.entity_id
    except InvalidEntryError:
        return None  # poison: it is dead-lettered and holds nothing
    if token is not None:
        return Hold(entity_id, token.decode(errors="replace"))  # a producer may write any bytes
    return Hold(entity_id, entry.id) if keeps else None


class Sequencer:
    """Split a batch into rounds so that each entity's entries run one after another.

    Args:
        holds: per entry, the entity whose order it keeps, or None.
        holders: the token of the entry in front of each entity held before the batch
            was read (``Streams.holders``).
    """

    def __init__(self, holds: Sequence[Hold | None], holders: Mapping[str, str]) -> None:
        self.holds = list(holds)
        self.parked: set[int] = set()  # to park behind their entity's hold
        self.fronts: set[int] = set()  # in front of a hold: ending them lifts it
        self.left: set[int] = set()  # behind a fenced entry: left pending, untouched
        self._queues: dict[str, deque[int]] = {}
        self._ready: list[int] = []
        closed: set[str] = set()
        for index, hold in enumerate(self.holds):
            if hold is None:
                self._ready.append(index)
                continue
            holder = holders.get(hold.entity)
            if hold.entity in closed or (holder is not None and holder != hold.token):
                self.parked.add(index)  # behind an entry in front, here or elsewhere
            elif holder is not None:
                self.fronts.add(index)
                self._queues[hold.entity] = deque([index])
                closed.add(hold.entity)
            else:
                self._queues.setdefault(hold.entity, deque()).append(index)
        self._ready += [queue.popleft() for queue in self._queues.values()]

    async def run(
        self, batch: Sequence[Entry], handle: Callable[[list[Entry]], Awaitable[list[Outcome]]]
    ) -> list[Verdict]:
        """Handle ``batch`` round by round; an entry never run is parked behind its entity,
        or left alone behind a fenced one."""
        outcomes: dict[int, Outcome] = {}
        while part := self.next_round():
            found = await handle([batch[i] for i in part])
            for index, outcome in zip(part, found, strict=True):
                outcomes[index] = outcome
                self.ended(index, outcome.kind)
        return [
            Verdict(
                entry=entry,
                outcome=outcomes.get(i, FENCED if i in self.left else None),
                hold=self.holds[i],
                front=i in self.fronts,
            )
            for i, entry in enumerate(batch)
        ]

    def next_round(self) -> list[int]:
        """The entries to run now, in batch order; empty when the batch is done."""
        ready, self._ready = sorted(self._ready), []
        return ready

    def ended(self, index: int, kind: str) -> None:
        """Entry ``index`` ended with ``kind``: its entity's next entry runs, or parks."""
        hold = self.holds[index]
        if hold is None:
            return
        queue = self._queues[hold.entity]
        if kind == "retry":
            self.parked.update(queue)
            queue.clear()
        elif kind == "fenced":
            # Another worker runs this entry now, and most likely the entity's next ones:
            # they are left pending as they are, neither run here nor parked.
            self.left.update(queue)
            queue.clear()
        elif queue:
            self._ready.append(queue.popleft())
