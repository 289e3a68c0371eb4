"""The in-process agent tests' node and a reader of what it sent, validated as the controller does."""

from __future__ import annotations

from typing import Any

from edge_agent.agent import Agent
from edge_agent.protocol import Topics, parse_message
from tests.support.recorder import Recorder

SHOP, NODE = "shop-a", "pi-1"


def uplinks(rec: Recorder, channel: str) -> list[Any]:
    topic = Topics.node(SHOP, NODE, channel) if channel != "state/reported" else Topics.reported(SHOP, NODE)
    with rec._lock:
        msgs = [(t, p) for t, p, _ in rec.messages if t == topic]
    return [parse_message(t, p) for t, p in msgs]  # validated exactly as the controller does


def sample(agent: Agent, metric: str, **labels: str) -> float:
    return agent.registry.get_sample_value(metric, labels) or 0.0
