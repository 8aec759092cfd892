"""The ``govflow`` command line, run as a user runs it: a process, real servers, env vars."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from redis import Redis

from govflow.schemas.codec import decode_event

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = sorted((ROOT / "deploy" / "examples").glob("*.yaml"))
PASSWORD = "s3cret-Pa55word"

Run = Callable[..., subprocess.CompletedProcess[str]]

VALID = """\
name: new-evidence
entity: evidence
trigger: create
actions:
  - create_task: {title: "Check {data.title}"}
"""


def closed_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


def clean_env() -> dict[str, str]:
    """The environment without any govflow setting the developer's shell may carry."""
    return {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("GOVFLOW_") and k not in ("REDIS_URL", "DATABASE_URL")
    }


@pytest.fixture
def govflow(redis_server_url: str, database_url: str, prefix: str, tmp_path: Path) -> Run:
    """Run ``govflow ARGS...`` in a process with this test's servers and prefix."""
    base = {
        **clean_env(),
        "GOVFLOW_REDIS_URL": redis_server_url,
        "GOVFLOW_DATABASE_URL": database_url,
        "GOVFLOW_PREFIX": prefix,
        "GOVFLOW_DATA_DIR": str(tmp_path / "data"),
    }

    def run(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "govflow.cli", *args],
            env={**base, **env},
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

    return run


def assert_one_error_line(result: subprocess.CompletedProcess[str], status: int) -> str:
    """The run failed with ``status`` and said why in one line on stderr, and nothing else."""
    assert result.returncode == status, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("govflow: ")
    assert result.stdout == ""
    return lines[0]


@pytest.fixture
def stream(redis_server_url: str, prefix: str) -> Callable[[], list[dict[bytes, bytes]]]:
    def entries() -> list[dict[bytes, bytes]]:
        client = Redis.from_url(redis_server_url)
        try:
            reply: Any = client.xrange(f"{prefix}:events")
            return [fields for _, fields in reply]
        finally:
            client.close()

    return entries


def test_migrate_twice(
    redis_server_url: str, empty_database_url: str, prefix: str, tmp_path: Path
) -> None:
    env = {
        **clean_env(),
        "GOVFLOW_REDIS_URL": redis_server_url,
        "GOVFLOW_DATABASE_URL": empty_database_url,
        "GOVFLOW_PREFIX": prefix,
        "GOVFLOW_DATA_DIR": str(tmp_path),
    }
    command = [sys.executable, "-m", "govflow.cli", "migrate"]
    first = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    second = subprocess.run(command, env=env, capture_output=True, text=True, check=False)

    assert (first.returncode, second.returncode) == (0, 0), first.stderr + second.stderr
    assert "0001_init" in first.stdout
    assert "up to date" in second.stdout


def test_unmigrated_database_says_migrate(govflow: Run, empty_database_url: str) -> None:
    result = govflow("workflows", "list", GOVFLOW_DATABASE_URL=empty_database_url)
    assert "govflow migrate" in assert_one_error_line(result, 1)


def test_apply_list_and_reapply(govflow: Run, tmp_path: Path) -> None:
    extra = tmp_path / "evidence.yaml"
    extra.write_text(VALID)
    files = [*map(str, EXAMPLES), str(extra)]
    assert len(EXAMPLES) >= 2

    first = govflow("workflows", "apply", *files)
    assert first.returncode == 0, first.stderr
    # Each example file is named after its workflow.
    assert first.stdout.splitlines() == [
        *(f"{path.stem} v1 changed" for path in EXAMPLES),
        "new-evidence v1 changed",
    ]

    again = govflow("workflows", "apply", *files)
    assert again.stdout.splitlines()[0] == f"{EXAMPLES[0].stem} v1 unchanged"

    extra.write_text(VALID.replace("Check", "Verify"))
    changed = govflow("workflows", "apply", str(extra), "--json")
    assert json.loads(changed.stdout) == [
        {"file": str(extra), "name": "new-evidence", "version": 2, "changed": True}
    ]

    listed = govflow("workflows", "list", "--json")
    assert listed.returncode == 0, listed.stderr
    rows = json.loads(listed.stdout)  # one JSON document, nothing else on stdout
    assert [(r["name"], r["version"]) for r in rows] == sorted(
        [*((path.stem, 1) for path in EXAMPLES), ("new-evidence", 2)]
    )
    by_name = {r["name"]: r for r in rows}
    assert by_name["high-risk-policy-approval"]["definition"]["when"][1] == {
        "field": "risk",
        "in": ["high", "critical"],
    }
    every = json.loads(govflow("workflows", "list", "--all", "--json").stdout)
    assert len(every) == len(EXAMPLES) + 2

    table = govflow("workflows", "list")
    assert "high-risk-policy-approval" in table.stdout


