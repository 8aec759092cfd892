"""Webhooks go only where an operator allowed: public addresses, or what the list names.

The checks run on the address connected to: a name is resolved once, every address is
checked, and the connection goes to a checked one. A hostile ``callback`` in event data
that aims a webhook at loopback or a metadata service is dead-lettered, never sent.
"""

from __future__ import annotations

import asyncio
import ipaddress
from collections.abc import Iterator
from typing import Any

import aiohttp
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from psycopg_pool import AsyncConnectionPool
from redis.asyncio import Redis

from govflow.plugins import webhook
from govflow.plugins.egress import EgressPolicy, is_public
from govflow.schemas.errors import PermanentError
from govflow.schemas.events import new_event
from tests._servers import run_async
from tests.faults.receiver import Receiver, receiving
from tests.pipeline_helpers import apply, fetch, publish, running_worker, wait_for

pytestmark = pytest.mark.anyio

NOT_PUBLIC = [
    "127.0.0.1",
    "10.1.2.3",
    "172.16.0.1",
    "192.168.1.1",
    "100.64.0.1",  # shared address space (carrier NAT; Alibaba's metadata service)
    "169.254.169.254",  # the metadata service of AWS, GCP and Azure
    "0.0.0.0",
    "224.0.0.1",
    "::1",
    "fe80::1",
    "fd00:ec2::254",  # AWS's IPv6 metadata service
    "::ffff:127.0.0.1",
    "::ffff:169.254.169.254",
]


@pytest.mark.parametrize("address", NOT_PUBLIC)
def test_an_address_that_is_not_public_is_refused_unless_listed(address: str) -> None:
    ip = ipaddress.ip_address(address)
    assert not is_public(ip)
    with pytest.raises(PermanentError, match="not a public address"):
        EgressPolicy(frozenset()).check_address("hook.example", ip)
    EgressPolicy(frozenset({"hook.example"})).check_address("hook.example", ip)
    EgressPolicy([address]).check_address("hook.example", ip)  # as an address, too


def test_a_listed_network_admits_its_addresses_only() -> None:
    policy = EgressPolicy(["10.0.0.0/8"])
    policy.check_address("internal", ipaddress.ip_address("10.9.8.7"))
    with pytest.raises(PermanentError, match="GOVFLOW_WEBHOOK_ALLOWED_HOSTS"):
        policy.check_address("internal", ipaddress.ip_address("192.168.0.1"))
    with pytest.raises(PermanentError, match="GOVFLOW_WEBHOOK_ALLOWED_HOSTS"):
        policy.check_host("hooks.example.org")


def test_a_public_address_needs_no_list() -> None:
    EgressPolicy(()).check_address("hooks.example.org", ipaddress.ip_address("93.184.216.34"))


async def post(url: str, allowed: frozenset[str]) -> int | PermanentError:
    async with webhook.client(2.0, allowed) as http:
        try:
            return await webhook.deliver(
                http, url, b"{}", idempotency_key="k", keys=["s"], allowed=allowed
            )
        except PermanentError as e:
            return e


async def test_a_name_resolving_to_loopback_is_refused_on_the_resolved_address() -> None:
    with receiving() as hooks:
        url = hooks.url("/hook").replace("127.0.0.1", "localhost")
        refused = await post(url, frozenset())
        assert isinstance(refused, PermanentError)
        assert "localhost resolves to" in str(refused)
        assert "not a public address" in str(refused)
        # Named, the same host is reached, at the address that was checked.
        assert await post(url, frozenset({"localhost"})) == 200
        assert hooks.count("/hook") == 1


HOSTILE = """
name: hostile-callback
entity: policy
trigger: create
actions:
  - create_task: {title: "Review {data.title}"}
  - notify: {webhook: "{data.callback}", message: "done"}
"""


async def run_callbacks(
    make_settings: Any,
    redis: Redis,
    pool: AsyncConnectionPool[Any],
    callbacks: dict[str, str],
    allowed: str,
) -> dict[str, tuple[str, str | None]]:
    """Publish one event per callback; return each entity's execution (status, error)."""
    settings = make_settings(webhook_allowed_hosts=allowed, max_attempts=3)
    await apply(pool, HOSTILE)
    events = [
        new_event("policy.created", entity, data={"title": entity, "callback": url})
        for entity, url in callbacks.items()
    ]
    async with running_worker(settings):
        await publish(redis, settings.keys(), events)
        rows = await wait_for(
            lambda: fetch(
                pool,
                "SELECT entity_id, status, last_error FROM workflow_executions"
                " WHERE status IN ('completed', 'dead_lettered')",
            ),
            lambda rows: len(rows) == len(callbacks),
            within=30,
            what="every execution finished",
        )
    return {entity: (status, error) for entity, status, error in rows}


