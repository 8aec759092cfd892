"""govflow on a real Redis Cluster: 3 primaries, 3 replicas, 8 partitions.

What is checked here: the Lua hand-overs and their fencing on a cluster; that one
partition on a cluster is refused; that partitions rebalance between workers without
ever being consumed by two; that a worker whose lease is taken cannot acknowledge; that
three worker processes run every event once, in each entity's publish order, through a
worker killed with SIGKILL; and what a primary's failover loses, with and without
``WAIT``-based publishing.
"""

from __future__ import annotations

import json
import secrets
import signal
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import anyio
import msgspec
import pytest
from psycopg_pool import AsyncConnectionPool

from benchmarks.cluster import Cluster, lease_owners
from govflow.consumers import scripts
from govflow.consumers.scripts import EntityOrder, Fence
from govflow.consumers.streams import HOLD_FIELD, RedisClient, Streams
from govflow.producers.publish import Publisher, PublishRetry
from govflow.runtime.worker import Worker
from govflow.schemas.errors import ConfigError, PublishError
from govflow.schemas.events import Change, Event, new_event
from govflow.schemas.keys import Keys
from govflow.schemas.settings import Settings
from tests.cluster.conftest import PARTITIONS
from tests.cluster.helpers import drained, pid_of, start_worker_process
from tests.pipeline_helpers import apply, fetch, running_worker, statuses, terminate, wait_for
from tests.webhook_server import Reply, serve

pytestmark = [pytest.mark.anyio, pytest.mark.cluster, pytest.mark.slow]
T = TypeVar("T")


async def test_hand_overs_are_fenced_and_keep_holds_on_a_cluster(
    cluster_redis: RedisClient, cluster_prefix: str, redis_cluster: Cluster
) -> None:
    keys = Keys(cluster_prefix, PARTITIONS)
    streams = Streams(cluster_redis)
    p, group = 5, "actions"
    stream, lease, held = keys.commands(p), keys.lease(group, p), keys.held(group, p)
    await streams.ensure_group(stream, group)
    for i in range(4):
        await cluster_redis.xadd(stream, {"command": f"c{i}"})
    batch = await streams.read(stream, group, "w1", 10, 100)
    assert len(batch) == 4
    await cluster_redis.set(lease, "w1")
    fence = Fence(lease, "w1")

    def parked(entity: str) -> str:
        return keys.parked(group, entity, p)

    def order(entity: str, token: str) -> EntityOrder:
        return EntityOrder(entity=entity, token=token, held=held, parked=parked(entity))

    # A server that forgot the scripts (a restart, a failover) is given them again.
    for node in redis_cluster.alive():
        with node.client() as client:
            client.script_flush()
    hold = order("POL-1", batch[1].id)
    replies = await streams.run_in_order(
        [
            scripts.acknowledge(stream=stream, group=group, ids=[batch[0].id], fence=fence),
            scripts.ack_and_schedule_retry(
                stream=stream,
                group=group,
                entry_id=batch[1].id,
                retry_set=keys.retry(p),
                delay_ms=60_000,
                to="commands",
                fields={**batch[1].fields, HOLD_FIELD: hold.token.encode()},
                fence=fence,
                order=hold,
            ),
            scripts.ack_and_park(
                stream=stream,
                group=group,
                entry_id=batch[2].id,
                fields={**batch[2].fields, HOLD_FIELD: batch[2].id.encode()},
                fence=fence,
                order=order("POL-1", batch[2].id),
            ),
        ]
    )
    assert replies == [1, 1, 1]
    assert await streams.holders(held, ["POL-1", "POL-2"]) == {"POL-1": batch[1].id}
    assert await cluster_redis.llen(parked("POL-1")) == 1
    assert await cluster_redis.zcard(keys.retry(p)) == 1

    # Another worker takes the lease: the last entry cannot be acknowledged by w1.
    await cluster_redis.set(lease, "w2")
    fenced = await streams.run_in_order(
        [scripts.acknowledge(stream=stream, group=group, ids=[batch[3].id], fence=fence)]
    )
    assert fenced == [-1]
    pending: Any = await cluster_redis.xpending(stream, group)
    assert pending["pending"] == 1

    # The retried entry ends (dead-lettered): the parked one goes back on the stream in
    # front, and holds the entity in its turn.
    await cluster_redis.set(lease, "w1")
    added: Any = await cluster_redis.xadd(stream, {"command": "c1", "hold": hold.token})
    retried = added.decode()
    await streams.read(stream, group, "w1", 10, 100)
    assert await streams.run_in_order(
        [
            scripts.ack_and_dead_letter(
                stream=stream,
                group=group,
                entry_id=retried,
                dead_stream=keys.dead(p),
                letter={"error": "gave up"},
                fence=fence,
                order=hold,
            )
        ]
    ) == [1]
    assert await cluster_redis.xlen(keys.dead(p)) == 1
    assert await streams.holders(held, ["POL-1"]) == {"POL-1": batch[2].id}
    released = await streams.read(stream, group, "w1", 10, 100)
    assert [e.field(HOLD_FIELD) for e in released] == [batch[2].id.encode()]


