"""Action plug-ins: declared with ``@action``, installed through ``govflow.actions`` entry points.

The main test builds a small plug-in package, installs it with uv into a directory of its
own (put on ``sys.path``, and on ``PYTHONPATH`` for the ``govflow`` processes), applies a
workflow that uses its action and runs events through a real worker. Broken plug-ins are
faked with a bare ``dist-info`` directory, which is all ``importlib.metadata`` reads.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Iterator
from importlib.metadata import entry_points
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgspec
import pytest
from psycopg_pool import AsyncConnectionPool
from redis.asyncio import Redis

import govflow
from govflow.plugins import ActionType, PluginError, StepContext, action, builtin
from govflow.plugins.registry import ENTRY_POINT_GROUP, registry
from govflow.runtime.worker import Worker
from govflow.schemas.commands import execution_id
from govflow.schemas.events import new_event
from govflow.schemas.settings import Settings
from tests.ops_helpers import govflow as run_govflow
from tests.ops_helpers import govflow_env
from tests.pipeline_helpers import EFFECT_TABLE, fetch, publish, running_worker, statuses, wait_for
from tests.test_cli import assert_one_error_line, clean_env

if TYPE_CHECKING:
    from decimal import Decimal as Hidden  # unknown at run time, as a plug-in's may be

pytestmark = pytest.mark.anyio

UV = shutil.which("uv")

PLUGIN_PYPROJECT = """\
[project]
name = "acme-sms"
version = "0.1.0"

[project.entry-points."govflow.actions"]
send_sms = "acme_sms:send_sms"

