"""The whole uplink path for real: agent subprocess -> Mosquitto -> controller -> SQL registry.

The agent is SIGKILLed and the broker restarted while it streams; the controller must end with
every seq of the node's epoch exactly once (dedupe on (node, epoch, seq), no gap), and presence
must follow the Will and the next birth.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from fleet_controller.registry.read import NotFound
from shopfleet.broker import BrokerProcess
from tests.support.agent import NODE, SHOP, AgentProcess
from tests.support.controller import RunningController, controller_settings
from tests.support.wait import wait_for

pytestmark = pytest.mark.slow


@pytest.fixture
def controller(tmp_path: Path, broker: BrokerProcess) -> Iterator[RunningController]:
    # keep every heartbeat, so retention never trims what the test counts
    rc = RunningController(controller_settings(broker, tmp_path, retention={"heartbeats_per_node": 100000}))
    yield rc
    rc.stop()


def node_row(rc: RunningController) -> dict:
    try:
        return rc.service.reader.get_node(SHOP, NODE, history=0).model_dump()
    except NotFound:  # not registered yet
        return {}


def test_every_seq_exactly_once_in_the_registry(tmp_path: Path, broker: BrokerProcess, controller: RunningController) -> None:
    agent = AgentProcess(tmp_path, broker, ticker=True)
    try:
        agent.start()
        wait_for(lambda: node_row(controller).get("watermark", 0) >= 50, 60, "the first 50 messages in the registry")

        broker.stop()  # outage: the agent keeps producing into its outbox
        wait_for(lambda: agent.stored() >= 100, 30, "a backlog during the outage")
        agent.kill()  # killed with the backlog on disk
        broker.start()
        agent.start()
        wait_for(lambda: agent.stored() < 50, 60, "the replay of the backlog")
        agent.kill()  # killed while connected and streaming
        agent.start()
        # The session this run of the agent took, from its own log: the registry's session may still
        # be catching up with the previous run's birth, which must not pass for this one.
        session = wait_for(agent.session, 60, "the restarted agent to connect")
        wait_for(lambda: node_row(controller)["session"] >= session, 60, "the restarted agent's birth")
        before = node_row(controller)["watermark"]
        wait_for(lambda: node_row(controller)["watermark"] >= before + 50, 60, "new messages after the restart")
        assert agent.terminate() == 0, agent.log.read_text()[-3000:]
        epoch, last = agent.meta()
        wait_for(lambda: node_row(controller).get("watermark") == last, 60, f"seq {last} in the registry")
        row = node_row(controller)
        assert row["epoch"] == epoch
        assert row["messages_total"] == last, "each seq stored exactly once"
        assert row["gaps"] == [] and row["missing_total"] == 0
        wait_for(lambda: node_row(controller)["presence"] == "offline", 30, "offline after the graceful stop")
    finally:
        agent.cleanup()
