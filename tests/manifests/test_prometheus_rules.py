"""Prometheus alerting rules: valid for promtool, and every metric they name exists in the code."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.manifests import support as s

RULES_FILE = s.ROOT / "monitoring" / "shopfleet.rules.yml"
REPO = Path(__file__).resolve().parents[2]
CODE_DIRS = ("edge_agent", "fleet_controller", "hardware", "vision", "shopfleet")
SUFFIXES = ("_total", "_bucket", "_sum", "_count", "_created", "_info")


def _defined_metrics() -> set[str]:
    """Return every metric name the code defines (string literals starting with shopfleet_)."""
    names: set[str] = set()
    for d in CODE_DIRS:
        for py in (REPO / d).rglob("*.py"):
            names.update(re.findall(r"[\"'](shopfleet_[a-z0-9_]+)[\"']", py.read_text()))
    return names


def _exposed(name: str) -> set[str]:
    """Return the names prometheus_client exposes for a metric defined as ``name``."""
    base = name.removesuffix("_total")
    return {name, base, *(base + suf for suf in SUFFIXES)}


def _used_metrics() -> set[str]:
    doc = yaml.safe_load(RULES_FILE.read_text())
    used = set()
    for group in doc["groups"]:
        for rule in group["rules"]:
            used.update(re.findall(r"\b(shopfleet_[a-z0-9_]+)\b", rule["expr"]))
    return used


def test_promtool_accepts_the_rules():
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is missing: scripts/install-system-deps.sh installs Debian's 'prometheus' package")
    proc = subprocess.run([promtool, "check", "rules", str(RULES_FILE)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "SUCCESS" in proc.stdout


def test_every_metric_in_the_rules_is_defined_in_the_code():
    exposed = set().union(*(_exposed(n) for n in _defined_metrics()))
    used = _used_metrics()
    assert len(used) >= 10
    missing = sorted(used - exposed)
    assert not missing, f"rules name metrics no code defines: {missing}"


def test_the_cross_check_catches_a_renamed_metric():
    exposed = set().union(*(_exposed(n) for n in _defined_metrics()))
    assert "shopfleet_agent_outbox_depth" in exposed and "shopfleet_agent_outbox_size" not in exposed
    assert "shopfleet_hardware_reconnects_total" in exposed  # Counter("shopfleet_hardware_reconnects") gets _total


def test_every_rule_has_a_severity_and_a_summary():
    doc = yaml.safe_load(RULES_FILE.read_text())
    alerts = [r for g in doc["groups"] for r in g["rules"]]
    for r in alerts:
        assert r["labels"]["severity"] in {"warning", "critical"} and r["annotations"]["summary"]
    assert len({r["alert"] for r in alerts}) == len(alerts)
