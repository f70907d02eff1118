"""The metric names fleetserve really exports, read from the code that exports them.

The contract (ARCHITECTURE.md "Server metrics", the operator issues) is
implemented in ``server/fleetserve_server/metrics.py`` and the operator's
prometheus_client metrics; the dashboard and the alert tests check their
queries against the names found there, so a renamed metric breaks the test
instead of silently blanking a panel or an alert.
"""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SERVER_METRICS = REPO / "server" / "fleetserve_server" / "metrics.py"
OPERATOR_PACKAGE = REPO / "operator" / "fleetserve_operator"
ROUTER_METRICS = REPO / "router" / "fleetserve_router" / "metrics.py"

# A metric name as a Python string literal in the exporting code.
_LITERAL = re.compile(r"""["']((?:fleetserve_|vllm:)[a-z0-9_:]+)["']""")
# A metric name inside a PromQL expression.
_IN_QUERY = re.compile(r"(?<![\w:])((?:fleetserve_|vllm:)[a-z0-9_:]+)")
# (prometheus_client adds `_total` to a Counter declared without it, as the router's are.)
_SERIES_SUFFIXES = ("_bucket", "_sum", "_count", "_total")
# Series Prometheus itself creates for every target.
PROMETHEUS_BUILTINS = {"up", "scrape_duration_seconds", "scrape_samples_scraped"}


def exported_metric_names() -> dict[str, Path]:
    """Every `fleetserve_*`/`vllm:*` name the server and operator code declares -> the file declaring it."""
    files = [SERVER_METRICS, ROUTER_METRICS, *sorted(OPERATOR_PACKAGE.rglob("*.py"))]
    names: dict[str, Path] = {}
    for path in files:
        if path.exists():
            for name in _LITERAL.findall(path.read_text()):
                names.setdefault(name, path)
    return names


def metric_names_in(expr: str) -> set[str]:
    """The fleetserve metric names a PromQL expression reads."""
    return set(_IN_QUERY.findall(expr))


def unknown_metric_names(expr: str, exported: dict[str, Path]) -> set[str]:
    """Names in `expr` that no code exports (histogram `_bucket`/`_sum`/`_count` series count as their family)."""
    unknown = set()
    for name in metric_names_in(expr):
        if name in exported:
            continue
        if any(name.endswith(s) and name[: -len(s)] in exported for s in _SERIES_SUFFIXES):
            continue
        unknown.add(name)
    return unknown
