"""Metric names as the tests cross-check them: which ones the code defines, which ones a PromQL text uses.

The Prometheus rules (manifests/monitoring, docs/prometheus) and the Grafana dashboard name
metrics by the names Prometheus scrapes; the code defines them by the names given to
prometheus_client. Both tests of those files (tests/manifests/test_prometheus_rules.py,
tests/fleet_controller/test_series.py) compare the two sets through these helpers, and check the
rule files with promtool.
"""

from __future__ import annotations

import functools
import re
import shutil
import subprocess
from collections.abc import Iterable
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CODE_PACKAGES = ("edge_agent", "fleet_controller", "hardware", "vision", "shopfleet")
METRIC_RE = re.compile(r"\bshopfleet_[a-z0-9_]+\b")
"""A shopfleet metric name in PromQL (or any text)."""
SUFFIXES = ("_total", "_bucket", "_sum", "_count", "_created", "_info")
"""What prometheus_client appends to a metric's name on exposition (counter, histogram/summary, info)."""


@functools.cache
def defined_metrics() -> frozenset[str]:
    """Every metric name the code defines: the string literals starting with ``shopfleet_`` in its packages."""
    names: set[str] = set()
    for pkg in CODE_PACKAGES:
        for py in (ROOT / pkg).rglob("*.py"):
            names.update(re.findall(r"[\"'](shopfleet_[a-z0-9_]+)[\"']", py.read_text()))
    return frozenset(names)


def exposed(name: str) -> set[str]:
    """The names prometheus_client may expose for a metric defined as ``name`` (a counter's _total is optional)."""
    base = name.removesuffix("_total")
    return {name, base, *(base + suf for suf in SUFFIXES)}


def exposed_metrics() -> set[str]:
    """Every name a scrape of shopfleet's components may show."""
    return set().union(*(exposed(n) for n in defined_metrics()))


def used_metrics(texts: Iterable[str]) -> set[str]:
    """The shopfleet metric names that PromQL expressions (or other texts) name."""
    return {m for t in texts for m in METRIC_RE.findall(t)}


def promtool_check_rules(path: Path) -> None:
    """Run ``promtool check rules`` on ``path`` and assert it succeeds; skip, saying how to install it, without promtool."""
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is missing: scripts/install-system-deps.sh installs Debian's 'prometheus' package")
    proc = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "SUCCESS" in proc.stdout
