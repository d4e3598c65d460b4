"""The shipped Prometheus alerts: valid, unit-tested by promtool, on metrics the daemons export."""

from __future__ import annotations

import subprocess
from pathlib import Path

import yaml

from tests.support.exported_metrics import (
    PROMETHEUS_SERIES,
    exported_metric_names,
    query_metric_names,
)
from tests.support.project import ROOT

RULES = ROOT / "etc" / "prometheus" / "hostdev-rules.yml"
RULE_TESTS = Path(__file__).with_name("hostdev-rules.test.yml")


def test_rules_pass_promtool_check(promtool: str) -> None:
    """``promtool check rules`` accepts the rules file."""
    result = subprocess.run([promtool, "check", "rules", str(RULES)], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_rules_pass_their_unit_tests(promtool: str) -> None:
    """``promtool test rules``: every alert fires when it should and stays quiet otherwise."""
    result = subprocess.run([promtool, "test", "rules", str(RULE_TESTS)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_alert_has_a_unit_test() -> None:
    """Each alert of the rules file is named by at least one test case."""
    alerts = {rule["alert"] for group in yaml.safe_load(RULES.read_text())["groups"]
              for rule in group["rules"]}
    tested = {case["alertname"] for test in yaml.safe_load(RULE_TESTS.read_text())["tests"]
              for case in test.get("alert_rule_test", ())}
    assert alerts - tested == set()


def test_every_rule_queries_metrics_the_daemons_export() -> None:
    """Each rule's expression names only series a hostdev daemon (or Prometheus) writes."""
    exported = exported_metric_names() | PROMETHEUS_SERIES
    for group in yaml.safe_load(RULES.read_text())["groups"]:
        for rule in group["rules"]:
            names = query_metric_names(rule["expr"])
            assert names, rule["alert"]
            assert names <= exported, f"{rule['alert']}: {sorted(names - exported)} not exported"