def test_apply_validates_every_file_first(govflow: Run, tmp_path: Path) -> None:
    good = tmp_path / "good.yaml"
    good.write_text(VALID)
    no_actions = tmp_path / "no-actions.yaml"
    no_actions.write_text("name: x\nentity: policy\ntrigger: create\nactions: []\n")
    not_yaml = tmp_path / "broken.yaml"
    not_yaml.write_text("name: [\n")

    result = govflow(
        "workflows", "apply", str(good), str(no_actions), str(not_yaml), str(tmp_path / "gone")
    )

    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 3
    assert lines[0].startswith(f"govflow: {no_actions}: ")
    assert "actions" in lines[0]
    assert lines[1] == f"govflow: {not_yaml}: not valid YAML at line 2"
    assert lines[2].startswith(f"govflow: {tmp_path / 'gone'}: No such file")
    # Nothing applied, not even the valid file.
    assert json.loads(govflow("workflows", "list", "--json").stdout) == []


def test_publish_writes_spec_wire_format(govflow: Run, stream: Callable[[], list[Any]]) -> None:
    result = govflow(
        "publish",
        "policy.status_changed",
        "--entity-id",
        "POL-1042",
        "--tenant",
        "acme",
        "--actor",
        "user-17",
        "--data",
        '{"title": "Access control", "status": "pending_approval", "risk": "high"}',
        "--changes",
        '{"status": {"from": "draft", "to": "pending_approval"}}',
        "--id",
        "0b6f6c9e-6a55-4f4e-9d7c-1f0e3f1b2a11",
    )

    assert result.returncode == 0, result.stderr
    assert result.stdout == "0b6f6c9e-6a55-4f4e-9d7c-1f0e3f1b2a11\n"
    [fields] = stream()
    assert list(fields) == [b"event"]
    wire = json.loads(fields[b"event"])
    assert {k: wire[k] for k in ("id", "type", "tenant", "entity_id", "actor")} == {
        "id": "0b6f6c9e-6a55-4f4e-9d7c-1f0e3f1b2a11",
        "type": "policy.status_changed",
        "tenant": "acme",
        "entity_id": "POL-1042",
        "actor": "user-17",
    }
    assert wire["data"]["risk"] == "high"
    assert wire["changes"] == {"status": {"from": "draft", "to": "pending_approval"}}
    assert wire["schema_version"] == 1
    assert wire["occurred_at"].endswith("Z")
    assert decode_event(fields[b"event"]).id == wire["id"]


def test_publish_makes_an_id(govflow: Run, stream: Callable[[], list[Any]]) -> None:
    result = govflow("publish", "policy.created", "--entity-id", "P1", "--data", '{"a": 1}')
    assert result.returncode == 0, result.stderr
    [fields] = stream()
    assert json.loads(fields[b"event"])["id"] == result.stdout.strip()


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["publish", "policy.created", "--entity-id", "P1", "--data", "{bad"], "--data"),
        (["publish", "policy.created", "--entity-id", "P1", "--data", "[1]"], "--data"),
        (["publish", "policy.created", "--entity-id", "P1", "--changes", '{"a": 1}'], "--changes"),
        (["publish", "policy.exploded", "--entity-id", "P1"], "policy.exploded"),
        (["publish", "policy.created"], "--entity-id"),
        (["publish", "policy.created", "--entity-id", "P1", "--colour", "red"], "--colour"),
        (["no-such-command"], "no-such-command"),
        (["run", "--role", "triggers,cooking"], "cooking"),
        (["run", "--concurrency", "0"], "--concurrency"),
    ],
)
def test_bad_arguments_are_one_line(
    govflow: Run, stream: Callable[[], list[Any]], args: list[str], says: str
) -> None:
    line = assert_one_error_line(govflow(*args), 2)
    assert says in line
    assert stream() == []


def test_bad_setting_is_one_line(govflow: Run) -> None:
    line = assert_one_error_line(govflow("workflows", "list", GOVFLOW_MAX_ATEMPTS="7"), 2)
    assert "max_atempts" in line.lower()


def test_unreachable_redis_is_one_line_without_password(govflow: Run) -> None:
    url = f"redis://govflow:{PASSWORD}@127.0.0.1:{closed_port()}/0"
    result = govflow("publish", "policy.created", "--entity-id", "P1", GOVFLOW_REDIS_URL=url)
    line = assert_one_error_line(result, 1)
    assert "127.0.0.1" in line
    assert PASSWORD not in result.stderr


def test_unreachable_postgres_is_one_line_without_password(govflow: Run) -> None:
    url = f"postgresql://govflow:{PASSWORD}@127.0.0.1:{closed_port()}/govflow"
    result = govflow("migrate", GOVFLOW_DATABASE_URL=url)
    assert_one_error_line(result, 1)
    assert PASSWORD not in result.stderr


def test_schema_prints_json_schema(govflow: Run) -> None:
    result = govflow("schema")
    assert result.returncode == 0, result.stderr
    schema = json.loads(result.stdout)
    assert {"event", "command", "workflow"} <= schema.keys()
