"""The fleetserve alert rules: promtool unit tests, rule syntax, and one source for both files.

Runs the provisioned promtool and helm (``make install``); a missing tool is a
failure with the install hint, never a skip, so `make test` cannot pass
without having run every promtool case.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from fleetserve_devcluster.tools import ToolMissingError, tool_path

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "fleetserve"
ALERTS_FILE = CHART / "files" / "alerts.yaml"
PROMTOOL_TESTS = sorted((REPO / "tests" / "promtool").glob("*.yaml"))
RUNBOOKS = REPO / "docs" / "runbooks.md"

sys.path.insert(0, str(REPO / "hack"))
from render_alerts import render_alerts  # noqa: E402


def _tool(name: str) -> Path:
    try:
        return tool_path(name)
    except ToolMissingError as exc:
        pytest.fail(str(exc))


def _rules() -> list[dict]:
    groups = yaml.safe_load(ALERTS_FILE.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"]]


def _alert_names() -> list[str]:
    return [rule["alert"] for rule in _rules()]


def _run(cmd: list[str | Path], cwd: Path = REPO) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(c) for c in cmd], cwd=cwd, capture_output=True, text=True, timeout=120)


def _render_prometheusrule(tmp_path: Path, *set_values: str) -> dict:
    cmd: list[str | Path] = [
        _tool("helm"), "template", "fleetserve", CHART,
        "--set", "monitoring.prometheusRule.enabled=true",
        "--show-only", "templates/prometheusrule.yaml",
    ]
    for value in set_values:
        cmd += ["--set-json", value] if re.search(r"=[0-9.]+$", value) else ["--set", value]
    result = _run(cmd)
    assert result.returncode == 0, result.stderr
    return yaml.safe_load(result.stdout)


def test_every_issue_alert_exists() -> None:
    # The alerts issue 8 asks for, by what they watch.
    expected = {
        "FleetserveKVCacheNearlyFull", "FleetserveQueueBacklog", "FleetservePreemptionsRising",
        "FleetserveTimeToFirstTokenHigh", "FleetserveFleetAtMaxReplicas", "FleetserveReplicasNotReady",
        "FleetserveMemoryDoesNotFit", "FleetserveOperatorScrapeErrors", "FleetserveOperatorReconcileErrors",
        "FleetserveServerTargetDown", "FleetserveOperatorDown",
        # issue 18 point 5: serving-SLO alerts
        "FleetserveTTFTBudgetBurnFast", "FleetserveTTFTBudgetBurnSlow", "FleetserveKVCacheEvictionsRising",
        "FleetserveAutoscalerPinnedQueueGrowing", "FleetserveProvisioningTooSlow",
        # issue 16 point 2: requests held by the router with no ready replica
        "FleetserveRequestsHeldTooLong",
        # issue 22 point 1: the outputs drift from their own level a day earlier
        "FleetserveOutputLogprobDrift", "FleetserveOutputEntropyDrift",
    }
    names = _alert_names()
    assert len(names) == len(set(names)), f"duplicate alert names: {names}"
    assert set(names) == expected


def test_promtool_unit_tests_pass() -> None:
    assert PROMTOOL_TESTS, "no promtool test files under tests/promtool/"
    result = _run([_tool("promtool"), "test", "rules", *PROMTOOL_TESTS])
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_every_alert_has_a_firing_and_a_silent_case() -> None:
    fires: dict[str, list[dict]] = {}
    silent: dict[str, int] = {}
    for path in PROMTOOL_TESTS:
        doc = yaml.safe_load(path.read_text())
        rule_files = [(path.parent / f).resolve() for f in doc["rule_files"]]
        assert rule_files == [ALERTS_FILE.resolve()], f"{path} must test {ALERTS_FILE}"
        for case in doc["tests"]:
            assert case.get("input_series"), f"{path}: case {case['name']!r} has no input series"
            for check in case.get("alert_rule_test", []):
                if check["exp_alerts"]:
                    fires.setdefault(check["alertname"], []).extend(check["exp_alerts"])
                else:
                    silent[check["alertname"]] = silent.get(check["alertname"], 0) + 1
    for name in _alert_names():
        assert name in fires, f"{name} has no promtool case where it fires"
        assert name in silent, f"{name} has no promtool case where it must not fire"
        for alert in fires[name]:
            assert "severity" in alert["exp_labels"], f"{name}: the firing case must check the severity label"
            assert set(alert["exp_annotations"]) == {"summary", "description", "runbook_url"}, name


def test_promtool_cases_can_fail(tmp_path: Path) -> None:
    """A rule that drifts from its tested behaviour (threshold 0.9 -> 0.99) makes promtool fail."""
    mutated = ALERTS_FILE.read_text().replace(
        "(fleetserve_kv_cache_usage_ratio) > 0.9", "(fleetserve_kv_cache_usage_ratio) > 0.99"
    )
    assert mutated != ALERTS_FILE.read_text()
    rules = tmp_path / "alerts.yaml"
    rules.write_text(mutated)
    for path in PROMTOOL_TESTS:
        doc = yaml.safe_load(path.read_text())
        doc["rule_files"] = [str(rules)]
        (tmp_path / path.name).write_text(yaml.safe_dump(doc, sort_keys=False))
    result = _run([_tool("promtool"), "test", "rules", *sorted(tmp_path.glob("*_test.yaml"))])
    assert result.returncode != 0
    assert "FleetserveKVCacheNearlyFull" in result.stdout + result.stderr


def test_promtool_check_rules_plain_file() -> None:
    result = _run([_tool("promtool"), "check", "rules", ALERTS_FILE])
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(_alert_names())} rules found" in result.stdout


def test_promtool_check_rules_of_rendered_prometheusrule(tmp_path: Path) -> None:
    obj = _render_prometheusrule(tmp_path)
    assert obj["kind"] == "PrometheusRule" and obj["apiVersion"] == "monitoring.coreos.com/v1"
    extracted = tmp_path / "prometheusrule-rules.yaml"
    extracted.write_text(yaml.safe_dump({"groups": obj["spec"]["groups"]}, sort_keys=False))
    result = _run([_tool("promtool"), "check", "rules", extracted])
    assert result.returncode == 0, result.stdout + result.stderr


def test_plain_file_is_the_chart_rules_with_default_values(tmp_path: Path) -> None:
    assert ALERTS_FILE.read_text() == render_alerts(_tool("helm")), (
        f"{ALERTS_FILE.relative_to(REPO)} differs from the chart's PrometheusRule; run hack/render_alerts.py"
    )
    rendered = _render_prometheusrule(tmp_path)["spec"]["groups"]
    assert rendered == yaml.safe_load(ALERTS_FILE.read_text())["groups"]


def test_thresholds_and_jobs_come_from_values(tmp_path: Path) -> None:
    obj = _render_prometheusrule(
        tmp_path,
        "alerts.kvCacheNearlyFull.threshold=0.8",  # sent with --set-json: --set makes floats strings
        "alerts.kvCacheNearlyFull.for=2m",
        "alerts.queueBacklog.threshold=25",
        "alerts.ttftP99.thresholdSeconds=1.5",
        "alerts.serverJob=llm-servers",
        "alerts.operatorJob=llm-operator",
    )
    rules = {r["alert"]: r for g in obj["spec"]["groups"] for r in g["rules"]}
    kv = rules["FleetserveKVCacheNearlyFull"]
    assert kv["expr"].endswith("> 0.8") and kv["for"] == "2m"
    assert "above 80% for 2m" in kv["annotations"]["description"]
    assert rules["FleetserveQueueBacklog"]["expr"].endswith("> 25")
    assert rules["FleetserveTimeToFirstTokenHigh"]["expr"].endswith("> 1.5")
    assert rules["FleetserveServerTargetDown"]["expr"] == 'up{job="llm-servers"} == 0'
    assert rules["FleetserveOperatorDown"]["expr"] == 'absent(up{job="llm-operator"} == 1)'


def test_every_alert_has_a_runbook_section() -> None:
    text = RUNBOOKS.read_text()
    headings = {m.group(1).strip() for m in re.finditer(r"^##+\s+(.+)$", text, flags=re.M)}
    for rule in _rules():
        name = rule["alert"]
        assert name in headings, f"docs/runbooks.md has no section '## {name}'"
        anchor = rule["annotations"]["runbook_url"].rsplit("#", 1)[1]
        assert anchor == name.lower(), f"{name}: runbook_url anchor {anchor!r} is not the section's anchor"
        assert rule["labels"]["severity"] in {"warning", "critical"}
        # The description must name what is affected, with the label values Prometheus fills in.
        assert "$labels." in rule["annotations"]["description"] or name == "FleetserveOperatorDown", name


def test_alerts_read_exported_metrics() -> None:
    from metrics_contract import PROMETHEUS_BUILTINS, exported_metric_names, unknown_metric_names

    exported = exported_metric_names()
    problems = {}
    for rule in _rules():
        unknown = unknown_metric_names(rule["expr"], exported)
        if unknown:
            problems[rule["alert"]] = sorted(unknown)
        # Every alert reads at least one fleetserve series or a Prometheus target series.
        assert "fleetserve_" in rule["expr"] or any(b in rule["expr"] for b in PROMETHEUS_BUILTINS), rule["alert"]
    assert not problems, f"alerts read metrics that no fleetserve code exports: {problems}"
