"""The presence session counts connections, not connection attempts (docs/protocol.md, issue 10 finding 4)."""

from __future__ import annotations

from edge_agent.protocol import Channel, Presence
from shopfleet.broker import BrokerProcess
from tests.support.inproc import uplinks
from tests.support.recorder import Recorder
from tests.support.wait import wait_for


def test_an_outage_with_many_failed_attempts_moves_the_session_by_one(make_agent, broker: BrokerProcess) -> None:
    recorder = Recorder(broker.port, persistent=True)
    try:
        agent = make_agent()
        assert agent.uplink.session == 1
        broker.stop()
        wait_for(lambda: not agent.uplink.connected.is_set(), 10, "the agent to notice the outage")

        def failures() -> float:
            return sum(s.value for m in agent.registry.collect() if m.name == "shopfleet_agent_connect_failures"
                       for s in m.samples if s.name.endswith("_total"))

        wait_for(lambda: failures() >= 5, 20, "several failed connection attempts")
        assert agent.uplink.session == 2  # the number the attempts use, taken once
        broker.start()
        wait_for(agent.uplink.connected.is_set, 20, "the agent to reconnect")
        births = wait_for(
            lambda: [p for p in uplinks(recorder, Channel.PRESENCE) if isinstance(p, Presence) and p.state == "online" and p.session == 2],
            20, "the birth of the second connection",
        )
        assert births and agent.uplink.session == 2
        assert agent.outbox.next_session() == 3  # the persisted counter moved once for the outage too
    finally:
        recorder.close()
