"""The Grafana dashboard's PromQL, as Grafana would send it: every panel target's expression and every
template variable query, with the variables resolved and substituted (tests/e2e/test_monitoring_fleet.py
evaluates them against the dev cluster's real Prometheus)."""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DASHBOARD = Path(__file__).resolve().parents[2] / "charts" / "fleetserve" / "files" / "dashboards" / "fleetserve.json"

# Grafana's $__rate_interval is max($__interval + scrape interval, 4 x scrape interval), with the data
# source's scrape interval setting (15 s unless set): 1 m on any range under a few hours.
RATE_INTERVAL = "1m"

_LABEL_VALUES = re.compile(r"^label_values\((?:(?P<selector>.+),\s*)?(?P<label>[a-zA-Z_][a-zA-Z0-9_]*)\)$")


@dataclass(frozen=True)
class Target:
    panel: str
    ref_id: str
    expr: str


def load(path: Path = DASHBOARD) -> dict[str, Any]:
    return json.loads(path.read_text())


def targets(dashboard: dict[str, Any]) -> Iterator[Target]:
    """Every query target of every panel, rows' collapsed panels included."""
    def walk(panels: list[dict[str, Any]]) -> Iterator[Target]:
        for panel in panels:
            yield from walk(panel.get("panels", []))
            for t in panel.get("targets", []):
                if t.get("expr"):
                    yield Target(panel.get("title", f"panel {panel.get('id')}"), t.get("refId", "?"), t["expr"])
    yield from walk(dashboard.get("panels", []))


def query_variables(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    """The `query` template variables, in dashboard order (a later one may use an earlier one)."""
    return [v for v in dashboard.get("templating", {}).get("list", []) if v.get("type") == "query"]


def variable_query(variable: dict[str, Any]) -> str:
    query = variable.get("query")
    return query["query"] if isinstance(query, dict) else str(query)


def regex_escape(value: str) -> str:
    """Grafana's Prometheus data source escaping of a value put into a regex matcher: each regex
    metacharacter gets a backslash, doubled because it sits in a PromQL string."""
    return re.sub(r"[\\^$*+?.()|\[\]{}/]", lambda m: "\\\\" + m.group(0), value)


def substitute(expr: str, values: dict[str, str]) -> str:
    """Grafana's interpolation of one selected value per variable (regex-escaped: the dashboard uses
    every variable inside =~), and of $__rate_interval."""
    out = expr.replace("$__rate_interval", RATE_INTERVAL).replace("${__rate_interval}", RATE_INTERVAL)
    for name in sorted(values, key=len, reverse=True):  # a longer name first: $model before $mod
        value = regex_escape(values[name])
        out = out.replace(f"${{{name}}}", value).replace(f"${name}", value)
    leftover = re.search(r"\$\{?[A-Za-z_]\w*", out)
    if leftover:
        raise ValueError(f"unresolved variable {leftover.group(0)} in {out}")
    return out


def resolve_variables(dashboard: dict[str, Any], label_values: Callable[[str | None, str], list[str]],
                      choose: Callable[[str, list[str]], str]) -> dict[str, str]:
    """Evaluate each query variable's label_values(selector, label) in order, substituting the values
    chosen so far; ``choose(name, values)`` picks the one value to use (a ValueError if none)."""
    chosen: dict[str, str] = {}
    for variable in query_variables(dashboard):
        m = _LABEL_VALUES.match(variable_query(variable).strip())
        if not m:
            raise ValueError(f"variable {variable['name']}: not a label_values() query: {variable_query(variable)}")
        selector = substitute(m["selector"], chosen) if m["selector"] else None
        chosen[variable["name"]] = choose(variable["name"], label_values(selector, m["label"]))
    return chosen
