"""Prometheus alerting rules: valid for promtool, and every metric they name exists in the code."""

from __future__ import annotations

import yaml

from tests.manifests import support as s
from tests.support.metric_names import exposed_metrics, promtool_check_rules, used_metrics

RULES_FILE = s.ROOT / "monitoring" / "shopfleet.rules.yml"


def _used_metrics() -> set[str]:
    doc = yaml.safe_load(RULES_FILE.read_text())
    return used_metrics(rule["expr"] for group in doc["groups"] for rule in group["rules"])


def test_promtool_accepts_the_rules():
    promtool_check_rules(RULES_FILE)


def test_every_metric_in_the_rules_is_defined_in_the_code():
    exposed = exposed_metrics()
    used = _used_metrics()
    assert len(used) >= 10
    missing = sorted(used - exposed)
    assert not missing, f"rules name metrics no code defines: {missing}"


def test_the_cross_check_catches_a_renamed_metric():
    exposed = exposed_metrics()
    assert "shopfleet_agent_outbox_depth" in exposed and "shopfleet_agent_outbox_size" not in exposed
    assert "shopfleet_hardware_reconnects_total" in exposed  # Counter("shopfleet_hardware_reconnects") gets _total


def test_every_rule_has_a_severity_and_a_summary():
    doc = yaml.safe_load(RULES_FILE.read_text())
    alerts = [r for g in doc["groups"] for r in g["rules"]]
    for r in alerts:
        assert r["labels"]["severity"] in {"warning", "critical"} and r["annotations"]["summary"]
    assert len({r["alert"] for r in alerts}) == len(alerts)
