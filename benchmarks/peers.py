"""The peers: installed into ``benchmarks/.peers/``, run as processes of their own.

Python peers live in their own venv (``uv venv`` + ``uv pip install``), BullMQ in an npm
folder; neither is a govflow dependency. Each peer runs the jobs of ``peer_apps/`` with a
worker configuration a user would pick on a 2-core machine: see ``PEERS``. The notify
scenario's job waits on a webhook, so its workers run with the concurrency each peer's
documentation recommends for I/O-bound work (``Peer.io_worker``).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
PEERS_DIR = HERE / ".peers"
VENV = PEERS_DIR / "py"
PY = VENV / "bin" / "python"
NODE_DIR = PEERS_DIR / "node"
PY_PACKAGES = [
    "celery[redis]",
    "dramatiq[redis]",
    "taskiq",
    "taskiq-redis",
    "psycopg[binary]",
    # The notify job's HTTP clients, and Celery's pool for I/O-bound tasks.
    "requests",
    "aiohttp",
    "gevent",
    # Not peers: the plot and the profiler, kept out of govflow's dependencies.
    "matplotlib",
    "py-spy",
]
NPM_PACKAGES = ["bullmq", "ioredis", "pg"]
STOP_TIMEOUT = 20.0
# Jobs in flight per worker process in the notify scenario, for the peers as for govflow
# (its GOVFLOW_WEBHOOK_HOST_CONCURRENCY there).
IO_SLOTS = 64
# What the peers' venv must hold besides the peers: checked by ``install``.
PY_NEEDED = ("matplotlib", "gevent", "requests", "aiohttp")


@dataclass(frozen=True)
class Peer:
    """One peer: how to start its workers and its producer."""

    name: str
    worker: tuple[str, ...]  # the command of one worker process; {slots} is filled in
    producer: tuple[str, ...]  # + RUN N RATE JOB
    slots: int  # jobs in flight per worker process, each with its own connection
    package: str  # whose version to report
    node: bool = False
    # The worker's command for I/O-bound jobs (notify), where it is not ``worker``'s;
    # {slots} is then IO_SLOTS.
    io_worker: tuple[str, ...] = ()

    def installed(self) -> bool:
        """Whether this peer's runtime is there."""
        if self.node:
            return (
                shutil.which("node") is not None and (NODE_DIR / "node_modules" / "bullmq").exists()
            )
        return PY.exists() and (VENV / "bin" / self.name).exists()

    def version(self) -> str:
        """The peer's version, as its package reports it."""
        if self.node:
            meta = NODE_DIR / "node_modules" / self.package / "package.json"
            node = subprocess.run(
                ["node", "--version"], capture_output=True, text=True, check=False
            )
            return f"{json.loads(meta.read_text())['version']} (node {node.stdout.strip()})"
        out = subprocess.run(
            [str(PY), "-c", f"import importlib.metadata as m; print(m.version({self.package!r}))"],
            capture_output=True, text=True, check=False,
        )  # fmt: skip
        return out.stdout.strip()

    def env(
        self, redis_url: str, database_url: str, schema: str, queue: str, webhook_url: str = ""
    ) -> dict[str, str]:
        """The environment of this peer's processes; ``webhook_url`` is the notify job's."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(("GOVFLOW_", "VIRTUAL_ENV"))}
        env.update(
            BENCH_REDIS_URL=redis_url,
            BENCH_DATABASE_URL=database_url,
            BENCH_SCHEMA=schema,
            BENCH_QUEUE=queue,
            BENCH_WEBHOOK_URL=webhook_url,
            BENCH_IO_SLOTS=str(IO_SLOTS),
            PYTHONPATH=str(ROOT),
            NODE_PATH=str(NODE_DIR / "node_modules"),
            PYTHONUNBUFFERED="1",
        )
        return env

    def start(
        self, processes: int, env: dict[str, str], log: Path, *, io: bool = False
    ) -> list[subprocess.Popen[bytes]]:
        """Start ``processes`` worker processes; ``io``: configured for I/O-bound jobs."""
        worker, slots = self.worker, self.slots
        if io:
            worker, slots = self.io_worker or self.worker, IO_SLOTS
        procs = []
        for i in range(processes):
            cmd = [part.format(slots=slots, i=i) for part in worker]
            with (log.parent / f"{log.name}-{i}.log").open("wb") as f:
                procs.append(
                    subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT,
                                     start_new_session=True)
                )  # fmt: skip
        return procs

    def produce(
        self, env: dict[str, str], run: str, n: int, rate: float, job: str = "drain"
    ) -> dict[str, Any]:
        """Enqueue ``n`` first jobs of ``job`` (drain or notify), at ``rate`` per second or at
        once; return the timing."""
        out = subprocess.run(
            [*self.producer, run, str(n), str(rate), job],
            cwd=ROOT, env=env, capture_output=True, text=True, check=False, timeout=900,
        )  # fmt: skip
        if out.returncode != 0:
            raise RuntimeError(f"{self.name} producer failed: {out.stderr.strip()[-2000:]}")
        result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
        return result


def _py(*args: str) -> tuple[str, ...]:
    return (str(PY), *args)


_NODE_APP = str(HERE / "peer_apps" / "bullmq_app.cjs")


def _celery(pool: str) -> tuple[str, ...]:
    return _py("-m", "celery", "-A", "benchmarks.peer_apps.celery_app", "worker",
               "--pool", pool, "--concurrency", "{slots}", "--loglevel", "WARNING",
               "--without-gossip", "--without-mingle", "--without-heartbeat",
               "--hostname", "bench{i}@%h")  # fmt: skip


def _taskiq(*options: str) -> tuple[str, ...]:
    return _py("-m", "taskiq", "worker", "benchmarks.peer_apps.taskiq_app:broker",
               "--workers", "1", "--log-level", "WARNING", "--no-configure-logging",
               *options)  # fmt: skip


# Worker configurations: each peer's own defaults where they suit the drain's job, with 8
# jobs in flight per worker process (govflow's `run --concurrency` default). For the notify
# job, which waits 50 ms on a webhook, each runs IO_SLOTS jobs in flight per process the
# way its documentation recommends for I/O-bound work: Celery's gevent pool, more
# Dramatiq threads, taskiq's --max-async-tasks, BullMQ's `concurrency`.
PEERS: dict[str, Peer] = {
    "celery": Peer(
        "celery",
        # The threads pool: 8 jobs in flight in one process, as the other peers have.
        worker=_celery("threads"),
        # Celery's pool for I/O-bound tasks: a greenlet per task (`-P gevent -c 1000` in its
        # docs); the worker monkey-patches before it imports the app.
        io_worker=_celery("gevent"),
        producer=_py("-m", "benchmarks.peer_apps.celery_app"),
        slots=8,
        package="celery",
    ),
    "dramatiq": Peer(
        "dramatiq",
        worker=_py("-m", "dramatiq", "benchmarks.peer_apps.dramatiq_app", "--processes", "1",
                   "--threads", "{slots}"),
        producer=_py("-m", "benchmarks.peer_apps.dramatiq_app"),
        slots=8,
        package="dramatiq",
    ),
    "taskiq": Peer(
        "taskiq",
        worker=_taskiq(),
        # The drain runs taskiq's default (100 tasks, 8 connections between them).
        io_worker=_taskiq("--max-async-tasks", "{slots}"),
        producer=_py("-m", "benchmarks.peer_apps.taskiq_app"),
        slots=8,
        package="taskiq-redis",
    ),
    "bullmq": Peer(
        "bullmq",
        worker=("node", _NODE_APP, "worker", "{slots}"),
        producer=("node", _NODE_APP, "produce"),
        slots=8,
        package="bullmq",
        node=True,
    ),
}  # fmt: skip


def install(names: list[str]) -> None:
    """Install what the named peers need (and the plot's and profiler's packages)."""
    wanted = [PEERS[n] for n in names]
    site = VENV / "lib" / "python3.11" / "site-packages"
    tools = [VENV / "bin" / "py-spy", *(site / name for name in PY_NEEDED)]
    if any(not p.installed() for p in wanted if not p.node) or not all(t.exists() for t in tools):
        PEERS_DIR.mkdir(exist_ok=True)
        if not PY.exists():  # a folder left half-made (an interrupted install) is kept
            venv = ["uv", "venv", "-q", "--allow-existing", "--python", "3.11", str(VENV)]
            subprocess.run(venv, check=True)
        subprocess.run(
            ["uv", "pip", "install", "-q", "--python", str(PY), *PY_PACKAGES], check=True
        )
    if any(p.node and not p.installed() for p in wanted):
        if shutil.which("npm") is None:
            raise RuntimeError("BullMQ needs Node.js and npm")
        NODE_DIR.mkdir(parents=True, exist_ok=True)
        package = NODE_DIR / "package.json"
        if not package.exists():
            package.write_text('{"name": "govflow-bench-peers", "private": true}\n')
        subprocess.run(
            ["npm", "install", "--no-audit", "--no-fund", "--loglevel", "error", *NPM_PACKAGES],
            cwd=NODE_DIR, check=True,
        )  # fmt: skip


def stop(procs: list[subprocess.Popen[bytes]]) -> None:
    """SIGTERM each worker's process group; SIGKILL what is still there after a while."""
    for proc in procs:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
    deadline = time.monotonic() + STOP_TIMEOUT
    for proc in procs:
        try:
            proc.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
