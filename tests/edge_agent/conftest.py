"""Fixtures of the agent tests: an in-process agent factory on this test's broker, and a recorder."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from edge_agent.agent import Agent
from edge_agent.apply.verify import Verifier
from edge_agent.config import validate_config
from edge_agent.facts import SystemFacts
from fleet_controller.rollout.signing import Signer, generate_keypair
from shopfleet.broker import BrokerProcess
from tests.support.inproc import NODE, SHOP
from tests.support.recorder import Recorder


@pytest.fixture
def make_agent(broker: BrokerProcess, tmp_path: Path) -> Iterator[Callable[..., Agent]]:
    agents: list[Agent] = []

    def make(start: bool = True, **kwargs: Any) -> Agent:
        data = {
            "shop": SHOP,
            "node": NODE,
            "broker": {"port": broker.port, "reconnect_min_s": 0.05, "reconnect_max_s": 0.3},
            "heartbeat_interval_s": 30,
            "outbox": {"path": str(tmp_path / f"outbox-{len(agents)}.db"), "synchronous": "normal"},
            "shutdown_timeout_s": 5,
        }
        extra = kwargs.pop("config", {})
        for key, value in extra.items():
            if isinstance(value, dict) and isinstance(data.get(key), dict):
                data[key] = {**data[key], **value}
            else:
                data[key] = value
        agent = Agent(validate_config(data), facts_provider=SystemFacts(probe=False, disk_path=tmp_path), **kwargs)
        agents.append(agent)
        if start:
            agent.start()
            assert agent.wait_connected(10)
        return agent

    yield make
    for a in agents:
        if a.uplink._thread is not None and a.uplink._thread.is_alive():
            a.stop(timeout=2)


@pytest.fixture
def recorder(broker: BrokerProcess) -> Iterator[Recorder]:
    r = Recorder(broker.port)
    yield r
    r.close()


@pytest.fixture
def keys(tmp_path: Path) -> tuple[Signer, Verifier]:
    generate_keypair(tmp_path / "k.pem")
    signer = Signer.from_file(tmp_path / "k.pem")
    return signer, Verifier.from_files([tmp_path / "k.pub"])