async def test_one_partition_on_a_cluster_is_refused(
    cluster_settings: Callable[..., Settings], tmp_path: Path
) -> None:
    settings = cluster_settings(partitions=1)
    with pytest.raises(ConfigError, match="GOVFLOW_PARTITIONS >= 2"):
        await Worker(settings, frozenset({"actions"})).run()
    log = tmp_path / "worker.log"
    proc = start_worker_process(settings, log)
    assert proc.wait(60) == 2
    text = log.read_text()
    assert "Traceback" not in text
    assert text.strip().splitlines()[-1].startswith("govflow: the Redis URL names a Redis Cluster")


async def test_partitions_rebalance_between_workers_and_are_never_shared(
    cluster_settings: Callable[..., Settings], cluster_redis: RedisClient
) -> None:
    settings = cluster_settings(lease_ttl=1.5)
    keys = settings.keys()
    everything = frozenset(keys.all_partitions())
    samples = 0

    async with running_worker(settings, frozenset({"actions"})) as first:
        (a,) = first.leases
        await wait_for(lambda: _now(a.owned()), lambda o: o == everything, within=10,
                       what="the first worker holding every partition")  # fmt: skip

        async def sample_until(done: Callable[[], bool], within: float, what: str) -> None:
            """Sample both workers' partitions and the lease keys until ``done()``."""
            nonlocal samples
            deadline = time.monotonic() + within
            while not done():
                assert time.monotonic() < deadline, f"timed out waiting for {what}"
                held_a, held_b = a.reading(), b.reading()
                assert not held_a & held_b, f"both read {sorted(held_a & held_b)}"
                owners = await lease_owners(cluster_redis, keys, "actions")
                # A partition readable before and after the look-up was leased all along.
                for p in held_a & a.reading():
                    assert owners[p] == a.worker_id, (p, owners[p])
                for p in held_b & b.reading():
                    assert owners[p] == b.worker_id, (p, owners[p])
                samples += 1
                await anyio.sleep(0.02)

        async with running_worker(settings, frozenset({"actions"})) as second:
            (b,) = second.leases
            # Within a few lease periods the two hold four partitions each.
            await sample_until(
                lambda: len(a.owned()) == 4 and len(b.owned()) == 4, 10, "a 4/4 split"
            )
            assert a.owned() | b.owned() == everything
        # The second worker left gracefully: its leases were given up, not left to lapse.
        await sample_until(lambda: a.owned() == everything, 5, "the first taking all back")
    assert samples > 5  # the split was watched, not just its end


async def _now(value: T) -> T:
    """``value``, as the awaitable ``wait_for`` polls."""
    return value


FENCE_WORKFLOW = """
name: fenced
entity: policy
trigger: create
actions:
  - notify: {{webhook: "http://127.0.0.1:{port}/slow"}}
"""


