"""The operator's per-LLMDeployment PrometheusRule, run through the provisioned promtool.

build_prometheus_rule's output is written as a rule file next to a copy of
tests/promtool/operator/llmdeployment_rule_test.yaml and tested like the chart's
rules: every alert fires in one case and stays silent in another, and no alert
name is also one of the chart's (the same name with other thresholds made two
rules with one identity in Alertmanager).
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from fleetserve_devcluster.tools import ToolMissingError, tool_path
from fleetserve_operator.resources.monitoring import build_prometheus_rule

REPO = Path(__file__).resolve().parents[2]
CHART_ALERTS = REPO / "charts" / "fleetserve" / "files" / "alerts.yaml"
CASES = REPO / "tests" / "promtool" / "operator" / "llmdeployment_rule_test.yaml"
RUNBOOKS = REPO / "docs" / "runbooks.md"


def _promtool() -> Path:
    try:
        return tool_path("promtool")
    except ToolMissingError as exc:
        pytest.fail(str(exc))


def _operator_rules() -> list[dict]:
    obj = build_prometheus_rule("chat", "ml", 8)
    return [rule for group in obj["spec"]["groups"] for rule in group["rules"]]


def _write_rule_dir(tmp_path: Path, rule: dict) -> Path:
    (tmp_path / "llmdeployment_rule.yaml").write_text(yaml.safe_dump({"groups": rule["spec"]["groups"]}))
    shutil.copy(CASES, tmp_path / CASES.name)
    return tmp_path / CASES.name


def _promtool_test(cases: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(_promtool()), "test", "rules", str(cases)], capture_output=True, text=True,
                          timeout=120, cwd=cases.parent)


def test_operator_rule_promtool_cases_pass(tmp_path: Path) -> None:
    result = _promtool_test(_write_rule_dir(tmp_path, build_prometheus_rule("chat", "ml", 8)))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_operator_rule_cases_can_fail(tmp_path: Path) -> None:
    """The old replicas-down expression (silent when every replica is down) fails the cases."""
    rule = build_prometheus_rule("chat", "ml", 8)
    for r in rule["spec"]["groups"][0]["rules"]:
        if r["alert"] == "FleetserveReplicasUnavailable":
            r["expr"] = 'count(up{namespace="ml",service="chat"} == 1) < count(up{namespace="ml",service="chat"})'
    result = _promtool_test(_write_rule_dir(tmp_path, rule))
    assert result.returncode != 0
    assert "every replica down" in result.stdout + result.stderr


def test_every_operator_alert_has_a_firing_and_a_silent_case() -> None:
    fires: set[str] = set()
    silent: set[str] = set()
    for case in yaml.safe_load(CASES.read_text())["tests"]:
        for check in case.get("alert_rule_test", []):
            (fires if check["exp_alerts"] else silent).add(check["alertname"])
    for rule in _operator_rules():
        assert rule["alert"] in fires, f"{rule['alert']} has no promtool case where it fires"
        assert rule["alert"] in silent, f"{rule['alert']} has no promtool case where it must not fire"


def test_operator_and_chart_alert_names_are_distinct() -> None:
    chart = [r["alert"] for g in yaml.safe_load(CHART_ALERTS.read_text())["groups"] for r in g["rules"]]
    operator = [r["alert"] for r in _operator_rules()]
    assert len(operator) == len(set(operator)), f"duplicate alert names in the operator's rule: {operator}"
    shared = sorted(set(chart) & set(operator))
    assert not shared, f"alert names used by both the chart and the operator's per-LLMDeployment rule: {shared}"


def test_every_operator_alert_has_a_runbook_section() -> None:
    headings = {m.group(1).strip() for m in re.finditer(r"^##+\s+(.+)$", RUNBOOKS.read_text(), flags=re.M)}
    for rule in _operator_rules():
        assert rule["alert"] in headings, f"docs/runbooks.md has no section '## {rule['alert']}'"
        assert rule["annotations"]["runbook_url"].endswith("#" + rule["alert"].lower())
