"""Where a webhook may go: public addresses, and what the operator names.

A webhook's URL is a template over event data, so any producer can aim it. An address
that is not public (loopback, private, link-local, unique-local, shared, multicast: the
cloud metadata services at 169.254.169.254 and fd00:ec2::254 among them) is refused
unless ``GOVFLOW_WEBHOOK_ALLOWED_HOSTS`` names the host, or a network holding the address.
A non-empty list also confines webhooks to the hosts and networks it names.

The check is made on the address connected to, not on the name: the host is resolved
once, every address it resolves to is checked, and the connection goes to a checked
address (``PinnedResolver`` for the webhook session, ``PinnedBackend`` for the httpx
client plug-ins get). A name that resolves to a public address when checked and to
127.0.0.1 when connected (DNS rebinding) therefore never reaches 127.0.0.1. The Host
header and TLS's server name stay the URL's host.
"""

from __future__ import annotations

import ipaddress
import itertools
import math
import socket
import ssl
import typing
from collections.abc import Iterable

import aiohttp
import anyio
import httpcore
import httpx
from aiohttp.abc import AbstractResolver, ResolveResult

from govflow.schemas.errors import PermanentError

IPAddress: typing.TypeAlias = ipaddress.IPv4Address | ipaddress.IPv6Address
Network: typing.TypeAlias = ipaddress.IPv4Network | ipaddress.IPv6Network


class EgressPolicy:
    """The operator's allow-list: host names, addresses and networks (``10.0.0.0/8``)."""

    def __init__(self, allowed: Iterable[str]) -> None:
        names: set[str] = set()
        networks: list[Network] = []
        for item in allowed:
            try:
                networks.append(ipaddress.ip_network(item.strip("[]"), strict=False))
            except ValueError:
                names.add(item.lower().rstrip("."))
        self.names = frozenset(names)
        self.networks = tuple(networks)

    @property
    def confined(self) -> bool:
        """Whether the list is set, so that only what it names may be reached."""
        return bool(self.names or self.networks)

    def check_host(self, host: str) -> None:
        """Refuse a host the list does not name (when it is set); before any connection.

        A host written as an address (``127.0.0.1``, ``[::1]``) is checked as an address
        here (``check_address``): aiohttp connects to it as it is, never resolving it. A
        name is checked again once resolved.

        Raises:
            PermanentError: the host is off the list, or its address may not be reached.
        """
        address = _address(host)
        if address is not None:
            self.check_address(host, address)
        elif self.confined and not self._named(host):
            raise PermanentError(f"webhook host {host} is not in GOVFLOW_WEBHOOK_ALLOWED_HOSTS")

    def check_address(self, host: str, address: IPAddress) -> None:
        """Refuse an address that is not public, unless the list names its host or network.

        Raises:
            PermanentError: the address may not be reached.
        """
        if self._named(host) or self._listed(address):
            return
        if self.confined:
            raise PermanentError(
                f"webhook host {host} is not in GOVFLOW_WEBHOOK_ALLOWED_HOSTS"
            )  # fmt: skip
        if not is_public(address):
            raise PermanentError(
                f"webhook host {host} resolves to {address}, which is not a public address;"
                " name it in GOVFLOW_WEBHOOK_ALLOWED_HOSTS to allow it"
            )

    def _named(self, host: str) -> bool:
        return host.lower().strip("[]").rstrip(".") in self.names

    def _listed(self, address: IPAddress) -> bool:
        return any(address in network for network in self.networks)


