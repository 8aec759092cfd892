"""deploy/monitoring: the alert rules pass promtool's check and their unit tests; the Grafana
dashboard is well formed. That every metric they name is one govflow exports is checked
against real scrapes, in tests/test_metrics.py.

promtool is Debian's ``prometheus`` package (.ci/run installs it): never skipped.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
MONITORING = ROOT / "deploy" / "monitoring"
ALERTS = MONITORING / "alerts.yml"
ALERTS_TEST = MONITORING / "alerts_test.yml"
DASHBOARD = MONITORING / "grafana-dashboard.json"
METRIC = re.compile(r"\bgovflow_[a-z0-9_]+\b")


def promtool(*args: str, stdin: bytes | None = None, cwd: Path = ROOT) -> str:
    """Run promtool; fail (never skip) when it is missing or says no."""
    binary = shutil.which("promtool")
    assert binary is not None, "promtool is missing: apt-get install prometheus (see .ci/run)"
    result = subprocess.run(
        [binary, *args], input=stdin, capture_output=True, cwd=cwd, timeout=60, check=False
    )
    output = (result.stdout + result.stderr).decode(errors="replace")
    assert result.returncode == 0, f"promtool {' '.join(args)}:\n{output}"
    return output


def alert_rules() -> list[dict[str, Any]]:
    rules: list[dict[str, Any]] = [
        rule for group in yaml.safe_load(ALERTS.read_text())["groups"] for rule in group["rules"]
    ]
    return rules


def dashboard() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return loaded


def dashboard_exprs() -> list[str]:
    return [t["expr"] for p in dashboard()["panels"] for t in p.get("targets", [])]


def referenced_metrics() -> set[str]:
    """Every govflow metric (a sample name) the rules and the dashboard query."""
    exprs = [rule["expr"] for rule in alert_rules()] + dashboard_exprs()
    return {name for expr in exprs for name in METRIC.findall(expr)}


def test_the_alert_rules_pass_promtool_check_and_their_unit_tests() -> None:
    assert "SUCCESS: 8 rules found" in promtool("check", "rules", str(ALERTS))
    assert "SUCCESS" in promtool("test", "rules", ALERTS_TEST.name, cwd=MONITORING)


def test_every_alert_is_unit_tested_and_says_how_bad_it_is() -> None:
    tested = {
        case["alertname"]
        for test in yaml.safe_load(ALERTS_TEST.read_text())["tests"]
        for case in test.get("alert_rule_test", [])
        if case["exp_alerts"]  # fires in at least one case
    }
    for rule in alert_rules():
        assert rule["alert"] in tested, f"{rule['alert']} never fires in alerts_test.yml"
        assert rule["labels"]["severity"] in ("warning", "critical"), rule["alert"]
        assert {"summary", "description"} <= set(rule["annotations"]), rule["alert"]


def test_the_dashboard_is_a_grafana_dashboard_on_a_prometheus_variable() -> None:
    board = dashboard()
    assert board["uid"] == "govflow"
    (variable,) = board["templating"]["list"]
    assert (variable["name"], variable["type"], variable["query"]) == (
        "datasource",
        "datasource",
        "prometheus",
    )
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids))
    for panel in board["panels"]:
        pos = panel["gridPos"]
        assert pos["x"] >= 0, panel["title"]
        assert pos["x"] + pos["w"] <= 24, panel["title"]
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert METRIC.search(target["expr"]), (panel["title"], target["expr"])
    # What the rules alert on is on the board too.
    charted = {name for expr in dashboard_exprs() for name in METRIC.findall(expr)}
    alerted = {name for rule in alert_rules() for name in METRIC.findall(rule["expr"])}
    assert alerted <= charted, alerted - charted
