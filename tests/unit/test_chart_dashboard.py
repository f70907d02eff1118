"""The Grafana dashboard: valid JSON, templated by namespace and model, every query valid PromQL
over metric names the server and operator really export."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest
import yaml
from fleetserve_devcluster.tools import ToolMissingError, tool_path
from metrics_contract import exported_metric_names, metric_names_in, unknown_metric_names

REPO = Path(__file__).resolve().parents[2]
DASHBOARD = REPO / "charts" / "fleetserve" / "files" / "dashboards" / "fleetserve.json"


def _dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def _queries() -> list[tuple[str, str]]:
    """(panel title, expr) of every query in the dashboard."""
    return [
        (panel["title"], target["expr"])
        for panel in _dashboard()["panels"]
        for target in panel.get("targets", [])
    ]


def test_dashboard_is_templated_by_namespace_and_model() -> None:
    dash = _dashboard()
    assert dash["uid"] and dash["title"]
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert {"datasource", "namespace", "model"} <= set(variables)
    assert variables["datasource"]["query"] == "prometheus"
    for title, expr in _queries():
        if "fleetserve_operator_" in expr or "fleetserve_router_" in expr:  # no model label on these
            assert 'namespace=~"$namespace"' in expr, title
        else:
            assert 'namespace=~"$namespace"' in expr and 'model=~"$model"' in expr, f"{title}: {expr}"


def test_panels_have_unique_ids_and_fit_the_grid() -> None:
    panels = _dashboard()["panels"]
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids))
    for panel in panels:
        pos = panel["gridPos"]
        assert 0 <= pos["x"] and pos["x"] + pos["w"] <= 24, panel["title"]
        if panel["type"] != "row":
            assert panel["targets"], f"panel {panel['title']!r} has no query"
            assert panel["datasource"]["uid"] == "${datasource}"


def test_every_query_reads_exported_metrics() -> None:
    exported = exported_metric_names()
    problems = {}
    for title, expr in _queries():
        unknown = unknown_metric_names(expr, exported)
        if unknown:
            problems[title] = sorted(unknown)
    for var in _dashboard()["templating"]["list"]:
        if var["type"] == "query":
            unknown = unknown_metric_names(var["query"]["query"], exported)
            if unknown:
                problems[f"variable {var['name']}"] = sorted(unknown)
    assert not problems, f"queries read metrics that no fleetserve code exports: {problems}"


def test_dashboard_shows_what_the_issue_lists() -> None:
    read = set().union(*(metric_names_in(expr) for _, expr in _queries()))
    wanted = {
        "fleetserve_generation_tokens_total",          # throughput (tokens/s)
        "fleetserve_requests_total",                   # requests/s
        "fleetserve_time_to_first_token_seconds_bucket",
        "fleetserve_time_per_output_token_seconds_bucket",
        "fleetserve_e2e_request_latency_seconds_bucket",
        "fleetserve_requests_waiting", "fleetserve_requests_running",
        "fleetserve_kv_cache_usage_ratio", "fleetserve_kv_cache_capacity_tokens",
        "fleetserve_prefix_cache_hits_total", "fleetserve_prefix_cache_queries_total",
        "fleetserve_kv_cache_evictions_total",         # by reason
        "fleetserve_preemptions_total",
        "fleetserve_batch_size_bucket",
        "fleetserve_operator_desired_replicas", "fleetserve_operator_ready_replicas",
        "fleetserve_operator_scale_events_total",
    }
    assert wanted <= read, f"missing from the dashboard: {sorted(wanted - read)}"
    percentiles = {re.search(r"histogram_quantile\((0\.\d+)", e).group(1) for _, e in _queries() if "quantile" in e}
    assert {"0.5", "0.99"} <= percentiles


def test_every_query_is_valid_promql(tmp_path: Path) -> None:
    """promtool parses each query (as a recording rule, with Grafana's variables filled in)."""
    try:
        promtool = tool_path("promtool")
    except ToolMissingError as exc:
        pytest.fail(str(exc))
    rules = []
    for i, (_, expr) in enumerate(_queries()):
        concrete = expr.replace("$__rate_interval", "1m")
        for var in ("namespace", "model", "llmdeployment"):
            concrete = concrete.replace(f"${var}", ".*")
        rules.append({"record": f"dashboard:query_{i}", "expr": concrete})
    path = tmp_path / "dashboard-queries.yaml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = subprocess.run([str(promtool), "check", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