async def test_a_worker_whose_lease_is_taken_does_not_acknowledge(
    cluster_settings: Callable[..., Settings],
    cluster_redis: RedisClient,
    pool: AsyncConnectionPool[Any],
) -> None:
    settings = cluster_settings()
    keys = settings.keys()
    with serve() as hooks:
        hooks.plan("/slow", Reply(200, delay=2.0))
        await apply(pool, FENCE_WORKFLOW.format(port=hooks.port))
        event = new_event("policy.created", "POL-7")
        p = keys.partition_of(event.entity_id)
        stream, lease = keys.commands(p), keys.lease("actions", p)
        async with running_worker(settings) as worker:
            _, actions = worker.leases
            await Publisher(cluster_redis, keys).publish(event)
            await wait_for(lambda: _now(len(hooks.requests_to("/slow"))), lambda n: n == 1,
                           within=20, what="the webhook in hand")  # fmt: skip
            # While the batch is in hand, another worker takes the partition over.
            await cluster_redis.set(lease, "another-worker", px=60_000)
            await wait_for(lambda: _now(actions.consuming()), lambda c: p not in c,
                           within=10, what="the fenced consumer stopping")  # fmt: skip
            pending: Any = await cluster_redis.xpending(stream, "actions")
            assert pending["pending"] == 1, "a fenced worker acknowledged"
            assert [c["name"].decode() for c in pending["consumers"]] == [actions.worker_id]
            assert await cluster_redis.get(lease) == b"another-worker"
            # The effect was committed before the hand-over (and is idempotent).
            assert await statuses(pool) == {"completed": 1}

            # The lease is free again: the worker takes the partition back, finds the
            # execution completed and acknowledges it without running it again.
            await cluster_redis.delete(lease)
            await wait_for(lambda: _xpending(cluster_redis, stream), lambda n: n == 0,
                           within=15, what="the entry acknowledged by the new owner")  # fmt: skip
        assert len(hooks.requests_to("/slow")) == 1
        assert await fetch(pool, "SELECT count(*) FROM notifications") == [(1,)]


async def _xpending(redis: RedisClient, stream: str) -> int:
    summary: Any = await redis.xpending(stream, "actions")
    return int(summary["pending"])


ORDERED_WORKFLOW = """
name: ordered-review
entity: policy
trigger: status_change
ordering: entity
actions:
  - notify: {{webhook: "http://127.0.0.1:{port}/h/{{entity_id}}/{{data.seq}}"}}
  - create_task: {{title: "{{data.seq}}"}}
"""
ENTITIES, STEPS = 50, 6
STATUS = ["draft", "pending_approval", "under_review", "approved", "published", "retired"]


def status_changes() -> list[Event]:
    """``STEPS`` status changes of each of ``ENTITIES`` policies, interleaved: the order
    the test expects each entity's executions in is ``data.seq``."""
    return [
        new_event(
            "policy.status_changed",
            f"POL-{i}",
            data={"status": STATUS[seq - 1], "seq": seq},
            changes={
                "status": Change(from_=STATUS[seq - 2] if seq > 1 else None, to=STATUS[seq - 1])
            },
        )
        for seq in range(1, STEPS + 1)
        for i in range(ENTITIES)
    ]