def is_public(address: IPAddress) -> bool:
    """Whether ``address`` is a public unicast address (an IPv4-mapped one by its IPv4)."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_global and not address.is_multicast


def _address(host: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return None


class PinnedResolver(AbstractResolver):
    """aiohttp's resolver, returning only addresses the policy allows.

    aiohttp connects to the addresses its resolver returns, with the URL's host as TLS's
    server name, so the connection is pinned to the checked addresses. A host written as
    an address is not resolved: ``EgressPolicy.check_host`` checks it before the request.
    """

    def __init__(self, policy: EgressPolicy) -> None:
        self._policy = policy
        self._resolver: AbstractResolver | None = None

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        """Resolve ``host`` once; refuse it unless every address it resolves to is allowed."""
        if self._resolver is None:  # made in the event loop it will run in
            self._resolver = aiohttp.ThreadedResolver()
        found = await self._resolver.resolve(host, port, family)
        for result in found:
            self._policy.check_address(host, ipaddress.ip_address(result["host"]))
        return found

    async def close(self) -> None:
        """Release the wrapped resolver."""
        if self._resolver is not None:
            await self._resolver.close()


class PinnedBackend(httpcore.AsyncNetworkBackend):
    """httpcore's network backend, connecting only to addresses the policy allows.

    httpcore hands ``connect_tcp`` the URL's host and starts TLS with that host as the
    server name, so replacing the host by the checked address here pins the connection
    and leaves Host and SNI as they were.
    """

    def __init__(self, policy: EgressPolicy) -> None:
        self._policy = policy
        self._backend = httpcore.AnyIOBackend()

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,  # noqa: ASYNC109 - httpcore's interface names it so
        local_address: str | None = None,
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        """Resolve ``host`` once, check every address, connect to a checked one."""
        addresses = await self._resolve(host, port, within=timeout)
        for address in addresses:
            self._policy.check_address(host, address)
        failed: httpcore.ConnectError | None = None
        for address in addresses:  # each was checked: try them in the resolver's order
            try:
                return await self._backend.connect_tcp(
                    str(address),
                    port,
                    timeout=timeout,
                    local_address=local_address,
                    socket_options=socket_options,
                )
            except httpcore.ConnectError as e:
                failed = e
        assert failed is not None  # _resolve returns at least one address
        raise failed

    async def _resolve(self, host: str, port: int, *, within: float | None) -> list[IPAddress]:
        try:
            with anyio.fail_after(within):
                found = await anyio.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except TimeoutError as e:
            raise httpcore.ConnectTimeout(f"resolving {host} timed out") from e
        except OSError as e:  # socket.gaierror: no such name, for now
            raise httpcore.ConnectError(f"cannot resolve {host}: {e}") from e
        addresses = list(dict.fromkeys(ipaddress.ip_address(info[4][0]) for info in found))
        if not addresses:
            raise httpcore.ConnectError(f"{host} resolves to no address")
        return addresses

    async def sleep(self, seconds: float) -> None:
        """Sleep as the wrapped backend does."""
        await self._backend.sleep(seconds)


# Connections one pool of ``ShardedTransport`` holds to a busy receiver, about.
CONNECTIONS_PER_SHARD = 8


class PinnedTransport(httpx.AsyncHTTPTransport):
    """httpx's transport over a connection pool whose connections go through the policy."""

    def __init__(self, policy: EgressPolicy, ssl_context: ssl.SSLContext) -> None:
        limits = httpx.Limits()
        # Given the context, httpx loads no certificates of its own (25 ms a pool).
        super().__init__(verify=ssl_context, trust_env=False, limits=limits)
        # httpx builds its pool in __init__ and takes no network backend: build it again
        # with the same settings and the pinned backend.
        self._pool = httpcore.AsyncConnectionPool(
            ssl_context=ssl_context,
            max_connections=limits.max_connections,
            max_keepalive_connections=limits.max_keepalive_connections,
            keepalive_expiry=limits.keepalive_expiry,
            network_backend=PinnedBackend(policy),
        )


class ShardedTransport(httpx.AsyncBaseTransport):
    """Requests taken in turn by several small connection pools, each a ``PinnedTransport``.

    httpcore's pool looks over every connection it holds each time it assigns a request
    (encode/httpcore#1035): with 64 connections kept to one receiver that pass took most
    of a worker's CPU, and more webhooks in flight delivered fewer a second. Each pool
    here holds about ``CONNECTIONS_PER_SHARD`` connections, whatever the concurrency.
    """

    def __init__(self, policy: EgressPolicy, concurrency: int) -> None:
        context = httpx.create_ssl_context(trust_env=False)  # loading the CAs once
        count = max(1, math.ceil(concurrency / CONNECTIONS_PER_SHARD))
        self._shards = [PinnedTransport(policy, context) for _ in range(count)]
        self._turn = itertools.cycle(self._shards)

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        """Send ``request`` through the next pool in turn."""
        return await next(self._turn).handle_async_request(request)

    async def aclose(self) -> None:
        """Close every pool."""
        for shard in self._shards:
            await shard.aclose()


def http_client(timeout: float, allowed: frozenset[str], concurrency: int = 1) -> httpx.AsyncClient:
    """The httpx client plug-ins get (``StepContext.http``): separate connect and read
    time-outs, no automatic redirects, connections only to the addresses ``allowed``
    admits, and pools sized for ``concurrency`` requests in flight (``ShardedTransport``)."""
    return httpx.AsyncClient(
        timeout=httpx.Timeout(timeout, connect=min(timeout, 5.0)),
        follow_redirects=False,
        trust_env=False,
        transport=ShardedTransport(EgressPolicy(allowed), concurrency),
    )
