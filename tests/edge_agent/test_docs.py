"""docs/agent.md names every config key, flag and metric of the agent (so it cannot drift)."""

from __future__ import annotations

from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from edge_agent.cli import FLAG_KEYS
from edge_agent.config import AgentConfig, BrokerConfig, MetricsConfig, OutboxConfig, TLSConfig
from edge_agent.metrics import AgentMetrics
from edge_agent.pipelines.process import Config as ProcessConfig
from edge_agent.supervisor import PipelineConfigBase

DOC = (Path(__file__).resolve().parents[2] / "docs" / "agent.md").read_text()

KEYS = (
    [k for k in AgentConfig.model_fields if k not in ("broker", "outbox", "metrics")]
    + [f"broker.{k}" for k in BrokerConfig.model_fields if k != "tls"]
    + [f"broker.tls.{k}" for k in TLSConfig.model_fields]
    + [f"outbox.{k}" for k in OutboxConfig.model_fields]
    + [f"metrics.{k}" for k in MetricsConfig.model_fields]
    + list(PipelineConfigBase.model_fields)
    + list(ProcessConfig.model_fields)
)


@pytest.mark.parametrize("key", sorted(set(KEYS)))
def test_every_config_key_documented(key: str) -> None:
    assert f"`{key}`" in DOC


@pytest.mark.parametrize("flag", sorted(FLAG_KEYS))
def test_every_flag_documented(flag: str) -> None:
    assert f"--{flag.replace('_', '-')}" in DOC


def test_every_metric_documented() -> None:
    registry = CollectorRegistry()
    AgentMetrics(registry).watch_pipelines(lambda: {}, lambda p: {})
    names = {m.name for m in registry.collect()}
    assert names
    for name in names:
        documented = name if f"`{name}`" in DOC else f"{name}_total"
        assert f"`{documented}`" in DOC, name
