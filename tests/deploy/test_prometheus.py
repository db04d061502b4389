"""deploy/prometheus: the example configuration and the alert rules pass promtool, Prometheus' own
checker (the rules also through docs/operations.md's example command, tests/deploy/test_docs.py)."""

from __future__ import annotations

import shutil

import yaml

from tests.deploy._tools import DEPLOY, run, tool

PROMETHEUS = DEPLOY / "prometheus"


def test_alert_rules_pass_promtool_check_rules():
    out = run([tool("promtool"), "check", "rules", str(PROMETHEUS / "alerts.yml")])
    rules = sum(len(group["rules"]) for group in yaml.safe_load((PROMETHEUS / "alerts.yml").read_text())["groups"])
    assert out.returncode == 0 and f"SUCCESS: {rules} rules found" in out.stdout, out.stdout + out.stderr


def test_promtool_fails_a_rule_with_a_bad_expression(tmp_path):
    bad = tmp_path / "alerts.yml"
    bad.write_text((PROMETHEUS / "alerts.yml").read_text().replace("accelmesh_ready == 0", "accelmesh_ready == = 0"))
    out = run([tool("promtool"), "check", "rules", str(bad)])
    assert out.returncode != 0, out.stdout


def test_example_configuration_passes_promtool_check_config(tmp_path):
    """With its credentials file present (promtool checks that it exists) and alerts.yml beside it."""
    key = tmp_path / "accelmesh-api-key"
    key.write_text("k" * 32 + "\n")
    config = (PROMETHEUS / "prometheus.yml").read_text()
    assert "/etc/prometheus/accelmesh-api-key" in config
    (tmp_path / "prometheus.yml").write_text(config.replace("/etc/prometheus/accelmesh-api-key", str(key)))
    shutil.copy(PROMETHEUS / "alerts.yml", tmp_path / "alerts.yml")
    out = run([tool("promtool"), "check", "config", str(tmp_path / "prometheus.yml")])
    assert out.returncode == 0 and "SUCCESS" in out.stdout + out.stderr, out.stdout + out.stderr
