"""What a user installs: the wheel holds one package, ``govflow``, and publishes from a venv.

The wheel is built from this checkout and installed with uv into a fresh virtual
environment outside the repository, so nothing of the source tree can stand in for what
is missing from the wheel. The project's own environment uses an editable install of the
same package (``make run``, ``make test``); that is checked too.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

import pytest
from redis import Redis

import govflow
from govflow.schemas.codec import decode_event

ROOT = Path(__file__).resolve().parent.parent
UV = shutil.which("uv")
UV_TIMEOUT = 300  # installing resolves against PyPI; with a warm cache it takes seconds

# Run by the venv's interpreter, in a directory outside the checkout: argv is the Redis
# URL and the key prefix; prints where govflow came from and the two event ids.
_PUBLISH = """
import asyncio, json, sys

import govflow
from govflow import Publisher, SyncPublisher, new_event
from govflow.schemas.keys import Keys

url, prefix = sys.argv[1], sys.argv[2]
keys = Keys(prefix)
with SyncPublisher.from_url(url, keys) as publisher:
    sync_id = publisher.publish(new_event("policy.created", "POL-1", data={"via": "sync"}))


async def publish_async() -> str:
    async with Publisher.from_url(url, keys) as publisher:
        return await publisher.publish(new_event("policy.updated", "POL-1", data={"via": "async"}))


async_id = asyncio.run(publish_async())
print(json.dumps({"file": govflow.__file__, "ids": [sync_id, async_id]}))
"""


def uv(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """Run ``uv ARGS...``; a failure shows uv's own output."""
    assert UV is not None
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")}
    done = subprocess.run(
        [UV, *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=UV_TIMEOUT,
        check=False,
    )
    assert done.returncode == 0, f"uv {' '.join(args)} failed:\n{done.stdout}{done.stderr}"
    return done


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel built from this checkout."""
    if UV is None:
        pytest.skip("uv is not on PATH (the Makefile installs it)")
    out = tmp_path_factory.mktemp("dist")
    uv("build", "--wheel", "--out-dir", str(out), str(ROOT), cwd=out)
    [built] = out.glob("govflow-*.whl")
    return built


def test_the_wheel_holds_only_the_govflow_package_and_its_data(wheel: Path) -> None:
    version = importlib.metadata.version("govflow")
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
    assert {name.split("/", 1)[0] for name in names} == {
        "govflow",
        f"govflow-{version}.dist-info",
    }
    assert "govflow/db/migrations/0001_init.sql" in names
    assert "govflow/api/dashboard.html" in names
    assert "govflow/py.typed" in names  # type checkers read the installed package's hints


@pytest.mark.slow
def test_the_installed_wheel_publishes_to_redis(
    wheel: Path, redis_server_url: str, prefix: str, tmp_path: Path
) -> None:
    venv = tmp_path / "venv"
    uv("venv", "--quiet", "--python", sys.executable, str(venv), cwd=tmp_path)
    python = venv / "bin" / "python"
    uv("pip", "install", "--quiet", "--python", str(python), str(wheel), cwd=tmp_path)

    done = subprocess.run(
        [str(python), "-c", _PUBLISH, redis_server_url, prefix],
        cwd=tmp_path,  # not the checkout: its govflow/ must not be importable from here
        env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert Path(report["file"]).is_relative_to(venv)

    client = Redis.from_url(redis_server_url)
    try:
        entries: Any = client.xrange(f"{prefix}:events")  # redis-py types replies loosely
    finally:
        client.close()
    events = [decode_event(fields[b"event"]) for _, fields in entries]
    assert [e.id for e in events] == report["ids"]
    assert [e.data["via"] for e in events] == ["sync", "async"]


def test_the_project_environment_runs_this_checkout_editable() -> None:
    dist = importlib.metadata.distribution("govflow")
    direct_url = json.loads(dist.read_text("direct_url.json") or "{}")
    if not direct_url.get("dir_info", {}).get("editable"):
        pytest.skip("govflow is not installed editable here (make install does that)")
    assert Path(govflow.__file__).resolve() == ROOT / "govflow" / "__init__.py"
    # The console script of the same environment runs this checkout's code.
    script = Path(sys.executable).parent / "govflow"
    done = subprocess.run(
        [str(script), "--help"], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    assert "publish" in done.stdout