[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"
"""
PLUGIN_MODULE = '''\
"""A govflow plug-in: text someone when a workflow says so."""

from __future__ import annotations

import msgspec

from govflow.plugins import PermanentError, StepContext, action

SENT = (
    "INSERT INTO sms_sent (execution_id, step, phone, body) VALUES (%s, %s, %s, %s)"
    " ON CONFLICT (execution_id, step) DO NOTHING"
)


class Sms(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    to: str
    body: str


@action("send_sms")
async def send_sms(ctx: StepContext, params: Sms) -> None:
    phone = ctx.render(params.to)
    ctx.effects.add(SENT, (ctx.command.execution_id, ctx.step, phone, ctx.render(params.body)))
    if not phone:
        # Raised after queueing on purpose: a step that fails writes nothing it queued.
        raise PermanentError("no phone number to text")
'''
SMS_TABLE = (
    "CREATE TABLE sms_sent (execution_id uuid, step int, phone text, body text,"
    " PRIMARY KEY (execution_id, step))"
)
WORKFLOW = """\
name: text-the-owner
entity: policy
trigger: create
actions:
  - send_sms: {to: "{data.phone}", body: "{data.title} needs your review"}
"""


class Ping(msgspec.Struct, frozen=True):
    host: str


BROKEN_MODULE = """\
from __future__ import annotations

import msgspec

from govflow.plugins import StepContext, action


class Ping(msgspec.Struct):
    host: str


async def plain(ctx: StepContext, params: Ping) -> None: ...


assign_again = action("assign")(plain)
pong = action("pong")(plain)
"""


@pytest.fixture
def fresh_registry() -> Iterator[None]:
    """Forget the actions loaded so far, before the test and after it."""
    registry.cache_clear()
    yield
    registry.cache_clear()


@pytest.fixture
def plugin_site(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fresh_registry: None) -> Path:
    """Build the acme-sms package and install it with uv into a directory on ``sys.path``."""
    if UV is None:
        pytest.skip("installing the plug-in package needs uv")
    source = tmp_path / "acme-sms"
    (source / "acme_sms").mkdir(parents=True)
    (source / "pyproject.toml").write_text(PLUGIN_PYPROJECT)
    (source / "acme_sms" / "__init__.py").write_text(PLUGIN_MODULE)
    site = tmp_path / "site"
    subprocess.run(
        [UV, "pip", "install", "--quiet", "--no-deps", "--python", sys.executable,
         "--target", str(site), str(source)],
        check=True, capture_output=True, timeout=300,
    )  # fmt: skip
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.delitem(sys.modules, "acme_sms", raising=False)  # put back as it was after
    return site


def fake_plugin(root: Path, entry_point: str) -> None:
    """An installed distribution as ``importlib.metadata`` sees one, with one entry point."""
    info = root / "broken_actions-0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: broken-actions\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[{ENTRY_POINT_GROUP}]\n{entry_point}\n")
    (root / "broken_actions.py").write_text(BROKEN_MODULE)


@pytest.fixture
def broken_site(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fresh_registry: None) -> Path:
    """A directory on ``sys.path`` for a fake plug-in distribution."""
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "broken_actions", raising=False)
    return tmp_path


# The decorator -------------------------------------------------------------------------


def test_the_decorator_takes_the_parameters_from_the_annotation() -> None:
    @action("ping")
    async def ping(ctx: StepContext, params: Ping) -> None: ...

    assert isinstance(ping, ActionType)
    assert (ping.name, ping.params) == ("ping", Ping)
    assert ping.parse({"host": "example.org"}) == Ping("example.org")
    assert govflow.action is action


async def queues_a_row(ctx: StepContext, params: Ping) -> None:
    ctx.effects.add("INSERT INTO pings (host) VALUES (%s)", (ctx.render(params.host),))


async def awaits(ctx: StepContext, params: Ping) -> None:
    await ctx.conn.execute("SELECT 1")


async def enters_async(ctx: StepContext, params: Ping) -> None:
    async with ctx.conn.transaction():
        pass


async def iterates_async(ctx: StepContext, params: Ping) -> None:
    async for _ in ctx.conn.notifies():
        break


@pytest.mark.parametrize(
    ("run", "suspends"),
    [(queues_a_row, False), (awaits, True), (enters_async, True), (iterates_async, True)],
)
def test_the_decorator_tells_an_action_that_may_suspend_from_one_that_never_does(
    run: Any, suspends: bool
) -> None:
    # One that never awaits runs to its end once started: the worker sets it no time limit.
    assert action("f")(run).suspends is suspends


def test_of_the_builtins_only_notify_may_suspend() -> None:
    actions = [a for a in vars(builtin).values() if isinstance(a, ActionType)]
    assert len(actions) == 5
    assert {a.name for a in actions if a.suspends} == {"notify"}


def not_async(ctx: StepContext, params: Ping) -> None: ...


async def one_argument(ctx: StepContext) -> None: ...


async def a_dict(ctx: StepContext, params: dict[str, Any]) -> None: ...


async def hidden(ctx: StepContext, params: Hidden) -> None: ...


@pytest.mark.parametrize(
    ("run", "says"),
    [
        (not_async, "not_async is not async"),
        (one_argument, "one_argument takes 1 arguments"),
        (a_dict, "params is annotated dict"),
        (hidden, "name 'Hidden' is not defined"),
    ],
)
def test_the_decorator_rejects_what_is_not_an_action(run: Any, says: str) -> None:
    with pytest.raises(TypeError, match=says):
        action("f")(run)


# Loading ---------------------------------------------------------------------------------


def test_the_builtins_are_entry_points_of_govflow(fresh_registry: None) -> None:
    ours = {
        ep.name: ep.value
        for ep in entry_points(group=ENTRY_POINT_GROUP)
        if ep.dist is not None and ep.dist.name == "govflow"
    }
    assert ours == {name: f"govflow.plugins.builtin:{name}" for name in EFFECT_TABLE}
    loaded = registry()
    for name in EFFECT_TABLE:
        assert loaded[name] is getattr(builtin, name)


@pytest.mark.parametrize(
    ("entry_point", "says"),
    [
        ("ping = no_such_module:ping",
         r"= no_such_module:ping \(package broken-actions\) failed to load: ModuleNotFoundError"),
        ("ping = broken_actions:nowhere", "failed to load: AttributeError"),
        ("ping = broken_actions:plain", "is not an action: decorate it with @govflow.plugins.action"),
        ("ping = broken_actions:pong", "is the action 'pong'"),
        ("assign = broken_actions:assign_again", "action 'assign' is installed twice, by"),
    ],
)  # fmt: skip
def test_a_broken_plugin_is_one_sentence(broken_site: Path, entry_point: str, says: str) -> None:
    fake_plugin(broken_site, entry_point)
    with pytest.raises(PluginError, match=says) as raised:
        registry()
    assert "\n" not in str(raised.value)


async def test_apply_reports_a_broken_plugin_in_one_line(tmp_path: Path) -> None:
    fake_plugin(tmp_path / "site", "ping = broken_actions:nowhere")
    (tmp_path / "wf.yaml").write_text(WORKFLOW)
    result = await run_govflow(
        {**clean_env(), "PYTHONPATH": str(tmp_path / "site")},
        "workflows", "apply", str(tmp_path / "wf.yaml"),
    )  # fmt: skip
    line = assert_one_error_line(
        subprocess.CompletedProcess(result.args, result.returncode, "", result.stderr.decode()), 2
    )
    assert "ping = broken_actions:nowhere (package broken-actions) failed to load" in line


async def test_a_worker_with_a_broken_plugin_does_not_start(
    broken_site: Path, settings: Settings
) -> None:
    fake_plugin(broken_site, "ping = broken_actions:plain")
    with pytest.raises(PluginError, match="is not an action"):
        await Worker(settings, frozenset({"actions"})).run()


# An installed plug-in in a workflow -------------------------------------------------------


@pytest.mark.slow
async def test_an_installed_plugin_runs_in_a_workflow_once_per_step(
    plugin_site: Path,
    settings: Settings,
    redis: Redis,
    pool: AsyncConnectionPool[Any],
    tmp_path: Path,
) -> None:
    definition = tmp_path / "text-the-owner.yaml"
    definition.write_text(WORKFLOW)
    assert settings.redis_url is not None
    assert settings.database_url is not None
    env = govflow_env(settings.redis_url, settings.database_url, settings.prefix)
    # Without the plug-in on the path, the action is unknown and nothing is applied.
    unknown = await run_govflow(env, "workflows", "apply", str(definition))
    assert unknown.returncode == 2
    assert b"action 1 is 'send_sms', not one of" in unknown.stderr
    applied = await run_govflow(
        {**env, "PYTHONPATH": str(plugin_site)}, "workflows", "apply", str(definition)
    )
    assert applied.returncode == 0, applied.stderr.decode()
    async with pool.connection() as conn:
        await conn.execute(SMS_TABLE.encode())

    texted = new_event(
        "policy.created", "POL-1", data={"title": "Access policy", "phone": "+15550100"}
    )
    nobody = new_event("policy.created", "POL-2", data={"title": "Backup policy"})
    async with running_worker(settings):
        await publish(redis, settings.keys(), [texted, nobody])
        await wait_for(
            lambda: statuses(pool),
            lambda s: s == {"completed": 1, "dead_lettered": 1},
            within=20,
            what="one execution completed and one dead-lettered",
        )

    rows = await fetch(pool, "SELECT execution_id::text, step, phone, body FROM sms_sent")
    # The dead-lettered step queued its row too before it raised; nothing of it was written.
    assert rows == [
        (
            execution_id(texted.tenant, texted.id, "text-the-owner"),
            1,
            "+15550100",
            "Access policy needs your review",
        )
    ]
    reason = await fetch(
        pool, "SELECT last_error FROM workflow_executions WHERE status = 'dead_lettered'"
    )
    assert reason == [("no phone number to text",)]