@pytest.mark.timeout(300)  # three interpreters start on a machine that may be busy
async def test_three_workers_keep_each_entitys_order_through_retries_and_a_kill(
    cluster_settings: Callable[..., Settings],
    cluster_redis: RedisClient,
    pool: AsyncConnectionPool[Any],
    tmp_path: Path,
) -> None:
    settings = cluster_settings()
    keys = settings.keys()
    total = ENTITIES * STEPS
    with serve() as hooks:
        # Every seventh entity's second change fails once (a 503): it is retried, and that
        # entity's later changes must wait for it.
        for i in range(ENTITIES):
            for seq in range(1, STEPS + 1):
                flaky = i % 7 == 0 and seq == 2
                replies = [Reply(503), Reply(200)] if flaky else [Reply(200)]
                hooks.plan(f"/h/POL-{i}/{seq}", *replies)
        await apply(pool, ORDERED_WORKFLOW.format(port=hooks.port))
        logs = [tmp_path / f"worker-{n}.log" for n in range(3)]
        procs = [start_worker_process(settings, log) for log in logs]
        try:
            await wait_for(lambda: _distinct(lease_owners(cluster_redis, keys, "actions")),
                           lambda n: n == 3, within=150, what="three workers sharing the partitions")  # fmt: skip
            await Publisher(cluster_redis, keys).publish_many(status_changes())
            # Mid-run, one worker dies without a word; its leases lapse and are taken over.
            await wait_for(lambda: _completed(pool), lambda n: n >= total // 4, within=60,
                           what="a quarter of the executions completed")  # fmt: skip
            victim = procs[0]
            victim.send_signal(signal.SIGKILL)
            victim.wait(10)
            await wait_for(lambda: statuses(pool), lambda s: s == {"completed": total},
                           within=90, what=f"{total} executions completed")  # fmt: skip
            survivors = {procs[1].pid, procs[2].pid}
            for group in ("triggers", "actions"):
                owners = await wait_for(
                    lambda g=group: lease_owners(cluster_redis, keys, g),  # type: ignore[misc]
                    lambda o: all(v is not None and pid_of(v) in survivors for v in o),
                    within=30,
                    what=f"the survivors holding every {group} partition",
                )
                assert len(set(owners)) == 2
        finally:
            for proc in procs:
                terminate(proc, grace=20)

    # Every event ran once: one execution each, one effect per step.
    assert await fetch(pool, "SELECT count(*), count(DISTINCT event_id) FROM workflow_executions") == [(total, total)]  # fmt: skip
    assert await fetch(pool, "SELECT count(*) FROM tasks") == [(total,)]
    assert await fetch(pool, "SELECT count(*) FROM notifications") == [(total,)]
    # In order: each entity's webhooks arrived in publish order (a retried one repeats,
    # nothing overtakes it), and its executions finished in publish order.
    calls: dict[str, list[int]] = {}
    for request in hooks.received:
        _, _, entity, step = request.path.split("/")
        calls.setdefault(entity, []).append(int(step))
    for entity, seqs in calls.items():
        assert seqs == sorted(seqs), f"{entity} ran out of order: {seqs}"
        assert sorted(set(seqs)) == list(range(1, STEPS + 1)), entity
    for i in range(0, ENTITIES, 7):
        assert calls[f"POL-{i}"].count(2) >= 2, "the failing change was not retried"
    rows = await fetch(
        pool,
        "SELECT e.entity_id, t.title::int, e.finished_at FROM workflow_executions e"
        " JOIN tasks t ON t.execution_id = e.id ORDER BY e.entity_id, t.title::int",
    )
    finished: dict[str, list[Any]] = {}
    for entity, _, at in rows:
        finished.setdefault(entity, []).append(at)
    for entity, times in finished.items():
        assert times == sorted(times), f"{entity} finished out of order"


async def _distinct(owners: Awaitable[list[str | None]]) -> int:
    return len({o for o in await owners if o is not None})


async def _completed(pool: AsyncConnectionPool[Any]) -> int:
    return (await statuses(pool)).get("completed", 0)


CREATED_WORKFLOW = """
name: on-create
entity: policy
trigger: create
actions:
  - create_task: {title: "Review {data.title}"}
"""
PUBLISHERS = 4  # concurrent publishing tasks: writes in flight when the primary dies


class Phase(msgspec.Struct):
    """What one failover did to the events published through it."""

    wait_replicas: int
    acknowledged: int = 0  # publish calls that returned
    refused: int = 0  # publish calls that raised PublishError
    lost: int = 0  # acknowledged, and never run
    gone_from_redis: int = 0  # of those, absent from the stream after the failover
    seconds: float = 0.0


