"""``govflow run`` as a real process, killed with SIGKILL or stopped with SIGTERM mid-burst.

README.md, "Guarantees": no event that Redis accepted is lost, whenever a worker dies; every step's effect
happens once; SIGTERM or SIGINT finishes the work in hand and exits 0.
"""

from __future__ import annotations

import signal
import subprocess
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from psycopg_pool import AsyncConnectionPool
from redis.asyncio import Redis

from govflow.schemas.events import Event, new_event
from govflow.schemas.keys import Keys
from govflow.schemas.settings import Settings
from tests.faults.servers import free_port
from tests.pipeline_helpers import (
    apply,
    effect_counts,
    effect_problems,
    publish,
    running_worker,
    scalar,
    start_cli_worker,
    statuses,
    stop_process,
    stream_state,
    wait_for,
    wait_settled,
)

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

WORKFLOW = """
name: review
entity: policy
trigger: create
actions:
  - create_approval: {approvers: [compliance-officer]}
  - create_task: {title: "Review {data.title}"}
  - assign: {assignee: risk-team}
"""
METRICS_HOST = "127.0.0.2"  # loopback too, but not where /metrics listens by default
NOTHING_LEFT = {"triggers_pending": 0, "actions_pending": 0, "retry_scheduled": 0, "dead_stream": 0}


def events(n: int) -> list[Event]:
    return [new_event("policy.created", f"POL-{i}", data={"title": f"P{i}"}) for i in range(n)]


async def completed(pool: AsyncConnectionPool[Any]) -> int:
    return int(
        await scalar(pool, "SELECT count(*) FROM workflow_executions WHERE status = 'completed'")
    )


async def consumers(redis: Redis, stream: str, group: str) -> set[str]:
    return {c["name"].decode() for c in await redis.xinfo_consumers(stream, group)}


async def worker_at_work(
    settings: Settings, pool: AsyncConnectionPool[Any], log: Path, *, done: int
) -> subprocess.Popen[bytes]:
    """``govflow run --role all --concurrency 4``, once ``done`` executions have completed."""
    with log.open("wb") as stderr:
        proc = start_cli_worker(settings, "--role", "all", "--concurrency", "4", stderr=stderr)
    try:
        await wait_for(
            lambda: completed(pool),
            lambda n: n >= done or proc.poll() is not None,
            within=60,
            every=0.02,
            what="the subprocess worker to get going",
        )
        assert proc.poll() is None, f"the worker exited early:\n{tail(log)}"
    except BaseException:
        stop_process(proc)
        raise
    return proc


def tail(path: Path, lines: int = 20) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