@pytest.mark.slow
async def test_a_hostile_callback_is_dead_lettered_unsent(
    make_settings: Any, redis: Redis, pool: AsyncConnectionPool[Any]
) -> None:
    with receiving() as hooks:
        callbacks = {
            "LOOPBACK": hooks.url("/loopback"),
            "LOCALHOST": hooks.url("/localhost").replace("127.0.0.1", "localhost"),
            "METADATA": "http://169.254.169.254/latest/meta-data/iam/security-credentials/",
            "METADATA6": "http://[fd00:ec2::254]/latest/meta-data/",
        }
        found = await run_callbacks(make_settings, redis, pool, callbacks, allowed="")
        assert hooks.count() == 0
    for entity, (status, error) in found.items():
        assert status == "dead_lettered", entity
        assert error is not None, entity
        assert "not a public address" in error, (entity, error)
    letters = await fetch(pool, "SELECT error, attempts FROM dead_letters")
    assert len(letters) == len(callbacks)
    assert all(attempts == 1 for _, attempts in letters)  # permanent: never retried
    assert await redis.xlen(make_settings().keys().dead()) == len(callbacks)


@pytest.mark.slow
async def test_a_callback_to_an_allowed_host_is_delivered(
    make_settings: Any, redis: Redis, pool: AsyncConnectionPool[Any]
) -> None:
    with receiving() as hooks:
        callbacks = {"ALLOWED": hooks.url("/ok")}
        found = await run_callbacks(make_settings, redis, pool, callbacks, allowed="127.0.0.1")
        assert hooks.count("/ok") == 1
    assert found == {"ALLOWED": ("completed", None)}


# Loopback written every way a resolver or a URL parser may read it.
LOOPBACK_SPELLINGS = [
    "127.0.0.1",
    "127.1",
    "2130706433",
    "0x7f000001",
    "0177.0.0.1",
    "localhost",
    "LOCALHOST.",
    "[::1]",
    "[::ffff:127.0.0.1]",
    "[::ffff:7f00:1]",
    "[0:0:0:0:0:ffff:7f00:1]",
]
HOSTILE_HOSTS = st.sampled_from(LOOPBACK_SPELLINGS) | st.ip_addresses(network="127.0.0.0/8").map(
    str
)


@pytest.fixture(scope="module")
def loopback_receiver() -> Iterator[Receiver]:
    """One receiver for every generated URL (starting one per example costs seconds)."""
    with receiving() as hooks:
        yield hooks


@settings(max_examples=40, deadline=None)
@given(host=HOSTILE_HOSTS, path=st.text(st.characters(categories=["L", "N"]), max_size=8))
def test_no_spelling_of_loopback_reaches_a_loopback_receiver(
    loopback_receiver: Receiver, host: str, path: str
) -> None:
    url = f"http://{host}:{loopback_receiver.port}/{path}"
    try:
        answer = run_async(post, url, frozenset())
    except (webhook.WebhookUnreachableError, webhook.WebhookTimeoutError):
        answer = None  # not sent as spelt (a name that does not resolve; ::1 unanswered)
    assert answer is None or isinstance(answer, PermanentError), (url, answer)
    assert loopback_receiver.count() == 0, url


class SlowReceiver:
    """An HTTP/1.1 keep-alive server on loopback that answers each POST after a pause,
    counting the connections it accepted and the most requests it held at once."""

    def __init__(self) -> None:
        self.connections = 0
        self.in_flight = 0
        self.most_in_flight = 0

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = next(
                    int(line.split(b":", 1)[1])
                    for line in head.split(b"\r\n")
                    if line.lower().startswith(b"content-length:")
                )
                await reader.readexactly(length)
                self.in_flight += 1
                self.most_in_flight = max(self.most_in_flight, self.in_flight)
                await asyncio.sleep(0.2)
                self.in_flight -= 1
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


async def test_webhooks_to_one_receiver_are_in_flight_together_and_keep_their_connections() -> None:
    """The client's requests are spread over several small pools; together they carry
    as many webhooks at once as the worker allows, over connections kept alive."""
    receiver = SlowReceiver()
    server = await asyncio.start_server(receiver.serve, "127.0.0.1", 0)
    url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/hook"
    allowed = frozenset({"127.0.0.1"})

    async def wave(http: aiohttp.ClientSession) -> list[int]:
        async def one(i: int) -> int:
            return await webhook.deliver(
                http, url, b"{}", idempotency_key=f"k{i}", keys=["s"], allowed=allowed
            )

        return list(await asyncio.gather(*(one(i) for i in range(32))))

    async with server, webhook.client(5.0, allowed, concurrency=32) as http:
        assert await wave(http) == [200] * 32
        assert receiver.most_in_flight == 32
        opened = receiver.connections
        assert await wave(http) == [200] * 32
    assert opened == 32
    assert receiver.connections == opened  # the second wave reused the first's connections


@pytest.mark.parametrize(
    "url",
    [
        "http://user:s3cret@hooks.example.org:70000/in",  # port out of range
        "http://user:s3cret@hooks.example.org:https/in",  # port not a number
        "http://[2001:db8::1/in",  # unclosed IPv6 address
    ],
)
def test_a_url_that_cannot_be_read_is_refused_for_good_without_its_password(url: str) -> None:
    """Retrying could never help, and the reason must not leak the URL's password."""
    with pytest.raises(PermanentError, match="webhook URL cannot be read") as refused:
        webhook.check_host(url, frozenset())
    assert "s3cret" not in str(refused.value)
