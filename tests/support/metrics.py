"""Reading Prometheus samples in tests, from a registry passed in (every component takes one)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry


def metric(registry: CollectorRegistry, name: str, **labels: str) -> float:
    """Return a sample's value (0 when absent)."""
    return registry.get_sample_value(name, labels) or 0.0