async def test_a_worker_killed_mid_batch_loses_nothing_and_doubles_nothing(
    make_settings: Any, redis: Redis, pool: AsyncConnectionPool[Any], tmp_path: Path
) -> None:
    settings = make_settings(claim_idle=2.0)
    keys = Keys(settings.prefix)
    await apply(pool, WORKFLOW)
    total = 2000
    await publish(redis, keys, events(total))
    log = tmp_path / "worker.log"
    proc = await worker_at_work(settings, pool, log, done=total // 5)
    try:
        proc.send_signal(signal.SIGKILL)
        await anyio.to_thread.run_sync(proc.wait)
    finally:
        stop_process(proc)
    at_kill = await stream_state(redis, keys)
    done_at_kill = await completed(pool)
    # Killed with work in hand (delivered, not acknowledged) and work not yet started.
    assert at_kill["triggers_pending"] + at_kill["actions_pending"] > 0, at_kill
    assert done_at_kill < total

    async with running_worker(settings, concurrency=2):
        await wait_settled(pool, total, within=60)
        await wait_for(
            lambda: stream_state(redis, keys),
            lambda s: s == NOTHING_LEFT,
            within=20,
            what="nothing pending, scheduled or dead",
        )

    assert await effect_problems(pool) == []
    assert await effect_counts(pool) == {
        "approvals": total, "assignments": total, "notifications": 0, "status_changes": 0,
        "tasks": total,
    }  # fmt: skip
    assert await scalar(pool, "SELECT count(*) FROM dead_letters") == 0
    print(
        f"\nkilled at {done_at_kill}/{total} completed, pending {at_kill};"
        f" executions run twice: "
        f"{await scalar(pool, 'SELECT count(*) FROM workflow_executions WHERE attempts > 1')}"
    )


@pytest.mark.parametrize(
    "signals",
    [
        [signal.SIGTERM],
        [signal.SIGINT],
        # Ctrl-C under `uv run`: the terminal's copy, and the one uv passes on at once.
        [signal.SIGINT, signal.SIGINT],
    ],
    ids=["SIGTERM", "SIGINT", "SIGINT-twice-at-once"],
)
async def test_a_stop_signal_finishes_the_work_in_hand_and_exits_0(
    make_settings: Any,
    redis: Redis,
    pool: AsyncConnectionPool[Any],
    tmp_path: Path,
    signals: list[signal.Signals],
) -> None:
    settings = make_settings(claim_idle=2.0)
    keys = Keys(settings.prefix)
    await apply(pool, WORKFLOW)
    total = 5000  # several times what a worker holds at once, however fast it runs
    await publish(redis, keys, events(total))
    log = tmp_path / "worker.log"
    proc = await worker_at_work(settings, pool, log, done=total // 50)
    try:
        for signum in signals:
            proc.send_signal(signum)
        try:
            code = await anyio.to_thread.run_sync(lambda: proc.wait(30))
        except subprocess.TimeoutExpired:
            pytest.fail(f"the worker did not exit within 30 s of {signals}:\n{tail(log)}")
    finally:
        stop_process(proc)
    assert code == 0, tail(log)
    done_at_stop = await completed(pool)
    assert done_at_stop < total  # it stopped mid-burst, not after the work ran out
    # Whatever it had taken it finished and acknowledged, then left its groups.
    at_stop = await stream_state(redis, keys)
    assert at_stop == NOTHING_LEFT, at_stop
    assert await consumers(redis, keys.events(), "triggers") == set()
    assert await consumers(redis, keys.commands(), "actions") == set()
    assert "Traceback" not in log.read_text(errors="replace")

    async with running_worker(settings, concurrency=2):
        await wait_settled(pool, total, within=60)
        await wait_for(
            lambda: stream_state(redis, keys),
            lambda s: s == NOTHING_LEFT,
            within=20,
            what="nothing pending, scheduled or dead",
        )

    assert await statuses(pool) == {"completed": total}
    assert await effect_problems(pool) == []
    # Nothing was run twice: a graceful stop hands over no half-done work.
    assert await scalar(pool, "SELECT max(attempts) FROM workflow_executions") == 1
    assert await scalar(pool, "SELECT count(*) FROM execution_steps WHERE attempts <> 1") == 0
    assert await scalar(pool, "SELECT count(*) FROM dead_letters") == 0
    print(f"\n{signals[0].name} at {done_at_stop}/{total} completed")


SLOW_NOTICE = """
name: slow-notice
entity: policy
trigger: create
actions:
  - notify: {webhook: "URL", message: "{data.title} is new"}
"""


@contextmanager
def held_webhook() -> Iterator[tuple[str, threading.Event, threading.Event]]:
    """A webhook receiver that holds each request until released: (url, arrived, release)."""
    arrived, release = threading.Event(), threading.Event()

    class Hold(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            self.rfile.read(int(self.headers["Content-Length"]))
            arrived.set()
            release.wait(60)
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Hold)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}/hook", arrived, release
    finally:
        release.set()
        server.shutdown()
        server.server_close()


async def worker_holding_a_webhook(
    settings: Settings,
    pool: AsyncConnectionPool[Any],
    redis: Redis,
    url: str,
    log: Path,
    arrived: threading.Event,
) -> subprocess.Popen[bytes]:
    """``govflow run``, once its one action (a webhook held by the receiver) is in hand."""
    await apply(pool, SLOW_NOTICE.replace("URL", url))
    await publish(redis, Keys(settings.prefix), events(1))
    with log.open("wb") as stderr:
        proc = start_cli_worker(settings, stderr=stderr, GOVFLOW_WEBHOOK_TIMEOUT="60")
    if not await anyio.to_thread.run_sync(lambda: arrived.wait(60)):
        stop_process(proc)
        pytest.fail(f"the webhook was not called:\n{tail(log)}")
    return proc


async def test_sigint_waits_for_the_webhook_in_hand_then_exits_0(
    make_settings: Any, redis: Redis, pool: AsyncConnectionPool[Any], tmp_path: Path
) -> None:
    settings, log = make_settings(), tmp_path / "worker.log"
    with held_webhook() as (url, arrived, release):
        proc = await worker_holding_a_webhook(settings, pool, redis, url, log, arrived)
        try:
            proc.send_signal(signal.SIGINT)
            await anyio.sleep(1.5)
            assert proc.poll() is None, f"the worker did not wait for its webhook:\n{tail(log)}"
            release.set()
            code = await anyio.to_thread.run_sync(lambda: proc.wait(30))
        finally:
            stop_process(proc)
    assert code == 0, tail(log)
    assert await statuses(pool) == {"completed": 1}
    assert await stream_state(redis, Keys(settings.prefix)) == NOTHING_LEFT


async def test_a_second_sigint_later_stops_at_once_with_130(
    make_settings: Any, redis: Redis, pool: AsyncConnectionPool[Any], tmp_path: Path
) -> None:
    settings, log = make_settings(), tmp_path / "worker.log"
    with held_webhook() as (url, arrived, _):
        proc = await worker_holding_a_webhook(settings, pool, redis, url, log, arrived)
        try:
            proc.send_signal(signal.SIGINT)
            await anyio.sleep(1.5)  # past the window in which a copy of the first one counts
            proc.send_signal(signal.SIGINT)
            code = await anyio.to_thread.run_sync(lambda: proc.wait(15))
        finally:
            stop_process(proc)
    assert code == 130, tail(log)
    assert "worker.stopping_at_once" in log.read_text()
    assert "Traceback" not in log.read_text()
    # The action was in hand, not done: it stays pending for another worker to claim.
    assert (await stream_state(redis, Keys(settings.prefix)))["actions_pending"] == 1


async def test_metrics_are_served_where_metrics_host_says(
    make_settings: Any, tmp_path: Path
) -> None:
    port, log = free_port(), tmp_path / "worker.log"
    with log.open("wb") as stderr:
        proc = start_cli_worker(
            make_settings(), "--role", "triggers",
            "--metrics-port", str(port), "--metrics-host", METRICS_HOST, stderr=stderr,
        )  # fmt: skip
    try:
        async with httpx.AsyncClient() as http:

            async def scrape() -> str:
                assert proc.poll() is None, f"the worker exited:\n{tail(log)}"
                try:
                    return (await http.get(f"http://{METRICS_HOST}:{port}/metrics")).text
                except httpx.ConnectError:
                    return ""

            text = await wait_for(scrape, bool, within=60, what="/metrics to answer")
            assert "# HELP govflow_batch_entries" in text
            with pytest.raises(httpx.ConnectError):  # not on the default address as well
                await http.get(f"http://127.0.0.1:{port}/metrics")
        proc.send_signal(signal.SIGTERM)
        assert await anyio.to_thread.run_sync(lambda: proc.wait(30)) == 0, tail(log)
    finally:
        stop_process(proc)


async def test_sigterm_while_postgres_is_away_at_start_exits_0(
    make_settings: Any, tmp_path: Path
) -> None:
    closed = free_port()
    settings = make_settings(database_url=f"postgresql://postgres@127.0.0.1:{closed}/govflow")
    log = tmp_path / "worker.log"
    with log.open("wb") as stderr:
        proc = start_cli_worker(settings, "--role", "triggers", stderr=stderr)
    try:
        await wait_for(
            lambda: anyio.to_thread.run_sync(log.read_text),
            lambda text: "error connecting" in text or proc.poll() is not None,
            within=60,
            what="the worker's pool to fail a first connection",
        )
        assert proc.poll() is None, f"the worker exited early:\n{tail(log)}"
        proc.send_signal(signal.SIGTERM)
        code = await anyio.to_thread.run_sync(lambda: proc.wait(10))
    finally:
        stop_process(proc)
    assert code == 0, tail(log)
