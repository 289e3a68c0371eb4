"""Every metric any component defines is named in docs/ (an operator looks a metric up there)."""

from __future__ import annotations

from tests.support.metric_names import CODE_PACKAGES, ROOT, defined_metrics

NOT_METRICS = {"shopfleet_request_actor"}
"""String literals that look like metric names and are not: a context variable's name (registry/audit.py)."""


def test_every_defined_metric_is_documented() -> None:
    docs = "\n".join(p.read_text() for p in (ROOT / "docs").rglob("*.md"))
    names = defined_metrics() - NOT_METRICS
    assert len(names) > 100, "the scan found too few metrics: has the code moved?"
    missing = sorted(n for n in names if n not in docs)
    assert not missing, f"metrics without a line in docs/: {missing}; add each to its component's metrics table"


def test_the_exceptions_are_still_not_metrics() -> None:
    # An exception that became a real metric must be documented like the others.
    for name in NOT_METRICS:
        uses = [p for pkg in CODE_PACKAGES for p in (ROOT / pkg).rglob("*.py") if f'"{name}"' in p.read_text()]
        assert uses and all("ContextVar" in p.read_text() for p in uses), (name, uses)
