"""deploy/grafana and deploy/prometheus: the dashboard imports, the rules are complete, and both
query only the metrics docs/operations.md tables ("Metrics and health"), the dashboard all of them.

The live check against a running daemon's `GET /metrics` uses the same
`tests.deploy_metrics.metric_names_in_deploy`.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from tests.deploy_metrics import (
    ALERTS,
    DASHBOARD,
    alert_rules,
    dashboard_queries,
    iter_panels,
    metric_names_in_deploy,
)

ROOT = Path(__file__).resolve().parent.parent
OPERATIONS = ROOT / "docs" / "operations.md"
PROMETHEUS_CONFIG = ROOT / "deploy" / "prometheus" / "prometheus.yml"
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")
SEVERITIES = {"warning", "critical"}


def tabled_metrics(text: str) -> dict[str, str]:
    """{name: type} from the table of the "## Metrics and health" section (first column's
    backticked name, second column's type)."""
    section = text.split("\n## Metrics and health\n", 1)[1].split("\n## ", 1)[0]
    metrics = {}
    for line in section.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) >= 2 and (match := re.fullmatch(r"`(accelmesh_\w+)`", cells[0])):
            metrics[match.group(1)] = cells[1]
    return metrics


TABLED = tabled_metrics(OPERATIONS.read_text())


def exposed_forms(name: str, kind: str) -> set[str]:
    """The names a tabled metric may be queried by: a histogram's series too."""
    return {name} | ({name + suffix for suffix in HISTOGRAM_SUFFIXES} if kind == "histogram" else set())


ALLOWED = {form: name for name, kind in TABLED.items() for form in exposed_forms(name, kind)}


def load_dashboard() -> dict:
    return json.loads((ROOT / DASHBOARD).read_text())


def load_rules() -> list[dict]:
    return alert_rules(yaml.safe_load((ROOT / ALERTS).read_text()))


def test_the_metrics_table_is_found_and_every_type_is_known():
    assert len(TABLED) >= 10, TABLED
    assert set(TABLED.values()) <= {"counter", "gauge", "histogram"}, TABLED
    assert all(name.endswith("_total") for name, kind in TABLED.items() if kind == "counter")


def test_dashboard_is_json_with_the_datasource_and_instance_variables():
    dashboard = load_dashboard()
    assert 36 <= dashboard["schemaVersion"] <= 41 and dashboard["uid"] and dashboard["title"]
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    instance = variables["instance"]
    assert instance["type"] == "query"
    assert instance["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
    assert instance["definition"] == "label_values(accelmesh_build_info, instance)"
    assert instance["query"]["query"] == instance["definition"]


def test_every_panel_has_a_type_title_place_datasource_and_a_query():
    panels = list(iter_panels(load_dashboard()["panels"]))
    ids = [panel["id"] for panel in panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    queried = [panel for panel in panels if panel["type"] != "row"]
    assert len(queried) >= 15
    for panel in panels:
        assert panel["type"] and panel["title"], panel
        assert set(panel["gridPos"]) == {"x", "y", "w", "h"} and panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24
    for panel in queried:
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        targets = panel["targets"]
        assert targets, panel["title"]
        assert len({t["refId"] for t in targets}) == len(targets), panel["title"]
        for target in targets:
            assert target["datasource"] == panel["datasource"], panel["title"]
            assert target["expr"].strip(), panel["title"]


def test_every_dashboard_query_follows_the_instance_variable():
    for panel in iter_panels(load_dashboard()["panels"]):
        for target in panel.get("targets", []):
            selectors = re.findall(r"accelmesh_\w+(\{[^}]*\})?", target["expr"])
            assert selectors and all('instance=~"$instance"' in s for s in selectors), (panel["title"], target["expr"])


def test_every_alert_rule_has_expr_for_severity_summary_and_description():
    rules = load_rules()
    assert len(rules) >= 8
    names = [rule["alert"] for rule in rules]
    assert len(names) == len(set(names)), names
    for rule in rules:
        assert rule["expr"].strip(), rule["alert"]
        assert re.fullmatch(r"\d+[smh]", rule["for"]), rule["alert"]
        assert rule["labels"]["severity"] in SEVERITIES, rule["alert"]
        assert rule["annotations"]["summary"].strip() and rule["annotations"]["description"].strip(), rule["alert"]


def test_prometheus_example_scrapes_metrics_with_a_bearer_file_and_loads_the_rules():
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    assert config["rule_files"] == ["alerts.yml"] and (PROMETHEUS_CONFIG.parent / "alerts.yml").is_file()
    (job,) = config["scrape_configs"]
    assert job["metrics_path"] == "/metrics"
    assert job["authorization"]["credentials_file"]
    targets = job["static_configs"][0]["targets"]
    assert targets and all(target.endswith(":8400") for target in targets)
    # the target-down alert selects this job by name
    assert any(f'up{{job="{job["job_name"]}"}}' in rule["expr"] for rule in load_rules())


@pytest.mark.parametrize("path", [DASHBOARD, ALERTS])
def test_deploy_files_name_only_tabled_metrics(path):
    names = metric_names_in_deploy(ROOT)[path]
    assert names, path
    assert names <= set(ALLOWED), f"{path} names metrics docs/operations.md does not table: {sorted(names - set(ALLOWED))}"


def test_dashboard_shows_every_tabled_metric():
    used = {ALLOWED[name] for name in metric_names_in_deploy(ROOT)[DASHBOARD] if name in ALLOWED}
    assert set(TABLED) - used == set(), "tabled metrics missing from the dashboard"


def test_metric_names_are_found_in_collapsed_rows_variables_and_block_scalars_as_written(tmp_path):
    dashboard = {
        "panels": [
            {"type": "row", "collapsed": True, "panels": [
                {"type": "timeseries", "targets": [{"expr": 'rate(accelmesh_a_seconds_bucket{x="/accelmesh/1"}[5m])'}]},
            ]},
            {"type": "stat", "targets": [{"expr": "accelmesh_b_total / on() not_accelmesh_c"}]},
        ],
        "templating": {"list": [{"type": "query", "name": "instance",
                                 "query": {"query": "label_values(accelmesh_d, instance)"}}]},
    }
    rules = (
        "groups:\n"
        "  - name: g\n"
        "    rules:\n"
        "      - alert: A\n"
        "        expr: |\n"
        "          sum(rate(accelmesh_e_total[5m]))\n"
        "            / sum(rate(accelmesh_f_sum[5m]))\n"
        "      - alert: B\n"
        "        expr: accelmesh_g == 0\n"
        "        annotations: {summary: accelmesh_not_a_query}\n"
    )
    (tmp_path / DASHBOARD).parent.mkdir(parents=True)
    (tmp_path / DASHBOARD).write_text(json.dumps(dashboard))
    (tmp_path / ALERTS).parent.mkdir(parents=True)
    (tmp_path / ALERTS).write_text(rules)
    assert metric_names_in_deploy(tmp_path) == {
        DASHBOARD: {"accelmesh_a_seconds_bucket", "accelmesh_b_total", "accelmesh_d"},
        ALERTS: {"accelmesh_e_total", "accelmesh_f_sum", "accelmesh_g"},
    }
    assert dashboard_queries(dashboard)[-1] == "label_values(accelmesh_d, instance)"