@pytest.mark.timeout(300)  # two failovers and two rejoins
async def test_a_primary_failover_loses_only_unreplicated_writes_and_wait_loses_none(
    cluster_settings: Callable[..., Settings],
    cluster_redis: RedisClient,
    pool: AsyncConnectionPool[Any],
    redis_cluster: Cluster,
) -> None:
    # An execution recorded whose command the failover lost is Postgres's to put back.
    settings = cluster_settings(reconcile_after=2.0)
    keys = settings.keys()
    await apply(pool, CREATED_WORKFLOW)
    phases = [Phase(wait_replicas=0), Phase(wait_replicas=1)]
    async with running_worker(settings):
        for phase in phases:
            published = await _publish_through_failover(redis_cluster, cluster_redis, keys, phase)
            await wait_for(lambda: drained(cluster_redis, keys), bool, within=60,
                           what="every partition drained after the failover")  # fmt: skip
            await wait_for(lambda: statuses(pool), lambda s: set(s) == {"completed"}, within=60,
                           what="every execution completed, those put back included")  # fmt: skip
            rows = await fetch(pool, "SELECT event_id, status FROM workflow_executions")
            ran = {event_id for event_id, status in rows if status == "completed"}
            lost = published - ran
            kept = await _event_ids(cluster_redis, keys)
            phase.lost, phase.gone_from_redis = len(lost), len(lost - kept)
    print(f"failover: {msgspec.json.encode(phases).decode()}")
    # Whatever Redis kept ran, once; what the failover lost is gone from Redis itself.
    assert all(p.lost == p.gone_from_redis for p in phases), phases
    assert phases[1].lost == 0, "a write WAIT saw replicated was lost"
    assert all(p.acknowledged > 100 for p in phases), phases
    assert await fetch(
        pool, "SELECT count(*) = count(DISTINCT event_id) FROM workflow_executions"
    ) == [(True,)]


async def _publish_through_failover(
    cluster: Cluster, redis: RedisClient, keys: Keys, phase: Phase
) -> set[str]:
    """Publish to one shard from several tasks, kill its primary, go on until it failed over.

    Returns the ids of the events whose publishing returned (acknowledged by Redis).
    """
    victim = cluster.primary_of(keys.events(0))
    targets = [p for p in keys.all_partitions() if cluster.primary_of(keys.events(p)) == victim]
    publisher = Publisher(
        redis, keys, retry=PublishRetry(attempts=1), wait_replicas=phase.wait_replicas,
        wait_timeout_ms=500,
    )  # fmt: skip
    acknowledged: set[str] = set()
    done = anyio.Event()

    async def publish() -> None:
        while not done.is_set():
            event = new_event("policy.created", _entity_in(keys, targets), data={"title": "t"})
            try:
                await publisher.publish(event)
            except PublishError:
                phase.refused += 1
                await anyio.sleep(0.05)
            else:
                acknowledged.add(event.id)

    started = time.monotonic()
    async with anyio.create_task_group() as tg:
        for _ in range(PUBLISHERS):
            tg.start_soon(publish)
        await anyio.sleep(1.5)
        cluster.kill(victim)  # SIGKILL: whatever its replica had not received is gone
        await anyio.to_thread.run_sync(cluster.wait_ok)
        await anyio.sleep(0.5)  # publishing goes on against the promoted replica
        done.set()
    phase.acknowledged, phase.seconds = len(acknowledged), time.monotonic() - started
    # The old primary comes back as a replica of the new one (its nodes.conf says so).
    cluster.start(victim)
    await anyio.to_thread.run_sync(cluster.wait_ok)
    await anyio.to_thread.run_sync(cluster.wait_replicated, cluster.primary_of(keys.events(0)))
    return acknowledged


def _entity_in(keys: Keys, partitions: list[int]) -> str:
    """A fresh entity id whose partition is one of ``partitions``."""
    while True:
        entity = f"POL-{secrets.token_hex(4)}"
        if keys.partition_of(entity) in partitions:
            return entity


async def _event_ids(redis: RedisClient, keys: Keys) -> set[str]:
    """The ids of the events every partition's stream holds."""
    found: set[str] = set()
    for p in keys.all_partitions():
        entries: Any = await redis.xrange(keys.events(p))
        found |= {json.loads(fields[b"event"])["id"] for _, fields in entries}
    return found
