"""One scrape path per server pod, and the operator's ServiceMonitor feeding the chart's alerts.

Issue 18 point 4: the chart's PodMonitor and the operator's per-LLMDeployment
ServiceMonitors select the same pods, so enabling both scraped every server
twice and doubled every per-model sum in the alerts. The chart now refuses
that combination with an error naming the values to change; the operator's
ServiceMonitor sets the job label the chart's rules select.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import yaml
from fleetserve_devcluster.tools import ToolMissingError, tool_path
from fleetserve_operator.resources.monitoring import build_service_monitor

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "fleetserve"
ONE_LLMD = ["--set", "llmDeployments[0].name=chat", "--set", "llmDeployments[0].model.source=x"]


def _helm(*args: str) -> subprocess.CompletedProcess[str]:
    try:
        helm = tool_path("helm")
    except ToolMissingError as exc:
        pytest.fail(str(exc))
    return subprocess.run([str(helm), "template", "fs", str(CHART), *args], capture_output=True, text=True,
                          timeout=120, cwd=REPO)


def test_pod_monitor_with_operator_service_monitors_is_refused() -> None:
    result = _helm("--set", "monitoring.podMonitor.enabled=true")
    assert result.returncode != 0
    assert "monitoring.podMonitor.enabled=true needs rbac.monitoringChildren=false" in result.stderr
    assert "scrape each pod a second time" in result.stderr


def test_pod_monitor_refuses_a_chart_llmdeployment_that_keeps_its_service_monitor() -> None:
    result = _helm("--set", "monitoring.podMonitor.enabled=true", "--set", "rbac.monitoringChildren=false", *ONE_LLMD)
    assert result.returncode != 0
    assert "llmDeployments chat: with monitoring.podMonitor.enabled=true it must set" in result.stderr


def test_pod_monitor_path_renders_when_exclusive() -> None:
    result = _helm(
        "--set", "monitoring.podMonitor.enabled=true", "--set", "rbac.monitoringChildren=false", *ONE_LLMD,
        "--set", "llmDeployments[0].monitoring.serviceMonitor=false",
        "--set", "llmDeployments[0].monitoring.prometheusRule=false",
    )
    assert result.returncode == 0, result.stderr
    objs = [o for o in yaml.safe_load_all(result.stdout) if o]
    assert [o["kind"] for o in objs].count("PodMonitor") == 1
    (llmd,) = [o for o in objs if o["kind"] == "LLMDeployment"]
    assert llmd["spec"]["monitoring"] == {"serviceMonitor": False, "prometheusRule": False}


def test_default_path_is_the_operator_service_monitor_with_the_alerts_job() -> None:
    result = _helm("--set", "monitoring.prometheusRule.enabled=true")
    assert result.returncode == 0, result.stderr
    kinds = [o["kind"] for o in yaml.safe_load_all(result.stdout) if o]
    assert "PodMonitor" not in kinds
    server_job = yaml.safe_load((CHART / "values.yaml").read_text())["alerts"]["serverJob"]
    endpoint = build_service_monitor("chat", "ml", 15)["spec"]["endpoints"][0]
    assert {"targetLabel": "job", "replacement": server_job} in endpoint["relabelings"]


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("alerts.ttftSLO.targetBucket=3", "/alerts/ttftSLO/targetBucket"),
        ("alerts.provisioning.limit=ten", "/alerts/provisioning/limit"),
        ("alerts.kvCacheEvictions.window=5 minutes", "/alerts/kvCacheEvictions/window"),
    ],
)
def test_schema_rejects_bad_slo_alert_values(value: str, message: str) -> None:
    result = _helm("--set", value)
    assert result.returncode != 0
    assert message in result.stderr, result.stderr
