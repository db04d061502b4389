"""The accelmesh metric names that deploy/'s Grafana dashboard and Prometheus alert rules query.

`metric_names_in_deploy(root)` reads the two files under a checkout's root and returns, per file
(its path relative to root, POSIX style), every name starting with `accelmesh_` that a query
names, exactly as written: a histogram appears as `..._bucket` (or `_sum`, `_count`), a counter
with its `_total`, the way a daemon's `GET /metrics` exposes them. Pure: it only reads the files.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import yaml  # PyYAML: installed with the `hf` extra (transformers, huggingface_hub need it)

__all__ = [
    "ALERTS",
    "DASHBOARD",
    "alert_rules",
    "dashboard_queries",
    "iter_panels",
    "metric_names",
    "metric_names_in_deploy",
]

DASHBOARD = "deploy/grafana/accelmesh.json"
ALERTS = "deploy/prometheus/alerts.yml"

# A PromQL metric name is [a-zA-Z_:][a-zA-Z0-9_:]*; one of ours starts with `accelmesh_` and is not
# the tail of a longer identifier (`x_accelmesh_y`) nor a label value's path (`/accelmesh/...`
# has no underscore after `accelmesh`, so it never matches).
_NAME = re.compile(r"(?<![A-Za-z0-9_:])accelmesh_[A-Za-z0-9_:]*")


def metric_names(expr: str) -> set[str]:
    """Every `accelmesh_*` name in one query, as written."""
    return set(_NAME.findall(expr))


def iter_panels(panels: list[Mapping[str, Any]]) -> Iterator[Mapping[str, Any]]:
    """Every panel, depth first, with the panels a (collapsed) row holds after the row itself."""
    for panel in panels:
        yield panel
        yield from iter_panels(panel.get("panels") or [])


def dashboard_queries(dashboard: Mapping[str, Any]) -> list[str]:
    """Every query a dashboard runs: each panel target's `expr` (rows included) and each query
    template variable's query (`instance` asks `label_values(accelmesh_build_info, instance)`)."""
    queries = [target["expr"] for panel in iter_panels(dashboard.get("panels") or [])
               for target in panel.get("targets") or [] if "expr" in target]
    for variable in (dashboard.get("templating") or {}).get("list") or []:
        if variable.get("type") != "query":
            continue
        query = variable.get("query")
        if isinstance(query, Mapping):
            query = query.get("query")
        queries.extend(q for q in (query, variable.get("definition")) if isinstance(q, str) and q)
    return queries


def alert_rules(rules_file: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    """Every rule of every group in a parsed Prometheus rules file."""
    return [rule for group in rules_file.get("groups") or [] for rule in group.get("rules") or []]


def metric_names_in_deploy(root: Path) -> dict[str, set[str]]:
    """{file relative to root: the `accelmesh_*` names its queries use, exactly as written}."""
    dashboard = json.loads((root / DASHBOARD).read_text())
    rules = yaml.safe_load((root / ALERTS).read_text())
    return {
        DASHBOARD: {name for query in dashboard_queries(dashboard) for name in metric_names(query)},
        ALERTS: {name for rule in alert_rules(rules) for name in metric_names(str(rule.get("expr", "")))},
    }
