"""What a new user meets first: `--version`, completion, `config`, `workflows validate`."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.test_cli import EXAMPLES, ROOT, Run, assert_one_error_line, clean_env

TYPO = """\
name: typo
entity: policy
trigger: create
actions:
  - create_task: {title: "Review {dta.title}"}
  - notify: {webhook: "not a url"}
"""


def offline(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    """Run ``govflow ARGS...`` with no server configured, as on a fresh machine."""
    return subprocess.run(
        [sys.executable, "-m", "govflow.cli", *args],
        env={**clean_env(), **env},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.fixture(name="govflow")
def govflow_fixture(redis_server_url: str, database_url: str, prefix: str, tmp_path: Path) -> Run:
    """Run ``govflow ARGS...`` with this test's servers and prefix."""
    servers = {
        "GOVFLOW_REDIS_URL": redis_server_url,
        "GOVFLOW_DATABASE_URL": database_url,
        "GOVFLOW_PREFIX": prefix,
        "GOVFLOW_DATA_DIR": str(tmp_path / "data"),
    }
    return lambda *args, **env: offline(*args, **servers, **env)


def test_version() -> None:
    result = offline("--version")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("govflow ")


def test_shell_completion() -> None:
    # Named, not detected: a CI job has no parent shell for Typer to detect.
    script = offline("--show-completion", "bash", _TYPER_COMPLETE_TEST_DISABLE_SHELL_DETECTION="1")
    assert script.returncode == 0, script.stderr
    assert "_GOVFLOW_COMPLETE" in script.stdout
    words = offline(_GOVFLOW_COMPLETE="complete_bash", COMP_WORDS="govflow wor", COMP_CWORD="1")
    assert words.stdout.split() == ["workflows"]


def test_config_shows_the_effective_settings_with_secrets_masked(tmp_path: Path) -> None:
    env = {
        "GOVFLOW_REDIS_URL": "redis://app:red-Pa55@localhost:6379/0",
        "GOVFLOW_API_TOKENS": "tok-Secret1:read",
        "GOVFLOW_WEBHOOK_SECRET": "hook-Secret2",
        "GOVFLOW_MAX_ATTEMPTS": "7",
        "COLUMNS": "80",
    }
    table = offline("--prefix", "blue", "config", **env)
    as_json = offline("config", "--json", **env)

    assert (table.returncode, as_json.returncode) == (0, 0), table.stderr + as_json.stderr
    for secret in ("red-Pa55", "tok-Secret1", "hook-Secret2"):
        assert secret not in table.stdout + as_json.stdout
    settings = json.loads(as_json.stdout)
    assert settings["redis_url"] == "redis://app:***@localhost:6379/0"
    assert (settings["api_tokens"], settings["webhook_secret"]) == ("***", "***")
    assert (settings["max_attempts"], settings["prefix"], settings["database_url"]) == (
        7,
        "govflow",
        None,
    )
    rows = {line.split()[0]: line.split()[1:] for line in table.stdout.splitlines() if line.strip()}
    assert rows["GOVFLOW_PREFIX"] == ["blue", "--prefix"]
    assert rows["GOVFLOW_MAX_ATTEMPTS"] == ["7", "environment"]
    assert rows["GOVFLOW_BATCH_SIZE"] == ["200", "default"]
    assert max(map(len, table.stdout.splitlines())) <= 80


def test_config_refuses_a_bad_setting() -> None:
    assert "GOVFLOW_MAX_ATTEMPTS" in assert_one_error_line(
        offline("config", GOVFLOW_MAX_ATTEMPTS="many"), 2
    )


def test_validate_applies_nothing_and_needs_no_server(tmp_path: Path) -> None:
    typo = tmp_path / "typo.yaml"
    typo.write_text(TYPO)
    # No URL and a data directory with no embedded server in it: nothing to connect to.
    env = {"GOVFLOW_DATA_DIR": str(tmp_path / "data")}

    good = offline("workflows", "validate", *map(str, EXAMPLES), **env)
    bad = offline("workflows", "validate", str(EXAMPLES[0]), str(typo), **env)

    assert good.returncode == 0, good.stderr
    assert good.stdout.splitlines() == [f"{path}: {path.stem} is valid" for path in EXAMPLES]
    assert bad.returncode == 1
    assert bad.stderr.splitlines() == [
        (
            f"govflow: {typo}: workflow typo, action 1 (create_task), parameter title:"
            " {dta.title}: 'dta' is not a field of the event (did you mean 'data'? fields: id,"
            " type, tenant, entity_id, occurred_at, actor, data, changes, schema_version,"
            " depth, causation_id, root_id, traceparent, tracestate)"
        ),
        (
            f"govflow: {typo}: workflow typo, action 2 (notify), parameter webhook:"
            " 'not a url' is not an http(s) URL with a host"
        ),
    ]
    assert bad.stdout == f"{EXAMPLES[0]}: {EXAMPLES[0].stem} is valid\n"
    assert not (tmp_path / "data").exists()


@pytest.mark.slow
def test_apply_refuses_a_misspelt_template(govflow: Run, tmp_path: Path) -> None:
    typo = tmp_path / "typo.yaml"
    typo.write_text(TYPO.replace('  - notify: {webhook: "not a url"}\n', ""))

    line = assert_one_error_line(govflow("workflows", "apply", str(typo)), 2)

    assert "{dta.title}: 'dta' is not a field of the event" in line
    assert json.loads(govflow("workflows", "list", "--json").stdout) == []
